"""How points are chosen: every point of a grid (Optuna's ``GridSampler``), or as many
trials as asked drawn by TPE or CMA-ES from values and ``LOW:HIGH[:log]`` ranges, per
adapter weights among them; and the pruner that stops a hopeless trial after its first
part of the validation data."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from mergekit_corespace.errors import CoreSpaceError
from mergekit_corespace.tune.grid import Range, expand_weights, is_read, point_key, read_point

SEARCHES = ("grid", "tpe", "cmaes")
DEFAULT_TRIALS = 40
# a pruned trial was scored on this share of each task's validation examples
FIRST_PART = 1 / 3
# the first trials are always scored whole: the pruner compares with them
PRUNER_STARTUP_TRIALS = 5
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


def pruner_of(prune: bool):
    import optuna

    if not prune:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS)


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
