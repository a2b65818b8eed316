"""How points are chosen: every point of a grid (Optuna's ``GridSampler``), or as many
trials as asked drawn by TPE or CMA-ES from values and ``LOW:HIGH[:log]`` ranges, per
adapter weights among them; and the pruner that stops a hopeless trial after a part of
the validation data: below the median of earlier trials after a third of each task file,
or, racing the best trial on the same examples, worse than it by Wilcoxon's signed-rank
test after a third and after two thirds."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from mergekit_corespace.errors import CoreSpaceError
from mergekit_corespace.tune.grid import Range, expand_weights, is_read, point_key, read_point

SEARCHES = ("grid", "tpe", "cmaes")
DEFAULT_TRIALS = 40
PRUNERS = ("median", "wilcoxon")
# where a trial may be pruned: the shares of each task file's validation examples scored
PRUNE_CUTS = {"median": (1 / 3,), "wilcoxon": (1 / 3, 2 / 3)}
# the median rule's first trials are always scored whole: it compares with them
PRUNER_STARTUP_TRIALS = 5
# the racing rule stops a trial when the one-sided signed-rank p-value that it is worse than
# the best trial is below this: generous, since a trial as good as the best loses little
# when stopped (~1/3 of them are, against ~4/5 of those 0.05 below it, in simulation)
WILCOXON_P = 0.3
# categorical settings are drawn before the others: they decide which others are read
FIRST_KEYS = ("merge_method", "merge")


def check_search(search: str, trials: int | None, grid_points_count: int | None) -> int:
    """The number of trials the run ends with (every point for a grid)."""
    if search not in SEARCHES:
        raise CoreSpaceError(f"--search {search}: expected one of {', '.join(SEARCHES)}")
    if search == "grid":
        if trials is not None:
            raise CoreSpaceError(
                f"--trials {trials}: a grid scores each of its {grid_points_count} points; "
                "--trials sets a tpe or cmaes search's length"
            )
        return grid_points_count
    if trials is None:
        return DEFAULT_TRIALS
    if trials < 1:
        raise CoreSpaceError(f"--trials {trials}: must be at least 1")
    return trials


def sampler_of(search: str, points: Sequence[Mapping[str, Any]], seed: int, queued: bool):
    """The sampler of a study; ``queued``: a grid whose points this run, the study's only
    writer, queues in order (no sampler is asked for them)."""
    import optuna

    if search == "grid" and queued:
        return optuna.samplers.RandomSampler(seed=seed)
    if search == "grid":
        return optuna.samplers.GridSampler({"point": [point_key(p) for p in points]}, seed=seed)
    if search == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    # categorical settings (merge=ta,ties) are drawn at random: CMA-ES is for numbers
    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


def check_prune(prune: bool | str | None) -> str | None:
    """The pruning rule asked for (``True``: the median rule), or None."""
    if prune is None or prune is False:
        return None
    if prune is True:
        return "median"
    if prune not in PRUNERS:
        raise CoreSpaceError(f"--prune {prune}: expected one of {', '.join(PRUNERS)}")
    return prune


def pruner_of(prune: str | None):
    import warnings

    import optuna

    if prune is None:
        return optuna.pruners.NopPruner()
    if prune == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS)
    with warnings.catch_warnings():  # experimental in Optuna since 3.6; its API is kept
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.pruners.WilcoxonPruner(p_threshold=WILCOXON_P)


def search_space(grid: Mapping[str, Any], recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The grid with ``weight`` made one dimension per adapter, categorical keys first."""
    space = expand_weights(grid, recipe)
    first = {key: space[key] for key in FIRST_KEYS if key in space}
    return first | {key: values for key, values in space.items() if key not in first}


def suggested_point(trial, search: str, space: Mapping[str, Any], recipe) -> dict[str, Any]:
    """The trial's point: the grid point given by the sampler, or each setting the point's
    method reads, drawn in order (the inner method first)."""
    if search == "grid":  # space: {"point": the grid's points, as keys}
        return json.loads(trial.suggest_categorical("point", space["point"]))
    point: dict[str, Any] = {}
    for key, values in space.items():
        if not is_read(key, point, recipe):
            continue
        if isinstance(values, Range):
            point[key] = trial.suggest_float(key, values.low, values.high, log=values.log)
        else:
            point[key] = trial.suggest_categorical(key, values)
    return read_point(point, recipe)


def corner_points(space: Mapping[str, Any], recipe) -> list[dict[str, Any]]:
    """Points a sampled search can reach at its extremes: every combination of the listed
    values with every range at its low end, and at its high end. Validating them before
    any work finds a range no merge accepts (a weight of 0 for TIES, a density above 1)."""
    import itertools

    lists = {k: v for k, v in space.items() if not isinstance(v, Range)}
    ranges = {k: v for k, v in space.items() if isinstance(v, Range)}
    corners = []
    for values in itertools.product(*lists.values()):
        for end in ("low", "high"):
            point = dict(zip(lists, values)) | {k: getattr(r, end) for k, r in ranges.items()}
            corners.append(read_point(point, recipe))
    return [dict(p) for p in {point_key(p): p for p in corners}.values()]
