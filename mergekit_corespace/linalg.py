"""Small linear-algebra steps shared by the spaces and the inner methods. Pure torch."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def relative_rank_cut(singular_values: torch.Tensor, shape: Sequence[int]) -> int:
    """How many singular values are not null, relative to the largest (numpy's rank rule:
    ``σ > max(shape)·eps·σ_max``, at most ``√eps·σ_max``) — never a fixed absolute threshold.

    The cap binds in float32 only (in float64 below 6.7·10⁷ rows or columns): there numpy's
    rule is 1 % of σ_max at 4 096 × 6·14 336 (a KnOTS concatenation at 8 B), enough to drop
    real directions of an adapter 10× weaker than another, while rounding leaves the null
    directions near 1e-6 (bench/perf/README.md, "Precision")."""
    if singular_values.numel() == 0 or singular_values[0] == 0:
        return 0
    eps = torch.finfo(singular_values.dtype).eps
    rtol = min(max(shape) * eps, math.sqrt(eps))
    return int((singular_values > rtol * singular_values[0]).sum())


def nonnull_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD restricted to the non-null singular values."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = relative_rank_cut(s, matrix.shape)
    return u[:, :k], s[:k], vh[:k]


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (or rows): ``U Vᵀ`` of its SVD."""
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def truncated(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-``rank`` approximation (Eckart–Young)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]
