"""Per-module cost of each space: core vs KnOTS vs full, same inputs, same process tree.

    python bench/perf/module_bench.py [--shape 4096x4096] [--adapters 6] [--rank 16]
                                      [--methods ta,ties,tsv] [--repeat 1]

For each (method, space) a fresh child process builds the same random LoRA factors
(float64, seed 0), warms up on a small module, merges once and reports the merge's wall
time (basis, tasks, inner method and the dense m×n delta a model merge adds) and its
peak memory above the inputs (growth of the child's RSS high-water mark). Prints one row
per method with the times, memories and the KnOTS/core and full/core ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SPACES = ("core", "knots", "full")


def one(shape: tuple[int, int], adapters: int, rank: int, method: str, space: str, device: str):
    import torch

    from mergekit_corespace.options import MergeParameters
    from mergekit_corespace.pipeline import merge_factors

    generator = torch.Generator().manual_seed(0)
    m, n = shape
    factors = [
        (
            torch.randn(m, rank, generator=generator, dtype=torch.float64).to(device) / rank,
            torch.randn(rank, n, generator=generator, dtype=torch.float64).to(device) / n**0.5,
        )
        for _ in range(adapters)
    ]
    # warm-up: the same method and space on a small module, so that library loading and
    # first-call costs are not timed
    small = [(b[:64], a[:, :48]) for b, a in factors]
    merge_factors(small, [1.0] * adapters, MergeParameters(merge=method), space).to_dense()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    delta = merge_factors(factors, [1.0] * adapters, MergeParameters(merge=method), space)
    dense = delta.to_dense()  # what a model merge adds to the base weight
    if device != "cpu":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    if device != "cpu":
        peak = torch.cuda.max_memory_allocated()
    print(json.dumps({"seconds": seconds, "peak_bytes": peak, "norm": float(dense.norm())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4096x4096")
    parser.add_argument("--adapters", type=int, default=6)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--methods", default="ta,ties,tsv")
    parser.add_argument("--spaces", default=",".join(SPACES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "SPACE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = tuple(int(x) for x in args.shape.lower().split("x"))
    if args.one:
        one(shape, args.adapters, args.rank, *args.one, args.device)
        return

    spaces = args.spaces.split(",")
    print(
        f"module {shape[0]}x{shape[1]}, {args.adapters} adapters of rank {args.rank}, "
        f"float64 on {args.device}; one fresh process per cell"
    )
    header = "  ".join(f"{s:>18s}" for s in spaces)
    print(f"{'method':8s}  {header}  {'knots/core':>10s}  {'full/core':>10s}")
    for method in args.methods.split(","):
        cells = {}
        for space in spaces:
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--shape",
                    args.shape,
                    "--adapters",
                    str(args.adapters),
                    "--rank",
                    str(args.rank),
                    "--device",
                    args.device,
                    "--one",
                    method,
                    space,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            cells[space] = json.loads(done.stdout.strip().splitlines()[-1])
        row = "  ".join(
            f"{cells[s]['seconds']:8.3f}s {cells[s]['peak_bytes'] / 2**20:6.0f}MiB" for s in spaces
        )
        ratios = [
            f"{cells[s]['seconds'] / cells['core']['seconds']:9.1f}x"
            if s in cells and "core" in cells
            else f"{'-':>10s}"
            for s in ("knots", "full")
        ]
        print(f"{method:8s}  {row}  {'  '.join(ratios)}", flush=True)


if __name__ == "__main__":
    main()
