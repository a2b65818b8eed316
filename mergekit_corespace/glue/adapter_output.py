"""The merge written as one PEFT LoRA adapter instead of a model.

Planned exactly like a model merge (so filters, gradients, seeds and ``ties_scope:
global`` resolve identically; :func:`~mergekit_corespace.glue.internals.planned_merge_tasks`),
but only the merge tasks run, without the base weights, and each module's merged delta
is written in factored form (:mod:`mergekit_corespace.lora_export`). The same adapter,
computed in memory and not written, is what ``mergekit-corespace-tune --score-as adapter``
evaluates; :func:`merged_weights` gives the merged model's weights in memory, which it
evaluates by default.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Any

import torch

from mergekit_corespace.errors import CoreSpaceError
from mergekit_corespace.glue.registration import METHOD_SPACES
from mergekit_corespace.glue.run import ValidatedRun, validate_run
from mergekit_corespace.glue.staging import claimed_output
from mergekit_corespace.glue.tasks import WeightMergeTask
from mergekit_corespace.lora_export import LoraExport, lora_export
from mergekit_corespace.memory import release_file_pages
from mergekit_corespace.pipeline import SpaceCache
from mergekit_corespace.spaces import LowRankDelta, MergedDelta, truncate

LOG = logging.getLogger(__name__)
_RELEASE_EVERY = 64  # modules between releases of the adapter files' mapped pages


@dataclass
class AdapterReport:
    """What :func:`merge_to_adapter` wrote (or :func:`merged_adapter` computed): per
    module, its rank and truncation error."""

    path: str | None
    ranks: dict[str, int]
    errors: dict[str, float]  # relative Frobenius error of the truncation

    def summary(self) -> str:
        if not self.errors:
            return f"merged adapter: only whole saved weights (modules_to_save) -> {self.path}"
        worst = max(self.errors, key=self.errors.get)
        ranks = sorted(set(self.ranks.values()))
        shown = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
        return (
            f"merged adapter: {len(self.ranks)} modules, rank {shown}; relative truncation "
            f"error worst {self.errors[worst]:.2e} ({worst}), mean "
            f"{sum(self.errors.values()) / len(self.errors):.2e} -> {self.path}"
        )


@dataclass
class MergedAdapter:
    """The merged adapter in memory (PEFT config and tensors) and what went into it."""

    export: LoraExport
    report: AdapterReport


def merge_to_adapter(
    config, out_path: str, options, rank: int | None = None, energy: float | None = None
) -> AdapterReport:
    """Merge the config's adapters into one PEFT LoRA adapter at ``out_path``.

    Each module's merged delta is cut to ``rank`` or ``energy`` from its factored form
    (default: every non-null direction, i.e. exact).
    """
    _check_method(config)
    with claimed_output(out_path) as output:
        run = validate_run(config, options)
        output.check_free_space(run.adapter_output_bytes(_dtype(config).itemsize, rank))
        merged = merged_adapter(config, options, rank, energy, run=run)
        with output.staging() as staging:
            os.makedirs(staging)
            merged.export.write(staging)
    merged.report.path = os.path.abspath(out_path)
    return merged.report


def merged_adapter(
    config,
    options,
    rank: int | None = None,
    energy: float | None = None,
    run: ValidatedRun | None = None,
) -> MergedAdapter:
    """The merged adapter :func:`merge_to_adapter` writes, computed in memory only (the
    tuner applies it to a loaded base with PEFT). ``run``: the config already validated."""
    return factored_merge(config, options, rank, energy, run).adapter()


@dataclass
class FactoredMerge:
    """A merge's modules cut to low rank before λ, and what turns them into an adapter.

    λ scales the merged delta last, so the adapter at another λ is these factors scaled
    (:meth:`adapter`), bit for bit what a fresh merge at that λ gives — unless some adapter
    saved a weight whole (``saved``: those are written as ``base + λ·ΔW``)."""

    modules: dict[str, LowRankDelta]
    lambdas: dict[str, float]  # module -> the config's λ for it
    layouts: dict[str, str]
    saved: dict[str, torch.Tensor]
    run: ValidatedRun
    dtype: torch.dtype

    def adapter(self, lambda_: float | None = None) -> MergedAdapter:
        """The adapter at the config's λ, or at ``lambda_`` for every module."""
        if lambda_ is not None and self.saved:
            raise ValueError("weights saved whole hold their λ; merge again for another")
        modules = {
            name: delta.scaled(self.lambdas[name] if lambda_ is None else float(lambda_))
            for name, delta in self.modules.items()
        }
        export = lora_export(
            modules,
            base_model_name_or_path=self.run.base_model.model.path,
            base_model_revision=self.run.base_model.model.revision,
            inputs=[adapter.config for adapter in self.run.adapters.values()],
            layouts=self.layouts,
            saved=self.saved,
            dtype=self.dtype,
            base_modules={name.rsplit(".", 1)[0] for name in self.run.checkpoint.stored},
        )
        report = AdapterReport(
            path=None,
            ranks={name: delta.rank for name, delta in modules.items() if delta.rank},
            errors={name: delta.relative_error for name, delta in modules.items() if delta.rank},
        )
        return MergedAdapter(export=export, report=report)


def factored_merge(
    config,
    options,
    rank: int | None = None,
    energy: float | None = None,
    run: ValidatedRun | None = None,
    spaces: SpaceCache | None = None,
) -> FactoredMerge:
    """The config's merge as :class:`FactoredMerge`; ``spaces`` keeps KnOTS spaces for the
    next merge of the same adapters (:class:`~mergekit_corespace.pipeline.SpaceCache`)."""
    _check_method(config)
    run = run if run is not None else validate_run(config, options)
    modules, lambdas, layouts, saved = _merged_modules(config, options, run, rank, energy, spaces)
    return FactoredMerge(modules, lambdas, layouts, saved, run, _dtype(config))


def _check_method(config) -> None:
    if config.merge_method not in METHOD_SPACES:
        raise CoreSpaceError(
            f"merge_method: {config.merge_method!r}; an adapter can only be merged with "
            f"{', '.join(METHOD_SPACES)}"
        )


def _dtype(config) -> torch.dtype:
    from mergekit.common import dtype_from_name

    return dtype_from_name(config.out_dtype or config.dtype) or torch.float32


def merge_devices(options) -> list[str]:
    """Where the adapter output's module merges run: ``options.device``, or with
    ``--multi-gpu`` every GPU torch sees, modules dealt out in turn."""
    device = options.device or "cpu"
    if options.multi_gpu:
        kind = torch.device(device).type if device != "cpu" else "cuda"
        count = getattr(torch, kind).device_count()
        return [f"{kind}:{index}" for index in range(count)] or [device]
    return [device]


def merged_tasks(config, options, run: ValidatedRun, keep, spaces=None):
    """Each weight merge task of the config, in plan order, as ``(task, the weight's name in
    the checkpoint, result)``: for a weight some adapter saved whole, the merged weight (λ
    applied; so is the written one); else ``keep(task, ΔW)`` of its merged delta before λ,
    called where the merge ran (with ``--multi-gpu``, on every GPU torch sees, modules dealt
    out in turn). ``keep`` should move what it keeps to the CPU, so a device holds one
    module's work at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from mergekit_corespace.glue.internals import planned_merge_tasks

    planned = planned_merge_tasks(config, options, run)
    tasks = [task for task in planned if isinstance(task, WeightMergeTask)]
    thresholds = run.thresholds.execute() if run.thresholds is not None else None
    devices = merge_devices(options)

    def merge(index: int):
        task, device, read = tasks[index], devices[index % len(devices)], []
        if task.dense:  # some adapter saved this weight whole: so does the merged one
            base = task.base.execute().to(device)
            delta = task.merged_delta(device, thresholds, base=base, views=read)
            return delta.applied_to(base).cpu(), read
        delta = task.merged_delta(device, thresholds, views=read, scaled=False, spaces=spaces)
        return keep(task, delta), read

    views = []  # adapter file views read so far: their pages are released in batches
    with ThreadPoolExecutor(len(devices)) as pool:
        results = (
            pool.map(merge, range(len(tasks)))
            if len(devices) > 1
            else map(merge, range(len(tasks)))
        )
        bar = tqdm(
            zip(tasks, results), total=len(tasks), desc="Merging adapters", disable=options.quiet
        )
        for index, (task, (result, read)) in enumerate(bar):
            views += read
            if index % _RELEASE_EVERY == _RELEASE_EVERY - 1:
                # one read of /proc/self/maps per batch: per module it would cost more than
                # the merge itself in a process that maps many files (the tuner's)
                release_file_pages(*views)
                views.clear()
            yield task, run.checkpoint.stored_names.get(task.weight_name, task.weight_name), result
    release_file_pages(*views)


def _merged_modules(config, options, run, rank: int | None, energy: float | None, spaces=None):
    """Each merged module's low-rank delta before λ (cut to ``rank`` / ``energy``), its λ
    and layout, and the weights some adapter saved whole, merged whole (λ applied)."""

    def cut(task, delta):
        low = truncate(delta, rank=rank, energy=energy)
        return replace(low, b=low.b.cpu(), a=low.a.cpu())

    modules, lambdas, layouts, saved = {}, {}, {}, {}
    for task, stored, result in merged_tasks(config, options, run, cut, spaces):
        if task.dense:
            saved[stored] = result
            continue
        module = stored.removesuffix(".weight")
        modules[module] = result
        lambdas[module] = task.parameters.lambda_
        first = task.contributions[0][0]
        layouts[module] = (
            "embedding" if first.embedding else "conv1d" if first.transposed else "linear"
        )
        LOG.info(
            "%s: rank %d, relative truncation error %.3e",
            module,
            result.rank,
            result.relative_error,
        )
    return modules, lambdas, layouts, saved


@dataclass
class MergedWeights:
    """A merge before λ, kept to give the merged model's weights at any λ: bit for bit the
    weights ``mergekit-yaml`` writes at that λ, since λ scales the merged delta last."""

    deltas: dict[str, MergedDelta]  # weight name in the checkpoint -> ΔW before λ (CPU)
    lambdas: dict[str, float]  # weight name -> the config's λ for it
    bases: dict[str, Any]  # weight name -> mergekit's load task of the base weight
    saved: dict[str, torch.Tensor]  # weights some adapter saved whole, merged (λ applied)

    def weights(self, lambda_: float | None = None, device: str = "cpu"):
        """``(name, W + λ·ΔW)`` per merged weight, at the config's λ or at ``lambda_``,
        computed one at a time on ``device``."""
        if lambda_ is not None and self.saved:
            raise ValueError("weights saved whole hold their λ; merge again for another")
        for name, delta in self.deltas.items():
            scale = self.lambdas[name] if lambda_ is None else float(lambda_)
            base = self.bases[name].execute().to(device)
            yield name, delta.to(device).scaled(scale).applied_to(base)
        yield from self.saved.items()


def merged_weights(config, options, run: ValidatedRun | None = None, spaces=None) -> MergedWeights:
    """The config's merge as :class:`MergedWeights` (what the tuner scores as a model);
    ``spaces`` as for :func:`factored_merge`."""
    _check_method(config)
    run = run if run is not None else validate_run(config, options)
    deltas, lambdas, bases, saved = {}, {}, {}, {}
    for task, stored, result in merged_tasks(
        config, options, run, lambda task, delta: delta.to("cpu"), spaces
    ):
        if task.dense:
            saved[stored] = result
            continue
        deltas[stored], lambdas[stored], bases[stored] = result, task.parameters.lambda_, task.base
    return MergedWeights(deltas, lambdas, bases, saved)
