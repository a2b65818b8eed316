"""The search space: ``--grid`` parsed, its points (recipe ↔ point), their λ groups, and
whether a chosen point sits at the grid's edge."""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from mergekit_corespace.errors import CoreSpaceError
from mergekit_corespace.options import METHOD_PARAMETERS, parameter_names

DEFAULT_GRID = {"lambda": [0.25, 0.5, 0.75, 1.0, 1.5]}
SPACES = ("core_space", "knots", "full_space")
GRID_KEYS = ("merge_method", *parameter_names())


def parse_grid(specs: Sequence[str] | Mapping[str, Sequence[Any]] | None) -> dict[str, list]:
    """``["lambda=0.5,1 merge=ta,ties", "density=0.3"]`` (or a mapping) -> values per
    key, each checked: known top-level parameter or ``merge_method``, listed once."""
    if specs is None or len(specs) == 0:
        return {key: list(values) for key, values in DEFAULT_GRID.items()}
    if isinstance(specs, Mapping):
        items = [(str(key), list(values), f"{key}") for key, values in specs.items()]
    else:
        items = []
        for spec in specs:
            for token in spec.split():
                key, sep, values = token.partition("=")
                if not sep or not key or not values or "" in values.split(","):
                    raise CoreSpaceError(
                        f"--grid {token}: expected NAME=VALUE[,VALUE...], e.g. lambda=0.5,1,2"
                    )
                items.append((key, [yaml.safe_load(v) for v in values.split(",")], token))
    grid: dict[str, list] = {}
    for key, values, token in items:
        if key == "weight":
            raise CoreSpaceError(
                f"--grid {token}: weight is a per-adapter parameter; the grid sets top-level "
                "parameters (and merge_method)"
            )
        if key not in GRID_KEYS:
            raise CoreSpaceError(
                f"--grid {token}: unknown parameter {key!r} (known: {', '.join(GRID_KEYS)})"
            )
        if key in grid:
            raise CoreSpaceError(f"--grid {token}: {key} is given twice")
        for value in values if key == "merge_method" else ():
            if value not in SPACES:
                raise CoreSpaceError(f"--grid {token}: {value!r} is not one of {', '.join(SPACES)}")
        if not values:
            raise CoreSpaceError(f"--grid {token}: no values")
        grid[key] = list(dict.fromkeys(values))  # a value listed twice is one point
    return grid


def grid_points(grid: Mapping[str, list], recipe: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in order (the last key varies fastest). A
    method-specific value (``density``, ...) is only combined with the methods that read
    it, so ``merge=ta,ties density=0.3,0.7`` is three points, not four."""
    base_merge = (recipe.get("parameters") or {}).get("merge", "ta")
    points = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        merge = point.get("merge", base_merge)
        for name, methods in METHOD_PARAMETERS.items():
            if name in point and merge not in methods:
                del point[name]
        if "knots_scale_tasks" in point and space_of(point, recipe) != "knots":
            del point["knots_scale_tasks"]
        if point not in points:
            points.append(point)
    return points


def check_every_value_is_read(
    grid: Mapping[str, list], points: Sequence[Mapping[str, Any]], recipe: Mapping[str, Any]
) -> None:
    """Refuse a grid setting that no point keeps (``density`` with only ``ta`` points,
    ``knots_scale_tasks`` outside KnOTS): its values would be dropped without a word."""
    base_merge = (recipe.get("parameters") or {}).get("merge", "ta")
    for key, values in grid.items():
        if any(key in point for point in points):
            continue
        written = f"--grid {key}={','.join(str(value) for value in values)}"
        if key == "knots_scale_tasks":
            raise CoreSpaceError(f"{written}: no point reads it; only merge_method: knots does")
        merges = list(dict.fromkeys(str(point.get("merge", base_merge)) for point in points))
        raise CoreSpaceError(
            f"{written}: no point reads it: {key} is only read by merge: "
            f"{' / '.join(METHOD_PARAMETERS[key])}, and the points merge with "
            f"{' / '.join(merges)}"
        )


def point_recipe(recipe: Mapping[str, Any], point: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe with the point's values; every other setting is kept, except top-level
    parameters that the point's method does not read (``density`` for ``tsv``, ...)."""
    recipe = copy.deepcopy(dict(recipe))
    parameters = dict(recipe.get("parameters") or {})
    for key, value in point.items():
        if key == "merge_method":
            recipe["merge_method"] = value
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
    appearance): one merge serves a whole group, scaled per point."""
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
    return " ".join(f"{key}={value}" for key, value in point.items())


def point_key(point: Mapping[str, Any]) -> str:
    """A point as a dictionary key (and as the points log writes it)."""
    return json.dumps(point, sort_keys=True)


def space_of(point: Mapping[str, Any], recipe: Mapping[str, Any]) -> str | None:
    return point.get("merge_method", recipe.get("merge_method"))
