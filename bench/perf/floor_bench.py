"""The arithmetic a core-space merge cannot avoid, timed alone: the floor under its wall time.

    python bench/perf/floor_bench.py [--preset 8b|1b|small] [--adapters 6] [--rank 16]

For every adapted module shape of the preset (q, k, v, o, gate, up, down; R = adapters ×
rank), at the best this machine does, one layer's worth and then times the layer count:

- update: the rank-R update ``W += L @ R`` in float32 on a preallocated float32 buffer (the
  GEMM alone: 2·m·n·R flops per weight), and its GFLOP/s;
- casts: the weight from bfloat16 to float32 and back (what the update needs around it);
- bases: the two thin float64 SVDs per module (m×R and n×R) that give U_B and V_A.

Compare the sum with the passthrough wall time of the same model (e2e_bench.py): what a
merge adds above passthrough can never be less than this, however the I/O is arranged.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build import PRESETS, TARGETS, layer_shapes  # noqa: E402


def best_of(function, *args, repeat: int = 3) -> float:
    function(*args)  # warm-up
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function(*args)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="1b")
    parser.add_argument("--adapters", type=int, default=6)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    config = PRESETS[args.preset]
    layers, rank = config["num_hidden_layers"], args.adapters * args.rank
    generator = torch.Generator().manual_seed(0)
    totals = {"update": 0.0, "casts": 0.0, "bases": 0.0}
    flops = 0
    for name, shape in layer_shapes(config).items():
        if name.rsplit(".", 1)[-1] not in TARGETS:
            continue
        m, n = shape
        weight = torch.randn(m, n, generator=generator).to(torch.bfloat16)
        buffer = weight.float()
        left = torch.randn(m, rank, generator=generator) * 1e-3
        right = torch.randn(rank, n, generator=generator)
        totals["update"] += best_of(torch.Tensor.addmm_, buffer, left, right)
        totals["casts"] += best_of(torch.Tensor.copy_, buffer, weight)
        totals["casts"] += best_of(torch.Tensor.copy_, weight, buffer)
        tall = torch.randn(m, rank, generator=generator, dtype=torch.float64)
        wide = torch.randn(n, rank, generator=generator, dtype=torch.float64)
        for factors in (tall, wide):
            totals["bases"] += best_of(torch.linalg.svd, factors, False)
        flops += 2 * m * n * rank
    print(
        f"\n### Arithmetic floor: {args.preset} preset, {layers} layers, R = {rank}, "
        f"{torch.get_num_threads()} torch threads\n"
    )
    print("| part | per layer | whole model |")
    print("|---|---|---|")
    for part, seconds in totals.items():
        print(f"| {part} | {seconds * 1e3:.1f} ms | {seconds * layers:.2f} s |")
    total = sum(totals.values()) * layers
    print(f"| **sum** | | **{total:.2f} s** |")
    print(
        f"\nupdate GEMM: {flops * layers / 1e12:.2f} TFLOP at "
        f"{flops / totals['update'] / 1e9:.0f} GFLOP/s"
    )


if __name__ == "__main__":
    main()
