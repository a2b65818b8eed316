"""Offline accuracy benchmark: six text tasks, real LoRA adapters, every method and space.

    python bench/accuracy/run.py --quick               # README demo: core-space TIES
    python bench/accuracy/run.py                       # every method × space, λ/density sweep
    python bench/accuracy/run.py --setting headroom    # r=16 on every linear module, random heads
    python bench/accuracy/run.py --coarse              # λ ∈ {0.5, 1, 2}, one density, no re-merge
    python bench/accuracy/run.py --render              # tables + chart from saved predictions
    python bench/accuracy/run.py --smoke               # CI: tiny splits, one step per adapter

Trains (or reuses from the cache) one LoRA adapter per task on all-MiniLM-L6-v2, merges
the six with `mergekit-yaml` for each (method, space), and scores each merged encoder on
every task with fixed heads (benchmark.py). Hyper-parameters are picked on the validation
split; the test split is only used for the reported numbers. Saves every scored encoder's
per-example test outcomes (``predictions[-headroom].json``) and writes ``results[-headroom].md``
and ``normalized_accuracy[-headroom].png`` next to this file, with 95 % bootstrap intervals
and paired core-vs-full / core-vs-KnOTS tests (stats.py); ``-quick`` files with ``--quick``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import benchmark as bench  # noqa: E402
import report  # noqa: E402
import stats  # noqa: E402
import torch  # noqa: E402
from tasks import load_tasks  # noqa: E402
from tqdm import tqdm  # noqa: E402

METHODS = ["ta", "mean", "ties", "dare", "dare_ties", "tsv", "cart", "iso_c", "iso_cts"]
SPACES = list(report.SPACES)
LAMBDAS = [0.3, 0.5, 0.7, 1.0, 1.5, 2.0]
DENSITIES = {"ties": [0.3, 0.7], "dare": [0.1, 0.5], "dare_ties": [0.1, 0.5]}
FULL = dict(methods=METHODS, spaces=SPACES, lambdas=LAMBDAS, densities=DENSITIES)
# --coarse: λ in factor-2 steps, one density per method (the paper's TIES top-k 70 %,
# p 0.5 for DARE), the chosen candidate scored as merged (no mergekit-yaml re-merge):
# about a third of the merges and scorings of FULL
COARSE = dict(
    methods=METHODS,
    spaces=SPACES,
    lambdas=[0.5, 1.0, 2.0],
    densities={"ties": [0.7], "dare": [0.5], "dare_ties": [0.5]},
    remerge=False,
)
# the demo sweeps λ only, at the paper's TIES density: under 10 minutes cold on 2 cores
QUICK = dict(methods=["ties"], spaces=["core"], lambdas=[0.5, 1.0], densities={"ties": [0.7]})
SMOKE = dict(
    methods=["ties"], spaces=["core", "knots"], lambdas=[1.0], densities={}, timing_repeats=1
)
SMOKE_TASKS = 3
SMOKE_HEADROOM = dict(SMOKE, methods=["ties"], spaces=["core", "full"], remerge=False)


def candidates(method: str, plan: dict):
    """The sweep for one method: λ, and density where the method reads one."""
    densities = plan["densities"].get(method, [None])
    for lam, density in itertools.product(plan["lambdas"], densities):
        yield {"lambda": lam, **({"density": density} if density is not None else {})}


class Scorer:
    """Scores encoders on every task with the fixed heads; token batches made once.

    Examples are batched in order of token length (less padding); predictions come
    back in the split's own order, one 0/1 per example (1 = correct)."""

    def __init__(self, encoder: bench.Encoder, tasks, heads):
        self.tasks, self.heads, self.encoder = tasks, heads, encoder
        self.splits = {
            (task.name, split): self._batches(getattr(task, split))
            for task in tasks
            for split in ("validation", "test")
        }

    def _batches(self, examples, size: int = 64):
        lengths = [len(ids) for ids in self.encoder.tokens(t for t, _ in examples)["input_ids"]]
        order = sorted(range(len(examples)), key=lambda i: lengths[i])
        batches = []
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            tokens = self.encoder.tokenizer(
                [examples[i][0] for i in chunk],
                padding=True,
                truncation=True,
                max_length=bench.MAX_LENGTH,
                return_tensors="pt",
            )
            labels = torch.tensor([examples[i][1] for i in chunk])
            batches.append((chunk, tokens, labels))
        return batches

    @torch.no_grad()
    def predictions(self, model, split: str, only: str | None = None) -> dict[str, list[int]]:
        """Per task, 1 where the encoder's prediction is right, 0 where it is wrong."""
        encoder = bench.Encoder(model.eval(), self.encoder.tokenizer)
        results = {}
        for task in self.tasks:
            if only is not None and task.name != only:
                continue
            correct = [0] * len(getattr(task, split))
            for chunk, tokens, labels in self.splits[(task.name, split)]:
                predicted = (encoder.embed(tokens) @ self.heads[task.name].T).argmax(-1)
                for i, right in zip(chunk, (predicted == labels).tolist()):
                    correct[i] = int(right)
            results[task.name] = correct
        return results

    def __call__(self, model, split: str, only: str | None = None) -> dict[str, float]:
        return {
            name: sum(values) / len(values)
            for name, values in self.predictions(model, split, only).items()
        }


def sweep_and_merge(method, space, adapters, scorer, plan, work):
    """Pick λ (and density) on validation with in-process merges, then merge the choice
    with a real `mergekit-yaml` and score it on test. Returns (test predictions, timings).
    With ``remerge`` off (``--coarse``), the chosen candidate's in-process merge is scored
    as it is, and its merge time is the one reported."""
    best, best_score, best_seconds = None, -1.0, 0.0
    chosen = os.path.join(work, f"{method}-{space}")
    for parameters in candidates(method, plan):
        out = os.path.join(work, "candidate")
        config = bench.merge_config(method, space, adapters, parameters)
        seconds = bench.merge_in_process(config, out)
        score = statistics.mean(scorer(load_merged(out), "validation").values())
        if score > best_score:
            best, best_score, best_seconds = parameters, score, seconds
            shutil.rmtree(chosen, ignore_errors=True)
            os.replace(out, chosen)
    if not plan.get("remerge", True):
        return scorer.predictions(load_merged(chosen), "test"), (best, best_seconds, None)
    config = bench.merge_config(method, space, adapters, best)
    wall = bench.merge_with_mergekit_yaml(config, chosen, work)
    repeats = plan.get("timing_repeats", 2)
    merge_seconds = min(bench.merge_in_process(config, chosen + "-t") for _ in range(repeats))
    return scorer.predictions(load_merged(chosen), "test"), (best, merge_seconds, wall)


def load_merged(path: str):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path)


def output_paths(args) -> dict[str, str]:
    """results, predictions and chart files of this run (one set per setting and mode)."""
    suffix = ("-quick" if args.quick else "") + (
        f"-{args.setting}" if args.setting != "base" else ""
    )
    folder = HERE
    results = args.results or os.path.join(HERE, f"results{suffix}.md")
    if args.results:
        folder = os.path.dirname(os.path.abspath(args.results))
    return {
        "results": results,
        "predictions": args.predictions or os.path.join(folder, f"predictions{suffix}.json"),
        "chart": os.path.join(folder, f"normalized_accuracy{suffix}.png"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the README demo: core-space TIES")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a CI smoke run: three tasks, tiny splits, one training step, not cached",
    )
    parser.add_argument(
        "--setting",
        choices=sorted(bench.SETTINGS),
        default="base",
        help="base: r=8 adapters on query/value, class-mean heads; headroom: r=16 adapters "
        "on every linear module, random fixed heads (see README.md)",
    )
    parser.add_argument(
        "--coarse",
        action="store_true",
        help="every method × space on a coarser sweep: λ ∈ {0.5, 1, 2}, one density, "
        "no mergekit-yaml re-merge of the choice",
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="rebuild the results file and chart from the saved predictions; no model is run",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cache",
        default=os.path.join(os.path.expanduser("~"), ".cache", "mergekit-corespace", "accuracy"),
    )
    parser.add_argument(
        "--results",
        default=None,
        help="markdown output (default: results[-quick][-headroom].md next to this file; "
        "with --smoke, a temporary file)",
    )
    parser.add_argument(
        "--predictions",
        default=None,
        help="per-example test outcomes, JSON (default: predictions[-quick][-headroom].json "
        "next to the results file)",
    )
    args = parser.parse_args()
    if args.smoke and not args.results:
        args.results = os.path.join(tempfile.mkdtemp(prefix="accuracy-smoke-"), "results.md")
    paths = output_paths(args)
    if args.render:
        with open(paths["predictions"], encoding="utf-8") as handle:
            saved = json.load(handle)
        publish(saved, paths, chart=not (args.quick or args.smoke))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bench.use_setting(args.setting)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    plan = QUICK if args.quick else COARSE if args.coarse else FULL
    sizes = {}
    if args.smoke:
        plan = SMOKE_HEADROOM if args.setting == "headroom" else SMOKE
        sizes = dict(train_size=32, validation_size=16, test_size=16)
        bench.TRAINING.update(epochs=1)
        args.cache = tempfile.mkdtemp(prefix="accuracy-smoke-")

    tasks = load_tasks(seed=args.seed, **sizes)
    if args.smoke:  # enough for every table and test; tasks.py is tested on all six
        tasks = tasks[:SMOKE_TASKS]
    base = bench.Encoder.load(bench.model_dir())
    cache = os.path.join(args.cache, bench.cache_key(tasks, args.seed))
    heads_file = os.path.join(cache, "heads.pt")
    if os.path.exists(heads_file):
        heads = torch.load(heads_file, weights_only=True)
    else:
        heads = {
            task.name: bench.fixed_head(base, task, args.seed) for task in tqdm(tasks, desc="heads")
        }
        os.makedirs(cache, exist_ok=True)
        torch.save(heads, heads_file)
    scorer = Scorer(base, tasks, heads)

    adapters, trained = {}, 0.0
    for task in tasks:
        path = os.path.join(cache, task.name)
        if not os.path.exists(os.path.join(path, "adapter_model.safetensors")):
            trained += bench.train_adapter(task, heads[task.name], path, args.seed)
        adapters[task.name] = path
    print(f"adapters: {cache} ({f'trained in {trained:.0f} s' if trained else 'cached'})")

    rows = {ZERO_SHOT: {"predictions": scorer.predictions(base.model, "test")}}
    individual, validation = {}, {}
    for task in tqdm(tasks, desc="individual adapters"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(
            bench.Encoder.load(bench.model_dir()).model, adapters[task.name]
        ).merge_and_unload()
        individual.update(scorer.predictions(model, "test", only=task.name))
        validation.update(scorer(model, "validation", only=task.name))
    rows[INDIVIDUAL] = {"predictions": individual}
    # a check that training worked, on validation (test is only read for the tables)
    zero_shot = scorer(base.model, "validation")
    print(
        "validation accuracy, zero-shot / own adapter: "
        + ", ".join(f"{n} {zero_shot[n]:.3f} / {validation[n]:.3f}" for n in validation)
    )

    with tempfile.TemporaryDirectory(prefix="accuracy-merges-") as work:
        for method, space in tqdm(
            list(itertools.product(plan["methods"], plan["spaces"])), desc="merges"
        ):
            predictions, (best, merge_seconds, wall) = sweep_and_merge(
                method, space, adapters, scorer, plan, work
            )
            rows[f"{method} · {space}"] = {
                "predictions": predictions,
                "chosen": best,
                "merge_seconds": round(merge_seconds, 3),
                "mergekit_yaml_seconds": None if wall is None else round(wall, 2),
            }

    mode = " --quick" if args.quick else " --smoke" if args.smoke else ""
    mode += " --coarse" if args.coarse and not (args.quick or args.smoke) else ""
    setting = f" --setting {args.setting}" if args.setting != "base" else ""
    saved = {
        "command": f"python bench/accuracy/run.py{mode}{setting}",
        "setting": args.setting,
        "seed": args.seed,
        "date": time.strftime("%Y-%m-%d"),
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "adapters_trained_seconds": round(trained),
        "lora": bench.LORA,
        "training": bench.TRAINING,
        "heads": bench.HEADS,
        "plan": plan,
        "tasks": [task.name for task in tasks],
        # per encoder and task, one character per test example: 1 right, 0 wrong
        "rows": {
            label: {
                **row,
                "predictions": {
                    name: "".join(map(str, values)) for name, values in row["predictions"].items()
                },
            }
            for label, row in rows.items()
        },
    }
    os.makedirs(os.path.dirname(os.path.abspath(paths["predictions"])), exist_ok=True)
    with open(paths["predictions"], "w", encoding="utf-8") as handle:
        json.dump(saved, handle, indent=1)
        handle.write("\n")
    publish(saved, paths, chart=not (args.quick or args.smoke))


ZERO_SHOT = "zero-shot base (fixed heads)"
INDIVIDUAL = report.INDIVIDUAL


def render(saved: dict, result: dict) -> str:
    names, figures = saved["tasks"], result["figures"]
    plan, lora, training = saved["plan"], saved["lora"], saved["training"]
    heads = {
        "class-mean": "class-mean heads of the base encoder",
        "random": "random orthonormal class vectors (the base encoder is at chance)",
    }[saved["heads"]]
    modules = ", ".join(f"`{m}`" for m in lora["target_modules"])
    threads = saved["torch_threads"]
    lines = [
        f"# Accuracy ({saved['setting']} setting): six text tasks, all-MiniLM-L6-v2, "
        "six LoRA adapters merged",
        "",
        f"Command: `{saved['command']}` (seed {saved['seed']}), {saved['date']}; "
        f"{saved['minutes']:.1f} min on {saved['cpus']} CPUs "
        f"({threads} torch thread{'s' if threads != 1 else ''}). Adapters: r = {lora['r']}, "
        f"α = {lora['lora_alpha']} on {modules}; {training['epochs']} epochs, "
        f"lr {training['learning_rate']}, batch {training['batch_size']}. Heads: {heads}.",
        "Test accuracy with the fixed heads; normalized = merged / own adapter, averaged over "
        "tasks. λ (and density) chosen on the validation split from "
        f"λ ∈ {plan['lambdas']}, density ∈ {plan['densities']}.",
        f"Brackets: 95 % percentile bootstrap intervals over test examples ({stats.RESAMPLES} "
        f"resamples, seed {stats.SEED}, stratified by task; the normalized figure resamples the "
        "own adapters' outcomes on the same examples). Per-example outcomes are in the "
        "predictions JSON next to this file; `--render` rebuilds this page and the chart "
        "from it.",
        "",
        "| encoder | average | normalized | chosen | merge (in-process / mergekit-yaml) |",
        "|---|---|---|---|---|",
    ]
    for label, row in saved["rows"].items():
        chosen, timing = "", ""
        if "chosen" in row:
            chosen = ", ".join(f"{k} {v}" for k, v in row["chosen"].items())
            wall = row["mergekit_yaml_seconds"]
            timing = f"{row['merge_seconds']:.2f} s / " + ("—" if wall is None else f"{wall:.1f} s")
        lines.append(
            f"| {label} | {report.ci(figures[label]['average'])} | "
            f"{report.ci(figures[label]['normalized'])} | {chosen} | {timing} |"
        )
    lines += [
        "",
        "## Per task (test accuracy, 95 % interval)",
        "",
    ]
    lines += report.task_table("encoder", saved["rows"], figures, names)
    lines += report.comparison_section(result["comparisons"], "encoders")
    return "\n".join(lines) + "\n"


def publish(saved: dict, paths: dict[str, str], chart: bool) -> None:
    result = report.summary(saved)
    page = render(saved, result)
    with open(paths["results"], "w", encoding="utf-8") as handle:
        handle.write(page)
    print(page)
    if chart:
        title = (
            f"{saved['setting']} setting: normalized test accuracy with 95 % bootstrap intervals"
        )
        report.plot(result, paths["chart"], title=title, zero_shot=ZERO_SHOT)


if __name__ == "__main__":
    main()
