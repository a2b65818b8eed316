"""End to end, in one run: core-space merge vs passthrough (the I/O floor) vs stock
mergekit TIES on `base+adapter` references (which merges a model copy per adapter).

    python bench/perf/e2e_bench.py [--preset 8b|1b|small | --small] [--work DIR]
                                   [--step all|default|shards|stock|none] [--repeat 2]
                                   [--skip-stock] [--cold] [--settle 20] [--cuda]
                                   [--modules-to-save] [--layers N] [--methods ties,tsv]

Builds (or reuses, in WORK) a Llama-architecture model at the preset's size with 6 PEFT
adapters of rank 16 on q, k, v, o, gate, up, down (bench/perf/build.py; with
--modules-to-save each adapter also saves embed_tokens and lm_head whole, and --layers sets
the depth). Every command is
a fresh `mergekit-yaml` process, started after `sync` (and, with --cold, after dropping
the page cache); reported are wall time, peak RSS of the whole process tree, and bytes
written to disk (output plus --lora-merge-cache). Steps, each printing its own tables
(ratios within a row always come from one run):

- default: passthrough vs core_space TIES (or each of --methods), alternating, default
  shard size (5B);
- shards: the same with small output shards (100M; 1B for the 8b preset), and for the
  small and 1b presets also on a model of half the depth: peak RSS must not grow with
  model size;
- stock: mergekit's own TIES on base+adapter references. For the 8b preset it is not run
  (it would write 6 merged copies of the model, ~100 GB): its bytes are computed.

Before each run the previous output is deleted, then the machine is left idle for
``--settle`` seconds (default 20): on a VM that hands freed memory back to its host
(virtio-balloon free page reporting), a run started at once writes into memory the host
still backs, up to 10× faster than into memory it has taken back (write_bench.py
measures this), so without the pause whichever run starts first would be favoured.

`--cuda` then runs passthrough, core space on the CPU and core space with `--cuda` once each
(with `--step none`, nothing else), and below 8b compares the CPU's and GPU's merged deltas
in float32. The 8b preset's steps each fit in 10 minutes on 2 CPU cores; run them one by one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from build import PRESETS, SHARD_BYTES, build_adapter, build_model  # noqa: E402
from measure import directory_bytes, mib, run_measured  # noqa: E402
from safetensors import safe_open  # noqa: E402

BIN = os.path.dirname(sys.executable)
ADAPTERS = 6
DENSITY = {"ties": 0.7, "dare": 0.1, "dare_ties": 0.1}  # core_space rows


def build(
    work: str, preset: str, layers: int | None, modules_to_save: bool = False
) -> tuple[str, list[str]]:
    config = dict(PRESETS[preset])
    if layers:
        config["num_hidden_layers"] = layers
    saved = "-saved" if modules_to_save else ""
    root = os.path.join(work, f"{preset}-{config['num_hidden_layers']}layers{saved}")
    base = os.path.join(root, "base")
    adapters = [os.path.join(root, f"adapter{t}") for t in range(ADAPTERS)]
    if not os.path.exists(os.path.join(adapters[-1], "adapter_model.safetensors")):
        shutil.rmtree(root, ignore_errors=True)
        build_model(base, config, shard_bytes=SHARD_BYTES.get(preset, 1 << 30))
        for t, path in enumerate(adapters):
            build_adapter(path, base, config, rank=16, seed=t, modules_to_save=modules_to_save)
    return base, adapters


def write_config(path: str, method: str, base: str, adapters: list[str]) -> str:
    """``passthrough``, ``ties`` (stock, on base+adapter) or ``core_space:<inner method>``."""
    if method == "passthrough":
        text = f"merge_method: passthrough\nmodels:\n  - model: {base}\n"
    else:
        models = "".join(
            f"  - model: {base}+{a}\n    parameters: {{weight: 1.0, density: 0.7}}\n"
            for a in adapters
        )
        if method.startswith("core_space"):
            inner = method.partition(":")[2] or "ties"
            density = f", density: {DENSITY[inner]}" if inner in DENSITY else ""
            models = models.replace(", density: 0.7", "")
            text = (
                f"merge_method: core_space\nbase_model: {base}\nmodels:\n{models}"
                f"parameters: {{merge: {inner}{density}, lambda: 0.5}}\n"
            )
        else:  # stock mergekit ties on base+adapter references
            text = (
                f"merge_method: ties\nbase_model: {base}\nmodels:\n{models}"
                "parameters: {lambda: 0.5}\ndtype: bfloat16\n"
            )
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def run(config: str, work: str, label: str, *options: str, cold=False, settle=0.0, keep=False):
    """One fresh `mergekit-yaml` process: (measurement, bytes written, output path)."""
    out, cache = os.path.join(work, f"out-{label}"), os.path.join(work, f"cache-{label}")
    for previous in (out, cache):
        shutil.rmtree(previous, ignore_errors=True)
    os.sync()
    time.sleep(settle)
    if cold:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
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
    if not keep:  # outputs of the 8b preset are 16 GB each
        shutil.rmtree(out, ignore_errors=True)
    return measured, written, out


SMALL_SHARDS = {"small": "100M", "1b": "100M", "8b": "1B"}
LABELS = {
    "passthrough": "passthrough of the base (I/O floor)",
    "ties": "stock ties on base+adapter (--lora-merge-cache)",
}


def label(method: str) -> str:
    return LABELS.get(method) or f"core_space, {method.partition(':')[2]}"


def median_row(runs):
    """(wall, peak RSS, bytes written) medians over repeated runs."""
    return tuple(
        statistics.median(values)
        for values in zip(*[(m.wall_s, m.peak_rss_bytes, written) for m, written, _ in runs])
    )


def print_table(title: str, rows: dict) -> None:
    floor_wall, floor_rss, _ = rows["passthrough"]
    print(f"\n### {title}\n")
    print("| run | wall | × passthrough | peak RSS (tree) | × passthrough | bytes written |")
    print("|---|---|---|---|---|---|")
    for method, (wall, rss, written) in rows.items():
        wall_cell = "not run" if wall is None else f"{wall:.1f} s"
        ratio = "" if wall is None else f"{wall / floor_wall:.2f}"
        rss_cells = "" if rss is None else f"{mib(rss)} | {rss / floor_rss:.2f}"
        print(
            f"| {label(method)} | {wall_cell} | {ratio} | {rss_cells or ' | '} | "
            f"{mib(written)}{' (computed)' if wall is None else ''} |"
        )


def alternate(configs: dict, work: str, args, *options: str) -> dict:
    """Run each config ``repeat`` times, alternating, so that drift hits all alike."""
    runs = {}
    for _ in range(args.repeat):
        for method, config in configs.items():
            label = (
                f"{method.replace(':', '-')}{'-' + '-'.join(options).strip('-') if options else ''}"
            )
            measured = run(config, work, label, *options, cold=args.cold, settle=args.settle)
            runs.setdefault(method, []).append(measured)
    return {method: median_row(measured) for method, measured in runs.items()}


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
    parser.add_argument(
        "--step",
        choices=("all", "default", "shards", "stock", "none"),
        default="all",
        help="none: only the --cuda runs",
    )
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--skip-stock", action="store_true")
    parser.add_argument(
        "--cold", action="store_true", help="drop the page cache before each run (root only)"
    )
    parser.add_argument("--settle", type=float, default=20.0, help="idle seconds before each run")
    parser.add_argument("--cuda", action="store_true", help="also run core space with --cuda")
    parser.add_argument(
        "--modules-to-save",
        action="store_true",
        help="adapters also save embed_tokens and lm_head whole (build.py --modules-to-save)",
    )
    parser.add_argument("--layers", type=int, help="override the preset's number of layers")
    parser.add_argument(
        "--methods", default="ties", help="core_space inner methods, comma-separated (ties)"
    )
    args = parser.parse_args()
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="corespace-e2e-"))
    os.makedirs(work, exist_ok=True)
    base, adapters = build(work, args.preset, args.layers, args.modules_to_save)
    cores = [f"core_space:{m}" for m in args.methods.split(",")]
    configs = {
        m: write_config(os.path.join(work, f"{m.replace(':', '-')}.yml"), m, base, adapters)
        for m in ("passthrough", *cores, "ties")
    }
    steps = {"all": ("default", "shards", "stock"), "none": ()}.get(args.step, (args.step,))
    model = f"{args.preset} model ({directory_bytes(base) / 2**30:.1f} GiB, {base})"
    pair = {m: configs[m] for m in ("passthrough", *cores)}

    if "default" in steps or "stock" in steps:
        rows = alternate(pair, work, args)
        if "stock" in steps and not args.skip_stock:
            if args.preset == "8b":  # a merged model per adapter in the cache, plus the output
                rows["ties"] = (None, None, (ADAPTERS + 1) * directory_bytes(base))
            else:
                rows["ties"] = median_row(
                    [run(configs["ties"], work, "ties", cold=args.cold, settle=args.settle)]
                )
        print_table(f"End to end: {model}, {ADAPTERS} adapters of rank 16", rows)
        if "ties" in rows and rows["ties"][0] is not None:
            print(
                f"\ncore_space is {rows['ties'][0] / rows[cores[0]][0]:.1f}× faster "
                "than the stock base+adapter TIES path."
            )
        elif "ties" in rows:
            print(
                "\nstock ties was not run: it would write the bytes above (one merged copy "
                "of the base per adapter in --lora-merge-cache, plus the output)."
            )

    if "shards" in steps:
        shard = SMALL_SHARDS[args.preset]
        rows = alternate(pair, work, args, "--out-shard-size", shard)
        print_table(f"Output shards of {shard} bytes: {model}", rows)
        if args.preset != "8b" and not args.layers:
            layers = PRESETS[args.preset]["num_hidden_layers"] // 2
            half_base, half_adapters = build(work, args.preset, layers, args.modules_to_save)
            half = {
                m: write_config(
                    os.path.join(work, f"{m.replace(':', '-')}-half.yml"),
                    m,
                    half_base,
                    half_adapters,
                )
                for m in ("passthrough", *cores)
            }
            rows = alternate(half, work, args, "--out-shard-size", shard)
            size = directory_bytes(half_base) / 2**30
            print_table(f"Output shards of {shard} bytes: half depth ({size:.1f} GiB)", rows)

    if args.cuda:
        cuda(configs, cores[0], base, work, args)


def cuda(configs: dict, core: str, base: str, work: str, args) -> None:
    """A GPU run of core space, and the CPU/GPU agreement of the merged deltas."""
    from safetensors.torch import load_file

    before = dict(cold=args.cold, settle=args.settle)
    floor = run(configs["passthrough"], work, "passthrough-cuda-floor", **before)[0]
    print(f"\npassthrough: {floor.wall_s:.1f} s", flush=True)  # each as it ends: a run cut
    cpu = run(configs[core], work, "core_space-cpu", **before)[0]  # short keeps the others
    print(f"core_space on the CPU: {cpu.wall_s:.1f} s", flush=True)
    measured = run(configs[core], work, "core_space-cuda", "--cuda", **before)[0]
    print(
        f"\n--cuda: {measured.wall_s:.1f} s ({cpu.wall_s / measured.wall_s:.1f}× faster than "
        f"the CPU run's {cpu.wall_s:.1f} s), {measured.wall_s / floor.wall_s:.2f}× passthrough"
    )
    if args.preset == "8b":  # two float32 copies of 8 B parameters: 64 GB of disk
        print("CPU vs GPU agreement not run at 8b (see bench/gpu_smoke.py for it)")
        return
    # agreement, in float32 output, of the merged deltas (W' − W) on CPU and GPU
    fp32 = configs[core].replace(".yml", "-fp32.yml")
    with open(configs[core]) as src, open(fp32, "w") as dst:
        dst.write(src.read() + "dtype: float32\n")
    outs = [
        run(fp32, work, f"fp32-{d}", *flags, keep=True)[2]
        for d, flags in (("cpu", ()), ("gpu", ("--cuda",)))
    ]
    index = os.path.join(base, "model.safetensors.index.json")
    with open(index) as handle:
        where = json.load(handle)["weight_map"]
    worst = 0.0
    for shard in sorted(f for f in os.listdir(outs[0]) if f.endswith(".safetensors")):
        cpu_out, gpu_out = (load_file(os.path.join(o, shard)) for o in outs)
        for name, x in cpu_out.items():
            with safe_open(os.path.join(base, where[name]), "pt") as handle:
                delta = x.double() - handle.get_tensor(name).double()
            if delta.any():
                diff = (x.double() - gpu_out[name].double()).norm() / delta.norm()
                worst = max(worst, diff.item())
    print(f"CPU vs GPU (float32 output): worst relative difference of a merged delta {worst:.1e}")
    for out in outs:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
