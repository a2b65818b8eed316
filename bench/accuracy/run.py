"""Offline accuracy benchmark: six text tasks, real LoRA adapters, every method and space.

    python bench/accuracy/run.py --quick    # README demo: core-space TIES
    python bench/accuracy/run.py            # every method × space, λ/density sweep
    python bench/accuracy/run.py --smoke    # CI: tiny splits, one step per adapter

Trains (or reuses from the cache) one LoRA adapter per task on all-MiniLM-L6-v2, merges
the six with `mergekit-yaml` for each (method, space), and scores each merged encoder on
every task with fixed class-mean heads (benchmark.py). Hyper-parameters are picked on
the validation split; the test split is only used for the reported numbers. Writes
``results.md`` and ``normalized_accuracy.png`` next to this file (``results-quick.md``
with ``--quick``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import benchmark as bench  # noqa: E402
import torch  # noqa: E402
from tasks import load_tasks  # noqa: E402
from tqdm import tqdm  # noqa: E402

METHODS = ["ta", "mean", "ties", "dare", "dare_ties", "tsv", "cart", "iso_c", "iso_cts"]
SPACES = ["core", "knots", "full"]
LAMBDAS = [0.3, 0.5, 0.7, 1.0, 1.5, 2.0]
DENSITIES = {"ties": [0.3, 0.7], "dare": [0.1, 0.5], "dare_ties": [0.1, 0.5]}
FULL = dict(methods=METHODS, spaces=SPACES, lambdas=LAMBDAS, densities=DENSITIES)
# the demo sweeps λ only, at the paper's TIES density: under 10 minutes cold on 2 cores
QUICK = dict(methods=["ties"], spaces=["core"], lambdas=[0.5, 1.0], densities={"ties": [0.7]})
SMOKE = dict(methods=["ta", "ties"], spaces=["core", "knots"], lambdas=[1.0], densities={})


def candidates(method: str, plan: dict):
    """The sweep for one method: λ, and density where the method reads one."""
    densities = plan["densities"].get(method, [None])
    for lam, density in itertools.product(plan["lambdas"], densities):
        yield {"lambda": lam, **({"density": density} if density is not None else {})}


class Scorer:
    """Scores encoders on every task with the fixed heads; token batches made once."""

    def __init__(self, encoder: bench.Encoder, tasks, heads):
        self.tasks, self.heads, self.encoder = tasks, heads, encoder
        self.splits = {
            (task.name, split): self._batches(getattr(task, split))
            for task in tasks
            for split in ("validation", "test")
        }

    def _batches(self, examples, size: int = 64):
        return [
            (
                self.encoder.tokens(t for t, _ in examples[i : i + size]),
                torch.tensor([label for _, label in examples[i : i + size]]),
            )
            for i in range(0, len(examples), size)
        ]

    @torch.no_grad()
    def __call__(self, model, split: str, only: str | None = None) -> dict[str, float]:
        encoder = bench.Encoder(model.eval(), self.encoder.tokenizer)
        scores = {}
        for task in self.tasks:
            if only is not None and task.name != only:
                continue
            correct = total = 0
            for tokens, labels in self.splits[(task.name, split)]:
                predicted = (encoder.embed(tokens) @ self.heads[task.name].T).argmax(-1)
                correct += int((predicted == labels).sum())
                total += len(labels)
            scores[task.name] = correct / total
        return scores


def sweep_and_merge(method, space, adapters, scorer, plan, work):
    """Pick λ (and density) on validation with in-process merges, then merge the choice
    with a real `mergekit-yaml` and score it on test. Returns (test scores, timings)."""
    best, best_score = None, -1.0
    for parameters in candidates(method, plan):
        out = os.path.join(work, "candidate")
        bench.merge_in_process(bench.merge_config(method, space, adapters, parameters), out)
        score = statistics.mean(scorer(load_merged(out), "validation").values())
        if score > best_score:
            best, best_score = parameters, score
    config = bench.merge_config(method, space, adapters, best)
    out = os.path.join(work, f"{method}-{space}")
    wall = bench.merge_with_mergekit_yaml(config, out, work)
    merge_seconds = min(bench.merge_in_process(config, out + "-timing") for _ in range(2))
    return scorer(load_merged(out), "test"), (best, merge_seconds, wall)


def load_merged(path: str):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the README demo: core-space TIES")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a CI smoke run: tiny splits, one training step, not cached",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cache",
        default=os.path.join(os.path.expanduser("~"), ".cache", "mergekit-corespace", "accuracy"),
    )
    parser.add_argument(
        "--results",
        default=None,
        help="markdown output (default: results.md for the full run, "
        "results-quick.md with --quick, a temporary file with --smoke)",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    plan = QUICK if args.quick else FULL
    sizes = {}
    if args.smoke:
        plan, sizes = SMOKE, dict(train_size=32, validation_size=16, test_size=16)
        bench.TRAINING.update(epochs=1)
        args.cache = tempfile.mkdtemp(prefix="accuracy-smoke-")
    if args.results is None:
        name = "results-quick.md" if args.quick else "results.md"
        args.results = os.path.join(args.cache if args.smoke else HERE, name)

    tasks = load_tasks(seed=args.seed, **sizes)
    base = bench.Encoder.load(bench.model_dir())
    cache = os.path.join(args.cache, bench.cache_key(tasks, args.seed))
    heads_file = os.path.join(cache, "heads.pt")
    if os.path.exists(heads_file):
        heads = torch.load(heads_file, weights_only=True)
    else:
        heads = {task.name: bench.class_mean_head(base, task) for task in tqdm(tasks, desc="heads")}
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

    rows = {"zero-shot base (class-mean heads)": scorer(base.model, "test")}
    individual = {}
    for task in tqdm(tasks, desc="individual adapters"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(
            bench.Encoder.load(bench.model_dir()).model, adapters[task.name]
        ).merge_and_unload()
        individual.update(scorer(model, "test", only=task.name))
    rows["individual adapters (own task)"] = individual

    timings = {}
    with tempfile.TemporaryDirectory(prefix="accuracy-merges-") as work:
        for method, space in tqdm(
            list(itertools.product(plan["methods"], plan["spaces"])), desc="merges"
        ):
            label = f"{method} · {space}"
            merged = sweep_and_merge(method, space, adapters, scorer, plan, work)
            rows[label], timings[label] = merged

    report = render(tasks, rows, individual, timings, plan, args, time.perf_counter() - started)
    with open(args.results, "w", encoding="utf-8") as handle:
        handle.write(report)
    print(report)
    if not (args.quick or args.smoke):
        plot(
            rows, individual, os.path.join(os.path.dirname(args.results), "normalized_accuracy.png")
        )


def normalized(scores: dict[str, float], individual: dict[str, float]) -> float:
    return statistics.mean(scores[name] / individual[name] for name in individual)


def render(tasks, rows, individual, timings, plan, args, seconds) -> str:
    names = [task.name for task in tasks]
    mode = " --quick" if args.quick else " --smoke" if args.smoke else ""
    lines = [
        "# Accuracy: six text tasks, all-MiniLM-L6-v2, six LoRA adapters merged",
        "",
        f"Command: `python bench/accuracy/run.py{mode}` (seed {args.seed}), "
        f"{time.strftime('%Y-%m-%d')}; {seconds / 60:.1f} min on {os.cpu_count()} CPUs "
        f"({torch.get_num_threads()} torch threads).",
        "Test accuracy with fixed class-mean heads; normalized = merged / own adapter, "
        "averaged over tasks. λ (and density) chosen on the validation split from "
        f"λ ∈ {plan['lambdas']}, density ∈ {plan['densities']}.",
        "",
        "| encoder | "
        + " | ".join(names)
        + " | average | normalized | chosen | merge (in-process / mergekit-yaml) |",
        "|---|" + "---|" * (len(names) + 4),
    ]
    for label, scores in rows.items():
        chosen, timing = "", ""
        if label in timings:
            best, merge_seconds, wall = timings[label]
            chosen = ", ".join(f"{k} {v}" for k, v in best.items())
            timing = f"{merge_seconds:.2f} s / {wall:.1f} s"
        cells = " | ".join(f"{scores[n]:.3f}" for n in names)
        lines.append(
            f"| {label} | {cells} | {statistics.mean(scores.values()):.3f} | "
            f"{normalized(scores, individual):.3f} | {chosen} | {timing} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows, individual, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
        return
    width = 0.27
    figure, axis = plt.subplots(figsize=(11, 4))
    for offset, space in enumerate(SPACES):
        values = [normalized(rows[f"{m} · {space}"], individual) for m in METHODS]
        axis.bar(
            [i + (offset - 1) * width for i in range(len(METHODS))],
            values,
            width,
            label={"core": "core space", "knots": "KnOTS", "full": "full space"}[space],
        )
    axis.axhline(
        normalized(rows["zero-shot base (class-mean heads)"], individual),
        color="grey",
        linestyle="--",
        label="zero-shot base",
    )
    axis.set_xticks(range(len(METHODS)), METHODS)
    axis.set_ylabel("normalized accuracy (merged / own adapter)")
    values = [normalized(scores, individual) for scores in rows.values()]
    axis.set_ylim(min(values) - 0.02, 1.005)
    axis.legend(ncols=4, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"chart: {path}")


if __name__ == "__main__":
    main()
