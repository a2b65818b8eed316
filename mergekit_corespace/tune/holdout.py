"""Honest winners: the best of many trials scored on the same examples is optimistic, so
the winner and the runners-up are scored again on examples the search never saw, each with
a 95 % interval, beside their search scores."""

from __future__ import annotations

import math
from typing import Any

from mergekit_corespace.evaluate import normalised_score
from mergekit_corespace.tune.grid import point_key
from mergekit_corespace.tune.selection import selection_value

RUNNERS_UP = 2  # re-scored on the held-out examples besides the winner
Z95 = 1.959964  # a 95 % interval is the score ± Z95 standard errors


def rescored_on_holdout(plan, study, session, result, normalise: bool) -> list[dict[str, Any]]:
    """The winner and up to :data:`RUNNERS_UP` runners-up (by search score), scored on the
    held-out examples (kept in the study: a resumed run does not score them again), with
    their search score, held-out score, its 95 % interval, and the difference."""
    by_normalised = result.selected_by != "average"
    references = {}
    if normalise:
        for task in plan.holdout:
            if task.name in result.references:
                key = f"reference:holdout:{task.name}"
                if key not in study.user_attrs:
                    study.set_user_attr(key, session.reference(task))
                references[task.name] = study.user_attrs[key]
    ranked = sorted(result.rows, key=lambda row: -selection_value(row, by_normalised))
    ranked = [result.best] + [row for row in ranked if row is not result.best]
    metrics = {task.name: task.metric for task in plan.tasks}
    rows = []
    for row in ranked[: 1 + RUNNERS_UP]:
        key = f"holdout:{point_key(row.point)}"
        if key not in study.user_attrs:
            model, _, _ = session.put(row.point)
            evaluations = plan.evaluations(model, plan.holdout)
            study.set_user_attr(key, {
                "scores": {n: e.score for n, e in evaluations.items()},
                "stderr": {n: e.stderr for n, e in evaluations.items()},
            })  # fmt: skip
        held = study.user_attrs[key]
        if by_normalised:
            parts = {
                n: (normalised_score(metrics[n], s, references[n]), references[n])
                for n, s in held["scores"].items()
            }
            stderrs = [  # by the derivative of the normalisation at the score
                None if held["stderr"][n] is None
                else held["stderr"][n] * (value if metrics[n] == "loglik" else 1 / abs(ref))
                for n, (value, ref) in parts.items()
            ]  # fmt: skip
            score = sum(value for value, _ in parts.values()) / len(parts)
        else:
            score = sum(held["scores"].values()) / len(held["scores"])
            stderrs = list(held["stderr"].values())
        searched = selection_value(row, by_normalised)
        interval = None
        if all(s is not None for s in stderrs):  # the tasks' errors, independent
            error = math.sqrt(sum(s * s for s in stderrs)) / len(stderrs)
            interval = [score - Z95 * error, score + Z95 * error]
        rows.append({
            "point": row.point,
            "trial": row.trial,
            "search": searched,
            "holdout": score,
            "interval95": interval,
            "difference": searched - score,
            "scores": held["scores"],
            "stderr": held["stderr"],
        })  # fmt: skip
    return rows
