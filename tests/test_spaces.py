"""The spaces on random LoRA factors: lossless linear merges, no m×n SVD, relative rank cut."""

import pytest
import torch

from mergekit_corespace import linalg, spaces
from mergekit_corespace.options import MergeParameters
from mergekit_corespace.pipeline import merge_factors
from mergekit_corespace.spaces import CoreSpace


def random_factors(m=48, n=40, ranks=(4, 8, 16), seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(m, r, generator=generator, dtype=dtype) * (t + 1),
            torch.randn(r, n, generator=generator, dtype=dtype),
        )
        for t, r in enumerate(ranks)
    ]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("space", ["core", "knots", "full"])
@pytest.mark.parametrize("scale_tasks", [True, False])
def test_task_arithmetic_is_lossless_in_every_space(space, scale_tasks):
    factors, weights = random_factors(), [1.0, -0.5, 0.25]
    parameters = MergeParameters(merge="ta", knots_scale_tasks=scale_tasks)
    merged = merge_factors(factors, weights, parameters, space).to_dense()
    dense = sum(w * (b @ a) for (b, a), w in zip(factors, weights))
    assert rel(merged, dense) < 1e-12


@pytest.mark.parametrize("method", ["ta", "mean"])
def test_core_knots_and_full_agree_for_linear_merges(method):
    factors, weights = random_factors(ranks=(3, 5, 8, 2)), [0.3, 1.2, 0.7, 2.0]
    parameters = MergeParameters(merge=method, **{"lambda": 0.6})
    core, knots, full = (
        merge_factors(factors, weights, parameters, space).to_dense()
        for space in ("core", "knots", "full")
    )
    assert rel(core, full) < 1e-10 and rel(knots, full) < 1e-10


METHODS = ["ta", "mean", "ties", "dare", "dare_ties", "tsv", "cart", "iso_c", "iso_cts"]
DECOMPOSITIONS = ["svd", "svdvals", "qr", "eigh", "eig", "eigvalsh", "cholesky", "lstsq", "pinv"]


@pytest.mark.parametrize("method", METHODS)
def test_core_space_never_decomposes_an_m_by_n_matrix(monkeypatch, method):
    """Whatever the inner method, core space decomposes only the stacked factors and R×R
    cores, and its result stays factored: nothing m×n is formed or decomposed."""
    factors = random_factors(m=300, n=200, ranks=(4, 8))
    shapes = []

    def recording(function):
        def record(matrix, *args, **kwargs):
            shapes.append(tuple(matrix.shape))
            return function(matrix, *args, **kwargs)

        return record

    for name in DECOMPOSITIONS:
        monkeypatch.setattr(torch.linalg, name, recording(getattr(torch.linalg, name)))
    for name in ("svd", "pca_lowrank", "svd_lowrank"):
        monkeypatch.setattr(torch, name, recording(getattr(torch, name)))
    merged = merge_factors(factors, [1.0, 0.5], MergeParameters(merge=method), "core")
    assert shapes[:2] == [(300, 12), (200, 12)]  # [B₁ B₂] and [A₁; A₂]ᵀ
    assert all(min(shape) <= 12 for shape in shapes), shapes  # the rest: 12×12 cores
    assert merged.dense is None
    assert merged.left.shape == (300, 12) and merged.right.shape == (12, 200)


def test_cores_are_r_by_r_and_reconstruct_each_task():
    factors = random_factors()
    basis = CoreSpace(factors)
    assert basis.u_b.shape == (48, 28) and basis.v_a.shape == (28, 40)
    for (b, a), core in zip(factors, basis.tasks):
        assert core.shape == (28, 28)
        assert rel(basis.u_b @ core @ basis.v_a, b @ a) < 1e-12


def test_rank_cut_is_relative_to_the_largest_singular_value():
    # two adapters sharing all directions: R = 8 nominal, 4 real, at any scale
    b, a = random_factors(ranks=(4,))[0]
    for scale in (1e-12, 1.0, 1e12):
        basis = CoreSpace([(scale * b, a), (2 * scale * b, a)])
        assert basis.u_b.shape[1] == 4 and basis.v_a.shape[0] == 4


def test_knots_tasks_are_blocks_of_one_svd():
    factors = random_factors(ranks=(2, 3))
    space = spaces.KnotsSpace(factors, scale_tasks=False)
    assert len(space.tasks) == 2 and all(t.shape == (5, 40) for t in space.tasks)
    stacked = torch.cat(space.tasks, dim=1)
    assert torch.allclose(stacked @ stacked.T, torch.eye(5, dtype=torch.float64), atol=1e-12)


def test_all_zero_adapters_give_a_zero_delta():
    factors = [(torch.zeros(10, 2, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64))]
    for space in ("core", "knots", "full"):
        merged = merge_factors(factors, [1.0], MergeParameters(), space).to_dense()
        assert merged.shape == (10, 6) and not merged.any()


@pytest.mark.parametrize("space", ["core", "knots"])
def test_float32_keeps_a_weak_adapter_of_a_wide_module(space):
    """In float32 numpy's rank rule (max(shape)·eps) is 3e-3 of σ_max for a KnOTS
    concatenation of 6 × 4 200 columns: it cut away an adapter 1 000× weaker than the
    others (84 % of its delta lost). The cut at √eps keeps it: the float32 merge is the
    float64 merge to float32's rounding, about 1 % of the weak delta here."""
    generator = torch.Generator().manual_seed(0)
    factors = [
        (
            torch.randn(32, 2, generator=generator, dtype=torch.float64),
            torch.randn(2, 4200, generator=generator, dtype=torch.float64) / 60,
        )
        for _ in range(6)
    ]
    factors[5] = (factors[5][0] * 1e-3, factors[5][1])
    weak = factors[5][0] @ factors[5][1]
    merged = {}
    for dtype in (torch.float64, torch.float32):
        parameters = MergeParameters(precision=str(dtype).removeprefix("torch."))
        cast = [(b.to(dtype), a.to(dtype)) for b, a in factors]
        merged[dtype] = merge_factors(cast, [1.0] * 6, parameters, space).to_dense().double()
    assert torch.allclose(merged[torch.float64], sum(b @ a for b, a in factors))
    assert (merged[torch.float32] - merged[torch.float64]).norm() < 0.1 * weak.norm()


def test_relative_rank_cut_counts_non_null_values():
    values = torch.tensor([10.0, 1.0, 1e-20, 0.0], dtype=torch.float64)
    assert linalg.relative_rank_cut(values, (4, 4)) == 2
    assert linalg.relative_rank_cut(torch.zeros(3, dtype=torch.float64), (3, 3)) == 0
    # float32, a wide matrix: numpy's max(shape)·eps (1e-2 here) is capped at √eps (3.5e-4)
    wide = torch.tensor([1.0, 1e-3, 1e-5], dtype=torch.float32)
    assert linalg.relative_rank_cut(wide, (4096, 86016)) == 2
