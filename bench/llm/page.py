"""The benchmark's results page (and chart) from its saved per-example outcomes:
``results.md`` with intervals, paired tests, free generation and sample answers."""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
sys.path[1:1] = [os.path.join(BENCH, "accuracy")]

import report  # noqa: E402
import stats  # noqa: E402
from answers import AGREEMENT, INDIVIDUAL, SAMPLE_TOKENS, ZERO_SHOT, saved_dtype, short_dtype  # noqa: E402

from mergekit_corespace.tune import at_grid_edge, grid_points  # noqa: E402


def publish(saved: dict, paths: dict[str, str], chart: bool = True) -> None:
    result = report.summary(saved)
    page = render(saved, result)
    with open(paths["results"], "w", encoding="utf-8") as handle:
        handle.write(page)
    print(page)
    if chart and len(saved["plan"]["spaces"]) > 1:
        title = (
            "SmolLM2-135M-Instruct, six LoRA adapters: normalized test accuracy "
            "with 95 % bootstrap intervals"
        )
        report.plot(result, paths["chart"], title=title, zero_shot=ZERO_SHOT)


def _accuracy(text: str) -> float:
    return text.count("1") / len(text)


def render(saved: dict, result: dict) -> str:
    names, figures, rows = saved["tasks"], result["figures"], saved["rows"]
    lora, training = saved["lora"], saved["training"]
    modules = ", ".join(f"`{m}`" for m in lora["target_modules"])
    threads = saved["torch_threads"]
    scored = {
        name: "exact match of the greedy answer"
        if saved["metrics"][name] == "exact"
        else "the label with the highest log-likelihood"
        for name in names
    }
    lines = [
        f"# LLM merges: {saved['model']}, {len(names)} LoRA adapters, judged by their answers",
        "",
        f"Command: `{saved['command']}`, {saved['date']}; {saved['minutes']:.1f} min on "
        f"{saved['cpus']} CPUs ({threads} torch thread{'s' if threads != 1 else ''}), of which "
        f"{saved['adapters_trained_seconds'] / 60:.1f} min training adapters (0 when cached) and "
        f"{saved['tuning_seconds'] / 60:.1f} min tuning. Adapters: r = {lora['r']}, "
        f"α = {lora['lora_alpha']} on {modules}; {training['steps']} steps of "
        f"{training['batch_size']} chats, AdamW lr {training['learning_rate']}, loss on the "
        "answer and its end-of-turn token.",
        "",
        "Every merge: λ (and density) chosen on the validation split "
        f"({saved['plan']['validation']} examples per task) by `mergekit-corespace-tune`'s "
        "code from the grids at the end of this page, then written by `mergekit-yaml` "
        f"({short_dtype(saved_dtype(saved))}) "
        "and scored on test from the written checkpoint. *Adapter agreement*: the same recipe "
        "written by `mergekit-corespace-lora` and applied to the base with PEFT "
        f"(`merge_and_unload`) gives the same answer, on the first {AGREEMENT} test examples "
        "of each task (checked for every core-space choice and each space's best; the others "
        "are left out to fit the time budget). Normalized = merged / own adapter, averaged "
        "over tasks. Brackets: 95 % "
        f"bootstrap intervals ({stats.RESAMPLES} resamples over test examples, stratified by "
        "task). Bold: each space's best merge on validation, which also answers freely below. "
        "(edge): the largest or smallest of three or more values in its grid (the tuner's "
        "warning; a wider grid might choose otherwise).",
        "",
        "| task | metric | test examples | zero-shot | own adapter |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        lines.append(
            f"| {name} | {scored[name]} | {saved['sizes'][name]} | "
            f"{report.ci(figures[ZERO_SHOT]['tasks'][name])} | "
            f"{report.ci(figures[INDIVIDUAL]['tasks'][name])} |"
        )
    lines += [
        "",
        "| model | average | normalized | chosen on validation | mergekit-yaml / "
        "mergekit-corespace-lora | adapter agreement |",
        "|---|---|---|---|---|---|",
    ]
    for label, row in rows.items():
        chosen = timing = agree = ""
        if "chosen" in row:
            grid = saved["grids"][label]
            point = {"merge_method": grid["merge_method"][0], "merge": grid["merge"][0]}
            edges = at_grid_edge(point | row["chosen"], grid_points(grid, {}))
            chosen = ", ".join(
                f"{k} {v}{' (edge)' if k in edges else ''}" for k, v in row["chosen"].items()
            )
            timing = f"{row['mergekit_yaml_seconds']:.1f} s / " + (
                f"{row['lora_seconds']:.1f} s" if "lora_seconds" in row else "–"
            )
        if "adapter_agreement" in row:
            same, total = row["adapter_agreement"]
            agree = f"{same / total:.3f} ({total - same} differ)"
        name = f"**{label}**" if row.get("best_of_space") else label
        lines.append(
            f"| {name} | {report.ci(figures[label]['average'])} | "
            f"{report.ci(figures[label]['normalized'])} | {chosen} | {timing} | {agree} |"
        )
    lines += [
        "",
        "## Per task (test accuracy, 95 % interval)",
        "",
    ]
    lines += report.task_table("model", rows, figures, names)
    lines += [
        "",
        "## Free generation",
        "",
        "Exact match of the greedy answer (case and spaces ignored) on every task, also those "
        "scored by label likelihood above: the model must say the label and stop.",
        "",
        "| model | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for label, hits in saved["free_generation"].items():
        cells = " | ".join(f"{_accuracy(hits[name]):.3f}" for name in names)
        lines.append(f"| {label} | {cells} |")
    lines += report.comparison_section(result["comparisons"], "models")
    lines += ["", "## Grids", ""]
    for space, spent in saved.get("tuning", {}).items():
        lines.append(
            f"- {space}: {spent['points']} points in {spent['seconds']} s, of which "
            f"{spent['merging_seconds']} s merging (points differing only in λ share one "
            "merge, KnOTS points share each module's KnOTS space)"
        )
    lines += [""] * ("tuning" in saved) + ["```json", json.dumps(saved["grids"]), "```"]
    lines += ["", "## The models answering", ""]
    lines += [
        "The first test example of each task, answered by free greedy generation "
        f"(at most {SAMPLE_TOKENS} tokens).",
        "",
    ]
    for name in names:
        example = saved["examples"][name]
        lines += [f"**{name}** — expected `{example['answer']}`", "", "```text"]
        lines += [example["question"], "```", ""]
        for label, answers in saved["samples"].items():
            if name in answers:
                said = answers[name].strip()
                lines.append(f"- {label}: " + (f"`{said}`" if said else "(empty answer)"))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
