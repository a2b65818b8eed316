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

from mergekit_corespace import dense_gram, merges
from mergekit_corespace.adapters import (
    AdapterError,
    Contribution,
    DenseWeight,
    LoraModule,
    read_factors,
    read_raw,
)
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


_METHODS = {
    "ta": _ta,
    "mean": _mean,
    "ties": _ties,
    "dare": _dare,
    "dare_ties": _dare_ties,
    "tsv": dense_gram.tsv,
    "cart": dense_gram.cart,
    "iso_c": dense_gram.iso_c,
    "iso_cts": dense_gram.iso_cts,
}
