"""End to end, in one run: core-space merge vs passthrough (the I/O floor) vs stock
mergekit TIES on `base+adapter` references (which merges a model copy per adapter).

    python bench/perf/e2e_bench.py [--preset 1b|small | --small] [--work DIR] [--repeat 2]
                                   [--skip-stock] [--cuda]

Builds (or reuses, in WORK) a Llama-architecture model at the preset's size and one at
half its depth, each with 6 PEFT adapters of rank 16 on q, k, v, o, gate, up, down
(bench/perf/build.py). Every command is a fresh `mergekit-yaml` process, started after
`sync`; reported are wall time, peak RSS of the whole process tree, and bytes written
to disk (output plus --lora-merge-cache). Prints markdown tables with the ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from build import PRESETS, build_adapter, build_model  # noqa: E402
from measure import directory_bytes, mib, run_measured  # noqa: E402

BIN = os.path.dirname(sys.executable)
ADAPTERS = 6


def build(work: str, preset: str, layers: int | None) -> tuple[str, list[str]]:
    config = dict(PRESETS[preset])
    if layers:
        config["num_hidden_layers"] = layers
    root = os.path.join(work, f"{preset}-{config['num_hidden_layers']}layers")
    base = os.path.join(root, "base")
    adapters = [os.path.join(root, f"adapter{t}") for t in range(ADAPTERS)]
    if not os.path.exists(os.path.join(adapters[-1], "adapter_model.safetensors")):
        shutil.rmtree(root, ignore_errors=True)
        build_model(base, config)
        for t, path in enumerate(adapters):
            build_adapter(path, base, config, rank=16, seed=t)
    return base, adapters


def write_config(path: str, method: str, base: str, adapters: list[str]) -> str:
    if method == "passthrough":
        text = f"merge_method: passthrough\nmodels:\n  - model: {base}\n"
    else:
        models = "".join(
            f"  - model: {base}+{a}\n    parameters: {{weight: 1.0, density: 0.7}}\n"
            for a in adapters
        )
        if method == "core_space":
            models = models.replace(", density: 0.7", "")
            text = (
                f"merge_method: core_space\nbase_model: {base}\nmodels:\n{models}"
                "parameters: {merge: ties, density: 0.7, lambda: 0.5}\n"
            )
        else:  # stock mergekit ties on base+adapter references
            text = (
                f"merge_method: ties\nbase_model: {base}\nmodels:\n{models}"
                "parameters: {lambda: 0.5}\ndtype: bfloat16\n"
            )
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def run(config: str, work: str, label: str, *options: str):
    out, cache = os.path.join(work, f"out-{label}"), os.path.join(work, f"cache-{label}")
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    os.sync()
    command = [
        os.path.join(BIN, "mergekit-yaml"),
        config,
        out,
        "--quiet",
        "--no-copy-tokenizer",
        "--lora-merge-cache",
        cache,
        *options,
    ]
    with open(os.path.join(work, f"{label}.log"), "w") as log:
        measured = run_measured(command, stdout=log, stderr=log)
    if measured.returncode:
        sys.exit(f"{' '.join(command)} failed; see {work}/{label}.log")
    written = directory_bytes(out, cache)
    shutil.rmtree(cache, ignore_errors=True)
    return measured, written, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="1b")
    parser.add_argument(
        "--small",
        dest="preset",
        action="store_const",
        const="small",
        help="the CI-sized model (same as --preset small)",
    )
    parser.add_argument("--work", default=None, help="where models and outputs go")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--skip-stock", action="store_true")
    parser.add_argument("--cuda", action="store_true", help="also run core space with --cuda")
    args = parser.parse_args()
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="corespace-e2e-"))
    os.makedirs(work, exist_ok=True)
    layers = PRESETS[args.preset]["num_hidden_layers"]
    base, adapters = build(work, args.preset, None)
    half_base, half_adapters = build(work, args.preset, layers // 2)

    configs = {
        m: write_config(os.path.join(work, f"{m}.yml"), m, base, adapters)
        for m in ("passthrough", "core_space", "ties")
    }
    rows = {}
    for _ in range(args.repeat):  # alternate, so that drift hits both alike
        for method in ("passthrough", "core_space"):
            rows.setdefault(method, []).append(run(configs[method], work, method))
    if not args.skip_stock:
        rows["ties"] = [run(configs["ties"], work, "ties")]

    def median(method):
        measured = [m for m, _, _ in rows[method]]
        return (
            statistics.median(m.wall_s for m in measured),
            statistics.median(m.peak_rss_bytes for m in measured),
            statistics.median(w for _, w, _ in rows[method]),
        )

    floor_wall, floor_rss, floor_written = median("passthrough")
    print(f"\n### End to end: {args.preset} model ({base}), {ADAPTERS} adapters of rank 16\n")
    print("| run | wall | × passthrough | peak RSS (tree) | × passthrough | bytes written |")
    print("|---|---|---|---|---|---|")
    labels = {
        "passthrough": "passthrough of the base (I/O floor)",
        "core_space": "core_space, ties",
        "ties": "stock ties on base+adapter (--lora-merge-cache)",
    }
    for method in rows:
        wall, rss, written = median(method)
        print(
            f"| {labels[method]} | {wall:.1f} s | {wall / floor_wall:.2f} | {mib(rss)} | "
            f"{rss / floor_rss:.2f} | {mib(written)} |"
        )
    if "ties" in rows:
        print(
            f"\ncore_space is {median('ties')[0] / median('core_space')[0]:.1f}× faster "
            "than the stock base+adapter TIES path."
        )

    print("\n### Small output shards (--out-shard-size 100M): peak RSS vs model size\n")
    print("| model | passthrough RSS | core_space RSS | ratio |")
    print("|---|---|---|---|")
    for name, (b, a) in (
        ("half depth", (half_base, half_adapters)),
        ("full depth", (base, adapters)),
    ):
        small = {
            m: write_config(os.path.join(work, f"{m}-{name[:4]}.yml"), m, b, a)
            for m in ("passthrough", "core_space")
        }
        rss = {
            m: run(small[m], work, f"{m}-shards", "--out-shard-size", "100M")[0].peak_rss_bytes
            for m in small
        }
        print(
            f"| {name} ({directory_bytes(b) / 2**30:.1f} GiB) | {mib(rss['passthrough'])} | "
            f"{mib(rss['core_space'])} | {rss['core_space'] / rss['passthrough']:.2f} |"
        )

    if args.cuda:
        from safetensors.torch import load_file

        measured, _, _ = run(configs["core_space"], work, "core_space-cuda", "--cuda")
        print(
            f"\n--cuda: {measured.wall_s:.1f} s ({median('core_space')[0] / measured.wall_s:.1f}× "
            f"the CPU run), {measured.wall_s / floor_wall:.2f}× passthrough"
        )
        # agreement, in float32 output, of the merged deltas (W' − W) on CPU and GPU
        fp32 = configs["core_space"].replace(".yml", "-fp32.yml")
        with open(configs["core_space"]) as src, open(fp32, "w") as dst:
            dst.write(src.read() + "dtype: float32\n")
        outs = [
            run(fp32, work, f"fp32-{d}", *flags)[2]
            for d, flags in (("cpu", ()), ("gpu", ("--cuda",)))
        ]
        base_shards = {
            f: load_file(os.path.join(base, f))
            for f in os.listdir(base)
            if f.endswith(".safetensors")
        }
        base_tensors = {k: v for shard in base_shards.values() for k, v in shard.items()}
        worst = 0.0
        for shard in sorted(f for f in os.listdir(outs[0]) if f.endswith(".safetensors")):
            cpu, gpu = (load_file(os.path.join(o, shard)) for o in outs)
            for name, x in cpu.items():
                delta = x.double() - base_tensors[name].double()
                if delta.any():
                    diff = (x.double() - gpu[name].double()).norm() / delta.norm()
                    worst = max(worst, diff.item())
        print(
            f"CPU vs GPU (float32 output): worst relative difference of a merged delta {worst:.1e}"
        )


if __name__ == "__main__":
    main()
