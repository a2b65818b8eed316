"""What TIES keeps of each task in core space and in full space, measured with the
package's own spaces and inner merges on every module the adapters share.

Per task t and space: *kept by the trim*, ‖trim(Xₜ)‖² / ‖Xₜ‖² (Xₜ the task's core matrix
or dense delta, trim = its top-density magnitudes), and *retained by the merge*,
⟨merge, Xₜ⟩ / ‖Xₜ‖² for TIES and for task arithmetic (unit weights, λ 1), summed over
modules; and the merge's own energy against the tasks' (TIES' disjoint mean averages where
task arithmetic sums, so its best λ is larger). Both spaces' bases are orthonormal, so
inner products and norms of the core matrices are those of the deltas they stand for: the
figures compare like with like, and task arithmetic's retention is the same in both (the
check that they do).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tqdm import tqdm

from mergekit_corespace import merges
from mergekit_corespace.adapters import LoraAdapter, read_factors
from mergekit_corespace.spaces import CoreSpace, FullSpace


def trim_energy(adapters: Mapping[str, str], densities: Sequence[float]) -> dict:
    """``{space: {"ta" or density: {"kept": {task: share}, "retained": {task: share},
    "merge_energy": ‖merge‖² / Σₜ‖Xₜ‖²}}}`` (densities as strings, for JSON; no "kept"
    for task arithmetic)."""
    opened = {name: LoraAdapter.open(path) for name, path in adapters.items()}
    modules = sorted(set.intersection(*(set(a.modules) for a in opened.values())))
    names, ones = list(opened), [1.0] * len(opened)
    sums: dict[tuple, float] = {}

    def add(key: tuple, value: torch.Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + float(value)

    for module in tqdm(modules, desc="TIES trim, core and full space"):
        factors = [read_factors(opened[name].modules[module], torch.float32) for name in names]
        spaces = {"core": CoreSpace(factors).tasks, "full": FullSpace(factors).tasks}
        for space, tasks in spaces.items():
            summed = merges.task_arithmetic(tasks, ones)
            add((space, "ta", "merge"), summed.square().sum())
            for name, task in zip(names, tasks, strict=True):
                add((space, "energy", name), task.square().sum())
                add((space, "ta", name), (summed * task).sum())
            for density in densities:
                merged = merges.ties(tasks, ones, density)
                add((space, density, "merge"), merged.square().sum())
                for name, task in zip(names, tasks, strict=True):
                    kept = merges.keep_top_magnitudes(task, density)
                    add((space, density, "kept", name), kept.square().sum())
                    add((space, density, "retained", name), (merged * task).sum())
    result = {}
    for space in ("core", "full"):
        energy = {name: sums[(space, "energy", name)] for name in names}
        total = sum(energy.values())
        result[space] = {
            "ta": {
                "retained": {n: sums[(space, "ta", n)] / energy[n] for n in names},
                "merge_energy": sums[(space, "ta", "merge")] / total,
            }
        }
        for density in densities:
            result[space][str(density)] = {
                figure: {n: sums[(space, density, figure, n)] / energy[n] for n in names}
                for figure in ("kept", "retained")
            } | {"merge_energy": sums[(space, density, "merge")] / total}
    return {"modules": len(modules), "spaces": result}
