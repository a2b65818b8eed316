"""A merged LoRA as a standard PEFT adapter (``adapter_config.json`` and weights).

Each merged module is ``ΔW = B @ A`` in the base weight's layout
(:func:`mergekit_corespace.spaces.truncate`). PEFT applies ``scaling · B @ A`` with
``scaling = lora_alpha / r``, so every module is written with ``lora_alpha = r``
(scaling 1) and the adapter reproduces the merged delta exactly; modules whose rank
differs from the most common one get ``rank_pattern`` / ``alpha_pattern`` entries (exact,
escaped module paths, since PEFT reads those keys as regular expressions). Conv1D and
embedding layers are written in PEFT's transposed layouts; weights some input adapter
saved whole are written whole again, as ``modules_to_save``.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from safetensors.torch import save_file

from mergekit_corespace.adapters import WEIGHTS_FILE
from mergekit_corespace.spaces import LowRankDelta

if TYPE_CHECKING:
    from peft import LoraConfig

PEFT_PREFIX = "base_model.model."
Layout = Literal["linear", "conv1d", "embedding"]


def adapter_tensors(
    modules: Mapping[str, LowRankDelta],
    layouts: Mapping[str, Layout],
    saved: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    tensors = {}
    for module, delta in sorted(modules.items()):
        a, b = delta.a, delta.b  # ΔW = b @ a in the base weight's layout
        if layouts.get(module, "linear") != "linear":  # PEFT computes (B A)ᵀ for these
            a, b = delta.b.T, delta.a.T
        if layouts.get(module) == "embedding":
            names = (f"{module}.lora_embedding_A", f"{module}.lora_embedding_B")
        else:
            names = (f"{module}.lora_A.weight", f"{module}.lora_B.weight")
        for name, tensor in zip(names, (a, b)):
            tensors[PEFT_PREFIX + name] = tensor.to("cpu", dtype).contiguous()
    for name, tensor in sorted(saved.items()):
        tensors[PEFT_PREFIX + name] = tensor.to("cpu", dtype).contiguous()
    return tensors


def target_modules_of(
    inputs: Sequence, modules: Sequence[str], base_modules: Collection[str] | None = None
) -> list[str]:
    """PEFT ``target_modules`` that make LoRA layers for exactly ``modules``: the input
    adapters' own target names (the union of their lists) when, among the base model's
    modules, they name exactly these; otherwise the modules' full names (an input trained
    on some layers only, ``layers_to_transform``, or a module whose merge is zero)."""
    targets = [getattr(config, "target_modules", None) for config in inputs]
    if (
        base_modules is not None
        and targets
        and all(isinstance(t, (list, set, tuple)) for t in targets)
    ):
        union = set().union(*targets)
        used = {t for t in union if any(m == t or m.endswith("." + t) for m in modules)}
        named = {m for m in base_modules if any(m == t or m.endswith("." + t) for t in used)}
        if used and named == set(modules):
            return sorted(used)
    return sorted(modules)


@dataclass
class LoraExport:
    """A merged adapter in memory: its PEFT ``LoraConfig`` and its tensors under PEFT's
    saved names (``base_model.model.<module>.lora_A.weight``, ...), exactly what
    :meth:`write` puts in ``adapter_config.json`` and ``adapter_model.safetensors``."""

    config: LoraConfig
    tensors: dict[str, torch.Tensor]

    def write(self, path: str) -> None:
        """Write the adapter to ``path`` (which must exist)."""
        self.config.save_pretrained(path)
        save_file(self.tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})


def lora_export(
    modules: Mapping[str, LowRankDelta],
    *,
    base_model_name_or_path: str,
    base_model_revision: str | None = None,
    inputs: Sequence,
    layouts: Mapping[str, Layout] | None = None,
    saved: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    base_modules: Collection[str] | None = None,
) -> LoraExport:
    """The merged adapter's config and tensors.

    ``modules``: module path -> its low-rank delta; ``layouts``: module path -> layout
    (default linear); ``saved``: weight name -> a whole weight to save (modules_to_save);
    ``base_modules``: the base model's module names (default unknown: target modules are
    written as full names).
    """
    from peft import LoraConfig

    layouts, saved = dict(layouts or {}), dict(saved or {})
    modules = {name: delta for name, delta in modules.items() if delta.rank > 0}
    if not modules and not saved:
        raise ValueError("the merged adapter is empty: every merged delta is zero")
    ranks = {name: delta.rank for name, delta in modules.items()}
    # the most common rank; the largest of equally common ones, for a stable choice
    counts = Counter(ranks.values()) or Counter({1: 1})
    rank = max(counts.items(), key=lambda item: (item[1], item[0]))[0]
    pattern = {re.escape(name): r for name, r in sorted(ranks.items()) if r != rank}
    task_types = {getattr(config, "task_type", None) for config in inputs}
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=target_modules_of(inputs, list(modules), base_modules) if modules else [],
        fan_in_fan_out=any(layouts.get(m) == "conv1d" for m in modules),
        modules_to_save=sorted({name.rsplit(".", 1)[0] for name in saved}) or None,
        base_model_name_or_path=base_model_name_or_path,
        revision=base_model_revision,
        task_type=task_types.pop() if len(task_types) == 1 else None,
        lora_dropout=0.0,
        bias="none",
    )
    # LoraConfig keeps target_modules as a set, which PEFT writes in hash order: a list
    # written sorted keeps the file byte-identical across runs.
    config.target_modules = sorted(config.target_modules)
    return LoraExport(config=config, tensors=adapter_tensors(modules, layouts, saved, dtype))


def write_lora_adapter(path: str, modules: Mapping[str, LowRankDelta], **export) -> None:
    """Write the merged adapter to ``path`` (which must exist); ``export`` as for
    :func:`lora_export`."""
    lora_export(modules, **export).write(path)
