# %% [markdown]
# # Merge LoRAs into one LoRA, from Python
#
# Notebook-style (`# %%` cells run in VS Code / Jupyter, or `python examples/merge_into_lora.py`).
# Builds a tiny base model and three PEFT adapters, merges them into **one adapter** with
# TIES in core space, checks it against the merged model, then cuts it to rank 8.

# %%
import os
import tempfile

import torch
from peft import PeftModel

from mergekit_corespace import merge_adapters, toy

work = tempfile.mkdtemp(prefix="merge-into-lora-")
base = toy.save_tiny_model(os.path.join(work, "base"), "llama")
adapters = {
    toy.save_lora_adapter(base, os.path.join(work, name), r=r, seed=seed): weight
    for name, r, seed, weight in (("math", 8, 1, 1.0), ("code", 16, 2, 0.7), ("chat", 4, 3, 0.5))
}

# %% One merged adapter: exact, rank Σ rₜ = 28 where all three adapters touch a module
merged_lora = merge_adapters(
    base,
    adapters,
    method="ties",
    out=os.path.join(work, "merged-lora"),
    density=0.7,
    **{"lambda": 1.0},
)
print(sorted(os.listdir(merged_lora)))

# %% The same merge as a full model, for comparison
merged_model = merge_adapters(
    base,
    adapters,
    method="ties",
    out=os.path.join(work, "merged-model"),
    as_adapter=False,
    density=0.7,
    options={"copy_tokenizer": False},
)

tokens = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    via_adapter = PeftModel.from_pretrained(toy.load_model(base), merged_lora)(tokens).logits
    via_model = toy.load_model(merged_model)(tokens).logits
print(
    f"max |logits(base + merged LoRA) - logits(merged model)| = "
    f"{(via_adapter - via_model).abs().max():.2e}"
)

# %% A smaller adapter: keep rank 8 per module (the best rank-8 cut of each merged delta)
small = merge_adapters(
    base, adapters, method="ties", out=os.path.join(work, "merged-lora-r8"), rank=8, density=0.7
)
for path in (merged_lora, small):
    size = os.path.getsize(os.path.join(path, "adapter_model.safetensors"))
    print(f"{os.path.basename(path):16s} {size / 1024:6.1f} KiB")
