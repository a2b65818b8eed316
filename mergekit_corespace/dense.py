"""Weights some adapter saved whole (``modules_to_save``, embedding layers PEFT saves):
their T dense deltas ``ΔWₜ = W_savedₜ − W_base`` merged one block of rows at a time.

Such a weight has no factors, so it is merged in full space, and at vocabulary shapes
(128 256 × 4 096 at 8 B) T float64 deltas would take T × 4.2 GB. Here the deltas are never
whole in memory: each pass over the weight recomputes one block of rows of every task
from the mapped files (the base block cast once, shared by all adapters) and gives the
pages read back (:class:`~mergekit_corespace.memory.MappedRows`). Memory ≈ T × one block,
plus n×n matrices for the SVD-based methods.

- ``ta``, ``mean``, ``ties``, ``dare``, ``dare_ties`` work entry by entry: the merged
  block is the inner method (:mod:`~mergekit_corespace.merges`) of the T blocks, bit for
  bit what the whole matrices give. TIES' per-module top-k threshold is found exactly,
  by radix selection over the bit patterns of ``|x|`` (passes of 16-bit histograms, then
  the few candidates left); DARE draws each task's mask from the same generator stream
  as a whole-matrix merge, one block after the other (a CPU generator gives the same
  values in consecutive chunks as in one draw; each task's start state is found by a
  first pass that draws the tasks before it).
- ``tsv``, ``cart``, ``iso_c``, ``iso_cts`` need SVDs of m×n matrices. Small ones (T·m·n
  ≤ ``IN_MEMORY_ELEMENTS``), and wide ones (m < n), are merged in memory exactly as full
  space merges LoRA modules. Tall large ones take the SVDs from n×n Gram matrices
  ``XᵀX = V S² Vᵀ`` accumulated over row blocks, with ``U = X V S⁻¹`` and ``polar(U) =
  U (UᵀU)^(-1/2)`` applied one block at a time. Forming ``XᵀX`` squares the condition
  number, so this is not bit-identical to LAPACK's SVD: directions whose singular value
  is below ``√(max(m, n)·eps)`` of the largest (≈ 5e-6 at 8 B shapes in float64) count
  as null, and the merged delta differs from the in-memory merge by ~1e-12 relative on
  well-conditioned deltas (tests/test_saved_weights.py bounds it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch

from mergekit_corespace import merges
from mergekit_corespace.adapters import (
    AdapterError,
    Contribution,
    DenseWeight,
    LoraModule,
    read_factors,
    read_raw,
)
from mergekit_corespace.linalg import polar
from mergekit_corespace.memory import MappedRows
from mergekit_corespace.options import MergeParameters
from mergekit_corespace.spaces import MergedDelta, RowBlocks

# Entries of one task in one block of rows (8 MiB per task in float64).
BLOCK_ELEMENTS = 1 << 20
# Blocks start at multiples of this many rows: GEMM kernels work on groups of rows, so
# aligned blocks of ``B Aᵀ`` get the bits of the whole-matrix product (checked by a test).
ROW_ALIGN = 64
# SVD-based methods merge T·m·n up to this many entries in memory (bit for bit as today).
IN_MEMORY_ELEMENTS = 1 << 22
ELEMENTWISE = ("ta", "mean", "ties", "dare", "dare_ties")
# Radix selection: candidates (over all tasks) few enough to gather and sort directly.
_GATHER_AT_MOST = 1 << 22
_DIGIT_BITS = 16
_INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32}


class DenseTasks:
    """The T dense task deltas of one weight, produced one block of rows at a time, each
    exactly as a whole-matrix read makes it: ``0 + Σ parts`` in order, where a LoRA part
    adds ``B A`` and a saved weight adds ``W_saved − W_base`` (in compute dtype)."""

    def __init__(
        self,
        contributions: Sequence[Sequence[Contribution]],
        base: torch.Tensor,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        views: list[torch.Tensor] | None = None,
    ):
        read = []
        self.parts = []
        for parts in contributions:
            task = []
            for part in parts:
                if isinstance(part, LoraModule):
                    task.append(read_factors(part, dtype, device, read))
                else:
                    task.append((part, read_raw(part, read)))
            self.parts.append(task)
        self.base, self.dtype, self.device = base, dtype, device
        self.shape = tuple(base.shape)
        self.pages = MappedRows(base, *(raw for task in self.parts for _, raw in _saved(task)))
        if views is not None:
            views += read

    @property
    def count(self) -> int:
        return len(self.parts)

    @property
    def block_rows(self) -> int:
        rows = BLOCK_ELEMENTS // max(1, self.shape[1])
        return max(ROW_ALIGN, rows // ROW_ALIGN * ROW_ALIGN)

    def ranges(self) -> Iterator[tuple[int, int]]:
        for start in range(0, self.shape[0], self.block_rows):
            yield start, min(self.shape[0], start + self.block_rows)

    def block(self, start: int, stop: int) -> list[torch.Tensor]:
        """Rows ``start:stop`` of every task; the file pages read are given back."""
        base = None
        tasks = []
        for task in self.parts:
            if len(task) == 1 and not isinstance(task[0][0], DenseWeight):
                left, right = task[0]  # as full space multiplies a LoRA-only task out
                tasks.append(left[start:stop] @ right)
                continue
            delta = torch.zeros(stop - start, self.shape[1], dtype=self.dtype, device=self.device)
            for part in task:
                if isinstance(part[0], DenseWeight):
                    weight, raw = part
                    rows = raw[start:stop]
                    if not torch.isfinite(rows).all():
                        raise AdapterError(f"{weight.file}: {weight.key} holds NaN or Inf values")
                    if base is None:  # cast once per block, shared by every adapter
                        base = self.base[start:stop].to(self.device, self.dtype)
                    delta += rows.to(device=self.device, dtype=self.dtype) - base
                else:
                    left, right = part
                    delta.addmm_(left[start:stop], right)
            tasks.append(delta)
        self.pages.release(start, stop)
        return tasks

    def blocks(self) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
        """One pass over the weight: ``(start, stop, task blocks)``."""
        for start, stop in self.ranges():
            yield start, stop, self.block(start, stop)


def _saved(task):
    return [part for part in task if isinstance(part[0], DenseWeight)]


def streams(parameters: MergeParameters, shape: tuple[int, ...], count: int) -> bool:
    """Whether a weight saved whole is merged in row blocks (else whole, in memory)."""
    if len(shape) != 2:
        return False  # biases and norms: small
    if parameters.merge in ELEMENTWISE:
        return True
    rows, cols = shape
    return rows >= cols and count * rows * cols > IN_MEMORY_ELEMENTS


def merge_saved(
    tasks: DenseTasks,
    weights: Sequence[float],
    parameters: MergeParameters,
    seed: int = 0,
) -> MergedDelta:
    """The merged ΔW of a weight saved whole, before λ, as row blocks computed when read
    (by :meth:`~mergekit_corespace.spaces.MergedDelta.applied_to`); the passes the method
    needs first (thresholds, Gram matrices) run now."""
    produce = _METHODS[parameters.merge](tasks, list(weights), parameters, seed)
    return MergedDelta(dense=RowBlocks(tasks.shape, produce))


# ---------------------------------------------------------------------------------------
# Element-wise methods: the inner method on each block of rows


def _ta(tasks, weights, p, seed):
    return lambda: (merges.task_arithmetic(b, weights) for _, _, b in tasks.blocks())


def _mean(tasks, weights, p, seed):
    return lambda: (merges.weighted_mean(b, weights) for _, _, b in tasks.blocks())


def _ties(tasks, weights, p, seed):
    thresholds = top_magnitude_thresholds(tasks, p.effective_density)
    return lambda: (
        merges.ties(b, weights, p.effective_density, thresholds) for _, _, b in tasks.blocks()
    )


def _dropped(tasks, p, seed) -> Callable[[], Iterator[list[torch.Tensor]]]:
    """Each block's tasks after DARE's random drop, with the masks a whole-matrix merge
    draws: task t's generator starts where the draws of tasks 0…t−1 left it."""
    density, starts = p.effective_density, []
    generator = torch.Generator(device="cpu").manual_seed(seed)
    scratch = None
    for t in range(tasks.count):
        starts.append(generator.get_state())
        if t == tasks.count - 1:
            break
        for start, stop in tasks.ranges():  # draw as random_drop would, and discard
            rows = (stop - start, tasks.shape[1])
            if scratch is None or scratch.shape != rows:
                scratch = torch.zeros(rows, dtype=tasks.dtype, device=tasks.device)
            merges.random_drop(scratch, density, generator)

    def produce():
        generators = [torch.Generator(device="cpu") for _ in starts]
        for generator, state in zip(generators, starts):
            generator.set_state(state)
        for _, _, blocks in tasks.blocks():
            yield [merges.random_drop(b, density, g) for b, g in zip(blocks, generators)]

    return produce


def _dare(tasks, weights, p, seed):
    dropped = _dropped(tasks, p, seed)
    return lambda: (merges.task_arithmetic(b, weights) for b in dropped())


def _dare_ties(tasks, weights, p, seed):
    dropped = _dropped(tasks, p, seed)

    def produce():
        for blocks in dropped():
            scaled = merges.weighted(blocks, weights)
            yield merges.disjoint_mean(scaled, weights, merges.elect_sign(scaled))

    return produce


def top_magnitude_thresholds(tasks: DenseTasks, density: float) -> list[float]:
    """Per task, the magnitude of its ``max(1, ⌊density·m·n⌋)``-th largest entry: the
    threshold :func:`~mergekit_corespace.merges.keep_top_magnitudes` takes from
    ``kthvalue`` over the whole matrix, exactly (0 when every entry is kept).

    Radix selection: for non-negative floats the order of the bit patterns is the order
    of the values, so each pass histograms the next 16 bits of ``|x|`` among the entries
    that share the bits fixed so far, until few enough candidates remain to gather."""
    numel = math.prod(tasks.shape)
    keep = max(1, int(density * numel))
    if keep >= numel:
        return [0.0] * tasks.count
    as_int = _INT_VIEW[tasks.dtype]
    width = torch.finfo(tasks.dtype).bits
    # per task: bits fixed so far (prefix), how many of them, rank still sought among them
    prefix, rank = [0] * tasks.count, [keep] * tasks.count
    fixed = 0
    candidates = [numel] * tasks.count
    while sum(candidates) > _GATHER_AT_MOST and fixed < width:
        shift = width - fixed - _DIGIT_BITS
        counts = [
            torch.zeros(1 << _DIGIT_BITS, dtype=torch.int64, device=tasks.device)
            for _ in range(tasks.count)
        ]
        for _, _, blocks in tasks.blocks():
            for t, block in enumerate(blocks):
                bits = _matching(block.abs().view(as_int), fixed, width, prefix[t])
                counts[t] += torch.bincount(
                    ((bits >> shift) & ((1 << _DIGIT_BITS) - 1)).long(),
                    minlength=1 << _DIGIT_BITS,
                )
        for t in range(tasks.count):
            from_top = counts[t].flip(0).cumsum(0)
            index = int(torch.searchsorted(from_top, rank[t]))  # first reaching the rank
            digit = (1 << _DIGIT_BITS) - 1 - index
            rank[t] -= int(from_top[index - 1]) if index else 0
            candidates[t] = int(counts[t][digit])
            prefix[t] = (prefix[t] << _DIGIT_BITS) | digit
        fixed += _DIGIT_BITS
    if fixed >= width:
        values = [_from_bits(bits, as_int, tasks.dtype) for bits in prefix]
        return values
    gathered = [[] for _ in range(tasks.count)]
    for _, _, blocks in tasks.blocks():
        for t, block in enumerate(blocks):
            magnitudes = block.abs()
            bits = magnitudes.view(as_int)
            gathered[t].append(magnitudes[_matches(bits, fixed, width, prefix[t])])
    thresholds = []
    for t, parts in enumerate(gathered):
        values = torch.cat(parts)
        thresholds.append(float(merges.kth_smallest(values, values.numel() - rank[t] + 1)))
    return thresholds


def _matches(bits: torch.Tensor, fixed: int, width: int, prefix: int) -> torch.Tensor:
    if fixed == 0:
        return torch.ones_like(bits, dtype=torch.bool)
    return (bits >> (width - fixed)) == prefix


def _matching(bits: torch.Tensor, fixed: int, width: int, prefix: int) -> torch.Tensor:
    return bits.flatten() if fixed == 0 else bits[_matches(bits, fixed, width, prefix)]


def _from_bits(bits: int, as_int: torch.dtype, dtype: torch.dtype) -> float:
    return float(torch.tensor([bits], dtype=as_int, device="cpu").view(dtype)[0])


# ---------------------------------------------------------------------------------------
# SVD-based methods on tall weights: Gram matrices over row blocks


def _gram_svd(gram: torch.Tensor, shape: Sequence[int], cut: bool = True):
    """``(S, V)`` of a matrix X from ``G = XᵀX``, largest first. With ``cut``, directions
    below G's rounding floor (σ² ≤ max(m, n)·eps·σ₁², the rule of
    :func:`~mergekit_corespace.linalg.relative_rank_cut` applied to σ²) are dropped."""
    values, vectors = torch.linalg.eigh(gram)
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    if cut:
        if values.numel() == 0 or values[0] == 0:
            keep = 0
        else:
            rtol = max(shape) * torch.finfo(values.dtype).eps
            keep = int((values > rtol * values[0]).sum())
        values, vectors = values[:keep], vectors[:, :keep]
    return values.sqrt(), vectors


def _inverse_sqrt(gram: torch.Tensor) -> torch.Tensor:
    """``G^(-1/2)`` of a Gram matrix ``G = UᵀU`` (pseudo-inverse on its null space), so
    that ``U G^(-1/2)`` is ``polar(U)``."""
    values, vectors = torch.linalg.eigh(gram)
    rtol = gram.shape[0] * torch.finfo(values.dtype).eps
    keep = values > rtol * values.max().clamp_min(0)
    vectors = vectors[:, keep]
    return (vectors * values[keep].rsqrt()) @ vectors.T


def _gram(rows: Iterator[torch.Tensor], size: int, tasks: DenseTasks) -> torch.Tensor:
    total = torch.zeros(size, size, dtype=tasks.dtype, device=tasks.device)
    for block in rows:
        total.addmm_(block.T, block)
    return total


def _top_triplets(task_blocks: Iterator[list[torch.Tensor]], tasks: DenseTasks, k: int):
    """Per task, its top ``k`` non-null singular triplets from the Gram matrix of its
    rows (``task_blocks`` yields one block of rows per task at a time), as lists of
    ``V S⁻¹`` (so that ``X V S⁻¹ = U``), ``S`` and ``Vᵀ``."""
    cols = tasks.shape[1]
    grams = [
        torch.zeros(cols, cols, dtype=tasks.dtype, device=tasks.device) for _ in range(tasks.count)
    ]
    for blocks in task_blocks:
        for gram, block in zip(grams, blocks, strict=True):
            gram.addmm_(block.T, block)
    projections, singular, vhs = [], [], []
    for gram in grams:
        s, v = _gram_svd(gram, tasks.shape)
        s, v = s[:k], v[:, :k]
        projections.append(v / s)
        singular.append(s)
        vhs.append(v.T)
    return projections, singular, vhs


def _tsv(tasks, weights, p, seed):
    k = merges.tsv_rank(tasks.shape, tasks.count, p.tsv_budget)
    projections, singular, vhs = _top_triplets(
        (merges.weighted(blocks, weights) for _, _, blocks in tasks.blocks()), tasks, k
    )

    def left(blocks):  # rows of [U_1 … U_T]
        scaled = merges.weighted(blocks, weights)
        return torch.cat([x @ proj for x, proj in zip(scaled, projections)], dim=1)

    s, vh = torch.cat(singular), torch.cat(vhs, dim=0)
    to_polar = _inverse_sqrt(_gram((left(b) for _, _, b in tasks.blocks()), s.numel(), tasks))
    right = (to_polar * s) @ polar(vh)  # polar(U) S polar(Vh) = U · (UᵀU)^(-1/2) S polar(Vh)
    return lambda: (left(b) @ right for _, _, b in tasks.blocks())


def _iso_c(tasks, weights, p, seed):
    def summed():
        return (merges.task_arithmetic(b, weights) for _, _, b in tasks.blocks())

    s, v = _gram_svd(_gram(summed(), tasks.shape[1], tasks), tasks.shape)
    if s.numel() == 0:
        return lambda: (torch.zeros_like(b[0]) for _, _, b in tasks.blocks())
    # mean(S) · U Vᵀ with U = X V S⁻¹
    right = s.mean() * ((v / s) @ v.T)
    return lambda: (x @ right for x in summed())


def _cart(tasks, weights, p, seed):
    k = math.ceil(p.cart_rank_ratio * min(tasks.shape))

    def centred():
        for _, _, blocks in tasks.blocks():
            mean = merges.weighted_mean(blocks, weights)
            yield mean, [task - mean for task in blocks]

    cols = tasks.shape[1]
    grams = [torch.zeros(cols, cols, dtype=tasks.dtype, device=tasks.device) for _ in weights]
    for _, residuals in centred():
        for gram, residual in zip(grams, residuals):
            gram.addmm_(residual.T, residual)
    # rank_k(R) = R V_k V_kᵀ
    bases = [_gram_svd(gram, tasks.shape, cut=False)[1][:, :k] for gram in grams]
    del grams

    def produce():
        for mean, residuals in centred():
            low_rank = sum(
                w * ((r @ v) @ v.T) for r, v, w in zip(residuals, bases, weights, strict=True)
            )
            yield mean + p.cart_alpha * low_rank

    return produce


def _iso_cts(tasks, weights, p, seed):
    count = tasks.count

    def summed():
        for _, _, blocks in tasks.blocks():
            scaled = merges.weighted(blocks, weights)
            yield scaled, torch.stack(scaled).sum(dim=0)

    s, v = _gram_svd(_gram((x for _, x in summed()), tasks.shape[1], tasks), tasks.shape)
    rank = s.numel()
    common = int(rank * p.iso_common_fraction)
    specific = round((rank - common) / count) * count
    common, per_task = rank - specific, specific // count
    to_common = v[:, :common] / s[:common]  # U_c = X V_c S_c⁻¹
    projections, singular, vhs = [], [], []
    if per_task:
        # task t's residual outside the common left subspace: R_t = X_t − U_c (U_cᵀ X_t)
        cols = tasks.shape[1]
        overlaps = [
            torch.zeros(common, cols, dtype=tasks.dtype, device=tasks.device) for _ in weights
        ]
        for scaled, total in summed():
            u_c = total @ to_common
            for overlap, x in zip(overlaps, scaled):
                overlap.addmm_(u_c.T, x)

        def residuals():
            for scaled, total in summed():
                u_c = total @ to_common
                yield [x - u_c @ overlap for x, overlap in zip(scaled, overlaps)], u_c

        projections, singular, vhs = _top_triplets(
            (blocks for blocks, _ in residuals()), tasks, per_task
        )
    else:

        def residuals():
            for _, total in summed():
                yield [], total @ to_common

    singular.append(s[:common])
    vhs.append(v[:, :common].T)
    s_all, vh = torch.cat(singular), torch.cat(vhs, dim=0)
    if s_all.numel() == 0:  # nothing to merge: all tasks are zero
        return lambda: (torch.zeros_like(b[0]) for _, _, b in tasks.blocks())

    def left():  # rows of [U_1 … U_T, U_c]
        for blocks, u_c in residuals():
            yield torch.cat([r @ proj for r, proj in zip(blocks, projections)] + [u_c], dim=1)

    to_polar = _inverse_sqrt(_gram(left(), s_all.numel(), tasks))
    right = s_all.mean() * (to_polar @ polar(vh))  # isotropic(polar(U), S, polar(Vh))
    return lambda: (u @ right for u in left())


_METHODS = {
    "ta": _ta,
    "mean": _mean,
    "ties": _ties,
    "dare": _dare,
    "dare_ties": _dare_ties,
    "tsv": _tsv,
    "cart": _cart,
    "iso_c": _iso_c,
    "iso_cts": _iso_cts,
}
