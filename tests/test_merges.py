"""Inner methods on hand-built inputs with hand-derived results, and their invariants."""

import pytest
import torch

from mergekit_corespace import merges

T = lambda *rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731


def singular_values(matrix):
    return torch.linalg.svdvals(matrix)


def test_ties_trims_elects_and_takes_the_disjoint_mean():
    x1 = T([1.0, -2.0], [3.0, 0.5])
    x2 = T([-4.0, 1.0], [2.0, 0.1])
    # density 0.5 keeps 2 of 4 entries per task: x1 -> [[0,-2],[3,0]], x2 -> [[-4,0],[2,0]]
    # signs of the sum: [[-,-],[+,0]]; agreeing entries averaged: [[-4,-2],[(3+2)/2,0]]
    merged = merges.ties([x1, x2], [1.0, 1.0], density=0.5)
    assert torch.equal(merged, T([-4.0, -2.0], [2.5, 0.0]))


def test_ties_weights_vote_and_average():
    x1, x2 = T([1.0]), T([-1.0])
    # weights 3 and 1: the elected sign is +, only x1 agrees: 3·1 / 3
    assert torch.equal(merges.ties([x1, x2], [3.0, 1.0], density=1.0), T([1.0]))
    # three tasks, two agree: (2·1 + 1·4) / (2 + 1)
    tasks = [T([1.0]), T([4.0]), T([-1.5])]
    assert torch.allclose(merges.ties(tasks, [2.0, 1.0, 1.0], density=1.0), T([2.0]))


def test_ties_with_thresholds_trims_by_magnitude():
    x1 = T([1.0, -2.0], [3.0, 0.5])
    merged = merges.ties([x1], [1.0], density=1.0, thresholds=[1.5])
    assert torch.equal(merged, T([0.0, -2.0], [3.0, 0.0]))


def test_ties_trim_by_sort_off_the_cpu_is_the_kthvalue_trim(monkeypatch):
    """Off the CPU the trim threshold is read from a sort (CUDA's kthvalue is slow): the
    same order statistic, so the same bits — with ties among magnitudes, signed zeros and
    every density from one entry kept to all but one."""
    generator = torch.Generator().manual_seed(0)
    task = torch.randint(-6, 7, (13, 11), generator=generator).double() / 4  # many ties
    task[0, 0], task[1, 1] = 0.0, -0.0
    tasks = [task, torch.randn(13, 11, generator=generator, dtype=torch.float64)]
    densities = (1 / task.numel(), 0.1, 0.37, 0.5, 0.7, 1 - 1 / task.numel())
    by_kthvalue = [merges.ties(tasks, [1.0, 2.0], density) for density in densities]
    monkeypatch.setattr(merges, "_selects_by_sort", lambda device: True)
    by_sort = [merges.ties(tasks, [1.0, 2.0], density) for density in densities]
    assert all(torch.equal(a, b) for a, b in zip(by_sort, by_kthvalue, strict=True))
    for density in densities:  # the trim itself, entry for entry
        keep = max(1, int(density * task.numel()))
        kept = merges.keep_top_magnitudes(task, density)
        threshold = task.abs().flatten().kthvalue(task.numel() - keep + 1).values
        assert torch.equal(kept, task * (task.abs() >= threshold))


def test_dare_with_density_one_is_task_arithmetic():
    tasks = [torch.randn(5, 4, dtype=torch.float64) for _ in range(3)]
    weights = [0.5, 1.0, -2.0]
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(
        merges.dare(tasks, weights, 1.0, generator), merges.task_arithmetic(tasks, weights)
    )


def test_dare_keeps_entries_with_the_given_probability_and_rescales_them():
    task = torch.full((200, 200), 3.0, dtype=torch.float64)
    dropped = merges.random_drop(task, 0.25, torch.Generator().manual_seed(1))
    kept = dropped != 0
    assert torch.all(dropped[kept] == 12.0)  # 3 / 0.25
    assert abs(kept.double().mean().item() - 0.25) < 0.01


def test_dare_masks_depend_only_on_the_seed():
    tasks = [torch.randn(6, 6, dtype=torch.float64) for _ in range(2)]
    runs = [merges.dare_ties(tasks, [1, 1], 0.3, torch.Generator().manual_seed(7)) for _ in "ab"]
    assert torch.equal(*runs)
    other = merges.dare_ties(tasks, [1, 1], 0.3, torch.Generator().manual_seed(8))
    assert not torch.equal(runs[0], other)


def test_dare_ties_with_density_one_is_the_disjoint_mean():
    x1, x2 = T([1.0, -2.0]), T([3.0, 1.0])
    merged = merges.dare_ties([x1, x2], [1.0, 1.0], 1.0, torch.Generator())
    assert torch.equal(merged, T([2.0, -2.0]))


def _orthogonal_tasks():
    # four orthonormal directions on each side, two rank-2 tasks on disjoint ones
    q_left, _ = torch.linalg.qr(torch.randn(8, 4, dtype=torch.float64))
    q_right, _ = torch.linalg.qr(torch.randn(6, 4, dtype=torch.float64))
    first = q_left[:, :2] @ torch.diag(T(5.0, 2.0)) @ q_right[:, :2].T
    second = q_left[:, 2:] @ torch.diag(T(3.0, 1.0)) @ q_right[:, 2:].T
    return first, second


def test_tsv_with_full_budget_on_orthogonal_tasks_is_task_arithmetic():
    first, second = _orthogonal_tasks()
    merged = merges.tsv([first, second], [1.0, 1.0], budget=1.0)
    assert torch.allclose(merged, first + second, atol=1e-12)


def test_tsv_keeps_each_tasks_top_singular_values():
    first, second = _orthogonal_tasks()
    # budget 4/6 of min(8, 6) = 4 vectors, 2 per task: everything; budget 2/6: 1 per task
    merged = merges.tsv([first, second], [1.0, 1.0], budget=2 / 6)
    assert torch.allclose(singular_values(merged)[:2], T(5.0, 3.0), atol=1e-12)
    assert singular_values(merged)[2] < 1e-12


def test_cart_on_diagonal_tasks():
    tasks = [
        torch.diag(T(3.0, 0.0, 0.0)),
        torch.diag(T(0.0, 3.0, 0.0)),
        torch.diag(T(0.0, 0.0, 3.0)),
    ]
    # mean = I; centred tasks diag(2,-1,-1), ...; their rank-1 parts diag(2,0,0), ...
    merged = merges.cart(tasks, [1.0, 1.0, 1.0], rank_ratio=0.1, alpha=0.5)
    assert torch.allclose(merged, torch.diag(T(2.0, 2.0, 2.0)), atol=1e-12)


def test_cart_of_two_tasks_is_their_mean():
    # the two centred tasks are ±D, so their rank-k parts cancel whatever k
    a, b = torch.randn(5, 5, dtype=torch.float64), torch.randn(5, 5, dtype=torch.float64)
    merged = merges.cart([a, b], [1.0, 1.0], rank_ratio=0.4, alpha=0.7)
    assert torch.allclose(merged, (a + b) / 2, atol=1e-12)


def test_iso_c_flattens_the_spectrum_of_the_sum():
    tasks = [torch.randn(7, 5, dtype=torch.float64) for _ in range(3)]
    total = sum(tasks)
    merged = merges.iso_c(tasks, [1.0, 1.0, 1.0])
    expected = singular_values(total).mean()
    assert torch.allclose(singular_values(merged), expected.expand(5), atol=1e-12)
    u, _, vh = torch.linalg.svd(total, full_matrices=False)
    assert torch.allclose(merged, expected * u @ vh, atol=1e-12)


def test_iso_c_keeps_a_low_rank_sum_low_rank():
    factors = [
        (torch.randn(30, 2, dtype=torch.float64), torch.randn(2, 20, dtype=torch.float64))
        for _ in range(2)
    ]
    merged = merges.iso_c([b @ a for b, a in factors], [1.0, 1.0])
    values = singular_values(merged)
    assert torch.allclose(values[:4], values[0].expand(4)) and values[4] < 1e-10


def test_iso_cts_has_a_flat_spectrum_and_reduces_to_iso_c():
    tasks = [torch.randn(12, 12, dtype=torch.float64) for _ in range(3)]
    merged = merges.iso_cts(tasks, [1.0, 1.0, 1.0], common_fraction=0.5)
    values = singular_values(merged)
    assert torch.allclose(values, values[0].expand(12), atol=1e-10)
    assert torch.allclose(
        merges.iso_cts(tasks, [1.0, 1.0, 1.0], common_fraction=1.0),
        merges.iso_c(tasks, [1.0, 1.0, 1.0]),
        atol=1e-12,
    )


def test_magnitude_sketch_threshold_is_within_one_bin_of_the_exact_quantile():
    generator = torch.Generator().manual_seed(0)
    modules = [
        torch.randn(n, n, generator=generator, dtype=torch.float64) * 10.0**-e
        for n, e in ((40, 3), (25, 1), (60, 5))
    ]
    sketch = merges.MagnitudeSketch(tasks=1)
    for module in modules:
        sketch.add(0, module)
    everything = torch.cat([m.abs().flatten() for m in modules])
    for density in (0.05, 0.3, 0.7):
        threshold = sketch.threshold(0, density)
        kept = int((everything >= threshold).sum())
        wanted = int(density * everything.numel())
        assert kept >= wanted
        exact = everything.sort(descending=True).values[wanted - 1].item()
        assert exact / 2 ** (1 / 64) <= threshold <= exact


@pytest.mark.parametrize("method", ["ta", "mean", "iso_c"])
def test_methods_without_parameters_are_linear_in_scale(method):
    function = {"ta": merges.task_arithmetic, "mean": merges.weighted_mean, "iso_c": merges.iso_c}[
        method
    ]
    tasks = [torch.randn(4, 3, dtype=torch.float64) for _ in range(2)]
    assert torch.allclose(function([2 * t for t in tasks], [1, 1]), 2 * function(tasks, [1, 1]))


@pytest.mark.parametrize(
    "method", ["ta", "mean", "ties", "dare", "dare_ties", "tsv", "cart", "iso_c", "iso_cts"]
)
def test_every_method_maps_zero_tasks_to_zero(method):
    from mergekit_corespace.options import MergeParameters
    from mergekit_corespace.pipeline import inner_merge

    zeros = [torch.zeros(6, 4, dtype=torch.float64) for _ in range(3)]
    merged = inner_merge(MergeParameters(merge=method), [1.0, 1.0, 1.0])(zeros)
    assert merged.shape == (6, 4) and not merged.any()
