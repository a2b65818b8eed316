"""The statistics and chart of an accuracy page, shared by ``bench/accuracy`` and
``bench/llm``: per-example 0/1 test outcomes per model and task in, point figures with
95 % bootstrap intervals, paired core-vs-full / core-vs-KnOTS tests (Holm-adjusted) and
a bar chart of normalized accuracy out.

``saved["rows"]`` maps a row label to ``{"predictions": {task: "0110…"}, ...}``; merged
models are labelled ``"<method> · <space>"`` (space: core, knots, full) and the
reference row is :data:`INDIVIDUAL` (each task scored with its own adapter).
"""

from __future__ import annotations

import stats

INDIVIDUAL = "individual adapters (own task)"
SPACES = ("core", "knots", "full")
SPACE_NAMES = {"core": "core space", "knots": "KnOTS", "full": "full space"}


def decode(saved: dict) -> dict[str, dict[str, list[int]]]:
    """Per encoder, per task, the saved 0/1 outcomes as lists."""
    return {
        label: {name: [int(c) for c in text] for name, text in row["predictions"].items()}
        for label, row in saved["rows"].items()
    }


def summary(saved: dict, pairs: list[tuple[str, str]] | None = None) -> dict:
    """Point figures, 95 % intervals and paired tests: of ``pairs`` of row labels (first,
    second), by default core against full space and KnOTS for each method."""
    outcomes = decode(saved)
    individual = outcomes[INDIVIDUAL]
    boot = stats.Bootstrap({name: len(values) for name, values in individual.items()})
    figures, replicates = {}, {}
    for label, predictions in outcomes.items():
        tasks = boot.task_accuracies(predictions)
        replicates[label] = boot.normalized(predictions, individual)
        figures[label] = {
            "tasks": {
                name: (stats.accuracy(values), stats.interval(tasks[name]))
                for name, values in predictions.items()
            },
            "average": (stats.average(predictions), stats.interval(boot.average(predictions))),
            "normalized": (
                stats.normalized(predictions, individual),
                stats.interval(replicates[label]),
            ),
        }
    if pairs is None:
        pairs = [
            (f"{method} · core", f"{method} · {other}")
            for method in methods_of(outcomes)
            for other in ("full", "knots")
            if f"{method} · core" in outcomes and f"{method} · {other}" in outcomes
        ]
    comparisons = []
    for first, second in pairs:
        difference = figures[first]["normalized"][0] - figures[second]["normalized"][0]
        differences = replicates[first] - replicates[second]
        a, b = stats.pooled(outcomes[first]), stats.pooled(outcomes[second])
        comparisons.append(
            {
                "first": first,
                "second": second,
                "method": first.split(" · ")[0],
                "other": second.split(" · ")[1] if " · " in second else second,
                "difference": difference,
                "interval": stats.interval(differences),
                "bootstrap_p": stats.paired_p_value(difference, differences),
                "mcnemar_p": stats.mcnemar_p_value(a, b),
                "disagreements": sum(x != y for x, y in zip(a, b)),
            }
        )
    adjusted = stats.holm([c["bootstrap_p"] for c in comparisons])
    for comparison, holm_p in zip(comparisons, adjusted):
        comparison["holm_p"] = holm_p
    return {"figures": figures, "comparisons": comparisons}


def methods_of(rows) -> list[str]:
    return list(dict.fromkeys(label.split(" · ")[0] for label in rows if " · " in label))


def ci(point_interval: tuple[float, tuple[float, float]]) -> str:
    point, (low, high) = point_interval
    return f"{point:.3f} [{low:.3f}, {high:.3f}]"


def p_text(value: float) -> str:
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def task_table(first: str, labels, figures: dict, names) -> list[str]:
    """Per-task test accuracy with intervals, a row per model."""
    lines = [f"| {first} | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label in labels:
        cells = " | ".join(ci(figures[label]["tasks"][name]) for name in names)
        lines.append(f"| {label} | {cells} |")
    return lines


def comparison_section(comparisons: list[dict], models: str) -> list[str]:
    """The page's section of paired core-vs-other tests (none without comparisons)."""
    if not comparisons:
        return []
    return [
        "",
        "## Core space against full space and KnOTS, same inner method",
        "",
        "Difference of normalized accuracy (core − other) on the same test examples, its "
        "95 % paired-bootstrap interval and two-sided p-value, the p-value Holm-adjusted "
        f"over the {len(comparisons)} comparisons of this page, the exact McNemar p-value "
        "on the pooled test examples (average accuracy), and the number of test examples "
        f"on which the two {models}' outcomes differ.",
        "",
        *comparison_table(comparisons),
    ]


def comparison_table(comparisons: list[dict]) -> list[str]:
    """The paired core-vs-other tests, a row per comparison, and what is significant."""
    lines = [
        "| method | core vs | difference | 95 % interval | p (bootstrap) | p (Holm) "
        "| p (McNemar) | disagreements |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        low, high = c["interval"]
        lines.append(
            f"| {c['method']} | {SPACE_NAMES[c['other']]} | {c['difference']:+.3f} | "
            f"[{low:+.3f}, {high:+.3f}] | {p_text(c['bootstrap_p'])} "
            f"| {p_text(c['holm_p'])} | {p_text(c['mcnemar_p'])} "
            f"| {c['disagreements']} |"
        )
    return [*lines, "", closing_note(comparisons)]


def closing_note(comparisons: list[dict]) -> str:
    """Which core-vs-other differences are significant at 5 % (paired bootstrap)."""

    def listed(items) -> str:
        return (
            ", ".join(
                f"{c['method']} core vs {SPACE_NAMES[c['other']]} ({c['difference']:+.3f}, "
                f"p {p_text(c['bootstrap_p'])})"
                for c in items
            )
            or "none"
        )

    significant = [c for c in comparisons if c["bootstrap_p"] < 0.05]
    after_holm = [c for c in significant if c["holm_p"] < 0.05]
    different = [c for c in comparisons if c["bootstrap_p"] >= 0.05 and c["disagreements"]]
    identical = [c for c in comparisons if not c["disagreements"]]
    same = ", ".join(f"{c['method']} core vs {SPACE_NAMES[c['other']]}" for c in identical)
    return (
        f"**Significant at 5 %** (paired bootstrap, unadjusted): {listed(significant)}; "
        f"still significant after Holm's adjustment: {listed(after_holm)}. "
        f"**Not significant at 5 %**: {listed(different)}. "
        f"**Same outcome on every test example** (p = 1): {same or 'none'}."
    )


def plot(result: dict, path: str, *, title: str, zero_shot: str) -> None:
    """Normalized accuracy per method and space with intervals; the ``zero_shot`` row as a
    dashed line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
        return
    figures = result["figures"]
    methods = methods_of(figures)
    width = 0.27
    figure, axis = plt.subplots(figsize=(11, 4))
    lows = []
    for offset, space in enumerate(SPACES):
        present = [i for i, m in enumerate(methods) if f"{m} · {space}" in figures]
        points = [figures[f"{methods[i]} · {space}"]["normalized"] for i in present]
        errors = [
            [point - low for point, (low, _) in points],
            [high - point for point, (_, high) in points],
        ]
        lows += [low for _, (low, _) in points]
        axis.bar(
            [i + (offset - 1) * width for i in present],
            [point for point, _ in points],
            width,
            yerr=errors,
            capsize=2,
            error_kw={"elinewidth": 0.8},
            label=SPACE_NAMES[space],
        )
    zero, (zero_low, zero_high) = figures[zero_shot]["normalized"]
    axis.axhline(zero, color="grey", linestyle="--", label="zero-shot base")
    axis.axhspan(zero_low, zero_high, color="grey", alpha=0.15)
    axis.set_xticks(range(len(methods)), methods)
    axis.set_ylabel("normalized accuracy (merged / own adapter)")
    axis.set_title(title, fontsize=10)
    axis.set_ylim(min([*lows, zero_low]) - 0.02, 1.02)
    axis.legend(ncols=4, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"chart: {path}")
