"""Every device option on a CUDA machine, checked against the CPU, in one command (sized
for 10 minutes on one GPU; ``--part`` runs half of it):

    python bench/gpu_smoke.py [--work DIR] [--results FILE]

1. A tiny Llama (float64, and bfloat16) with three LoRA adapters of mixed ranks and one
   that also saves ``lm_head`` (modules_to_save), merged in core / KnOTS / full space with
   ta, ties, ties (global), dare, dare_ties, tsv and iso_cts, as a model and as a merged
   adapter, on the CPU and, in float64, with ``--cuda``, ``--cuda --low-cpu-memory``,
   ``--cuda --read-to-gpu`` and ``--multi-gpu`` (which runs every task inside
   ``with torch.device("cuda:i")``, one GPU or several); in bfloat16 with ``--cuda``.
   Each GPU output is compared with the CPU's: float64 deltas within 1e-10 relative,
   bfloat16 weights within one unit in the last place (of the larger of |W| and |W'|),
   merged adapters with the same kept ranks and the same product B·A (to 1e-10, or to
   the rounding of bfloat16 factors).
2. At 14 336 × 4 096 (Llama-3-8B's MLP shape): TIES's threshold by a sort against
   ``kthvalue``, and a DARE mask drawn on the CPU (as merges do) against on the GPU; then
   one module of six rank-16 adapters per space (``--spaces``; KnOTS last, its float64
   SVDs take minutes) and method, in float32 and float64: GPU wall time,
   ``torch.cuda.max_memory_allocated``, and float32's error against float64.

Merges run in process through mergekit's own ``run_merge`` (and ``merge_adapters`` for
adapters): the same code path as ``mergekit-yaml`` without a Python start per merge.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
from measure import bf16_ulps, read_weights  # noqa: E402

from mergekit_corespace import merge_adapters, toy  # noqa: E402

SPACES = {"core": "core_space", "knots": "knots", "full": "full_space"}
METHODS = {
    "ta": {},
    "ties": {"density": 0.5},
    "ties global": {"density": 0.5, "ties_scope": "global"},
    "dare": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "tsv": {},
    "iso_cts": {},
}
GPU_OPTIONS = {
    "--cuda": dict(cuda=True),
    "--cuda --low-cpu-memory": dict(cuda=True, low_cpu_memory=True),
    "--cuda --read-to-gpu": dict(cuda=True, read_to_gpu=True),
    "--multi-gpu": dict(cuda=True, multi_gpu=True),
}


def build(work: str, dtype: torch.dtype) -> tuple[str, list[str]]:
    from peft import LoraConfig, get_peft_model

    name = str(dtype).removeprefix("torch.")
    base = toy.save_tiny_model(os.path.join(work, f"base-{name}"), "llama", dtype=dtype)
    adapters = [
        toy.save_lora_adapter(base, os.path.join(work, f"{name}-r{r}"), r=r, seed=r)
        for r in (4, 8, 12)
    ]
    torch.manual_seed(5)  # one adapter that also saves lm_head whole
    model = get_peft_model(
        toy.load_model(base),
        LoraConfig(
            r=6,
            target_modules=["q_proj", "down_proj"],
            modules_to_save=["lm_head"],
            init_lora_weights=False,
        ),
    )
    with torch.no_grad():
        head = model.base_model.model.lm_head.modules_to_save["default"].weight
        head.add_(torch.randn_like(head))
    saved = os.path.join(work, f"{name}-saved-head")
    model.save_pretrained(saved)
    return base, [*adapters, saved]


def model_difference(cpu: dict, gpu: dict, base: dict) -> float:
    """float64: the largest relative difference of the deltas. bfloat16: the largest
    difference in units in the last place of the larger of |W| and |W'| (where W + ΔW
    cancels to far below |W|, the rounding of the float32 sum is counted in the ulps of
    its inputs, not of the tiny result)."""
    worst = 0.0
    for name, want in cpu.items():
        got = gpu[name]
        if want.dtype == torch.float64:
            delta = want - base[name]
            if delta.norm() > 0:
                worst = max(worst, float((got - want).norm() / delta.norm()))
        else:
            worst = max(worst, float(bf16_ulps(got, want, base[name]).max()))
    return worst


def adapter_difference(cpu: dict, gpu: dict) -> tuple[bool, float]:
    """Same kept ranks, and the largest relative difference of B·A per module."""
    same_ranks, worst = set(cpu) == set(gpu), 0.0
    for key in cpu:
        if key.endswith("lora_A.weight"):
            b_key = key.replace("lora_A", "lora_B")
            same_ranks &= cpu[key].shape == gpu[key].shape
            if not same_ranks:
                continue
            want = cpu[b_key].double() @ cpu[key].double()
            got = gpu[b_key].double() @ gpu[key].double()
            worst = max(worst, float((got - want).norm() / want.norm().clamp_min(1e-300)))
        elif "lora_" not in key:  # a weight saved whole
            want, got = cpu[key].double(), gpu[key].double()
            worst = max(worst, float((got - want).norm() / want.norm().clamp_min(1e-300)))
    return same_ranks, worst


def merges(work: str, rows: list[str], device_options: dict, args) -> bool:
    ok = True
    for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
        base, adapters = build(work, dtype)
        base_tensors = {k: v.double() for k, v in read_weights(base).items()}
        bound = 1e-10 if dtype == torch.float64 else 1.0
        for space, (method, parameters) in itertools.product(
            args.spaces.split(","), [(m, METHODS[m]) for m in args.methods.split(",")]
        ):
            # ties_scope: global does not take adapters that save whole weights
            inputs = adapters[:-1] if method == "ties global" else adapters
            common = dict(
                method=method.split()[0],
                space=space,
                dtype=str(dtype).removeprefix("torch."),
                precision="float64",
                **parameters,
            )
            label = f"{space}-{method.replace(' ', '-')}-{common['dtype']}"
            cpu = os.path.join(work, f"cpu-{label}")
            merge_adapters(base, inputs, out=cpu, as_adapter=False, options=SEED, **common)
            cpu_lora = merge_adapters(base, inputs, out=cpu + "-lora", options=SEED, **common)
            # every option in float64; bfloat16 (the same code, rounded) with --cuda alone,
            # so that the whole smoke stays within 10 minutes on one GPU
            chosen = (
                device_options if dtype == torch.float64 else dict(list(device_options.items())[:1])
            )
            for flags, options in chosen.items():
                gpu = os.path.join(work, f"gpu-{label}-{len(flags)}")
                started = time.perf_counter()
                merge_adapters(
                    base,
                    inputs,
                    out=gpu,
                    as_adapter=False,
                    options={**SEED, **options},
                    **common,
                )
                seconds = time.perf_counter() - started
                worst = model_difference(read_weights(cpu), read_weights(gpu), base_tensors)
                gpu_lora = merge_adapters(
                    base, inputs, out=gpu + "-lora", options={**SEED, **options}, **common
                )
                ranks, lora_worst = adapter_difference(
                    read_weights(cpu_lora), read_weights(gpu_lora)
                )
                # bf16 factors: B·A agrees to their rounding, 2⁻⁸ relative per factor
                lora_bound = 1e-10 if dtype == torch.float64 else 2**-7
                passed = worst <= bound and ranks and lora_worst <= lora_bound
                ok &= passed
                unit = "ulp" if dtype == torch.bfloat16 else "rel"
                rows.append(
                    f"| {common['dtype']} | {space} | {method} | `{flags}` | {worst:.2e} {unit} "
                    f"| {'same' if ranks else 'DIFFERENT'} ranks, {lora_worst:.1e} "
                    f"| {seconds:.2f} s | {'ok' if passed else 'FAIL'} |"
                )
                print(rows[-1], flush=True)
    return ok


SEED = {"random_seed": 7, "copy_tokenizer": False}


def module_timings(rows: list[str], spaces: list[str]) -> None:
    from mergekit_corespace.options import MergeParameters
    from mergekit_corespace.pipeline import merge_factors

    m, n, adapters, rank = 14336, 4096, 6, 16
    generator = torch.Generator().manual_seed(0)
    factors64 = [
        (
            torch.randn(m, rank, generator=generator, dtype=torch.float64, device="cpu") / 30,
            torch.randn(rank, n, generator=generator, dtype=torch.float64, device="cpu") / 30,
        )
        for _ in range(adapters)
    ]
    weights = [1.0] * adapters
    warm = [(b.to("cuda"), a.to("cuda")) for b, a in factors64[:2]]  # CUDA and cuBLAS start-up
    merge_factors(warm, [1.0, 1.0], MergeParameters(merge="tsv"), "full", seed=1).to_dense()
    del warm
    # core first: a run cut short by its time limit still has the headline rows
    ordered = [space for space in ("core", "full", "knots") if space in spaces]
    for space, method in itertools.product(ordered, ("ta", "ties", "dare", "tsv")):
        results = {}
        for precision in ("float64", "float32"):
            dtype = getattr(torch, precision)
            factors = [(b.to("cuda", dtype), a.to("cuda", dtype)) for b, a in factors64]
            extra = {"density": 0.5} if method in ("ties", "dare") else {}
            parameters = MergeParameters(merge=method, precision=precision, **extra)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            started = time.perf_counter()
            delta = merge_factors(factors, weights, parameters, space, seed=1).to_dense()
            torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            peak = torch.cuda.max_memory_allocated() - before
            results[precision] = (seconds, peak, delta.double())
            del factors, delta
            torch.cuda.empty_cache()
        (s64, p64, d64), (s32, p32, d32) = results["float64"], results["float32"]
        error = float((d32 - d64).norm() / d64.norm().clamp_min(1e-300))
        rows.append(
            f"| {space} | {method} | {s64:.3f} s | {p64 / 2**30:.2f} GiB | {s32:.3f} s "
            f"| {p32 / 2**30:.2f} GiB | {s64 / s32:.1f}× | {error:.1e} |"
        )
        print(rows[-1], flush=True)
        del results
        torch.cuda.empty_cache()


def gpu_seconds(work) -> tuple[float, object]:
    """Wall seconds of ``work()`` on the GPU (after one untimed call), and its result."""
    work()
    torch.cuda.synchronize()
    started = time.perf_counter()
    result = work()
    torch.cuda.synchronize()
    return time.perf_counter() - started, result


def primitive_timings(rows: list[str]) -> None:
    """At 14 336 × 4 096, the merges' own TIES threshold (``kth_smallest``: a sort off the
    CPU) against ``kthvalue``, and their DARE drop (``random_drop``: the mask drawn on the
    CPU in float64 and copied) against a mask drawn on the GPU."""
    from mergekit_corespace.merges import kth_smallest, random_drop

    m, n = 14336, 4096
    generator = torch.Generator().manual_seed(0)
    task = torch.randn(m, n, generator=generator, dtype=torch.float64).to("cuda")
    k = m * n // 2
    for dtype in (torch.float64, torch.float32):
        values = task.to(dtype).abs().flatten()
        by_sort, sorted_value = gpu_seconds(lambda values=values: kth_smallest(values, k))
        by_kth, kth_value = gpu_seconds(lambda values=values: values.kthvalue(k).values)
        same = "same value" if bool(sorted_value == kth_value) else "DIFFERENT values"
        rows.append(
            f"| TIES threshold, {str(dtype).removeprefix('torch.')} | sort {by_sort:.3f} s "
            f"| kthvalue {by_kth:.3f} s | {by_kth / by_sort:.1f}× | {same} |"
        )
        print(rows[-1], flush=True)
    cpu_generator = torch.Generator().manual_seed(1)
    gpu_generator = torch.Generator("cuda").manual_seed(1)
    on_cpu, _ = gpu_seconds(lambda: random_drop(task, 0.5, cpu_generator))
    on_gpu, _ = gpu_seconds(
        lambda: task * (torch.rand(task.shape, generator=gpu_generator, device="cuda") < 0.5) / 0.5
    )
    rows.append(
        f"| DARE drop (density 0.5) | mask on the CPU {on_cpu:.3f} s | mask on the GPU "
        f"{on_gpu:.4f} s | {on_cpu / on_gpu:.0f}× | different draws (another generator) |"
    )
    print(rows[-1], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None)
    parser.add_argument("--results", default=None, help="also write the tables here")
    parser.add_argument(
        "--cpu", action="store_true", help="a check of this script: the CPU against itself"
    )
    parser.add_argument("--part", choices=("all", "merges", "modules"), default="all")
    parser.add_argument("--dtypes", default="float64,bfloat16")
    parser.add_argument("--spaces", default=",".join(SPACES))
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    if not (args.cpu or torch.cuda.is_available()):
        sys.exit("bench/gpu_smoke.py needs a CUDA device (torch.cuda.is_available() is False)")
    work = args.work or tempfile.mkdtemp(prefix="gpu-smoke-")
    started = time.perf_counter()
    name = "CPU" if args.cpu else torch.cuda.get_device_name(0)
    count = 1 if args.cpu else torch.cuda.device_count()
    header = [
        f"# GPU smoke: {count} × {name}, torch {torch.__version__}",
        "",
        "## Every option against the CPU (tiny Llama, 4 adapters, one saving lm_head)",
        "",
        "| dtype | space | method | options | model vs CPU | merged adapter vs CPU "
        "| GPU merge wall | |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    rows: list[str] = []
    ok = True
    if args.part in ("all", "merges"):
        ok = merges(work, rows, {"(CPU again)": {}} if args.cpu else GPU_OPTIONS, args)
    timing_header = [
        "",
        f"## One {14336}×{4096} module, 6 adapters of rank 16, on {name}",
        "",
        "| space | method | float64 | peak | float32 | peak | float64 / float32 "
        "| float32 vs float64 (rel.) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    timings: list[str] = []
    primitives_header = [
        "",
        f"## Selection steps at {14336}×{4096} on {name}",
        "",
        "| step | today | other | ratio | |",
        "|---|---|---|---|---|",
    ]
    primitives: list[str] = []
    if not args.cpu and args.part in ("all", "modules"):
        print("\n".join(primitives_header), flush=True)
        primitive_timings(primitives)  # seconds: before the long KnOTS rows
        print("\n".join(timing_header), flush=True)
        module_timings(timings, args.spaces.split(","))
    minutes = (time.perf_counter() - started) / 60
    footer = f"\n{'all checks passed' if ok else 'SOME CHECKS FAILED'}; {minutes:.1f} min"
    print(footer)
    if args.results:
        with open(args.results, "w", encoding="utf-8") as handle:
            handle.write(
                "\n".join(
                    [
                        *header,
                        *rows,
                        *primitives_header,
                        *primitives,
                        *timing_header,
                        *timings,
                        footer,
                    ]
                )
                + "\n"
            )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
