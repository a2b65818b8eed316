"""How sure the accuracy table is: bootstrap intervals and paired tests over test examples.

Pure functions over saved per-example predictions (1 = right, 0 = wrong), no model code.

- Intervals: percentile bootstrap, 95 %, a fixed seed. Resampling is **stratified by
  task**: each replicate redraws every task's test examples with replacement (the task
  keeps its size), and the per-task accuracies, their average and the normalized figure
  (merged / own adapter, averaged over tasks) are all computed on the same replicate.
  Every encoder is scored on the same redrawn examples, so differences are paired.
- Paired bootstrap p-value (two-sided) for the difference of two encoders on one figure:
  the replicates of the difference, centred on the observed difference, stand in for its
  null distribution; p = (1 + #{|d* − d| ≥ |d|}) / (1 + B) (Efron & Tibshirani 1993, §16.4).
- Exact McNemar test on the pooled test examples of all tasks: of the examples the two
  encoders disagree on, is the split between them a fair coin's?
- Holm's step-down adjustment for a family of p-values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95

Predictions = Mapping[str, Sequence[int]]  # task name → 0/1 per test example


class Bootstrap:
    """The same stratified resamples of each task's test examples, for every encoder."""

    def __init__(self, sizes: Mapping[str, int], resamples: int = RESAMPLES, seed: int = SEED):
        generator = np.random.default_rng(seed)
        self.resamples = resamples
        self.indices = {
            name: generator.integers(0, size, size=(resamples, size))
            for name, size in sorted(sizes.items())
        }

    def task_accuracies(self, predictions: Predictions) -> dict[str, np.ndarray]:
        """Per task, the accuracy on each replicate (an array of ``resamples``)."""
        return {
            name: np.asarray(values, dtype=np.float64)[self.indices[name]].mean(axis=1)
            for name, values in predictions.items()
        }

    def average(self, predictions: Predictions) -> np.ndarray:
        """The average accuracy over tasks, on each replicate."""
        return np.mean(list(self.task_accuracies(predictions).values()), axis=0)

    def normalized(self, predictions: Predictions, individual: Predictions) -> np.ndarray:
        """Merged / own adapter accuracy averaged over tasks, on each replicate."""
        merged = self.task_accuracies(predictions)
        own = self.task_accuracies(individual)
        with np.errstate(divide="ignore", invalid="ignore"):  # own accuracy 0: undefined
            ratios = np.mean([merged[name] / own[name] for name in own], axis=0)
        return np.where(np.isfinite(ratios), ratios, np.nan)


def accuracy(values: Sequence[int]) -> float:
    return sum(values) / len(values)


def average(predictions: Predictions) -> float:
    return float(np.mean([accuracy(values) for values in predictions.values()]))


def normalized(predictions: Predictions, individual: Predictions) -> float:
    return float(
        np.mean([accuracy(predictions[name]) / accuracy(individual[name]) for name in individual])
    )


def interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates (undefined replicates, NaN, left out)."""
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(replicates, [tail, 100 - tail])
    return float(low), float(high)


def paired_p_value(observed: float, replicates: np.ndarray) -> float:
    """Two-sided paired bootstrap p-value for a difference ``observed`` whose replicates
    (on the same resampled examples for both encoders) are ``replicates``."""
    replicates = np.asarray(replicates)
    replicates = replicates[np.isfinite(replicates)]
    centred = np.abs(replicates - observed)
    extreme = int(np.sum(centred >= abs(observed) - 1e-12))
    return (1 + extreme) / (1 + len(replicates))


def mcnemar_p_value(first: Sequence[int], second: Sequence[int]) -> float:
    """Exact two-sided McNemar test for two encoders' 0/1 outcomes on the same examples."""
    only_first = sum(1 for a, b in zip(first, second, strict=True) if a and not b)
    only_second = sum(1 for a, b in zip(first, second, strict=True) if b and not a)
    disagreements = only_first + only_second
    if disagreements == 0:
        return 1.0
    smaller = min(only_first, only_second)
    tail = sum(math.comb(disagreements, k) for k in range(smaller + 1)) / 2**disagreements
    return min(1.0, 2 * tail)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def pooled(predictions: Predictions) -> list[int]:
    """All tasks' outcomes in one list (task order as given)."""
    return [value for values in predictions.values() for value in values]
