"""Inner merge methods: T same-shaped task matrices in, one matrix out. Pure torch.

The same functions serve core, KnOTS and full space (:mod:`mergekit_corespace.spaces`).
``weights`` are the per-adapter ``weight`` parameters wₜ; the global ``lambda`` is applied
by the caller to the result. Each method is composed from the small steps below so that
every step can be checked against its paper:

- task arithmetic (arXiv 2212.04089): ``Σ wₜ Xₜ``
- TIES (arXiv 2306.01708): ``trim`` → ``elect_sign`` → ``disjoint_mean``
- DARE (arXiv 2311.03099): ``random_drop`` (keep with prob. density, rescale 1/density)
- TSV-M (arXiv 2412.00081): top singular triplets per task, ``polar``-orthogonalised
- CART (arXiv 2412.12153): mean + α Σ rank-k(Xₜ − mean)
- Iso-C / Iso-CTS (arXiv 2502.04959): flatten the spectrum of the merged matrix
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mergekit_corespace.linalg import nonnull_svd, polar, truncated

# ---------------------------------------------------------------------------------------
# Shared steps


def weighted(tasks: Sequence[torch.Tensor], weights: Sequence[float]) -> list[torch.Tensor]:
    """``wₜ Xₜ`` for every task."""
    return [task * weight for task, weight in zip(tasks, weights, strict=True)]


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th smallest entry (1-based) of a 1-D tensor. On the CPU ``kthvalue`` is a
    quickselect; CUDA's runs one thread block per slice, about 20× slower than sorting the
    whole slice at 10⁸ entries (pytorch/pytorch#75599), so elsewhere it is read from a sort:
    the same value, so the same bits."""
    if _selects_by_sort(values.device):
        return values.sort().values[k - 1]
    return values.kthvalue(k).values


def _selects_by_sort(device: torch.device) -> bool:
    return device.type != "cpu"


def keep_top_magnitudes(task: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``max(1, ⌊density·numel⌋)`` largest-magnitude entries (TIES trim)."""
    keep = max(1, int(density * task.numel()))
    if keep >= task.numel():
        return task
    threshold = kth_smallest(task.abs().flatten(), task.numel() - keep + 1)
    return task * (task.abs() >= threshold)


def keep_above(task: torch.Tensor, threshold: float) -> torch.Tensor:
    """Zero the entries whose magnitude is below ``threshold`` (TIES trim, global scope)."""
    return task * (task.abs() >= threshold)


def elect_sign(tasks: Sequence[torch.Tensor]) -> torch.Tensor:
    """TIES sign election: the sign of the summed (weighted, trimmed) tasks, entrywise."""
    return torch.sign(torch.stack(list(tasks)).sum(dim=0))


def disjoint_mean(
    tasks: Sequence[torch.Tensor], weights: Sequence[float], sign: torch.Tensor
) -> torch.Tensor:
    """Weighted mean over the tasks whose (non-zero) entry agrees with ``sign``:
    ``Σ_agree wₜXₜ / Σ_agree wₜ`` (the disjoint mean of TIES; 0 where none agrees)."""
    numerator = torch.zeros_like(tasks[0])
    denominator = torch.zeros_like(tasks[0])
    for task, weight in zip(tasks, weights, strict=True):
        agrees = (torch.sign(task) == sign) & (task != 0)
        numerator += torch.where(agrees, task, 0)
        denominator += agrees.to(denominator.dtype) * weight  # bool × float is float32
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-300), 0)


def random_drop(task: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``, rescale the kept ones by 1/density.

    The mask is drawn on the CPU from ``generator`` so that it is the same on any device."""
    if density >= 1:
        return task
    keep = torch.rand(task.shape, generator=generator, dtype=torch.float64, device="cpu") < density
    return task * keep.to(task.device) / density


# ---------------------------------------------------------------------------------------
# Methods


def task_arithmetic(tasks: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``Σₜ wₜ Xₜ``."""
    return torch.stack(weighted(tasks, weights)).sum(dim=0)


def weighted_mean(tasks: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``Σₜ wₜ Xₜ / Σₜ wₜ`` over the adapters present in this module."""
    total = sum(weights)
    if total == 0:
        raise ValueError("merge: mean needs adapter weights with a non-zero sum")
    return task_arithmetic(tasks, weights) / total


def ties(
    tasks: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float,
    thresholds: Sequence[float] | None = None,
) -> torch.Tensor:
    """TIES: trim each task to its top-``density`` magnitudes (or, with ``thresholds``, to
    the per-task magnitude threshold of a global trim), elect signs, disjoint mean."""
    if thresholds is None:
        trimmed = [keep_top_magnitudes(task, density) for task in tasks]
    else:
        trimmed = [keep_above(task, t) for task, t in zip(tasks, thresholds, strict=True)]
    trimmed = weighted(trimmed, weights)
    return disjoint_mean(trimmed, weights, elect_sign(trimmed))


def dare(
    tasks: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """DARE: random drop and rescale each task, then task arithmetic."""
    return task_arithmetic([random_drop(task, density, generator) for task in tasks], weights)


def dare_ties(
    tasks: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """DARE-TIES: random drop and rescale, then TIES sign election and disjoint mean."""
    dropped = weighted([random_drop(task, density, generator) for task in tasks], weights)
    return disjoint_mean(dropped, weights, elect_sign(dropped))


def tsv_rank(shape: Sequence[int], count: int, budget: float) -> int:
    """TSV's singular triplets per task, ``⌊budget·min(a, b)/T⌋`` (at least 1)."""
    k = math.floor(budget * min(shape) / count)
    if k == 0:
        raise ValueError(
            f"merge: tsv keeps {budget}·min{tuple(shape)}/{count} < 1 singular "
            "vector per task; raise tsv_budget"
        )
    return k


def tsv(tasks: Sequence[torch.Tensor], weights: Sequence[float], budget: float) -> torch.Tensor:
    """TSV-M: each task keeps its top ``k = ⌊budget·min(a, b)/T⌋`` singular triplets (null
    ones dropped: their arbitrary vectors would bend the others under ``polar``); the
    concatenated U's and V's are orthogonalised by ``polar``; the concatenated singular
    values are kept as they are."""
    k = tsv_rank(tasks[0].shape, len(tasks), budget)
    us, ss, vhs = [], [], []
    for task in weighted(tasks, weights):
        u, s, vh = nonnull_svd(task)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    u, s, vh = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)
    return (polar(u) * s) @ polar(vh)


def cart(
    tasks: Sequence[torch.Tensor],
    weights: Sequence[float],
    rank_ratio: float,
    alpha: float,
) -> torch.Tensor:
    """CART: ``X̄ + α Σₜ wₜ·rank_k(Xₜ − X̄)`` with X̄ the weighted mean, ``k = ⌈ρ·min(a, b)⌉``."""
    mean = weighted_mean(tasks, weights)
    k = math.ceil(rank_ratio * min(mean.shape))
    residual = sum(w * truncated(task - mean, k) for task, w in zip(tasks, weights, strict=True))
    return mean + alpha * residual


def isotropic(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """``mean(s) · U Vᵀ``: every singular value replaced by their mean."""
    if s.numel() == 0:  # nothing to merge: all tasks are zero
        return u.new_zeros(u.shape[0], vh.shape[1])
    return s.mean() * (u @ vh)


def iso_c(tasks: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Iso-C: the summed tasks with a flat spectrum. The mean runs over the non-null
    singular values only, so a low-rank sum (KnOTS, full space) stays low rank."""
    return isotropic(*nonnull_svd(task_arithmetic(tasks, weights)))


def iso_cts(
    tasks: Sequence[torch.Tensor], weights: Sequence[float], common_fraction: float
) -> torch.Tensor:
    """Iso-CTS: the top ``c ≈ common_fraction·p`` directions of the summed tasks (p = its
    rank), plus ``d = (p − c)/T`` task-specific directions per task taken from what the
    common left subspace does not explain; orthogonalised by ``polar``, flat spectrum."""
    scaled = weighted(tasks, weights)
    u, s, vh = nonnull_svd(torch.stack(scaled).sum(dim=0))
    p, count = s.numel(), len(tasks)
    common = int(p * common_fraction)
    specific = round((p - common) / count) * count
    common, per_task = p - specific, specific // count
    us, ss, vhs = [], [], []
    if per_task:
        projector = u[:, :common]
        for task in scaled:
            residual = task - projector @ (projector.T @ task)
            ut, st, vht = nonnull_svd(residual)
            us.append(ut[:, :per_task])
            ss.append(st[:per_task])
            vhs.append(vht[:per_task])
    us.append(u[:, :common])
    ss.append(s[:common])
    vhs.append(vh[:common])
    return isotropic(polar(torch.cat(us, dim=1)), torch.cat(ss), polar(torch.cat(vhs, dim=0)))


# ---------------------------------------------------------------------------------------
# Global TIES threshold: a two-pass plan with a bounded-memory magnitude sketch


class MagnitudeSketch:
    """Histogram of log₂|x| per task across all modules (64 bins per octave), giving each
    task's magnitude threshold for a global top-``density`` trim.

    Memory is fixed (~20k bins per task) whatever the model size; the threshold is exact
    to within one bin, i.e. ±1.1 % in magnitude, keeping at most one bin's worth of extra
    entries."""

    BINS_PER_OCTAVE = 64
    LOW, HIGH = -256, 128  # log₂ range covered; smaller magnitudes count as zeros

    def __init__(self, tasks: int):
        bins = (self.HIGH - self.LOW) * self.BINS_PER_OCTAVE
        self.counts = torch.zeros(tasks, bins, dtype=torch.float64, device="cpu")
        self.totals = [0] * tasks

    def add(self, task_index: int, task: torch.Tensor) -> None:
        self.totals[task_index] += task.numel()
        magnitudes = task.detach().abs().flatten().to("cpu", torch.float64)
        logs = magnitudes[magnitudes > 2.0**self.LOW].log2().clamp_max(self.HIGH - 1e-9)
        self.counts[task_index] += torch.histc(
            logs, bins=self.counts.shape[1], min=self.LOW, max=self.HIGH
        )

    def threshold(self, task_index: int, density: float) -> float:
        """The smallest bin edge with at least ``density·total`` entries at or above it."""
        keep = max(1, int(density * self.totals[task_index]))
        from_top = self.counts[task_index].flip(0).cumsum(0)
        reached = torch.nonzero(from_top >= keep)
        if reached.numel() == 0:
            return 0.0  # fewer non-zero entries than asked for: keep them all
        bin_index = self.counts.shape[1] - 1 - int(reached[0])
        return 2.0 ** (self.LOW + bin_index / self.BINS_PER_OCTAVE)
