"""Where one merge's time goes: ``run_merge`` of a config, in this process, under cProfile.

    python bench/perf/profile_run.py CONFIG [--top 20] [--out-shard-size 5B] [--keep OUT]
                                            [--cuda]

Runs mergekit's ``run_merge`` exactly as ``mergekit-yaml CONFIG OUT --quiet
--no-copy-tokenizer`` does (plugin installed first), after ``sync``, and prints the wall
time of ``run_merge`` (interpreter and import start-up excluded: passthrough pays them
alike), then the functions with the most own time. The output goes to a temporary
directory that is removed afterwards unless ``--keep`` names one. With ``--cuda`` the GPU's
time shows where the host waits for it (a copy back to the CPU, a synchronisation).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--out-shard-size", default="5B")
    parser.add_argument("--keep", default=None, help="write the output here and keep it")
    parser.add_argument("--cuda", action="store_true", help="mergekit-yaml's --cuda")
    args = parser.parse_args()

    import mergekit_corespace._hook

    mergekit_corespace._hook.install()  # what mergekit_corespace.pth does at start-up
    import mergekit.merge
    import yaml
    from mergekit.common import parse_kmb
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    with open(args.config, encoding="utf-8") as handle:
        config = MergeConfiguration.model_validate(yaml.safe_load(handle))
    options = MergeOptions(
        quiet=True,
        copy_tokenizer=False,
        out_shard_size=parse_kmb(args.out_shard_size),
        cuda=args.cuda,
    )
    out = args.keep or tempfile.mkdtemp(prefix="profile-run-")
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.runcall(mergekit.merge.run_merge, config, out, options=options)
    wall = time.perf_counter() - started
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    print(f"run_merge: {wall:.2f} s ({args.config})\n")
    stats = pstats.Stats(profile)
    stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
