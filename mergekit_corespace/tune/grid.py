"""The search space: ``--grid`` parsed (lists of values, ``LOW:HIGH[:log]`` ranges, and
per-adapter weights), its points (recipe ↔ point), their λ groups, and whether a chosen
point sits at the grid's edge.

A point is a flat mapping: top-level parameter names (``lambda``, ``density``, ...),
``merge_method``, and ``weight[NAME]`` for the weight of the adapter named ``NAME`` (its
directory's name; its position in ``models:`` where two share a name)."""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from mergekit_corespace.errors import CoreSpaceError
from mergekit_corespace.options import METHOD_PARAMETERS, parameter_names

DEFAULT_GRID = {"lambda": [0.25, 0.5, 0.75, 1.0, 1.5]}
SPACES = ("core_space", "knots", "full_space")
WEIGHT = "weight"  # per adapter: one dimension each, ``weight[NAME]`` in a point
GRID_KEYS = ("merge_method", *parameter_names(), WEIGHT)


@dataclass(frozen=True)
class Range:
    """A continuous dimension of a search: ``LOW:HIGH``, sampled on a log scale with ``log``."""

    low: float
    high: float
    log: bool = False

    def __str__(self) -> str:
        return f"{self.low}:{self.high}" + (":log" if self.log else "")


def parse_grid(
    specs: Sequence[str] | Mapping[str, Sequence[Any]] | None,
) -> dict[str, list | Range]:
    """``["lambda=0.5,1 merge=ta,ties", "density=0.1:0.9 weight=0:2"]`` (or a mapping) ->
    values (or a :class:`Range`) per key, each checked: a known top-level parameter,
    ``merge_method``, ``weight`` (every adapter) or ``weight[NAME]`` (adapter NAME alone,
    checked against the recipe by :func:`expand_weights`), listed once."""
    if specs is None or len(specs) == 0:
        return {key: list(values) for key, values in DEFAULT_GRID.items()}
    if isinstance(specs, Mapping):
        items = [
            (str(key), values if isinstance(values, Range) else list(values), f"{key}")
            for key, values in specs.items()
        ]
    else:
        items = []
        for spec in specs:
            for token in spec.split():
                key, sep, values = token.partition("=")
                if not sep or not key or not values or "" in values.split(","):
                    raise CoreSpaceError(
                        f"--grid {token}: expected NAME=VALUE[,VALUE...] or NAME=LOW:HIGH[:log], "
                        "e.g. lambda=0.5,1,2 or lambda=0.1:3:log"
                    )
                if ":" in values:
                    items.append((key, _parse_range(token, values), token))
                else:
                    items.append((key, [yaml.safe_load(v) for v in values.split(",")], token))
    grid: dict[str, list | Range] = {}
    for key, values, token in items:
        if key not in GRID_KEYS and not is_adapter_weight(key):
            raise CoreSpaceError(
                f"--grid {token}: unknown parameter {key!r} (known: {', '.join(GRID_KEYS)}, "
                f"and {WEIGHT}[NAME] for the adapter NAME alone)"
            )
        if key in grid:
            raise CoreSpaceError(f"--grid {token}: {key} is given twice")
        if isinstance(values, Range):
            if key in ("merge_method", "merge", "ties_scope", "precision", "knots_scale_tasks"):
                raise CoreSpaceError(f"--grid {token}: {key} takes values, not a range")
            grid[key] = values
            continue
        for value in values if key == "merge_method" else ():
            if value not in SPACES:
                raise CoreSpaceError(f"--grid {token}: {value!r} is not one of {', '.join(SPACES)}")
        if not values:
            raise CoreSpaceError(f"--grid {token}: no values")
        grid[key] = list(dict.fromkeys(values))  # a value listed twice is one point
    return grid


def weight_key(name: str) -> str:
    """The key of adapter ``name``'s weight in a point: ``weight[NAME]``."""
    return f"{WEIGHT}[{name}]"


def is_adapter_weight(key: str) -> bool:
    """Whether ``key`` names one adapter's weight: ``weight[NAME]``."""
    return key.startswith(f"{WEIGHT}[") and key.endswith("]") and len(key) > len(WEIGHT) + 2


def _parse_range(token: str, text: str) -> Range:
    parts = text.split(":")
    log = len(parts) == 3 and parts[2] == "log"
    try:
        if len(parts) not in (2, 3) or (len(parts) == 3 and not log):
            raise ValueError
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        raise CoreSpaceError(f"--grid {token}: a range is LOW:HIGH or LOW:HIGH:log") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise CoreSpaceError(f"--grid {token}: a range needs finite LOW < HIGH")
    if log and low <= 0:
        raise CoreSpaceError(f"--grid {token}: a log range needs LOW > 0")
    return Range(low, high, log)


def adapter_names(recipe: Mapping[str, Any]) -> list[str]:
    """Per entry of the recipe's ``models:``, its adapter's directory (or Hub repository)
    name, or its position from 0 (as text) where two entries share a name."""
    names = []
    for entry in recipe.get("models") or []:
        model = entry.get("model") if isinstance(entry, Mapping) else entry
        reference = str(model).split("+")[-1]
        names.append(os.path.basename(os.path.normpath(reference)))
    if len(set(names)) < len(names):
        names = [str(index) for index in range(len(names))]
    return names


def adapter_keys(recipe: Mapping[str, Any]) -> list[str]:
    """Per entry of the recipe's ``models:``, its weight's key in a point: ``weight[NAME]``
    (NAME from :func:`adapter_names`)."""
    return [weight_key(name) for name in adapter_names(recipe)]


def expand_weights(grid: Mapping[str, Any], recipe: Mapping[str, Any]) -> dict[str, Any]:
    """``weight`` and ``weight[NAME]`` replaced by one key per adapter, in the order of
    ``models:``, each with its own values (or range) where given, else ``weight``'s; an
    adapter given neither keeps the weight its recipe gives it."""
    keys = adapter_keys(recipe)
    for key, values in grid.items():
        if is_adapter_weight(key) and key not in keys:
            shown = values if isinstance(values, Range) else ",".join(map(str, values))
            raise CoreSpaceError(
                f"--grid {key}={shown}: no adapter is named {key[len(WEIGHT) + 1 : -1]!r} "
                f"in models: (adapters: {', '.join(adapter_names(recipe))})"
            )
    expanded = {}
    for key, values in grid.items():
        if key == WEIGHT or is_adapter_weight(key):
            for name in keys:  # all of them at the first weight key
                if name not in expanded and (name in grid or WEIGHT in grid):
                    expanded[name] = grid.get(name, grid.get(WEIGHT))
        else:
            expanded[key] = values
    return expanded


def grid_points(grid: Mapping[str, list], recipe: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in order (the last key varies fastest). A
    method-specific value (``density``, ...) is only combined with the methods that read
    it, so ``merge=ta,ties density=0.3,0.7`` is three points, not four; ``weight`` values
    are combined per adapter."""
    ranges = [key for key, values in grid.items() if isinstance(values, Range)]
    if ranges:
        raise CoreSpaceError(
            f"--grid {ranges[0]}={grid[ranges[0]]}: a range is searched by --search tpe or "
            "cmaes; a grid lists values"
        )
    grid = expand_weights(grid, recipe)
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    return unique_points([read_point(point, recipe) for point in points])


def read_point(point: Mapping[str, Any], recipe: Mapping[str, Any]) -> dict[str, Any]:
    """``point`` less the settings its inner method (or space) does not read."""
    return {key: value for key, value in point.items() if is_read(key, point, recipe)}


def is_read(key: str, point: Mapping[str, Any], recipe: Mapping[str, Any]) -> bool:
    """Whether ``point``'s inner method (or space) reads the setting ``key``: a
    method-specific one only by its methods, ``knots_scale_tasks`` only in KnOTS."""
    merge = point.get("merge", (recipe.get("parameters") or {}).get("merge", "ta"))
    if key in METHOD_PARAMETERS:
        return merge in METHOD_PARAMETERS[key]
    if key == "knots_scale_tasks":
        return space_of(point, recipe) == "knots"
    return True


def unique_points(points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    kept: list[dict[str, Any]] = []
    for point in points:
        if point not in kept:
            kept.append(dict(point))
    return kept


def check_every_value_is_read(grid: Mapping[str, Any], recipe: Mapping[str, Any]) -> None:
    """Refuse a setting that no point reads (``density`` with only ``ta`` points,
    ``knots_scale_tasks`` outside KnOTS): its values would be dropped without a word."""
    parameters = recipe.get("parameters") or {}
    merges = grid.get("merge", [parameters.get("merge", "ta")])
    spaces = grid.get("merge_method", [recipe.get("merge_method")])
    for key, values in grid.items():
        shown = values if isinstance(values, Range) else ",".join(str(v) for v in values)
        written = f"--grid {key}={shown}"
        if key == "knots_scale_tasks" and "knots" not in spaces:
            raise CoreSpaceError(f"{written}: no point reads it; only merge_method: knots does")
        if key in METHOD_PARAMETERS and not set(merges) & set(METHOD_PARAMETERS[key]):
            raise CoreSpaceError(
                f"{written}: no point reads it: {key} is only read by merge: "
                f"{' / '.join(METHOD_PARAMETERS[key])}, and the points merge with "
                f"{' / '.join(str(merge) for merge in merges)}"
            )


def point_recipe(recipe: Mapping[str, Any], point: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe with the point's values; every other setting is kept, except top-level
    parameters that the point's method does not read (``density`` for ``tsv``, ...)."""
    recipe = copy.deepcopy(dict(recipe))
    parameters = dict(recipe.get("parameters") or {})
    weights = dict(zip(adapter_keys(recipe), range(len(recipe.get("models") or []))))
    for key, value in point.items():
        if key == "merge_method":
            recipe["merge_method"] = value
        elif key in weights:
            entry = recipe["models"][weights[key]]
            if not isinstance(entry, dict):
                entry = recipe["models"][weights[key]] = {"model": entry}
            entry["parameters"] = {**(entry.get("parameters") or {}), WEIGHT: value}
        else:
            parameters[key] = value
    merge = parameters.get("merge", "ta")
    for name, methods in METHOD_PARAMETERS.items():
        if name in parameters and name not in point and merge not in methods:
            del parameters[name]
    if "knots_scale_tasks" in parameters and recipe.get("merge_method") != "knots":
        del parameters["knots_scale_tasks"]
    recipe["parameters"] = parameters
    return recipe


def lambda_groups(points: Sequence[Mapping[str, Any]]) -> list[list[dict[str, Any]]]:
    """The points in groups that differ only in a numeric λ (in order of first
    appearance): scored one after another, a group shares one merge, scaled per point."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for point in points:
        lam = point.get("lambda")
        if isinstance(lam, (int, float)) and not isinstance(lam, bool):
            key = point_key({k: v for k, v in point.items() if k != "lambda"})
        else:
            key = point_key(point) + " alone"
        groups.setdefault(key, []).append(dict(point))
    return list(groups.values())


def at_grid_edge(point: Mapping[str, Any], points: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """``point``'s numeric settings that are the largest or smallest of three or more values
    tried with its other settings in ``points`` (the best may lie beyond the grid): each
    setting's name -> ``"largest"`` or ``"smallest"``."""
    edges = {}
    for key, value in point.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        tried = {
            other[key]
            for other in points
            if key in other and all(other.get(k) == v for k, v in point.items() if k != key)
        }
        if len(tried) < 3:  # of two values, one always wins at an edge
            continue
        if value == max(tried) and not (key == "density" and value >= 1):
            edges[key] = "largest"
        elif value == min(tried):
            edges[key] = "smallest"
    return edges


def label(point: Mapping[str, Any]) -> str:
    """A point for people: its settings, drawn numbers to 4 significant digits."""
    return " ".join(
        f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
        for key, value in point.items()
    )


def point_key(point: Mapping[str, Any]) -> str:
    """A point as a dictionary key (and as the points log writes it)."""
    return json.dumps(point, sort_keys=True)


def space_of(point: Mapping[str, Any], recipe: Mapping[str, Any]) -> str | None:
    return point.get("merge_method", recipe.get("merge_method"))
