"""Peak RSS and wall time of a core-space merge next to `passthrough` of its base model.

    python bench/rss_vs_passthrough.py CONFIG.yml [--repeat 3] [-- extra mergekit-yaml options]

Runs `mergekit-yaml CONFIG` and `mergekit-yaml` with `merge_method: passthrough` on the
config's base model alone (the I/O floor), alternately, in one run; prints both and their
ratio. E.g. after `python examples/demo.py`:

    python bench/rss_vs_passthrough.py demo-output/core_ta.yml
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import yaml
from measure import mib, run_measured

BIN = os.path.dirname(sys.executable)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("extra", nargs="*", help="more mergekit-yaml options (after --)")
    args = parser.parse_args()

    with open(args.config, encoding="utf-8") as handle:
        base = yaml.safe_load(handle)["base_model"]
    work = tempfile.mkdtemp(prefix="rss-bench-")
    passthrough = os.path.join(work, "passthrough.yml")
    with open(passthrough, "w", encoding="utf-8") as handle:
        handle.write(f"merge_method: passthrough\nmodels:\n  - model: {base}\n")

    runs = {"core_space": [], "passthrough": []}
    for trial in range(args.repeat):
        for name, config in (("core_space", args.config), ("passthrough", passthrough)):
            out = os.path.join(work, f"{name}-{trial}")
            command = [os.path.join(BIN, "mergekit-yaml"), config, out, "--quiet", *args.extra]
            measured = run_measured(
                command, stdout=open(os.devnull, "w"), stderr=open(os.devnull, "w")
            )
            if measured.returncode:
                sys.exit(f"{' '.join(command)} failed ({measured.returncode})")
            runs[name].append(measured)

    print(f"base model: {base}  ({args.repeat} alternating runs each, medians)")
    print(f"{'':12s} {'wall':>8s} {'peak RSS':>12s}")
    medians = {}
    for name, measured in runs.items():
        wall = statistics.median(m.wall_s for m in measured)
        rss = statistics.median(m.peak_rss_bytes for m in measured)
        medians[name] = (wall, rss)
        print(f"{name:12s} {wall:7.2f}s {mib(rss):>12s}")
    (core_wall, core_rss), (pt_wall, pt_rss) = medians["core_space"], medians["passthrough"]
    print(f"{'ratio':12s} {core_wall / pt_wall:7.2f}x {core_rss / pt_rss:11.2f}x")


if __name__ == "__main__":
    main()
