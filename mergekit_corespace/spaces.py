"""Task spaces for one module: where the inner merge method runs. Pure torch.

T adapters give ``ΔWₜ = Bₜ Aₜ`` (scale folded into ``Bₜ``). A space turns them into T
same-shaped task matrices (``tasks``), an inner method (:mod:`mergekit_corespace.merges`)
merges those, and the space maps the merged matrix back to a weight delta (``back``):

- core  (Core Space, arXiv 2509.17786 §3): ``U_B`` = left singular vectors of
  ``[B₁ … B_T]``, ``V_A`` = right singular vectors of ``[A₁; …; A_T]``; task t is the
  core ``Mₜ = (U_Bᵀ Bₜ)(Aₜ V_Aᵀ)`` (R×R, R = Σ rₜ); back: ``ΔW = U_B M V_A``. Never forms
  an m×n matrix, and is exact for linear merges.
- knots (KnOTS, arXiv 2410.19735 §3): SVD of the concatenated dense deltas
  ``[ΔW₁ … ΔW_T] = U S [V₁ … V_T]``; task t is ``S Vₜ`` (or ``Vₜ``); back: ``ΔW = U V``
  (or ``U S V``). Costs a dense SVD of an m×(T·n) matrix: the slow baseline.
- full: the dense ``ΔWₜ`` themselves (the classic baseline).

Null directions are dropped with a tolerance relative to the largest singular value.
Results stay factored (``left @ right``) where the space allows, so a merged adapter
needs no m×n matrix at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from mergekit_corespace.linalg import nonnull_svd, relative_rank_cut

# ΔWₜ as Bₜ @ Aₜ: B is m×r, A is r×n, the scale already folded into B.
LowRank = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class RowBlocks:
    """An m×n matrix computed one block of rows at a time, top to bottom, whenever it is
    read: never whole in memory (a merged weight saved whole, :mod:`mergekit_corespace.dense`)."""

    shape: tuple[int, int]
    produce: Callable[[], Iterator[torch.Tensor]]  # consecutive blocks of rows

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first row, block)`` pairs."""
        start = 0
        for block in self.produce():
            yield start, block
            start += block.shape[0]

    def materialize(self) -> torch.Tensor:
        return torch.cat(list(self.produce()))


@dataclass(frozen=True)
class MergedDelta:
    """A merged weight delta, ``left @ right`` when factored, else ``dense`` (a tensor, or
    :class:`RowBlocks` computed as they are read)."""

    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    dense: torch.Tensor | RowBlocks | None = None

    def to_dense(self) -> torch.Tensor:
        if isinstance(self.dense, RowBlocks):
            return self.dense.materialize()
        return self.dense if self.dense is not None else self.left @ self.right

    def applied_to(
        self, weight: torch.Tensor, out: torch.Tensor | None = None, block_elements: int = 1 << 20
    ) -> torch.Tensor:
        """``weight + ΔW`` as a new tensor of ``weight``'s dtype (written into ``out``, a
        fresh tensor shaped like ``weight``, when given).

        The update runs in float64 for float64 weights and in float32 otherwise — its
        rounding (~√R·2⁻²⁴ of ΔW) stays below that of the output — one block of rows at a
        time, so the working copy stays in cache and no m×n temporary is allocated."""
        compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
        if weight.dim() < 2:
            merged = (weight.to(compute) + self.to_dense().to(compute)).to(weight.dtype)
            return merged if out is None else out.copy_(merged)
        out = torch.empty_like(weight) if out is None else out
        if isinstance(self.dense, RowBlocks):
            for start, delta in self.dense:
                stop = start + delta.shape[0]
                block = weight[start:stop].to(compute, copy=True)
                block += delta.to(compute)
                out[start:stop] = block
            return out
        rows = max(1, block_elements // max(1, weight.shape[1]))
        if self.dense is None:
            left, right = self.left.to(compute), self.right.to(compute)
        for start in range(0, weight.shape[0], rows):
            block = weight[start : start + rows].to(compute, copy=True)  # never write the base
            if self.dense is None:
                block.addmm_(left[start : start + rows], right)
            else:
                block += self.dense[start : start + rows].to(compute)
            out[start : start + rows] = block
        return out

    def to(self, device: torch.device | str) -> MergedDelta:
        """The delta on ``device`` (row blocks are computed where they were planned)."""
        if isinstance(self.dense, RowBlocks):
            return self
        moved = (None if t is None else t.to(device) for t in (self.left, self.right, self.dense))
        return MergedDelta(*moved)

    def scaled(self, factor: float) -> MergedDelta:
        """``factor · ΔW`` (the left factor scaled, or each dense block as it is read)."""
        if isinstance(self.dense, RowBlocks):
            produce = self.dense.produce
            return MergedDelta(
                dense=RowBlocks(self.dense.shape, lambda: (factor * b for b in produce()))
            )
        if self.dense is not None:
            return MergedDelta(dense=factor * self.dense)
        return MergedDelta(left=factor * self.left, right=self.right)

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Thin SVD of ΔW. Factored: QR of both factors and an SVD of the k×k product of
        their R's — nothing m×n is formed. Dense: the thin SVD of the m×n delta itself."""
        if self.dense is not None:
            return torch.linalg.svd(self.to_dense(), full_matrices=False)
        q_left, r_left = torch.linalg.qr(self.left)
        q_right, r_right = torch.linalg.qr(self.right.T)
        p, s, qh = torch.linalg.svd(r_left @ r_right.T)
        return q_left @ p, s, qh @ q_right.T

    @property
    def shape(self) -> tuple[int, int]:
        if self.dense is not None:
            return tuple(self.dense.shape)
        return (self.left.shape[0], self.right.shape[1])


@dataclass(frozen=True)
class LowRankDelta:
    """``ΔW ≈ B @ A`` of rank ``rank``, and the relative Frobenius error of that cut."""

    b: torch.Tensor  # m×rank
    a: torch.Tensor  # rank×n
    relative_error: float

    @property
    def rank(self) -> int:
        return self.b.shape[1]

    def scaled(self, factor: float) -> LowRankDelta:
        """``factor · ΔW``; the cut and its relative error do not change with a scale."""
        return LowRankDelta(b=factor * self.b, a=self.a, relative_error=self.relative_error)


def truncate(
    delta: MergedDelta, rank: int | None = None, energy: float | None = None
) -> LowRankDelta:
    """Best rank-k factors of ΔW (Eckart–Young), singular values split evenly between B and A.

    ``rank=None, energy=None`` keeps every non-null direction (exact up to rounding);
    ``rank=k`` keeps at most k; ``energy=e`` keeps the fewest directions holding a share
    ``e`` of ‖ΔW‖²_F. The error is ``sqrt(Σ_dropped σ²) / sqrt(Σ σ²)``.
    """
    u, s, vh = delta.svd()
    k = relative_rank_cut(s, delta.shape)
    if rank is not None:
        k = min(k, rank)
    if energy is not None and k:
        cumulative = (s**2).cumsum(0) / (s**2).sum()
        k = min(k, int((cumulative < energy - 1e-12).sum()) + 1)
    total = (s**2).sum()
    error = float(((s[k:] ** 2).sum() / total).sqrt()) if total > 0 else 0.0
    root = s[:k].sqrt()
    return LowRankDelta(b=u[:, :k] * root, a=root[:, None] * vh[:k], relative_error=error)


def left_basis(matrix: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning the column space of ``matrix`` (m×k)."""
    return nonnull_svd(matrix)[0]


def right_basis(matrix: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning the row space of ``matrix`` (k×n): the left singular
    vectors of its transpose (LAPACK is ~1.5× faster on the tall orientation)."""
    return left_basis(matrix.T).T


class CoreSpace:
    """Shared basis ``U_B`` (m×R_B), ``V_A`` (R_A×n) of one module; tasks are the cores."""

    def __init__(self, factors: Sequence[LowRank]):
        self.u_b = left_basis(torch.cat([b for b, _ in factors], dim=1))
        self.v_a = right_basis(torch.cat([a for _, a in factors], dim=0))
        self.tasks = [self.core(factor) for factor in factors]

    def core(self, factor: LowRank) -> torch.Tensor:
        """``Mₜ = (U_Bᵀ Bₜ)(Aₜ V_Aᵀ)``: O((m + n) R²), exact since Bₜ, Aₜ lie in the basis."""
        b, a = factor
        return (self.u_b.T @ b) @ (a @ self.v_a.T)

    def back(self, merged: torch.Tensor) -> MergedDelta:
        return MergedDelta(left=self.u_b @ merged, right=self.v_a)


class KnotsSpace:
    """One SVD of ``[ΔW₁ … ΔW_T]`` (m×T·n), built block by block in one buffer.

    LAPACK is given the transpose ``[ΔW₁ᵀ; …; ΔW_Tᵀ]`` (T·n×m, tall): the same SVD with
    the factors' roles swapped, 2–3.5× faster than the wide matrix on the CPU."""

    def __init__(self, factors: Sequence[LowRank], scale_tasks: bool = True):
        m, n = factors[0][0].shape[0], factors[0][1].shape[1]
        stacked = factors[0][0].new_empty(n * len(factors), m)
        for t, (b, a) in enumerate(factors):
            torch.mm(a.T, b.T, out=stacked[t * n : (t + 1) * n])
        v, s, uh = torch.linalg.svd(stacked, full_matrices=False)
        del stacked
        k = relative_rank_cut(s, (m, n * len(factors)))
        # copies, not views: the kept k columns should not hold the whole factors alive
        self.u, self.s, self.scale_tasks = uh[:k].T.contiguous(), s[:k].clone(), scale_tasks
        blocks = [block.contiguous() for block in v[:, :k].T.split(n, dim=1)]
        self.tasks = [self.s[:, None] * v for v in blocks] if scale_tasks else list(blocks)

    def back(self, merged: torch.Tensor) -> MergedDelta:
        left = self.u if self.scale_tasks else self.u * self.s
        return MergedDelta(left=left, right=merged)


class FullSpace:
    """The dense deltas: T m×n matrices (factors are multiplied out; dense deltas, e.g.
    of ``modules_to_save`` weights, are taken as they are)."""

    def __init__(self, inputs: Sequence[LowRank | torch.Tensor]):
        self.tasks = [
            item if isinstance(item, torch.Tensor) else item[0] @ item[1] for item in inputs
        ]

    def back(self, merged: torch.Tensor) -> MergedDelta:
        return MergedDelta(dense=merged)


SPACES = {"core": CoreSpace, "knots": KnotsSpace, "full": FullSpace}
