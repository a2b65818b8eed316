"""The page of bench/llm/search.py from its saved per-example outcomes: each arm's choice
and test accuracy with 95 % intervals, paired tests between arms, and the trim's energy."""

from __future__ import annotations

import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[1:1] = [os.path.join(os.path.dirname(HERE), "accuracy")]

import report  # noqa: E402
from answers import INDIVIDUAL, saved_dtype, short_dtype  # noqa: E402

from mergekit_corespace.tune.grid import weight_key  # noqa: E402


def pairs(rows: dict) -> list[tuple[str, str]]:
    """The arms compared on the same test examples: search against grid for each method and
    space (a raced search against both), core against full space for each kind, KnOTS
    scaled against unscaled, and the search chosen on validation (the best of them there)
    against every other search and every KnOTS arm; each pair once."""
    searches = [label for label in rows if label.split(" · ")[-1].startswith("search")]
    best = max(searches, key=lambda label: rows[label]["validation_normalized"], default=None)
    rivals = [label for label in rows if label in searches or " · knots " in label]
    out = [(best, other) for other in rivals if best is not None and other != best]
    for label in rows:
        method, space, kind = (label.split(" · ") + ["", ""])[:3]
        twins = [f"{method} · {space} · search", f"{method} · {space} · grid"]
        if label in searches:  # a raced search against the searched one, and the grid
            out += [(label, twin) for twin in twins if twin in rows and twin != label]
        other = f"{method} · full · {kind}"
        if space == "core" and other in rows:
            out.append((label, other))
    scaled, unscaled = "ties · knots (S·Vₜ) · grid", "ties · knots (Vₜ) · grid"
    if scaled in rows and unscaled in rows:
        out.append((scaled, unscaled))
    kept: list[tuple[str, str]] = []  # each pair once, in either order: the chosen search
    for first, second in out:  # may be a core search with a full twin, or a raced one's twin
        if (first, second) not in kept and (second, first) not in kept:
            kept.append((first, second))
    return kept


def chosen_text(point: dict) -> str:
    """λ, density and each adapter's weight of a winning point, in short."""
    parts = [f"λ {point['lambda']:.3g}"] if "lambda" in point else []
    if "density" in point:
        parts.append(f"density {point['density']:.2f}")
    weights = [(k[len("weight[") : -1], v) for k, v in point.items() if k.startswith("weight[")]
    if weights:
        parts.append("weights " + ", ".join(f"{name} {value:.2f}" for name, value in weights))
    return "; ".join(parts)


def render(saved: dict) -> str:
    result = report.summary(saved, pairs(saved["rows"]))
    figures, tests = result["figures"], result["comparisons"]
    rows, names = saved["rows"], saved["tasks"]
    lines = [
        f"# Search against grid: {saved['model']}, {len(names)} LoRA adapters",
        "",
        f"Command: `{saved['command']}`, {saved['date']}; {saved['minutes']:.1f} min in "
        f"its last run on {saved['cpus']} CPUs ({saved['torch_threads']} torch threads). "
        f"Every arm chooses on the validation split ({saved['validation']} examples a task) by "
        "`mergekit_corespace.tune.tune` with the same seed; its choice is written by "
        f"`mergekit-yaml` ({short_dtype(saved_dtype(saved))}) and scored on test "
        f"({', '.join(f'{n} {k}' for n, k in saved['sizes'].items())} examples). Search and "
        f"grid of a method take the same number of evaluations ({saved['evaluations']}): the "
        "grid every point of its grid, the search (Optuna's TPE) as many trials over ranges "
        "of λ, each adapter's weight and density, stopping a hopeless trial after a third of "
        "each task (the tuner's `--prune`, the median rule); a search marked (raced) stops a "
        "trial after a third or two thirds of each task when it is worse than the best "
        "trial on the same examples (`--prune wilcoxon`). Tuning s: the arm's wall time on "
        "validation (merging in brackets), summed over resumed runs. Normalized = merged / own "
        "adapter, averaged over tasks; brackets: 95 % bootstrap intervals (2000 "
        "resamples, stratified by task).",
        *partial(saved),
        "",
        "| arm | evaluations | tuning s (merging) | chosen on validation | validation "
        "normalized | test average | test normalized | " + " | ".join(names) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(names),
    ]
    measured = [INDIVIDUAL, *(arm for arm in saved.get("arms", []) if arm in rows)]
    for label in dict.fromkeys([*measured, *rows]):  # the arms' order, not the runs'
        row, figure = rows[label], figures[label]
        tasks = " | ".join(f"{figure['tasks'][n][0]:.3f}" for n in names)
        if label == INDIVIDUAL:
            lines.append(
                f"| {label} |  |  |  |  | {report.ci(figure['average'])} | "
                f"{report.ci(figure['normalized'])} | {tasks} |"
            )
            continue
        lines.append(
            f"| {label} | {evaluations(row)} | {row['tuning_seconds']} "
            f"({row['merging_seconds']}) | {chosen_text(row['chosen'])} | "
            f"{row['validation_normalized']:.3f} | {report.ci(figure['average'])} | "
            f"{report.ci(figure['normalized'])} | {tasks} |"
        )
    lines += paired_section(tests)
    lines += interference_section(saved.get("interference"), names)
    lines += weight_response_section(saved, names)
    return "\n".join([*lines, *trim_section(saved["trim"], names)]) + "\n"


def paired_section(tests: list[dict]) -> list[str]:
    """Each pair of arms compared on the same test examples (none until both are measured)."""
    if not tests:
        return []
    lines = [
        "",
        "## Paired tests",
        "",
        "Difference of test normalized accuracy (first − second) on the same test examples, "
        "its 95 % paired-bootstrap interval and two-sided p-value, the p-value Holm-adjusted "
        f"over the {len(tests)} comparisons of this page, the exact McNemar p-value on the "
        "pooled test examples, and the test examples on which the two differ.",
        "",
        "| first | second | difference | 95 % interval | p (bootstrap) | p (Holm) | "
        "p (McNemar) | disagreements |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in tests:
        low, high = t["interval"]
        lines.append(
            f"| {t['first']} | {t['second']} | {t['difference']:+.3f} | [{low:+.3f}, "
            f"{high:+.3f}] | {report.p_text(t['bootstrap_p'])} | {report.p_text(t['holm_p'])} "
            f"| {report.p_text(t['mcnemar_p'])} | {t['disagreements']} |"
        )
    return lines


def partial(saved: dict) -> list[str]:
    """A line naming the arms not yet measured, when the study stopped before its end."""
    missing = [arm for arm in saved.get("arms", []) if arm not in saved["rows"]]
    if saved.get("complete", True) or not missing:
        return []
    return [
        "",
        f"**Partial:** {len(saved['rows']) - 1} of {len(saved['arms'])} arms measured; not yet: "
        f"{', '.join(missing)}. `{saved['command']}` resumes where it stopped.",
    ]


def evaluations(row: dict) -> str:
    """Trials of an arm, and how many of them the pruner stopped."""
    counts = row.get("search_counts", {})
    if counts.get("pruned"):
        return f"{counts['complete'] + counts['pruned']} ({counts['pruned']} pruned)"
    return str(row["evaluations"])


def interference_section(measured: dict | None, names) -> list[str]:
    """The task the merges lose, scored in weighted sums of the adapters (runs saved before
    it was measured have none)."""
    if not measured:
        return []
    task = measured["task"]
    lines = [
        "",
        f"## What takes {task} to 0",
        "",
        "Task arithmetic in core space at λ 1 (`bench/llm/interference.py`): the exact "
        f"weighted sum of the adapters named, scored on {task}'s validation examples by the "
        f"tuner. {task} alone at weight 1 is its own adapter.",
        "",
        f"| adapters merged (weights) | {task} on validation |",
        "|---|---|",
    ]
    for row in measured["rows"]:
        lines.append(f"| {weights_text(row['weights'], names, task)} | {row['score']:.3f} |")
    return lines


RATIO_EDGES = (0.5, 1, 2, 3)  # of a task's weight to the others' geometric mean


def weight_response_section(saved: dict, names) -> list[str]:
    """The lost task's validation score in the searches' trials, by how far its weight
    stands above the others' (λ cancels out of the ratio): whether the method lets a
    weight bring the task back."""
    task = (saved.get("interference") or {}).get("task")
    key = weight_key(task)
    arms = {
        label: row["trials"]
        for label, row in saved["rows"].items()
        if any(key in trial["point"] for trial in row.get("trials", []))
    }
    if not arms:
        return []
    edges = [f"{edge:g}" for edge in RATIO_EDGES]
    bins = [f"< {edges[0]}", *(f"{a}–{b}" for a, b in zip(edges, edges[1:])), f"≥ {edges[-1]}"]
    lines = [
        "",
        f"## How {task} answers its own weight",
        "",
        f"Every trial of each search scored whole on validation (pruned ones are not): "
        f"{task}'s mean score (trials in brackets) by the ratio of its weight to the "
        "geometric mean of the other adapters' weights.",
        "",
        f"| arm \\ {task}'s weight / the others' | " + " | ".join(bins) + " |",
        "|---|" + "---|" * len(bins),
    ]
    for label, trials in arms.items():
        found: list[list[float]] = [[] for _ in bins]
        for trial in trials:
            point = trial["point"]
            others = [point.get(weight_key(n), 1.0) for n in names if n != task]  # 1: unset
            ratio = point[key] / math.prod(others) ** (1 / len(others))
            found[sum(ratio >= edge for edge in RATIO_EDGES)].append(trial["scores"][task])
        cells = [f"{sum(s) / len(s):.3f} ({len(s)})" if s else "" for s in found]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def weights_text(weights: dict, names, task: str) -> str:
    """A merge's adapters and weights, in short."""
    left_out = [name for name in names if name not in weights]
    values = set(weights.values())
    if len(weights) == 1:
        return f"{task} alone at {weights[task]:g}"
    if len(values) == 1 and not left_out:
        return f"all {len(names)} at {values.pop():g}"
    if len(values) == 1 and len(left_out) == 1:
        return f"all but {left_out[0]}, at {values.pop():g}"
    if len(weights) == 2 and len(values) == 1:
        other = next(name for name in weights if name != task)
        return f"{task} + {other}, at {values.pop():g}"
    others = {weights[name] for name in weights if name != task}
    if not left_out and len(others) == 1:
        return f"all {len(names)}: {task} at {weights[task]:g}, the others at {others.pop():g}"
    return ", ".join(f"{name} {weight:g}" for name, weight in weights.items())


def trim_section(trim: dict, names) -> list[str]:
    """What TIES' trim keeps and its merge retains of each task, per space and density."""
    lines = [
        "",
        "## What TIES keeps of each task, core and full space",
        "",
        f"Over the {trim['modules']} modules the adapters share (`bench/llm/trim_energy.py`, "
        "the package's own spaces and merges, unit weights, λ 1): *kept*, the share of a "
        "task's energy ‖Xₜ‖² its trim keeps; *retained*, ⟨merge, Xₜ⟩ / ‖Xₜ‖², how much of "
        "the task the merge still holds; *merge energy*, ‖merge‖² / Σₜ‖Xₜ‖². Task "
        "arithmetic is the same in both spaces (lossless).",
        "",
        "| space | merge | figure | " + " | ".join(names) + " | merge energy |",
        "|---|---|---|" + "---|" * len(names) + "---|",
    ]
    for space, by_merge in trim["spaces"].items():
        for merge, figures in by_merge.items():
            title = "task arithmetic" if merge == "ta" else f"TIES, density {merge}"
            for figure in ("kept", "retained"):
                if figure in figures:
                    cells = " | ".join(f"{figures[figure][n]:.3f}" for n in names)
                    energy = f"{figures['merge_energy']:.3f}" if figure == "retained" else ""
                    lines.append(f"| {space} | {title} | {figure} | {cells} | {energy} |")
    return lines
