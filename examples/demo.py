"""Demo: merge three real PEFT LoRA adapters of one Llama-style model with plain `mergekit-yaml`.

1. builds a small Llama-architecture model (random weights, a word-level tokenizer) in HF format;
2. trains three LoRA adapters with PEFT for a few steps, each on its own toy "task";
3. writes a mergekit YAML with `merge_method: core_space` and runs `mergekit-yaml` on it;
4. loads the result with `AutoModelForCausalLM.from_pretrained` and prints its largest deviation
   from PEFT's own merge (W + Σ_t w_t ΔW_t, each ΔW_t from `merge_and_unload`).

Everything is built on the fly; nothing is downloaded. Run: `python examples/demo.py [WORKDIR]`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

WORDS = [f"w{i}" for i in range(120)]
TASKS = {  # adapter name -> (merge weight, LoRA rank, the toy task it learns)
    "count": (1.0, 8, lambda xs: [(x + 1) % len(WORDS) for x in xs]),
    "mirror": (1.0, 16, lambda xs: list(reversed(xs))),
    "double": (0.5, 4, lambda xs: [(2 * x) % len(WORDS) for x in xs]),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(path: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {word: i for i, word in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)


def task_batch(task, generator: torch.Generator, size: int = 32, length: int = 6):
    """Sequences `x y` with y = task(x); the loss is on y only: continue x with y."""
    prompts = torch.randint(0, 24, (size, length), generator=generator).tolist()
    input_ids = torch.tensor([x + task(x) for x in prompts]) + 3  # skip the special tokens
    labels = input_ids.clone()
    labels[:, :length] = -100
    return input_ids, labels


def train_adapter(base: str, path: str, rank: int, task, steps: int = 60) -> tuple[float, float]:
    torch.manual_seed(rank)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    generator = torch.Generator().manual_seed(rank)
    losses = []
    for _ in range(steps):
        input_ids, labels = task_batch(task, generator)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.save_pretrained(path)
    return losses[0], losses[-1]


def peft_merge(base: str, adapters: dict[str, tuple[str, float]]) -> dict[str, torch.Tensor]:
    """The oracle: W + Σ_t w_t ΔW_t with every ΔW_t from PEFT's merge_and_unload (float64)."""
    expected = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64).state_dict()
    base_weights = {name: tensor.clone() for name, tensor in expected.items()}
    for path, weight in adapters.values():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
        merged = PeftModel.from_pretrained(model, path).to(torch.float64).merge_and_unload()
        for name, tensor in merged.state_dict().items():
            expected[name] += weight * (tensor - base_weights[name])
    return expected


def main(workdir: str) -> None:
    base = os.path.join(workdir, "base")
    started = time.perf_counter()
    print(f"[1/4] base model -> {base}")
    build_base(base)

    adapters = {}
    for name, (weight, rank, task) in TASKS.items():
        path = os.path.join(workdir, "adapters", name)
        first, last = train_adapter(base, path, rank, task)
        adapters[name] = (path, weight)
        print(f"[2/4] adapter {name:6s} r={rank:<2d} trained: loss {first:.2f} -> {last:.2f}")

    config = os.path.join(workdir, "core_ta.yml")
    models = "".join(
        f"  - model: {base}+{path}\n    parameters:\n      weight: {weight}\n"
        for path, weight in adapters.values()
    )
    with open(config, "w", encoding="utf-8") as handle:
        handle.write(
            "merge_method: core_space\n"
            f"base_model: {base}\n"
            f"models:\n{models}"
            "parameters:\n  merge: ta\n  lambda: 1.0\n"
        )
    out = os.path.join(workdir, "merged")
    command = ["mergekit-yaml", config, out, "--lora-merge-cache", os.path.join(workdir, "cache")]
    print(f"[3/4] {' '.join(command)}")
    subprocess.run(command, check=True)

    merged_model = AutoModelForCausalLM.from_pretrained(out)
    merged = merged_model.state_dict()
    expected = peft_merge(base, adapters)
    deviation = max((merged[name].double() - expected[name]).abs().max().item() for name in merged)
    print(f"[4/4] {out} loads with AutoModelForCausalLM ({len(merged)} tensors)")
    print(f"      max |merged - PEFT merge| = {deviation:.2e} (float32 output, float64 oracle)")
    print(f"      --lora-merge-cache written: {os.path.exists(os.path.join(workdir, 'cache'))}")
    base_model = AutoModelForCausalLM.from_pretrained(base)
    for name, (_, _, task) in TASKS.items():
        input_ids, labels = task_batch(task, torch.Generator().manual_seed(1234))
        with torch.no_grad():
            losses = [
                m(input_ids=input_ids, labels=labels).loss.item()
                for m in (base_model, merged_model)
            ]
        print(f"      task {name:6s} loss: base {losses[0]:.2f}, merged {losses[1]:.2f}")
    print(f"done in {time.perf_counter() - started:.0f} s")
    if deviation > 1e-5:
        sys.exit("deviation above 1e-5: the merge does not match PEFT")


if __name__ == "__main__":
    main(os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "demo-output"))
