"""float32 against float64 merges: the error behind ``precision: auto``.

    python bench/perf/precision_bench.py --adapters DIR [--every 5]
                                         [--shape 4096x14336] [--spaces core,knots,full]
                                         [--methods ta,ties,...]

``auto`` computes in float64, except where an SVD of a dense m×n matrix runs on a GPU
(KnOTS's space; full-space TSV, CART, Iso), which runs in float32 — but not under TIES or
DARE. This measures what float32 costs in accuracy for every space and method, on the CPU
(the dtype, not the device, decides the rounding):

1. **Real adapters** (``--adapters``: a folder of PEFT LoRA adapters of one model, e.g. the
   six SmolLM2-135M adapters of ``bench/llm``, in ``~/.cache/mergekit-corespace/llm``):
   every ``--every``-th layer's targeted modules merged in each space with each
   method, in float32 and in float64; per method and space, the largest relative error
   ‖ΔW₃₂ − ΔW₆₄‖ / ‖ΔW₆₄‖ over the modules, and what it does to the written model — the
   share of bf16 weights of W + ΔW that differ and the largest difference in bf16 units
   in the last place (of the larger of |W| and |W'|, as ``bench/gpu_smoke.py`` counts).
2. **One module of ``--shape``** (six rank-16 random adapters; default Llama-3-8B's MLP
   down_proj shape, 4096 × 14336), the same figures for one large matrix. ``--shape 0``
   skips it. (KnOTS at 14336 × 4096, up/gate, did not finish one float64 + float32 pair
   within 7 min on 2 cores.)
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import time
from collections.abc import Callable, Iterable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.dirname(HERE))

from measure import bf16_ulps, read_weights  # noqa: E402

from mergekit_corespace.adapters import LoraAdapter, read_factors  # noqa: E402
from mergekit_corespace.options import MergeParameters  # noqa: E402
from mergekit_corespace.pipeline import merge_factors  # noqa: E402

HALF = {"density": 0.5}
METHODS = {
    "ta": {},
    "ties": HALF,
    "dare": HALF,
    "dare_ties": HALF,
    "tsv": {},
    "cart": {},
    "iso_c": {},
    "iso_cts": {},
}
SPACES = ("core", "knots", "full")


def compare(factors, weights, base, method: str, space: str) -> tuple[float, float, float]:
    """float32 vs float64 merge of one module: relative error, bf16 share and ulps."""
    deltas = {}
    for precision in ("float64", "float32"):
        dtype = getattr(torch, precision)
        cast = [(b.to(dtype), a.to(dtype)) for b, a in factors]
        parameters = MergeParameters(merge=method, precision=precision, **METHODS[method])
        deltas[precision] = merge_factors(cast, weights, parameters, space, seed=1).to_dense()
    d64, d32 = deltas["float64"].double(), deltas["float32"]
    error = float((d32.double() - d64).norm() / d64.norm().clamp_min(1e-300))
    ulps = bf16_ulps(
        (base.double() + d32.double()).to(torch.bfloat16),
        (base.double() + d64).to(torch.bfloat16),
        base,
    )
    return error, float((ulps > 0).double().mean()), float(ulps.max())


def table(title: str, modules: Callable[[], Iterable], spaces: list[str], methods: list[str]):
    """One row per space and method: the worst of ``modules()`` (each ``(factors, W)``)."""
    print(
        f"{title}\n\n| space | method | relative error (worst) | bf16 weights that differ "
        "| largest difference | seconds (float64 + float32) |\n|---|---|---|---|---|---|",
        flush=True,
    )
    for space in spaces:
        for method in methods:
            started, worst = time.perf_counter(), (0.0, 0.0, 0.0)
            for factors, base in modules():
                result = compare(factors, [1.0] * len(factors), base, method, space)
                worst = tuple(max(x, y) for x, y in zip(worst, result))
            print(
                f"| {space} | {method} | {worst[0]:.1e} | {worst[1]:.2%} | {worst[2]:.1f} ulp "
                f"| {time.perf_counter() - started:.0f} s |",
                flush=True,
            )


def real_adapters(folder: str, every: int, spaces: list[str], methods: list[str]) -> None:
    paths = sorted(p for p in glob.glob(os.path.join(folder, "*")) if os.path.isdir(p))
    adapters = [LoraAdapter.open(p) for p in paths]
    base_path = adapters[0].base_model_name
    base = read_weights(base_path)
    names = [
        n
        for n in sorted(adapters[0].modules)
        if int(re.search(r"layers\.(\d+)\.", n).group(1)) % every == 0
    ]

    def modules():
        for name in names:
            factors = [read_factors(a.modules[name], torch.float64) for a in adapters]
            yield factors, base[name + ".weight"]

    title = (
        f"{len(paths)} adapters of {base_path} ({', '.join(map(os.path.basename, paths))}); "
        f"{len(names)} modules (every {every}th layer)"
    )
    table(title, modules, spaces, methods)


def one_module(shape: str, spaces: list[str], methods: list[str]) -> None:
    m, n = (int(x) for x in shape.split("x"))
    generator = torch.Generator().manual_seed(0)
    factors = [
        (
            torch.randn(m, 16, generator=generator, dtype=torch.float64) / 30,
            torch.randn(16, n, generator=generator, dtype=torch.float64) / 30,
        )
        for _ in range(6)
    ]
    base = (torch.randn(m, n, generator=generator) * 0.02).to(torch.bfloat16)
    title = f"one {m} × {n} module, six rank-16 random adapters, base ~ N(0, 0.02²) in bf16"
    table(title, lambda: [(factors, base)], spaces, methods)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", help="a folder of LoRA adapters of one base model")
    parser.add_argument("--every", type=int, default=5, help="every n-th layer's modules")
    parser.add_argument("--shape", default="4096x14336", help="one random module; 0: none")
    parser.add_argument("--spaces", default=",".join(SPACES))
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    spaces, methods = args.spaces.split(","), args.methods.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n")
    if args.adapters:
        real_adapters(args.adapters, args.every, spaces, methods)
        print()
    if args.shape != "0":
        one_module(args.shape, spaces, methods)


if __name__ == "__main__":
    main()
