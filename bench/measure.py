"""Measuring commands (wall time and peak RSS of the whole process tree, from Linux /proc)
and the rounding of written weights."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass

import torch
from safetensors.torch import load_file


@dataclass
class Measurement:
    wall_s: float
    peak_rss_bytes: int
    returncode: int


def _tree_rss(root: int) -> int:
    """Sum of VmRSS over ``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, ()))
        try:
            with open(f"/proc/{pid}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def run_measured(command: list[str], interval: float = 0.02, **popen) -> Measurement:
    """Run ``command``; sample the process tree's RSS every ``interval`` seconds."""
    started = time.perf_counter()
    process = subprocess.Popen(command, **popen)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(process.pid))
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    returncode = process.wait()
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    return Measurement(wall_s=wall, peak_rss_bytes=peak, returncode=returncode)


def directory_bytes(*paths: str) -> int:
    total = 0
    for path in paths:
        for folder, _, files in os.walk(path):
            total += sum(os.path.getsize(os.path.join(folder, name)) for name in files)
    return total


def mib(value: int) -> str:
    return f"{value / 2**20:,.0f} MiB"


def bf16_ulps(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """How far apart two merged weights are, per entry, in bfloat16 units in the last place
    of the larger of |W| and |W'|: where W + ΔW cancels to far below |W|, the rounding of
    the sum is counted in the ulps of its inputs, not of the tiny result."""
    magnitude = torch.maximum(want.double().abs(), base.double().abs()).clamp_min(2**-126)
    ulp = 2.0 ** (torch.floor(torch.log2(magnitude)) - 7)
    return (got.double() - want.double()).abs() / ulp


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder's safetensors files."""
    out = {}
    for file in sorted(os.listdir(path)):
        if file.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, file)))
    return out
