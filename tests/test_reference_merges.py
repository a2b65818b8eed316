"""Every inner method in every space through `mergekit-yaml`, against an independent
reference (tests/reference.py: numpy, written from the papers, no package import) on a
float64 model — and the inputs that tell the methods apart."""

import numpy as np
import pytest
import reference
import torch
from helpers import invoke_cli, load_model_tensors, peft_factors

from mergekit_corespace import merges

ADAPTERS = ("r8a", "patterns", "qv_only")  # ranks 8 / 2–12 / 8; q,v in all three, the rest in two
WEIGHTS = (1.0, 0.6, 0.8)
LAMBDA = 0.9
SEED = 7
# Non-default values, so that a parameter the code ignores changes the result.
PARAMETERS = {
    "ta": {},
    "mean": {},
    "ties": {"density": 0.4},
    "dare": {"density": 0.3},
    "dare_ties": {"density": 0.3},
    "tsv": {"tsv_budget": 0.6},
    "cart": {"cart_rank_ratio": 0.25, "cart_alpha": 0.35},
    "iso_c": {},
    "iso_cts": {"iso_common_fraction": 0.5},
}
SPACES = {"core_space": "core", "knots": "knots", "full_space": "full"}
TOLERANCE = 1e-10


def _merge(tmp_path, llama64, merge_method, parameters):
    base, adapters = llama64
    models = "".join(
        f"  - model: {base}+{adapters[name]}\n    parameters: {{weight: {weight}}}\n"
        for name, weight in zip(ADAPTERS, WEIGHTS)
    )
    lines = "".join(f"  {key}: {value}\n" for key, value in parameters.items())
    config = tmp_path / "merge.yml"
    config.write_text(
        f"merge_method: {merge_method}\nbase_model: {base}\nmodels:\n{models}parameters:\n{lines}"
    )
    out = tmp_path / "out"
    args = [str(config), str(out), "--no-copy-tokenizer", "--no-write-model-card"]
    done = invoke_cli([*args, "--random-seed", str(SEED)])
    assert done.returncode == 0, done.stderr[-3000:]
    return load_model_tensors(out)


def _factors(llama64):
    """Per adapter, per base weight: ``(s·B, A)`` as PEFT's own LoRA layers hold them."""
    base, adapters = llama64
    return [
        {name: (b.numpy(), a.numpy()) for name, (b, a) in peft_factors(base, adapters[n]).items()}
        for n in ADAPTERS
    ]


def _assert_matches_reference(merged, llama64, parameters, space, thresholds=None):
    base_tensors = load_model_tensors(llama64[0])
    per_adapter = _factors(llama64)
    touched = set().union(*per_adapter)
    assert touched
    for name, tensor in merged.items():
        if name not in touched:
            assert torch.equal(tensor, base_tensors[name]), name
            continue
        present = [i for i, factors in enumerate(per_adapter) if name in factors]
        expected = reference.merged_delta(
            [per_adapter[i][name] for i in present],
            [WEIGHTS[i] for i in present],
            parameters,
            space,
            random_seed=SEED,
            weight_name=name,
            thresholds=None if thresholds is None else [thresholds[i] for i in present],
        )
        assert tensor.dtype == torch.float64
        actual = (tensor - base_tensors[name]).numpy()
        error = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
        assert error <= TOLERANCE, (name, error)


CASES = [
    (merge_method, method, scale)
    for merge_method in SPACES
    for method in PARAMETERS
    for scale in ((True, False) if merge_method == "knots" else (None,))
    # unscaled KnOTS tasks have a flat spectrum, so TSV's top-k has no unique answer:
    # test_unscaled_knots_tasks_have_a_flat_spectrum
    if (merge_method, method, scale) != ("knots", "tsv", False)
]


@pytest.mark.parametrize(("merge_method", "method", "scale_tasks"), CASES)
def test_every_method_in_every_space_matches_the_independent_reference(
    llama64, tmp_path, merge_method, method, scale_tasks
):
    parameters = {"merge": method, "lambda": LAMBDA, **PARAMETERS[method]}
    if scale_tasks is not None:
        parameters["knots_scale_tasks"] = scale_tasks
    merged = _merge(tmp_path, llama64, merge_method, parameters)
    _assert_matches_reference(merged, llama64, parameters, SPACES[merge_method])


BINS_PER_OCTAVE = 64  # the global trim's documented resolution (README, "ties_scope")


def _global_threshold(magnitudes: np.ndarray, density: float) -> float:
    """The exact top-``density`` quantile of one adapter's magnitudes over all modules,
    lowered to the magnitude grid of 64 steps per octave (the sketch's bin edges)."""
    keep = max(1, int(density * magnitudes.size))
    exact = np.sort(magnitudes)[::-1][keep - 1]
    edge = 2.0 ** (np.floor(np.log2(exact) * BINS_PER_OCTAVE) / BINS_PER_OCTAVE)
    assert edge <= exact < edge * 2 ** (1 / BINS_PER_OCTAVE)
    return edge


@pytest.mark.parametrize("merge_method", SPACES)
def test_global_ties_trims_each_adapter_over_all_modules(llama64, tmp_path, merge_method):
    """``ties_scope: global``: one magnitude threshold per adapter over its tasks in every
    module it has (the exact quantile, within one bin of the sketch), then TIES per module."""
    space = SPACES[merge_method]
    per_adapter = _factors(llama64)
    magnitudes = [[] for _ in ADAPTERS]
    for name in sorted(set().union(*per_adapter)):
        present = [i for i, f in enumerate(per_adapter) if name in f]
        tasks = reference.module_tasks([per_adapter[i][name] for i in present], space)
        for i, task in zip(present, tasks):
            magnitudes[i].append(np.abs(task).ravel())
    density = 0.3
    thresholds = [_global_threshold(np.concatenate(m), density) for m in magnitudes]
    parameters = {"merge": "ties", "density": density, "ties_scope": "global", "lambda": LAMBDA}
    merged = _merge(tmp_path, llama64, merge_method, parameters)
    _assert_matches_reference(merged, llama64, parameters, space, thresholds)
    # and the global trim is not the per-module one
    base_tensors = load_model_tensors(llama64[0])
    differs = 0
    for name in set.intersection(*(set(f) for f in per_adapter)):
        module = reference.merged_delta(
            [f[name] for f in per_adapter], WEIGHTS, {**parameters, "ties_scope": "module"}, space
        )
        differs += not np.allclose((merged[name] - base_tensors[name]).numpy(), module)
    assert differs


def test_unscaled_knots_tasks_have_a_flat_spectrum(llama64):
    """With ``knots_scale_tasks: false`` each task Vₜ of adapters in general position has
    every non-null singular value equal to 1 (ΣₜVₜVₜᵀ = I and the ranks add up), so a
    method that keeps each task's *top* singular vectors (TSV) picks among equals: the
    README says so, and the reference comparison leaves that one case out."""
    per_adapter = _factors(llama64)
    name = "model.layers.0.self_attn.q_proj.weight"
    factors = [f[name] for f in per_adapter]
    for task in reference.module_tasks(factors, "knots", scale_tasks=False):
        assert np.allclose(reference.svd(task)[1], 1.0, atol=1e-10)
    for task in reference.module_tasks(factors, "knots", scale_tasks=True):
        assert np.ptp(reference.svd(task)[1]) > 0.1


# ---------------------------------------------------------------------------------------
# Inputs that tell the methods apart: the package's functions against the reference, and
# both against results worked out by hand


def _t(array) -> torch.Tensor:
    return torch.tensor(np.asarray(array, dtype=np.float64))


def _low_rank_tasks_sharing_directions(seed=0, shape=(12, 10), count=3):
    """Rank-3 tasks whose column spaces overlap in one shared direction: the polar step of
    TSV and the common / specific split of Iso-CTS both change the result on them."""
    rng = np.random.default_rng(seed)
    shared_left, shared_right = rng.normal(size=(shape[0], 1)), rng.normal(size=(1, shape[1]))
    tasks = []
    for t in range(count):
        left = np.hstack([shared_left, rng.normal(size=(shape[0], 2))])
        right = np.vstack([shared_right, rng.normal(size=(2, shape[1]))])
        tasks.append(left @ np.diag([3.0 + t, 1.5, 0.5]) @ right)
    return tasks


def test_ties_elects_the_sign_by_mass_not_by_count():
    tasks = [np.array([[1.0, 2.0]]), np.array([[1.0, -1.0]]), np.array([[-5.0, -0.5]])]
    # entry 0: two votes for +, but the mass is −3: only the third task agrees → −5
    # entry 1: mass +0.5 → the first task alone → 2
    expected = np.array([[-5.0, 2.0]])
    assert np.array_equal(reference.ties(tasks, [1.0] * 3, density=1.0), expected)
    package = merges.ties([_t(x) for x in tasks], [1.0] * 3, density=1.0)
    assert np.array_equal(package.numpy(), expected)


def test_ties_disjoint_mean_divides_by_the_agreeing_weights_in_full_precision():
    tasks, weights = [np.array([[3.0]]), np.array([[-1.0]])], [0.6, 0.1]
    # mass 1.8 − 0.1 > 0: only the first agrees, 0.6·3 / 0.6 = 3 exactly
    assert reference.ties(tasks, weights, 1.0)[0, 0] == 3.0
    assert merges.ties([_t(x) for x in tasks], weights, 1.0).item() == 3.0


def test_tsv_orthogonalises_overlapping_task_subspaces():
    tasks, weights = _low_rank_tasks_sharing_directions(), [1.0, 0.7, 1.3]
    expected = reference.tsv(tasks, weights, budget=0.6)  # k = ⌊0.6·10/3⌋ = 2 per task
    package = merges.tsv([_t(x) for x in tasks], weights, budget=0.6).numpy()
    assert np.abs(package - expected).max() < 1e-12 * np.abs(expected).max()
    # the polar step matters here: the plain sum of each task's top-2 is another matrix
    plain = sum(reference.best_rank(w * x, 2) for x, w in zip(tasks, weights))
    assert np.linalg.norm(plain - expected) > 0.05 * np.linalg.norm(expected)
    # and it keeps the concatenated singular values with orthonormal vectors
    kept = np.sort(np.concatenate([reference.svd(w * x)[1][:2] for x, w in zip(tasks, weights)]))
    assert np.allclose(np.sort(np.linalg.svd(expected, compute_uv=False))[-6:], kept)


def test_iso_cts_adds_task_specific_directions_to_iso_c():
    tasks, weights = _low_rank_tasks_sharing_directions(), [1.0, 0.7, 1.3]
    expected = reference.iso_cts(tasks, weights, common_fraction=0.5)
    package = merges.iso_cts([_t(x) for x in tasks], weights, common_fraction=0.5).numpy()
    assert np.abs(package - expected).max() < 1e-12 * np.abs(expected).max()
    iso_c = reference.iso_c(tasks, weights)
    assert np.abs(merges.iso_c([_t(x) for x in tasks], weights).numpy() - iso_c).max() < 1e-12
    assert np.linalg.norm(expected - iso_c) > 0.05 * np.linalg.norm(iso_c)
    # one flat spectrum over rank(sum) = 7 directions: 4 common, 1 specific per task
    values = np.linalg.svd(expected, compute_uv=False)
    assert np.sum(values > 1e-9 * values[0]) == 7
    assert np.allclose(values[:7], values[0])


@pytest.mark.parametrize(("rank_ratio", "alpha"), [(0.2, 0.1), (0.2, 0.45), (0.4, 0.45)])
def test_cart_reads_its_rank_and_alpha(rank_ratio, alpha):
    tasks, weights = _low_rank_tasks_sharing_directions(seed=1), [1.0, 0.7, 1.3]
    expected = reference.cart(tasks, weights, rank_ratio, alpha)
    package = merges.cart([_t(x) for x in tasks], weights, rank_ratio, alpha).numpy()
    assert np.abs(package - expected).max() < 1e-12 * np.abs(expected).max()
    default = reference.cart(tasks, weights, 0.04, 0.1)
    assert np.linalg.norm(expected - default) > 1e-3 * np.linalg.norm(default)


def test_dare_masks_are_the_documented_draws_distinct_per_task():
    tasks = [np.random.default_rng(t).normal(size=(40, 30)) for t in range(3)]
    seed = reference.dare_seed(7, "model.layers.0.mlp.up_proj.weight")
    masks = reference.dare_masks((40, 30), 3, 0.3, seed)
    for first in range(3):
        assert abs(masks[first].mean() - 0.3) < 5 * np.sqrt(0.3 * 0.7 / 1200)
        for second in range(first):
            assert not np.array_equal(masks[first], masks[second])
    generator = torch.Generator().manual_seed(seed)
    package = merges.dare([_t(x) for x in tasks], [1.0, 0.5, 2.0], 0.3, generator).numpy()
    expected = reference.dare(tasks, [1.0, 0.5, 2.0], 0.3, seed)
    assert np.abs(package - expected).max() < 1e-12 * np.abs(expected).max()


def test_dare_through_mergekit_draws_other_masks_per_task_and_per_module(llama64, tmp_path):
    """Two copies of one adapter at weight 1, full-space DARE: an entry of ΔW is 0, 1 or 2
    times ΔW₁/density as neither, one or both tasks keep it. One mask for every task would
    give no 1s; one mask for every module of a shape would repeat the pattern."""
    import shutil

    base, adapters = llama64
    copy = tmp_path / "copy"
    shutil.copytree(adapters["r8a"], copy)
    density = 0.3
    config = tmp_path / "dare.yml"
    config.write_text(
        f"merge_method: full_space\nbase_model: {base}\nmodels:\n"
        f"  - model: {base}+{adapters['r8a']}\n  - model: {base}+{copy}\n"
        f"parameters: {{merge: dare, density: {density}}}\n"
    )
    out = tmp_path / "out"
    done = invoke_cli([str(config), str(out), "--no-copy-tokenizer", "--no-write-model-card"])
    assert done.returncode == 0, done.stderr[-3000:]
    merged, base_tensors = load_model_tensors(out), load_model_tensors(base)
    factors = _factors(llama64)[ADAPTERS.index("r8a")]
    patterns = {}
    for layer in (0, 1):
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        b, a = factors[name]
        times = (merged[name] - base_tensors[name]).numpy() * density / (b @ a)
        counts = np.rint(times)
        assert np.allclose(times, counts, atol=1e-9) and set(np.unique(counts)) == {0, 1, 2}
        size = counts.size
        one, two = (counts == 1).sum() / size, (counts == 2).sum() / size
        assert abs(one - 2 * density * (1 - density)) < 5 * np.sqrt(0.42 * 0.58 / size)
        assert abs(two - density**2) < 5 * np.sqrt(0.09 * 0.91 / size)
        patterns[name] = counts
    first, second = patterns.values()
    assert (first == second).mean() < 0.8  # independent masks agree on ~0.58 of entries
