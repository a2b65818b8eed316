"""A merged LoRA as a standard PEFT adapter: ``adapter_config.json`` + ``adapter_model.safetensors``.

Each merged module is ``ΔW = B @ A`` (:func:`mergekit_corespace.spaces.truncate`). PEFT
applies ``scaling · B @ A`` with ``scaling = lora_alpha / r``, so every module is written
with ``lora_alpha = r`` (scaling 1): the adapter reproduces the merged delta exactly, and
modules whose rank differs from the most common one get ``rank_pattern`` / ``alpha_pattern``
entries (exact, escaped module paths, since PEFT reads those keys as regular expressions).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence

import torch
from safetensors.torch import save_file

from mergekit_corespace.adapters import WEIGHTS_FILE
from mergekit_corespace.spaces import LowRankDelta

PEFT_PREFIX = "base_model.model."


def adapter_tensors(
    modules: Mapping[str, LowRankDelta], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    tensors = {}
    for module, delta in sorted(modules.items()):
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = delta.a.to("cpu", dtype).contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = delta.b.to("cpu", dtype).contiguous()
    return tensors


def target_modules_of(inputs: Sequence, modules: Sequence[str]) -> list[str]:
    """The union of the input adapters' ``target_modules`` when all are lists of names;
    otherwise (a regex among them) the names of the merged modules themselves."""
    targets = [getattr(config, "target_modules", None) for config in inputs]
    if targets and all(isinstance(t, (list, set, tuple)) for t in targets):
        return sorted(set().union(*targets))
    return sorted({module.rsplit(".", 1)[-1] for module in modules})


def write_lora_adapter(
    path: str,
    modules: Mapping[str, LowRankDelta],
    *,
    base_model_name_or_path: str,
    inputs: Sequence,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write the merged adapter to ``path`` (which must exist)."""
    from peft import LoraConfig

    modules = {name: delta for name, delta in modules.items() if delta.rank > 0}
    if not modules:
        raise ValueError("the merged adapter is empty: every merged delta is zero")
    ranks = {name: delta.rank for name, delta in modules.items()}
    # the most common rank; the largest of equally common ones, for a stable choice
    rank = max(Counter(ranks.values()).items(), key=lambda item: (item[1], item[0]))[0]
    pattern = {re.escape(name): r for name, r in sorted(ranks.items()) if r != rank}
    task_types = {getattr(config, "task_type", None) for config in inputs}
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=target_modules_of(inputs, list(modules)),
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_types.pop() if len(task_types) == 1 else None,
        lora_dropout=0.0,
        bias="none",
    )
    config.save_pretrained(path)
    save_file(
        adapter_tensors(modules, dtype), os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"}
    )
