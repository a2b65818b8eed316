"""What float32 merging costs a real LLM: bench/llm's chosen merges in float32 and float64.

    python bench/llm/precision.py [--labels "iso_cts · knots,ties · core,..."] [--smoke]

For each chosen merge of ``bench/llm/predictions.json`` (same adapters, λ and density),
``mergekit-yaml`` writes the model twice, with ``precision: float64`` and ``float32``, and
both are scored on bench/llm's test split. Printed per merge: the normalized accuracy of
each, their paired difference with a 95 % bootstrap interval, the test answers that
changed, and the share of written weights that differ (in the dtype of the saved answers:
bf16, or float32 where run.py ran on a CPU without bf16). The float64 model's answers are
also checked against those saved in predictions.json (the same merge, rerun).
Run on the CPU: the dtype, not the device, decides the rounding. About 20 minutes on
2 cores with the adapters cached (``python bench/llm/run.py`` trains them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))
sys.path.insert(2, os.path.join(os.path.dirname(HERE), "accuracy"))

import report  # noqa: E402
import run  # noqa: E402
import stats  # noqa: E402
from answers import INDIVIDUAL, Scorer, agreement, load, saved_dtype, short_dtype  # noqa: E402
from measure import bf16_ulps, read_weights  # noqa: E402

from mergekit_corespace import toy  # noqa: E402
from mergekit_corespace.tune import point_recipe  # noqa: E402

# auto's float32 choices with the largest float32 error (bench/perf/precision_bench.py),
# and TIES, which auto keeps in float64
LABELS = "iso_cts · knots,iso_cts · full,tsv · knots,ta · knots,ties · knots,ties · core"


def weights_apart(first: str, second: str, base: str) -> tuple[int, int, float]:
    """Written weights that differ, all written weights, and the largest difference in
    bf16 units in the last place."""
    a, b, w = (read_weights(p) for p in (first, second, base))
    differ = total = 0
    worst = 0.0
    for name, want in a.items():
        ulps = bf16_ulps(b[name], want, w.get(name, want))
        differ += int((ulps > 0).sum())
        total += ulps.numel()
        worst = max(worst, float(ulps.max()))
    return differ, total, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", default=None, help="comma-separated 'method · space'")
    parser.add_argument("--predictions", default=os.path.join(HERE, "predictions.json"))
    parser.add_argument("--cache", default=run.CACHE)
    parser.add_argument(
        "--smoke", action="store_true", help="CI: the merges of `run.py --smoke`'s predictions"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with open(args.predictions, encoding="utf-8") as handle:
        saved = json.load(handle)
    outcomes = report.decode(saved)
    individual = outcomes[INDIVIDUAL]
    default = "ties · core,ties · knots" if args.smoke else LABELS
    labels = [label.strip() for label in (args.labels or default).split(",")]
    for label in labels:
        if label not in saved["rows"]:
            sys.exit(f"--labels: {label!r} is not a row of {args.predictions}")
    started = time.perf_counter()
    work = tempfile.mkdtemp(prefix="llm-precision-")
    try:
        plan = dict(run.SMOKE if args.smoke else run.FULL)
        plan["cache"] = os.path.join(work, "cache") if args.smoke else args.cache
        base = run.base_model(args.smoke, work)
        sizes = {k: plan[k] for k in ("validation", "test", "train") if k in plan}
        tasks = run.chat_tasks.load_chat_tasks(plan["tasks"], seed=run.SEED, **sizes)
        test = run.chat_tasks.write_task_files(tasks, "test", os.path.join(work, "test"))
        adapters, trained = run.train_adapters(base, tasks, plan)
        from transformers import AutoTokenizer

        scorer = Scorer(AutoTokenizer.from_pretrained(base), test, plan["tasks"])
        dtype = saved_dtype(saved)  # bf16, or float32 from a CPU without bf16
        raw = yaml.safe_load(run.recipe_text(base, adapters, dtype))
        boot = stats.Bootstrap({name: len(v) for name, v in individual.items()})
        print(
            f"{saved['model']}, {len(adapters)} adapters, {len(individual)} tasks × {plan['test']} "
            f"test examples; adapters {'trained' if trained else 'cached'}\n\n"
            "| merge | float64 | float32 | float32 − float64 [95 % CI] | answers changed "
            f"| {short_dtype(dtype)} weights that differ | largest difference (bf16 ulps) "
            "| float64 = saved answers |\n"
            "|---|---|---|---|---|---|---|---|",
            flush=True,
        )
        for label in labels:
            method, space = label.split(" · ")
            point = {"merge_method": run.SPACES[space], "merge": method}
            point |= saved["rows"][label]["chosen"]
            answers, hits, written = {}, {}, {}
            for precision in ("float64", "float32"):
                config = point_recipe(raw, {**point, "precision": precision})
                path = toy.write_yaml(
                    os.path.join(work, "recipe.yml"), yaml.safe_dump(config, sort_keys=False)
                )
                written[precision] = os.path.join(work, precision)
                run.run_script("mergekit-yaml", path, written[precision])
                answers[precision] = scorer.answers(load(written[precision], dtype=dtype))
                hits[precision] = {
                    name: [int(c) for c in h] for name, h in scorer.hits(answers[precision]).items()
                }
            same, total = agreement(answers["float64"], answers["float32"])
            differ, weights, worst = weights_apart(written["float32"], written["float64"], base)
            first, second = (stats.normalized(hits[p], individual) for p in ("float64", "float32"))
            replicates = boot.normalized(hits["float32"], individual) - boot.normalized(
                hits["float64"], individual
            )
            low, high = stats.interval(replicates)
            print(
                f"| {label} | {first:.3f} | {second:.3f} | {second - first:+.3f} "
                f"[{low:+.3f}, {high:+.3f}] | {total - same} of {total} "
                f"| {differ / weights:.2%} | {worst:.0f} ulp "
                f"| {'yes' if hits['float64'] == outcomes[label] else 'NO'} |",
                flush=True,
            )
            for folder in written.values():
                shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
