"""Search against grid on the README's tuning example: today's global-λ grid, a grid over λ
and per-adapter weights, and Optuna's TPE over ranges of both (with and without pruning),
side by side in one run, each winner re-scored on the same held-out examples.

    python bench/tune/search.py tune-search      # builds the example (bench/tune/example.py)

Every run is one ``tune()`` call (the code of ``mergekit-corespace-tune``) on the same
recipe, data, held-out split and seed, each in its own output directory; the table gives
the trials, the examples scored, the wall time, the winner's normalised average on the
searched examples and on the held-out ones (95 % interval), and its ratio of time and
examples to the weight grid's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

RUNS = {  # name -> tune() settings besides the shared ones
    "λ grid (today)": dict(grid=["merge=ta,ties lambda=0.25,0.5,0.75,1,1.5"]),
    "λ × weight grid": dict(grid=["merge=ties lambda=0.5,1,1.5 weight=0.5,1.5"]),
    "TPE": dict(grid=["merge=ties lambda=0.5:1.5 weight=0.5:1.5"], search="tpe"),
    "TPE, pruned": dict(
        grid=["merge=ties lambda=0.5:1.5 weight=0.5:1.5"], search="tpe", prune=True
    ),  # fmt: skip
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="where the example and the runs are written")
    parser.add_argument("--trials", type=int, default=24, help="of each TPE search")
    parser.add_argument("--examples", type=int, default=40, help="validation examples per task")
    parser.add_argument("--holdout-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run", type=int, help=argparse.SUPPRESS)  # one run, in its process
    args = parser.parse_args()
    if args.run is not None:
        return one_run(args, list(RUNS)[args.run])
    if not os.path.exists(os.path.join(args.directory, "recipe.yml")):
        example = [sys.executable, os.path.join(HERE, "example.py"), args.directory]
        subprocess.run([*example, "--examples", str(args.examples)], check=True)
    results = {}
    for index, name in enumerate(RUNS):  # each in a fresh process: no run inherits memory
        subprocess.run([sys.executable, *sys.argv, "--run", str(index)], check=True)
        with open(os.path.join(args.directory, "runs", str(index), "results.json")) as handle:
            results[name] = json.load(handle)
        print(f"{name}: {results[name]['wall_seconds']:.0f} s")
    print(table(results, "λ × weight grid"))


def one_run(args, name: str) -> None:
    """One ``tune()`` call; its wall time added to its ``results.json``."""
    from mergekit_corespace.tune import tune

    settings = dict(RUNS[name])
    if settings.get("search"):
        settings["trials"] = args.trials
    out = os.path.join(args.directory, "runs", str(list(RUNS).index(name)))
    started = time.perf_counter()
    tune(
        os.path.join(args.directory, "recipe.yml"),
        os.path.join(args.directory, "data"),
        metric="exact",
        out=out,
        holdout_fraction=args.holdout_fraction,
        random_seed=args.seed,
        fresh=True,
        progress=False,
        **settings,
    )
    seconds = time.perf_counter() - started
    path = os.path.join(out, "results.json")
    with open(path) as handle:
        summary = json.load(handle)
    summary["wall_seconds"] = seconds
    with open(os.path.join(out, "timing.json")) as handle:
        summary["timing"] = json.load(handle)
    with open(path, "w") as handle:
        json.dump(summary, handle, indent=1)


def table(results, against: str) -> str:
    """The runs side by side (their ``results.json``), time and examples as ratios to the
    run ``against``."""
    base = results[against]
    lines = [
        "| run | trials (pruned) | examples scored | wall s | × time | × examples | "
        "merge s / trial | winner | search | held-out [95 %] |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, summary in results.items():
        search, held = summary["search"], summary["holdout"][0]
        low, high = held["interval95"] or (held["holdout"], held["holdout"])
        winner = " ".join(
            f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in summary["best"]["point"].items()
        )
        seconds = summary["wall_seconds"]
        merge = summary["timing"]["seconds_per_point"]["merge"]
        lines.append(
            f"| {name} | {search['complete'] + search['pruned']} ({search['pruned']}) | "
            f"{search['examples_scored']} | {seconds:.0f} | "
            f"{seconds / base['wall_seconds']:.2f} | "
            f"{search['examples_scored'] / base['search']['examples_scored']:.2f} | "
            f"{merge:.1f} | {winner} | {held['search']:.3f} | "
            f"{held['holdout']:.3f} [{low:.3f}, {high:.3f}] |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
