"""The graph tasks mergekit schedules for a run: one weight's merge, and the first pass of
``ties_scope: global``.

They subclass ``mergekit.graph.Task``, the API every mergekit merge method builds on, and
call the pure pipeline (:mod:`mergekit_corespace.pipeline`) for the math. The base weight
reaches a merge task as the result of a load task mergekit built and runs itself.
"""

from __future__ import annotations

import torch
from mergekit.graph import Task

from mergekit_corespace.adapters import Contribution, DenseWeight, LoraModule
from mergekit_corespace.errors import CoreSpaceError
from mergekit_corespace.memory import release_file_pages
from mergekit_corespace.options import MergeParameters, Space
from mergekit_corespace.pipeline import SpaceCache, global_ties_thresholds, merge_module
from mergekit_corespace.spaces import MergedDelta


class TiesThresholdsTask(Task[tuple]):
    """First pass of ``ties_scope: global``: each adapter's magnitude threshold over all
    merged modules. Every TIES merge task depends on it, so it runs once, first."""

    space: Space
    modules: tuple[tuple[tuple[int, LoraModule], ...], ...]  # per weight: (adapter, LoRA)
    adapters: int
    parameters: MergeParameters
    device: str
    quiet: bool = False

    def arguments(self) -> dict[str, Task]:
        return {}

    def uses_accelerator(self) -> bool:
        return True

    def main_thread_only(self) -> bool:
        # With --multi-gpu, a leading task: run once before the GPUs' islands start, its
        # thresholds handed to each. Duplicated per GPU it would read and decompose every
        # module of every adapter once per GPU; on one GPU, it would join every TIES
        # merge into one island.
        return True

    def execute(self) -> tuple:
        return global_ties_thresholds(
            self.modules,
            self.adapters,
            self.parameters,
            self.space,
            device=self.device,
            progress=not self.quiet,
        )


class WeightMergeTask(Task[torch.Tensor]):
    """``W + ΔW`` for one weight: the base tensor comes from mergekit, each adapter's part
    of this module (its LoRA factors, or a saved whole weight) is read here, merged in
    ``space``, and added in one step."""

    base: Task  # mergekit's load task of the base weight
    weight_name: str
    space: Space
    contributions: tuple[tuple[Contribution, ...], ...]  # per adapter present
    adapter_indices: tuple[int, ...]
    weights: tuple[float, ...]
    parameters: MergeParameters
    seed: int
    thresholds: TiesThresholdsTask | None = None

    def arguments(self) -> dict[str, Task]:
        if self.thresholds is None:
            return {"base": self.base}
        return {"base": self.base, "thresholds": self.thresholds}

    def group_label(self) -> str | None:
        return self.base.group_label()  # keeps the merge next to its load and save

    def uses_accelerator(self) -> bool:
        return True

    @property
    def dense(self) -> bool:
        """Whether some adapter saved this weight whole (then the merge runs in full space)."""
        return any(isinstance(p, DenseWeight) for parts in self.contributions for p in parts)

    def execute(self, base: torch.Tensor, thresholds: tuple | None = None) -> torch.Tensor:
        for parts in self.contributions:
            for part in parts:
                if part.delta_shape != tuple(base.shape):
                    raise CoreSpaceError(
                        f"{part.file}: {getattr(part, 'module', getattr(part, 'key', ''))} gives "
                        f"a {part.delta_shape} delta but base weight {self.weight_name} is "
                        f"{tuple(base.shape)}"
                    )
        views = [base]
        delta = self.merged_delta(base.device, thresholds, base=base, views=views)
        merged = delta.applied_to(base)
        release_file_pages(*views)  # each file read once: its mapped pages need not stay
        return merged

    def merged_delta(
        self,
        device,
        thresholds: tuple | None = None,
        base: torch.Tensor | None = None,
        views: list[torch.Tensor] | None = None,
        *,
        scaled: bool = True,
        spaces: SpaceCache | None = None,
    ) -> MergedDelta:
        """This weight's merged ΔW, factored where the space allows. ``base`` is only read
        for weights some adapter saved whole (their delta is saved − base); ``views`` as
        for :func:`~mergekit_corespace.pipeline.read_inputs`; ``scaled``, ``spaces`` as for
        :func:`~mergekit_corespace.pipeline.merge_module`."""
        return merge_module(
            self.contributions,
            self.weights,
            self.parameters,
            self.space,
            device,
            base,
            views,
            seed=self.seed,
            thresholds=None
            if thresholds is None
            else [thresholds[i] for i in self.adapter_indices],
            scaled=scaled,
            spaces=spaces,
            name=self.weight_name,
        )
