"""Optuna's search against the grid at an equal number of evaluations, on bench/llm's six
SmolLM2 adapters; the KnOTS space with and without its singular values on the tasks; what
takes addition to 0 in the merges (``interference.py``); and what TIES' trim keeps of each
task in core and in full space.

    python bench/llm/search.py            # hours on 2 CPU cores; a rerun resumes (see README)
    python bench/llm/search.py --out DIR  # the study of DIR/search.json (e.g. search-float32)
    python bench/llm/search.py --render   # search.md again from search.json
    python bench/llm/search.py --smoke    # CI: a tiny random Llama, two tasks, seconds

Each arm is one ``mergekit_corespace.tune.tune`` call (the code of
``mergekit-corespace-tune``) on run.py's validation split, the same seed and the same
number of evaluations: the grid scores every point of a finer grid than run.py's (λ down
to 0.125), the search draws λ, each adapter's weight (and density) with Optuna's TPE.
Each arm's winner is written by ``mergekit-yaml`` and scored on test (300 examples a
task); search and grid are compared on the same test examples by a paired bootstrap and
McNemar's test (``bench/accuracy/stats.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[1:1] = [HERE, os.path.join(os.path.dirname(HERE), "accuracy")]

import run  # noqa: E402
import torch  # noqa: E402
from answers import INDIVIDUAL, metrics  # noqa: E402
from interference import interference  # noqa: E402
from search_page import render  # noqa: E402
from trim_energy import trim_energy  # noqa: E402

from mergekit_corespace.tune import tune  # noqa: E402

EVALUATIONS = 40  # of every arm
WEIGHTS = "weight=0.25:2:log"  # one dimension per adapter; TIES refuses weight 0
TIES_GRID = "lambda=0.125,0.25,0.375,0.5,0.75,1,1.5,2 density=0.1,0.3,0.5,0.7,0.9"  # 40


def geometric(low: float, high: float, count: int = EVALUATIONS) -> str:
    """``count`` values from ``low`` to ``high``, evenly spaced on a log scale."""
    ratio = (high / low) ** (1 / (count - 1))
    return ",".join(f"{low * ratio**i:.4g}" for i in range(count))


# (method, space) -> the grid and the search, both of EVALUATIONS points; the ranges
# hold every value the grid tries. The core searches run in this order (``turn``; a rerun
# resumes where one stopped): task arithmetic, whose sum keeps each adapter at the
# strength its weight gives (addition needs its own near 1 and the others' low:
# interference.py), run.py's best core merge, core TIES, TSV (which keeps each task's
# singular values, so a weight sets its strength); full-space TIES after TSV's grid.
STUDY = {
    ("ta", "core"): (f"lambda={geometric(0.05, 1)}", f"lambda=0.05:1:log {WEIGHTS}"),
    ("iso_cts", "core"): (f"lambda={geometric(0.5, 4)}", f"lambda=0.5:4:log {WEIGHTS}"),
    ("ties", "core"): (TIES_GRID, f"lambda=0.1:2:log density=0.1:0.9 {WEIGHTS}"),
    ("tsv", "core"): (f"lambda={geometric(0.1, 2)}", f"lambda=0.1:2:log {WEIGHTS}"),
    ("ties", "full"): (TIES_GRID, f"lambda=0.1:2:log density=0.1:0.9 {WEIGHTS}"),
}
# searched again racing the best trial (the tuner's --prune wilcoxon): after a third and
# two thirds of each task, a trial worse than the best on the same examples stops there
# (and the smoke run's one search)
RACED = (("tsv", "core"),)
RACED_KIND = "search (raced)"
# DARE-TIES: the grid only, down to λ 0.125 in both spaces (run.py's stopped at 0.5)
DARE_TIES_GRID = "lambda=0.125,0.25,0.375,0.5,0.75,1,1.5,2 density=0.3,0.7"
GRIDS = {("dare_ties", "core"): DARE_TIES_GRID, ("dare_ties", "full"): DARE_TIES_GRID}
# KnOTS' TIES with the tasks scaled by the singular values (S·Vₜ, as the KnOTS authors'
# code, the default) and without (Vₜ, as the Core Space authors' KnOTS baseline)
KNOTS_GRID = "merge=ties lambda=0.125,0.25,0.5,1 density=0.3,0.7"
TRIM_DENSITIES = (0.3, 0.5, 0.7)
SMOKE_STUDY = {("ties", "core"): ("lambda=0.5,1 density=0.5", f"lambda=0.5:1 {WEIGHTS}")}


def arms(smoke: bool) -> dict[str, dict]:
    """label -> the arm's method, space, kind and ``tune()`` settings."""
    out = {}
    for (method, space), (grid, search) in (SMOKE_STUDY if smoke else STUDY).items():
        head = f"merge_method={run.SPACES[space]} merge={method}"
        trials = 2 if smoke else EVALUATIONS
        # the search prunes (the tuner's --prune): a hopeless trial stops after a third of
        # each task, so its 40 evaluations cost less than the grid's
        out[f"{method} · {space} · search"] = dict(
            grid=[f"{head} {search}"], search="tpe", trials=trials, prune=True
        )
        out[f"{method} · {space} · grid"] = dict(grid=[f"{head} {grid}"])
        if (method, space) in RACED or smoke:
            out[f"{method} · {space} · {RACED_KIND}"] = dict(
                grid=[f"{head} {search}"], search="tpe", trials=trials, prune="wilcoxon"
            )
    for scaled in (True, False):
        grid = "merge=ties lambda=1 density=0.5" if smoke else KNOTS_GRID
        tasks = "S·Vₜ" if scaled else "Vₜ"
        out[f"ties · knots ({tasks}) · grid"] = dict(
            grid=[f"merge_method=knots {grid} knots_scale_tasks={str(scaled).lower()}"]
        )
    for (method, space), grid in ({} if smoke else GRIDS).items():
        head = f"merge_method={run.SPACES[space]} merge={method}"
        out[f"{method} · {space} · grid"] = dict(grid=[f"{head} {grid}"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CI: tiny random model, seconds")
    parser.add_argument("--render", action="store_true", help="the page from the saved JSON")
    parser.add_argument("--out", default=None, help="folder of search.md, search.json")
    parser.add_argument("--cache", default=run.CACHE)
    args = parser.parse_args()
    out = args.out or (tempfile.mkdtemp(prefix="llm-search-smoke-") if args.smoke else HERE)
    paths = {"page": os.path.join(out, "search.md"), "saved": os.path.join(out, "search.json")}
    if not args.render:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        work = tempfile.mkdtemp(prefix="llm-search-")
        plan = dict(run.SMOKE if args.smoke else run.FULL)
        plan["cache"] = os.path.join(work, "cache") if args.smoke else args.cache
        os.makedirs(out, exist_ok=True)
        try:
            earlier = paths["saved"] if os.path.exists(paths["saved"]) else None
            command = "python bench/llm/search.py" + (" --smoke" if args.smoke else "")
            if args.out and not args.smoke:  # the command that resumes this study
                command += f" --out {os.path.relpath(out)}"
            study(
                plan, work, args.smoke, lambda saved: run.write_json(saved, paths["saved"]),
                earlier, command=command,
            )  # fmt: skip
        finally:
            shutil.rmtree(work, ignore_errors=True)
    with open(paths["saved"], encoding="utf-8") as handle:
        page = render(json.load(handle))
    with open(paths["page"], "w", encoding="utf-8") as handle:
        handle.write(page)
    print(page)


def cached(path: str, key, compute):
    """``compute()``, kept in ``path`` beside the tuner's studies under ``key``: a rerun
    after a kill scores on test only what it had not scored."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            kept = json.load(handle)
        if kept["key"] == key:
            return kept["value"]
    value = compute()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    run.write_json({"key": key, "value": value}, path)
    return value


def earlier_run(path: str | None, own: list) -> dict:
    """What an earlier run saved in ``path`` (a search.json, say the committed one: a new
    machine has none of the cache), when its own adapters answered every test example as
    these do, i.e. the same adapters; else nothing."""
    if path is None:
        return {}
    with open(path, encoding="utf-8") as handle:
        saved = json.load(handle)
    if saved["rows"].get(INDIVIDUAL, {}).get("predictions") != own:
        print(f"{path}: its arms came from other adapters (own test answers differ); rerun")
        return {}
    return saved


# when each arm runs (a rerun resumes where one stopped): the core searches (what may reach
# the goal), then what they are set against — KnOTS (short grids), TSV's grid (the best
# search on the float32 page: its grid gives the search's cost), the full-space search —
# then the other grids: core ones first (core TIES's, then Iso-CTS's: their searches had
# no grid to be set against), full-space TIES's, task arithmetic's last (a global λ holds
# every adapter at one strength: addition is lost in run.py's)
TURN = (
    "core search", "knots", "tsv grid", "full search",
    "ties core grid", "iso_cts grid", "ties grid", "dare_ties grid", "ta grid",
)  # fmt: skip


def turn(label: str) -> int:
    """The arm's place in ``TURN``; arms of one place keep the order of ``arms``, which is
    also the page's (each search beside its grid)."""
    method, space, kind = label.split(" · ")
    if space.startswith("knots"):
        return TURN.index("knots")
    if kind.startswith("search"):
        return TURN.index(f"{space} search")
    own = f"{method} {space} grid"  # a grid given its own place, else its method's
    return TURN.index(own if own in TURN else f"{method} grid")


def study(
    plan: dict, work: str, smoke: bool, save, earlier: str | None = None, *, command: str
) -> None:
    """Every arm in turn; ``save`` gets the results after each one (``complete`` at the end).
    Arms found in ``earlier`` with the same grid and search are kept, not rerun; ``command``
    is the one that resumes it, as the page shows it."""
    started = time.perf_counter()
    bench = run.setup(plan, work, smoke)
    names = list(bench.scorer.tasks)
    sizes = {name: len(bench.scorer.tasks[name].examples) for name in names}
    kept = os.path.join(bench.tuning, "search")
    planned = arms(smoke)
    own = cached(
        os.path.join(kept, "own-test.json"), sizes,
        lambda: run.own_adapters(bench, extras=False)[0],
    )  # fmt: skip
    saved = {
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "minutes": 0.0,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "model": run.model_label(smoke),
        "dtype": run.DTYPE,
        "tasks": names,
        "sizes": sizes,
        "validation": plan["validation"],
        "evaluations": 2 if smoke else EVALUATIONS,
        "complete": False,
        "arms": list(planned),
        "rows": {INDIVIDUAL: {"predictions": own}},
        "trim": cached(  # keyed as JSON keeps it: a list
            os.path.join(kept, "trim.json"),
            list(TRIM_DENSITIES),
            lambda: trim_energy(bench.adapters, densities=TRIM_DENSITIES),
        ),
    }
    before = earlier_run(earlier, own)
    # the task the merges lose (addition on these adapters; the first in the smoke run)
    task = "addition" if "addition" in names else names[0]
    by_task = metrics(names)
    metric = by_task.get(task, by_task["*"])
    saved["interference"] = (
        before["interference"]
        if before.get("interference", {}).get("task") == task
        else {
            "task": task,
            "rows": cached(
                os.path.join(kept, "interference.json"), [task, sizes],
                lambda: interference(bench.raw, bench.validation, task, metric, work),
            ),
        }
    )  # fmt: skip
    save(saved)
    done = before.get("rows", {})
    for label in sorted(planned, key=turn):
        settings = planned[label]
        kept_row = done.get(label, {})
        if "trials" in kept_row and (kept_row["grid"], kept_row["search"]) == (
            settings["grid"][0],
            settings.get("search", "grid"),
        ):
            saved["rows"][label] = kept_row
            save(saved)  # a kill during the next arm keeps it
            print(f"{label}: kept from {earlier}")
            continue
        folder = label.replace(" · ", "-").replace(" ", "-").replace("(", "").replace(")", "")
        spent = Spent(os.path.join(kept, folder, "seconds.json"))
        result = tune(
            bench.recipe_path, bench.validation, metric=metrics(names), batch_size=16,
            out=os.path.join(kept, folder), random_seed=run.SEED, progress=True,
            on_point=spent.add, **settings,
        )  # fmt: skip
        point = result.best.point
        saved["rows"][label] = {
            **cached(
                os.path.join(kept, folder, "test.json"), [point, sizes],
                lambda: on_test(bench, point, work),  # noqa: B023
            ),
            "chosen": point,
            "validation_normalized": round(result.best.normalised_average, 4),
            "evaluations": len(result.rows),
            "tuning_seconds": round(spent.total["wall"]),
            "merging_seconds": round(spent.total["merge"]),
            "search_counts": {k: v for k, v in result.search.items() if isinstance(v, int)},
            "grid": settings["grid"][0],
            "search": settings.get("search", "grid"),
            "prune": settings.get("prune"),
            # every point scored whole on validation (pruned ones are not)
            "trials": [{"point": row.point, "scores": row.scores} for row in result.rows],
        }  # fmt: skip
        saved["minutes"] = round((time.perf_counter() - started) / 60, 1)
        save(saved)
        print(f"{label}: {saved['rows'][label]['validation_normalized']} on validation")
    saved["complete"] = True
    save(saved)


class Spent:
    """An arm's tuning time summed over its points, kept in ``path`` across resumed runs:
    the wall time from the start (or the last point) to each point's end, and its merge."""

    def __init__(self, path: str):
        self.path, self.tick = path, time.perf_counter()
        self.total = {"wall": 0.0, "merge": 0.0}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                self.total = json.load(handle)

    def add(self, _, times) -> None:
        now = time.perf_counter()
        self.total["wall"] += now - self.tick
        self.total["merge"] += times.merge
        self.tick = now
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        run.write_json(self.total, self.path)


def on_test(bench, point: dict, work: str) -> dict:
    """The point written by ``mergekit-yaml``, scored on test."""
    model, _, written_seconds = run.written(bench, point, work)
    return {
        "predictions": bench.scorer.hits(bench.scorer.answers(model)),
        "mergekit_yaml_seconds": round(written_seconds, 1),
    }


if __name__ == "__main__":
    main()
