"""One PEFT LoRA adapter of a causal LM trained on chat examples, cached by its settings.

The loss is on the answer tokens and the end-of-turn token after them (so that greedy
generation stops after the answer); the prompt tokens are masked. Weights are trained
in float32, under bfloat16 autocast where the CPU has bf16 instructions (2–3× faster than
float32 there); elsewhere bf16 is emulated, 26× slower than float32 (a SmolLM2 step of 8
chats on a 2-core AVX2 EPYC: 96 s against 3.6 s), so those CPUs train in float32. The
adapter is saved in float32.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Sequence

import torch

from mergekit_corespace.generation import native_on_cpu
from mergekit_corespace.toy import LLAMA_TARGETS

LORA = dict(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS, lora_dropout=0.0)
TRAINING = dict(steps=60, batch_size=8, learning_rate=1e-3)


def bf16_autocast() -> bool:
    """Whether this CPU runs bf16 matrix products natively, so that training under bf16
    autocast is faster, not slower (a torch that cannot tell: float32 is safe)."""
    return native_on_cpu("bfloat16") is True


def cache_key(base: str, examples: Sequence[tuple[list[dict], str]], seed: int, **settings) -> str:
    """A digest of everything that decides the adapter: base, data, seed, settings, and
    whether it trains under bf16 autocast."""
    decided = [os.path.abspath(base), examples, seed, LORA, TRAINING, settings]
    if not bf16_autocast():  # the key of autocast training stays what it was
        decided.append("float32")
    digest = hashlib.sha256(json.dumps(decided, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def train_lora(
    base: str,
    examples: Sequence[tuple[list[dict], str]],
    out: str,
    *,
    seed: int,
    steps: int | None = None,
    progress: str | None = None,
) -> float:
    """Train an adapter of ``base`` on ``(chat turns before the answer, answer)`` pairs and
    save it to ``out`` (written aside and moved in place). Returns the seconds it took;
    0 when ``out`` already holds it."""
    if os.path.isfile(os.path.join(out, "adapter_model.safetensors")):
        return 0.0
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    steps = steps or TRAINING["steps"]
    size = TRAINING["batch_size"]
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(**LORA))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=TRAINING["learning_rate"])
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    end = [tokenizer.convert_tokens_to_ids(tokenizer.eos_token)]
    model.train()
    autocast = bf16_autocast()
    for step in range(steps):
        rows = []
        for k in range(step * size, (step + 1) * size):
            turns, answer = examples[order[k % len(order)]]
            context = tokenizer.apply_chat_template(
                turns, tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(context, add_special_tokens=False)["input_ids"]
            target = tokenizer(answer, add_special_tokens=False)["input_ids"] + end
            rows.append((ids + target, [-100] * len(ids) + target))
        width = max(len(ids) for ids, _ in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end[0]
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if progress and (step % 20 == 0 or step == steps - 1):
            print(f"{progress}: step {step + 1}/{steps}, loss {loss.item():.3f}", flush=True)
    partial = out + ".partial"
    model.save_pretrained(partial)
    os.replace(partial, out)
    return time.perf_counter() - started
