"""The accuracy benchmark's statistics (bench/accuracy/stats.py) against independent oracles."""

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "accuracy"))

import stats  # noqa: E402


def _bernoulli(p: float, n: int, seed: int) -> list[int]:
    return (np.random.default_rng(seed).random(n) < p).astype(int).tolist()


def test_mcnemar_equals_a_brute_force_sign_test():
    # 3 examples only the first encoder gets right, 9 only the second, 20 both, 8 neither
    first = [1] * 3 + [0] * 9 + [1] * 20 + [0] * 8
    second = [0] * 3 + [1] * 9 + [1] * 20 + [0] * 8
    # oracle: every equally likely way the 12 disagreements could split under the null;
    # p = share of splits at least as lopsided as 3 vs 9
    splits = [sum(bits) for bits in itertools.product((0, 1), repeat=12)]
    oracle = sum(abs(k - 6) >= abs(3 - 6) for k in splits) / len(splits)
    assert stats.mcnemar_p_value(first, second) == pytest.approx(oracle, rel=1e-12)
    assert stats.mcnemar_p_value(second, first) == pytest.approx(oracle, rel=1e-12)
    assert oracle == pytest.approx(2 * (1 + 12 + 66 + 220) / 4096)  # by hand


def test_mcnemar_is_one_without_disagreements_and_small_for_a_one_sided_split():
    same = _bernoulli(0.7, 200, seed=1)
    assert stats.mcnemar_p_value(same, same) == 1.0
    assert stats.mcnemar_p_value([1] * 10, [0] * 10) == pytest.approx(2 / 2**10)


def test_interval_of_a_bernoulli_sample_covers_the_truth_about_95_percent_of_the_time():
    truth, n, covered = 0.8, 400, 0
    for trial in range(100):
        sample = _bernoulli(truth, n, seed=100 + trial)
        boot = stats.Bootstrap({"task": n}, resamples=500, seed=trial)
        low, high = stats.interval(boot.task_accuracies({"task": sample})["task"])
        covered += low <= truth <= high
        # the percentile interval is about as wide as the normal approximation's
        assert high - low == pytest.approx(2 * 1.96 * math.sqrt(truth * (1 - truth) / n), rel=0.3)
    assert 88 <= covered <= 100


def test_paired_p_value_is_one_for_identical_encoders_and_tiny_for_a_clear_gap():
    sizes = {"a": 300, "b": 200}
    boot = stats.Bootstrap(sizes, seed=0)
    individual = {name: [1] * size for name, size in sizes.items()}
    good = {"a": _bernoulli(0.9, 300, 2), "b": _bernoulli(0.9, 200, 3)}
    bad = {"a": [x * y for x, y in zip(good["a"], _bernoulli(0.8, 300, 4))], "b": good["b"]}

    def p(first, second):
        difference = stats.normalized(first, individual) - stats.normalized(second, individual)
        replicates = boot.normalized(first, individual) - boot.normalized(second, individual)
        return stats.paired_p_value(difference, replicates)

    assert p(good, good) == 1.0
    assert p(good, bad) == 1 / (1 + stats.RESAMPLES)  # a ~0.09 gap on 300 examples, one-sided
    assert p(bad, good) == p(good, bad)


def test_paired_p_value_of_a_small_gap_agrees_with_mcnemar():
    # 6 vs 2 disagreements out of 400: neither test calls it significant
    first = [1] * 6 + [0] * 2 + [1] * 360 + [0] * 32
    second = [0] * 6 + [1] * 2 + [1] * 360 + [0] * 32
    boot = stats.Bootstrap({"task": 400}, seed=0)
    replicates = boot.average({"task": first}) - boot.average({"task": second})
    difference = stats.average({"task": first}) - stats.average({"task": second})
    bootstrap_p = stats.paired_p_value(difference, replicates)
    mcnemar_p = stats.mcnemar_p_value(first, second)
    assert mcnemar_p == pytest.approx(2 * (1 + 8 + 28) / 256)
    assert 0.1 < bootstrap_p < 0.5 and 0.1 < mcnemar_p < 0.5


def test_resampling_is_stratified_and_seeded():
    sizes = {"a": 40, "b": 10}
    first, again, other = (stats.Bootstrap(sizes, resamples=50, seed=s) for s in (7, 7, 8))
    assert all(np.array_equal(first.indices[k], again.indices[k]) for k in sizes)
    assert not np.array_equal(first.indices["a"], other.indices["a"])
    # each task keeps its own examples and its size in every replicate
    assert first.indices["a"].shape == (50, 40) and first.indices["b"].shape == (50, 10)
    assert first.indices["b"].max() < 10
    # a task every encoder gets fully right adds no spread to the average
    predictions = {"a": _bernoulli(0.5, 40, 9), "b": [1] * 10}
    tasks = first.task_accuracies(predictions)
    assert np.all(tasks["b"] == 1.0)
    assert np.allclose(first.average(predictions), (tasks["a"] + 1.0) / 2)


def test_normalized_divides_by_the_own_adapter_per_task_then_averages():
    merged = {"a": [1, 1, 0, 0], "b": [1, 0, 0, 0]}
    individual = {"a": [1, 1, 1, 0], "b": [1, 1, 0, 0]}
    assert stats.normalized(merged, individual) == pytest.approx(((2 / 3) + (1 / 2)) / 2)
    assert stats.average(merged) == pytest.approx(0.375)


def test_holm_adjustment_matches_hand_computation():
    # sorted 0.01, 0.02, 0.04, 0.30 → ×4, ×3, ×2, ×1, then running maximum
    adjusted = stats.holm([0.04, 0.01, 0.30, 0.02])
    assert adjusted == pytest.approx([0.08, 0.04, 0.30, 0.06])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_results_page_lists_which_core_differences_are_significant():
    import report
    import run

    tasks = {"a": 400, "b": 400}
    rng = np.random.default_rng(0)
    own = {k: (rng.random(n) < 0.95).astype(int).tolist() for k, n in tasks.items()}
    strong = {k: [x * (r < 0.97) for x, r in zip(v, rng.random(400))] for k, v in own.items()}
    weak = {k: [x * (r < 0.8) for x, r in zip(v, rng.random(400))] for k, v in strong.items()}
    rows = {run.ZERO_SHOT: {"predictions": weak}, run.INDIVIDUAL: {"predictions": own}}
    chosen = {"chosen": {"lambda": 1.0}, "merge_seconds": 0.1, "mergekit_yaml_seconds": 5.0}
    for method, core, full in (("ta", strong, strong), ("ties", strong, weak)):
        rows[f"{method} · core"] = {"predictions": core, **chosen}
        rows[f"{method} · full"] = {"predictions": full, **chosen}
    saved = {
        "command": "python bench/accuracy/run.py",
        "setting": "base",
        "seed": 0,
        "date": "2026-01-01",
        "minutes": 1.0,
        "cpus": 2,
        "torch_threads": 2,
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]},
        "training": {"epochs": 2, "learning_rate": 0.002, "batch_size": 32},
        "heads": "class-mean",
        "plan": {"lambdas": [1.0], "densities": {}},
        "tasks": list(tasks),
        "rows": {
            label: {**row, "predictions": {k: "".join(map(str, v)) for k, v in p.items()}}
            for label, row in rows.items()
            for p in [row["predictions"]]
        },
    }
    page = run.render(saved, report.summary(saved))
    note = page.rsplit("\n\n", 1)[1]
    significant, rest = note.split("**Not significant at 5 %**")
    assert "ties core vs full space" in significant and "ta core" not in significant
    assert "ta core vs full space" in rest.split("**Same outcome")[1]
    assert "| individual adapters (own task) | 0.9" in page and "1.000 [1.000, 1.000]" in page
