"""What `mergekit_corespace.pth` costs every Python start: `python -c "import json"` with and
without it, alternating, many times (moves the .pth aside temporarily; needs write access).

    python bench/startup_overhead.py [--runs 60]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=60)
    args = parser.parse_args()
    pth = os.path.join(sysconfig.get_paths()["purelib"], "mergekit_corespace.pth")
    aside = pth + ".aside"
    if not os.path.exists(pth):
        sys.exit(f"{pth} not found: install the package first")

    def start() -> float:
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import json"], check=True)
        return time.perf_counter() - began

    with_hook, without_hook = [], []
    try:
        for _ in range(args.runs):
            with_hook.append(start())
            shutil.move(pth, aside)
            without_hook.append(start())
            shutil.move(aside, pth)
    finally:
        if os.path.exists(aside):
            shutil.move(aside, pth)

    importtime = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import json"], capture_output=True, text=True
    ).stderr
    own = [line for line in importtime.splitlines() if "mergekit_corespace" in line]
    a, b = statistics.median(with_hook), statistics.median(without_hook)
    print(f"python -c 'import json', median of {args.runs} alternating runs:")
    print(f"  with the .pth    {a * 1e3:7.2f} ms")
    print(f"  without it       {b * 1e3:7.2f} ms")
    print(f"  difference       {(a - b) * 1e3:+7.2f} ms")
    print("-X importtime of the plugin's own modules (self us | cumulative us | module):")
    for line in own:
        print("  " + line.split(":", 1)[1].strip())


if __name__ == "__main__":
    main()
