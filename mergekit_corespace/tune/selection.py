"""A point's scores made into a row (normalised by each task's own adapter), and the
winner chosen among the rows."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import yaml

from mergekit_corespace.evaluate import normalised_score
from mergekit_corespace.tune.grid import point_recipe
from mergekit_corespace.tune.results import Row, TuneResult

if TYPE_CHECKING:
    from mergekit_corespace.tune.plan import Plan

LOG = logging.getLogger(__package__)  # one logger for the tuner: mergekit_corespace.tune


def scored_row(
    point: Mapping[str, Any],
    scores: Mapping[str, float],
    plan: Plan,
    references,
    stderr: Mapping[str, float | None] | None = None,
) -> Row:
    """The row of one point: its scores, their mean, and (for the tasks with a reference)
    the normalised scores and their mean."""
    metrics = {task.name: task.metric for task in plan.tasks}
    normalised = {
        task: normalised_score(metrics[task], scores[task], reference)
        for task, reference in references.items()
    }
    return Row(
        point=dict(point),
        scores=dict(scores),
        average=sum(scores.values()) / len(scores),
        normalised=normalised,
        normalised_average=sum(normalised.values()) / len(normalised) if normalised else None,
        stderr=dict(stderr or {}),
    )


def selection_value(row: Row, by_normalised: bool) -> float:
    """What the winner is chosen by (and a search maximises)."""
    value = row.normalised_average if by_normalised else row.average
    return -math.inf if value is None or math.isnan(value) else value


def select_best(plan: Plan, references: Mapping[str, float], rows: list[Row]) -> TuneResult:
    """The result with its winner: the best normalised average when every task has a
    reference, else the best plain average; the first of equal scores, in grid order."""
    metrics = {task.name: task.metric for task in plan.tasks}
    by_normalised = len(references) == len(plan.tasks)
    if not by_normalised and len(set(metrics.values())) > 1:
        LOG.warning(
            "tasks are scored with different metrics (%s) and not every task has its own "
            "adapter to normalise by: the average mixes scales",
            ", ".join(f"{task} {metric}" for task, metric in metrics.items()),
        )

    best = max(rows, key=lambda row: selection_value(row, by_normalised))
    recipe = point_recipe(plan.recipe, best.point)
    return TuneResult(
        out=plan.out,
        metrics=metrics,
        references=dict(references),
        rows=rows,
        best=best,
        selected_by="normalised average" if by_normalised else "average",
        recipe=yaml.safe_dump(recipe, sort_keys=False),
    )
