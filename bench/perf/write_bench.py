"""What writing an output shard costs, by where its tensors live: the measurement behind
"serialisation of new tensors is slower than passthrough's".

    python bench/perf/write_bench.py [--gib 1.0] [--repeat 3] [--work DIR]

Writes the same bf16 tensors (4096×4096 blocks, ``--gib`` in all) with
``safetensors.torch.save_file``, as mergekit's writer does, from three sources:

- ``mapped``: views into a memory-mapped safetensors file, as passthrough hands them over
  (the file's pages already in the page cache);
- ``fresh``: tensors in newly allocated memory that was filled just before;
- ``merged``: tensors produced by the core-space update ``W + U_B M V_A``
  (:meth:`MergedDelta.applied_to`), the time of which is reported apart.

Each write goes to a new file after ``sync``; the per-source medians and ratios are
printed, and the page faults (minor/major) each phase took.

Then the same ``fresh`` write into the page cache in two machine states: at once after
the previous output file was deleted, and after the machine idled ``--idle`` seconds
(default 20). On a VM with free page reporting (virtio-balloon) the idle machine has
handed the freed memory back to its host, and every page the write takes must be faulted
in again from the host: the cost is kernel time, whatever the tensors' source.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import tempfile
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SHAPE = (4096, 4096)


def faults() -> tuple[int, int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_majflt


def timed(function):
    before, started = faults(), time.perf_counter()
    result = function()
    seconds = time.perf_counter() - started
    after = faults()
    return result, seconds, (after[0] - before[0], after[1] - before[1])


def main() -> None:
    from mergekit_corespace.spaces import MergedDelta

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", default=None)
    parser.add_argument("--idle", type=float, default=20.0)
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="write-bench-")
    count = max(1, int(args.gib * 2**30 / (SHAPE[0] * SHAPE[1] * 2)))
    generator = torch.Generator().manual_seed(0)
    source = {
        f"w{i}": torch.empty(SHAPE, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
        for i in range(count)
    }
    mapped_file = os.path.join(work, "source.safetensors")
    save_file(source, mapped_file)
    handle = safe_open(mapped_file, "pt")
    left = torch.randn(SHAPE[0], 96, generator=generator, dtype=torch.float64) * 1e-3
    right = torch.randn(96, SHAPE[1], generator=generator, dtype=torch.float64)

    def mapped():
        tensors = {name: handle.get_tensor(name) for name in source}
        for tensor in tensors.values():  # its pages resident, as after mergekit's load
            tensor.view(torch.int16).sum()
        return tensors

    def fresh():
        return {name: torch.empty_like(tensor).copy_(tensor) for name, tensor in source.items()}

    def merged():
        delta = MergedDelta(left=left, right=right)
        return {name: delta.applied_to(tensor) for name, tensor in source.items()}

    rows = {}
    for _ in range(args.repeat):
        for label, make in (("mapped", mapped), ("fresh", fresh), ("merged", merged)):
            tensors, make_seconds, make_faults = timed(make)
            out = os.path.join(work, f"{label}.safetensors")
            os.sync()
            _, write_seconds, write_faults = timed(functools.partial(save_file, tensors, out))
            rows.setdefault(label, []).append(
                (make_seconds, write_seconds, make_faults, write_faults)
            )
            del tensors
            os.remove(out)
    size = count * SHAPE[0] * SHAPE[1] * 2
    print(f"\n{count} tensors of {SHAPE[0]}×{SHAPE[1]} bf16 = {size / 2**30:.2f} GiB per write")
    print(f"torch threads: {torch.get_num_threads()}\n")
    print("| source | producing | faults (minor/major) | save_file | faults | × mapped |")
    print("|---|---|---|---|---|---|")
    floor = statistics.median(r[1] for r in rows["mapped"])
    for label, measured in rows.items():
        make = statistics.median(r[0] for r in measured)
        write = statistics.median(r[1] for r in measured)
        make_faults, write_faults = measured[-1][2], measured[-1][3]
        print(
            f"| {label} | {make:.2f} s | {make_faults[0]}/{make_faults[1]} | {write:.2f} s "
            f"({size / write / 2**30:.1f} GiB/s) | {write_faults[0]}/{write_faults[1]} | "
            f"{write / floor:.2f} |"
        )

    tensors = fresh()
    states = {}
    for _ in range(args.repeat):
        for state, wait in (("right after deleting the previous output", 0.0), ("idle", args.idle)):
            out = os.path.join(work, "state.safetensors")
            save_file(tensors, out)  # the previous output, deleted just before the timed write
            os.remove(out)
            os.sync()
            time.sleep(wait)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
            _, seconds, _ = timed(functools.partial(save_file, tensors, out))
            system = resource.getrusage(resource.RUSAGE_SELF).ru_stime - before
            states.setdefault(state, []).append((seconds, system))
            os.remove(out)
    label = f"after {args.idle:.0f} s idle"
    print("\n| machine state before the write | save_file | kernel time |")
    print("|---|---|---|")
    for state, measured in states.items():
        seconds = statistics.median(r[0] for r in measured)
        system = statistics.median(r[1] for r in measured)
        name = label if state == "idle" else state
        print(f"| {name} | {seconds:.2f} s ({size / seconds / 2**30:.1f} GiB/s) | {system:.2f} s |")


if __name__ == "__main__":
    main()
