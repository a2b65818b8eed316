"""The scored trials written for people and programs: the Markdown table, ``results.csv``,
``results.json``, the winning recipe ``best.yml`` and the plots."""

from __future__ import annotations

import csv
import io
import json
import os
from typing import TYPE_CHECKING, Any

from mergekit_corespace.tune.grid import label
from mergekit_corespace.tune.plot import plot_score_vs_lambda, plot_study

if TYPE_CHECKING:
    from mergekit_corespace.tune.plan import Plan
    from mergekit_corespace.tune.results import Row, TuneResult


def markdown_table(result: TuneResult) -> str:
    """The result as a Markdown table, the winning row marked with *."""
    keys, tasks = _columns(result)
    normalised = bool(result.references)
    sampled = result.search.get("search", "grid") != "grid"
    header = [*(["trial"] if sampled else []), *keys]
    header += [*(f"{t} ({result.metrics[t]})" for t in tasks), "average"]
    if normalised:
        header.append("normalised")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result.rows:
        mark = " *" if row is result.best else ""
        cells = [str(row.trial)] if sampled else []
        cells += [_cell(row.point.get(key, "")) for key in keys]
        cells += [_with_stderr(row.scores[t], row.stderr.get(t)) for t in tasks]
        cells.append(f"{row.average:.4f}")
        if normalised:
            cells.append(f"{row.normalised_average:.4f}")
        cells[-1] += mark
        lines.append("| " + " | ".join(cells) + " |")
    if result.references:
        shown = ", ".join(f"{task} {score:.4f}" for task, score in result.references.items())
        lines.append(f"\nOwn adapter alone (references): {shown}")
        low = near_zero_references(result.metrics, result.references)
        if low:
            lines.append(
                "Near-zero references (each normalised score of these tasks is their score "
                "× "
                + ", ".join(f"{task} {1 / score:.0f}" for task, score in low.items())
                + "): their tasks weigh most in the normalised average"
            )
    lines.append(f"Best by {result.selected_by}: {label(result.best.point)} (marked *)")
    lines += [
        f"At the grid's edge: {note}; a wider grid may score higher" for note in result.at_edge()
    ]
    search = result.search
    if search.get("pruned"):
        lines.append(
            f"Trials: {search['complete']} scored whole, {search['pruned']} pruned by the "
            f"{search.get('prune') or 'median'} rule; {search['examples_scored']} examples "
            f"scored of {search['examples_unpruned']} without pruning"
        )
    if result.holdout:
        lines += ["", f"Held-out examples ({result.selected_by}, 95 % interval):", ""]
        lines += ["| point | search | held-out | search − held-out |", "|---|---|---|---|"]
        for held in result.holdout:
            interval = held["interval95"]
            shown = f"{held['holdout']:.4f}" + (
                f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else ""
            )
            mark = " *" if held["point"] == result.best.point else ""
            lines.append(
                f"| {label(held['point'])}{mark} | {held['search']:.4f} | {shown} | "
                f"{held['difference']:+.4f} |"
            )
    return "\n".join(lines)


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


NEAR_ZERO = 0.1  # an accuracy reference below this multiplies its task's normalised scores by >10


def near_zero_references(metrics, references) -> dict[str, float]:
    """The accuracy-like references (all but ``loglik``) below :data:`NEAR_ZERO`."""
    return {
        task: score
        for task, score in references.items()
        if metrics.get(task) != "loglik" and 0 < score < NEAR_ZERO
    }


def _with_stderr(score: float, stderr: float | None) -> str:
    return f"{score:.4f}" if stderr is None else f"{score:.4f} ± {stderr:.4f}"


def write_outputs(plan: Plan, result: TuneResult, best_examples, timing, study) -> None:
    """``results.csv``, ``results.json``, ``predictions.jsonl`` (the winner's, per task and
    example), ``timing.json``, ``best.yml``, ``score_vs_lambda.png`` and the study's plots
    in ``OUT``, each written aside and moved into place."""
    keys, tasks = _columns(result)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    normalised = bool(result.references)
    writer.writerow(
        ["trial", *keys, *tasks, *(f"{t} stderr" for t in tasks), "average"]
        + ([*(f"{t} normalised" for t in result.references), "normalised"] if normalised else [])
    )
    for row in result.rows:
        writer.writerow(
            [row.trial, *(row.point.get(key, "") for key in keys)]
            + [repr(row.scores[t]) for t in tasks]
            + [repr(row.stderr.get(t)) if row.stderr.get(t) is not None else "" for t in tasks]
            + [repr(row.average)]
            + (
                [
                    *(repr(row.normalised[t]) for t in result.references),
                    repr(row.normalised_average),
                ]
                if normalised
                else []
            )
        )
    write_text(os.path.join(plan.out, "results.csv"), buffer.getvalue())
    summary = {
        "config": plan.config_path,
        "metrics": result.metrics,
        "references": result.references,
        "selected_by": result.selected_by,
        "best": _row_json(result.best),
        "points": [_row_json(row) for row in result.rows],
        "search": result.search,
        "holdout": result.holdout,
        "run": result.run,
    }
    write_text(os.path.join(plan.out, "results.json"), json.dumps(summary, indent=1) + "\n")
    lines = [
        json.dumps({"task": task, **example}, default=str) + "\n"
        for task, examples in best_examples.items()
        for example in examples
    ]
    write_text(os.path.join(plan.out, "predictions.jsonl"), "".join(lines))
    write_text(os.path.join(plan.out, "timing.json"), json.dumps(timing, indent=1) + "\n")
    write_text(os.path.join(plan.out, "best.yml"), result.recipe)
    plot_score_vs_lambda(plan, result, os.path.join(plan.out, "score_vs_lambda.png"))
    plot_study(plan, study)


def write_text(path: str, text: str) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)


def _columns(result: TuneResult) -> tuple[list[str], list[str]]:
    keys = list(dict.fromkeys(key for row in result.rows for key in row.point))
    return keys, list(result.metrics)


def _row_json(row: Row) -> dict[str, Any]:
    return {
        "trial": row.trial,
        "point": row.point,
        "scores": row.scores,
        "average": row.average,
        "normalised": row.normalised,
        "normalised_average": row.normalised_average,
        "stderr": row.stderr,
    }
