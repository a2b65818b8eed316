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
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.directory, "recipe.yml")):
        example = [sys.executable, os.path.join(HERE, "example.py"), args.directory]
        subprocess.run([*example, "--examples", str(args.examples)], check=True)
    from mergekit_corespace.tune import tune

    results = {}
    for name, settings in RUNS.items():
        settings = dict(settings)
        if settings.get("search"):
            settings["trials"] = args.trials
        started = time.perf_counter()
        result = tune(
            os.path.join(args.directory, "recipe.yml"),
            os.path.join(args.directory, "data"),
            metric="exact",
            out=os.path.join(args.directory, "runs", str(len(results))),
            holdout_fraction=args.holdout_fraction,
            random_seed=args.seed,
            fresh=True,
            progress=False,
            **settings,
        )
        results[name] = (result, time.perf_counter() - started)
        print(f"{name}: {len(result.rows)} trials scored whole in {results[name][1]:.0f} s")
    print(table(results, "λ × weight grid"))


def table(results, against: str) -> str:
    """The runs side by side, time and examples as ratios to the run ``against``."""
    base_result, base_seconds = results[against]
    base_examples = base_result.search["examples_scored"]
    lines = [
        "| run | trials (pruned) | examples scored | wall s | × time | × examples | winner | "
        "search | held-out [95 %] |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (result, seconds) in results.items():
        search = result.search
        held = result.holdout[0]
        low, high = held["interval95"] or (held["holdout"], held["holdout"])
        winner = " ".join(
            f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in result.best.point.items()
        )
        lines.append(
            f"| {name} | {search['complete'] + search['pruned']} ({search['pruned']}) | "
            f"{search['examples_scored']} | {seconds:.0f} | {seconds / base_seconds:.2f} | "
            f"{search['examples_scored'] / base_examples:.2f} | {winner} | {held['search']:.3f} | "
            f"{held['holdout']:.3f} [{low:.3f}, {high:.3f}] |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
