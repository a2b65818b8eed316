"""Weights saved whole, SVD-based inner methods on tall ones (:mod:`~mergekit_corespace.dense`):
the SVDs of TSV, CART, Iso-C and Iso-CTS taken from n×n Gram matrices ``XᵀX = V S² Vᵀ``
accumulated over row blocks, with ``U = X V S⁻¹`` and ``polar(U) = U (UᵀU)^(-1/2)`` applied
one block at a time, so that no task is ever whole in memory.

Each method takes a :class:`~mergekit_corespace.dense.DenseTasks` (row blocks of every task),
the adapters' weights, the merge parameters and the seed, and returns a function that
yields the merged ΔW one block of rows after the other.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from mergekit_corespace import merges
from mergekit_corespace.linalg import polar

if TYPE_CHECKING:
    from mergekit_corespace.dense import DenseTasks


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


def tsv(tasks, weights, p, seed):
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


def iso_c(tasks, weights, p, seed):
    def summed():
        return (merges.task_arithmetic(b, weights) for _, _, b in tasks.blocks())

    s, v = _gram_svd(_gram(summed(), tasks.shape[1], tasks), tasks.shape)
    if s.numel() == 0:
        return lambda: (torch.zeros_like(b[0]) for _, _, b in tasks.blocks())
    # mean(S) · U Vᵀ with U = X V S⁻¹
    right = s.mean() * ((v / s) @ v.T)
    return lambda: (x @ right for x in summed())


def cart(tasks, weights, p, seed):
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


def iso_cts(tasks, weights, p, seed):
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
