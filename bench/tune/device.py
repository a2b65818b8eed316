"""The tuner on a GPU against the same tuner on the CPU: same scores, and seconds per point.

    python bench/tune/device.py WORK [--grid "lambda=0.25,0.5,1,1.5 merge=ta,ties"]
                                     [--examples 24] [--device cuda]

Builds the README's tuning example in WORK (``example.py``: SmolLM2-135M-Instruct, three
trained adapters, validation files) and runs one ``tune()`` per device on the same recipe,
data and grid, scored as the merged model ``mergekit-yaml`` would write (bf16), in one
process: first on the CPU, then on ``--device``. Prints, per point, each task's score on
both (log-likelihoods: their difference; accuracies: in examples), where each point's time
went on both, and both winners.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "llm")]

import torch  # noqa: E402
from cost import CACHE, TASKS, recipe_file, smollm2, task_files  # noqa: E402
from example import train  # noqa: E402

from mergekit_corespace.tune import tune  # noqa: E402


def timed_tune(recipe: str, data: str, grid: str, device: str, out: str, metric: str):
    """One ``tune()`` run: its result, its per-point times and its wall time."""
    times = {}
    started = time.perf_counter()
    result = tune(
        recipe, data, [grid], out=out, device=device, metric=metric, fresh=True, progress=False,
        on_point=lambda row, spent: times.__setitem__(str(row.point), spent),
    )  # fmt: skip
    return result, times, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work")
    parser.add_argument("--grid", default="lambda=0.25,0.5,1,1.5 merge=ta,ties")
    parser.add_argument("--examples", type=int, default=24, help="validation examples per task")
    parser.add_argument("--steps", type=int, default=30, help="training steps per adapter")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--metric", default="auto", help="as mergekit-corespace-tune's")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench/tune/device.py: torch.cuda.is_available() is False")

    started = time.perf_counter()
    base = smollm2(os.path.join(CACHE, "SmolLM2-135M-Instruct"))
    adapters = {task: train(base, task, args.steps, seed) for seed, task in enumerate(TASKS)}
    data = task_files(os.path.join(args.work, "data"), args.examples, seed=0)
    recipe = recipe_file(os.path.join(args.work, "recipe.yml"), base, adapters)
    print(f"example ready in {time.perf_counter() - started:.0f} s", flush=True)

    runs = []  # a list: --device cpu checks the script, the CPU against itself
    for device in ("cpu", args.device):
        out = os.path.join(args.work, f"{device}-{len(runs)}")
        runs.append(timed_tune(recipe, data, args.grid, device, out, args.metric))
        print(f"{device}: tuned in {runs[-1][2]:.1f} s", flush=True)

    (cpu, cpu_times, cpu_wall), (gpu, gpu_times, gpu_wall) = runs
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    print(
        f"\nSmolLM2-135M-Instruct (bf16), 3 trained adapters, {args.examples} examples a "
        f"task, metrics {cpu.metrics}; CPU: {torch.get_num_threads()} threads; "
        f"{args.device}: {name}\n"
    )
    print(
        "| point | task | CPU | GPU | differ by | CPU merge / apply / evaluate "
        "| GPU merge / apply / evaluate |"
    )
    print("|---|---|---|---|---|---|---|")
    worst = {"examples": 0, "loglik": 0.0}
    gpu_rows = {str(row.point): row for row in gpu.rows}
    for row in cpu.rows:
        key = str(row.point)
        other, c, g = gpu_rows[key], cpu_times[key], gpu_times[key]
        for index, task in enumerate(row.scores):
            gap = abs(row.scores[task] - other.scores[task])
            unit = "loglik" if cpu.metrics[task] == "loglik" else "examples"
            gap = round(gap * args.examples) if unit == "examples" else round(gap, 3)
            worst[unit] = max(worst[unit], gap)
            differ = f"{gap} {unit}"
            times = (
                f"| {c.merge:.2f} / {c.apply:.2f} / {c.evaluate:.2f} s "
                f"| {g.merge:.2f} / {g.apply:.2f} / {g.evaluate:.2f} s |"
                if index == 0
                else "| | |"
            )
            print(
                f"| {key if index == 0 else ''} | {task} | {row.scores[task]:.3f} "
                f"| {other.scores[task]:.3f} | {differ} {times}"
            )

    def per_point(times: dict) -> float:
        return statistics.median(t.merge + t.apply + t.evaluate for t in times.values())

    print(
        f"\nwinner: CPU {cpu.best.point} ({cpu.best.normalised_average or cpu.best.average:.3f}),"
        f" GPU {gpu.best.point} ({gpu.best.normalised_average or gpu.best.average:.3f}): "
        f"{'the same' if cpu.best.point == gpu.best.point else 'DIFFERENT'}; per-task scores "
        f"differ by at most {worst['examples']} example(s), {worst['loglik']} in mean loglik"
    )
    print(
        f"median seconds per point: CPU {per_point(cpu_times):.2f} s, GPU "
        f"{per_point(gpu_times):.2f} s ({per_point(cpu_times) / per_point(gpu_times):.1f}× ); "
        f"whole tune(): CPU {cpu_wall:.1f} s, GPU {gpu_wall:.1f} s"
    )


if __name__ == "__main__":
    main()
