"""The same merge written as one LoRA adapter and as a full model: time and size.

    python bench/lora_vs_model.py CONFIG.yml [--repeat 3]

Runs `mergekit-corespace-lora CONFIG` and `mergekit-yaml CONFIG` alternately, each in a
fresh process, and prints median wall times and the bytes each writes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from measure import directory_bytes, mib

BIN = os.path.dirname(sys.executable)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="lora-vs-model-")
    commands = {
        "merged LoRA adapter (mergekit-corespace-lora)": "mergekit-corespace-lora",
        "merged model (mergekit-yaml)": "mergekit-yaml",
    }
    times, sizes = {name: [] for name in commands}, {}
    for trial in range(args.repeat):
        for name, script in commands.items():
            out = os.path.join(work, f"{script}-{trial}")
            os.sync()
            started = time.perf_counter()
            subprocess.run(
                [os.path.join(BIN, script), args.config, out, "--quiet"],
                check=True,
                capture_output=True,
            )
            times[name].append(time.perf_counter() - started)
            sizes[name] = directory_bytes(out)
    print(f"| output | wall (median of {args.repeat}) | written |")
    print("|---|---|---|")
    for name in commands:
        print(f"| {name} | {statistics.median(times[name]):.1f} s | {mib(sizes[name])} |")


if __name__ == "__main__":
    main()
