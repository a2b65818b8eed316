"""Inner merge methods: T same-shaped task matrices in, one matrix out. Pure torch.

The same functions serve core, KnOTS and full space (:mod:`mergekit_corespace.spaces`).
``weights`` are the per-adapter ``weight`` parameters; the global ``lambda`` is applied
by the caller to the merged matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def task_arithmetic(tasks: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``Σ_t w_t X_t`` (Ilharco et al., arXiv 2212.04089)."""
    merged = torch.zeros_like(tasks[0])
    for task, weight in zip(tasks, weights, strict=True):
        merged.add_(task, alpha=weight)
    return merged


def weighted_mean(tasks: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``Σ_t w_t X_t / Σ_t w_t`` over the adapters present in this module."""
    total = sum(weights)
    if total == 0:
        raise ValueError("merge: mean needs adapter weights with a non-zero sum")
    return task_arithmetic(tasks, weights) / total
