"""Task spaces for one module: where the inner merge method runs. Pure torch.

T adapters give ``ΔW_t = B_t A_t`` (scale folded into ``B_t``). A space maps them to T
same-shaped task matrices, an inner method (:mod:`mergekit_corespace.merges`) merges
those, and the space maps the result back to a weight delta:

- core  (Core Space, arXiv 2509.17786 §3): ``U_B`` = left singular vectors of
  ``[B_1 … B_T]``, ``V_A`` = right singular vectors of ``[A_1; …; A_T]``; task t is the
  core ``M_t = (U_Bᵀ B_t)(A_t V_Aᵀ)`` (R×R, R = Σ r_t); back: ``ΔW = U_B M V_A``.
  Never forms an m×n matrix before the end, and is exact for linear merges.
- knots (KnOTS, arXiv 2410.19735 §3): SVD of the concatenated dense deltas
  ``[ΔW_1 … ΔW_T] = U S [V_1 … V_T]``; task t is ``V_t`` (or ``S V_t``); back:
  ``ΔW = U S V`` (or ``U V``). Costs a dense SVD of an m×(T·n) matrix.
- full: the dense ``ΔW_t`` themselves (the classic baseline).

Null directions are dropped with a tolerance relative to the largest singular value.
Results stay factored (``left @ right``) where the space allows, so a merged adapter
needs no m×n matrix at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# (ΔW_t as B_t @ A_t): B is m×r, A is r×n, the scale already folded into B.
LowRank = tuple[torch.Tensor, torch.Tensor]
# An inner merge: T same-shaped task matrices -> one matrix of that shape.
InnerMerge = Callable[[Sequence[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class MergedDelta:
    """A merged weight delta, ``left @ right`` when factored, else ``dense``."""

    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    def to_dense(self) -> torch.Tensor:
        return self.dense if self.dense is not None else self.left @ self.right

    def add_to(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight + ΔW`` in ``weight``'s dtype, without a separate m×n delta when factored."""
        if self.dense is not None:
            return weight + self.dense.to(weight.dtype)
        return torch.addmm(weight, self.left.to(weight.dtype), self.right.to(weight.dtype))


def relative_rank_cut(singular_values: torch.Tensor, shape: Sequence[int]) -> int:
    """How many singular values are not null, relative to the largest (numpy's rank rule)."""
    if singular_values.numel() == 0 or singular_values[0] == 0:
        return 0
    rtol = max(shape) * torch.finfo(singular_values.dtype).eps
    return int((singular_values > rtol * singular_values[0]).sum())


def left_basis(matrix: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning the column space of ``matrix`` (m×k)."""
    u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, : relative_rank_cut(s, matrix.shape)]


def right_basis(matrix: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning the row space of ``matrix`` (k×n)."""
    _, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return vh[: relative_rank_cut(s, matrix.shape)]


@dataclass(frozen=True)
class CoreBasis:
    """The shared basis of one module: ``U_B`` (m×R_B) and ``V_A`` (R_A×n)."""

    u_b: torch.Tensor
    v_a: torch.Tensor

    @classmethod
    def from_factors(cls, factors: Sequence[LowRank]) -> CoreBasis:
        u_b = left_basis(torch.cat([b for b, _ in factors], dim=1))
        v_a = right_basis(torch.cat([a for _, a in factors], dim=0))
        return cls(u_b=u_b, v_a=v_a)

    def core(self, factor: LowRank) -> torch.Tensor:
        """``M_t = (U_Bᵀ B_t)(A_t V_Aᵀ)``: cost O((m + n) R²), exact since B_t, A_t lie in the basis."""
        b, a = factor
        return (self.u_b.T @ b) @ (a @ self.v_a.T)


def core_space(factors: Sequence[LowRank], merge: InnerMerge) -> MergedDelta:
    basis = CoreBasis.from_factors(factors)
    merged = merge([basis.core(factor) for factor in factors])
    return MergedDelta(left=basis.u_b @ merged, right=basis.v_a)


def full_space(factors: Sequence[LowRank], merge: InnerMerge) -> MergedDelta:
    return MergedDelta(dense=merge([b @ a for b, a in factors]))


def knots_space(
    factors: Sequence[LowRank], merge: InnerMerge, scale_tasks: bool = True
) -> MergedDelta:
    """KnOTS: one SVD of ``[ΔW_1 … ΔW_T]`` (m×T·n), built block by block in place."""
    m, n = factors[0][0].shape[0], factors[0][1].shape[1]
    concatenated = torch.empty(
        m, n * len(factors), dtype=factors[0][0].dtype, device=factors[0][0].device
    )
    for t, (b, a) in enumerate(factors):
        concatenated[:, t * n : (t + 1) * n] = b @ a
    u, s, vh = torch.linalg.svd(concatenated, full_matrices=False)
    del concatenated
    k = relative_rank_cut(s, (m, n * len(factors)))
    u, s, vh = u[:, :k], s[:k], vh[:k]
    tasks = list(vh.split(n, dim=1))
    if scale_tasks:
        merged = merge([s[:, None] * task for task in tasks])
        return MergedDelta(left=u, right=merged)
    merged = merge(tasks)
    return MergedDelta(left=u * s, right=merged)


SPACES = {"core": core_space, "knots": knots_space, "full": full_space}
