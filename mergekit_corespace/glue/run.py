"""One validated run: what it merges, where, and how each weight of the output is planned.

:func:`validate_run` checks the configuration, opens every adapter (headers only) and
reads the base checkpoint's weight names and shapes, all before mergekit plans or writes
anything. The :class:`ValidatedRun` it returns then plans each output weight as the base
weight alone (copied bit for bit) or as a :class:`~mergekit_corespace.glue.tasks.WeightMergeTask`.
Uses mergekit's public model and architecture API (``ModelReference``,
``mergekit.architecture``); what the planner hands over comes through
:mod:`mergekit_corespace.glue.internals`.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from mergekit.architecture import ConfiguredModelArchitecture, arch_info_for_config
from mergekit.common import ModelReference
from mergekit.graph import Task
from safetensors import safe_open
from tqdm import tqdm

from mergekit_corespace.adapters import (
    Contribution,
    DenseWeight,
    LoraAdapter,
    LoraModule,
    match_modules,
)
from mergekit_corespace.errors import CoreSpaceError
from mergekit_corespace.glue.registration import METHOD_SPACES
from mergekit_corespace.glue.tasks import TiesThresholdsTask, WeightMergeTask
from mergekit_corespace.glue.validation import (
    check_device_options,
    check_models,
    check_parameters,
    check_plain_weights,
    check_weights,
    combine_duplicates,
    listed_models,
    weight_parameters,
)
from mergekit_corespace.hub import adapter_directory, base_model_error
from mergekit_corespace.options import MergeParameters, Space
from mergekit_corespace.pipeline import module_seed

LOG = logging.getLogger(__name__)

# (shared parameters, per-adapter parameters) of one weight, as mergekit resolves them
ParameterResolver = Callable[[], tuple[Mapping[str, Any], Mapping[ModelReference, Mapping]]]


# A tensor's safetensors header entry beyond its base weight's name: the key's PEFT prefix
# and suffix, dtype, shape and two 20-digit offsets in JSON.
_HEADER_ENTRY_BYTES = 160


@dataclass
class ValidatedRun:
    """What one validated run knows: its adapters and what each changes in which weight."""

    space: Space
    base_model: ModelReference
    checkpoint: BaseCheckpoint
    adapters: dict[ModelReference, LoraAdapter]  # in the order the config lists them
    # adapter reference -> base weight name -> that adapter's parts of it
    parts: dict[ModelReference, dict[str, tuple[Contribution, ...]]] = field(default_factory=dict)
    thresholds: TiesThresholdsTask | None = None

    def plan_weight(
        self,
        weight_name: str,
        base_load: Task,
        input_names: Mapping[ModelReference, str],
        resolve_parameters: ParameterResolver,
        options,
    ) -> Task:
        """The task that yields output weight ``weight_name``: ``base_load`` itself where no
        adapter changes it, else a merge task on top of it. ``input_names`` gives the name
        of the weight in each input model."""
        edits = [
            (self.parts[model][name], model)
            for model, name in input_names.items()
            if model != self.base_model and name in self.parts[model]
        ]
        if not edits:
            return base_load  # untouched: copied from the base, bit for bit
        shared, per_input = resolve_parameters()
        parameters = weight_parameters(shared, weight_name, self.space)
        weights = tuple(per_input[model]["weight"] for _, model in edits)
        check_weights(parameters, weights, [model for _, model in edits], weight_name)
        thresholds = None
        if parameters.merge == "ties" and parameters.ties_scope == "global":
            thresholds = self._thresholds_task(parameters, list(input_names), options)
        adapter_order = list(self.adapters)
        return WeightMergeTask(
            base=base_load,
            weight_name=weight_name,
            space=self.space,
            contributions=tuple(parts for parts, _ in edits),
            adapter_indices=tuple(adapter_order.index(model) for _, model in edits),
            weights=weights,
            parameters=parameters,
            seed=module_seed(options.random_seed, weight_name),
            thresholds=thresholds,
        )

    def adapter_output_bytes(self, itemsize: int, rank: int | None = None) -> int:
        """At most what a merged adapter takes: per module, rank ≤ Σ rₜ of the adapters on
        it (or ``rank``) times (m + n) entries; weights saved whole at their full size; and
        each tensor's entry in the safetensors header (its key, dtype, shape, offsets)."""
        total = 1 << 12  # adapter_config.json
        for weight_name in dict.fromkeys(name for parts in self.parts.values() for name in parts):
            parts = [p for adapter in self.parts.values() for p in adapter.get(weight_name, ())]
            header = len(weight_name) + _HEADER_ENTRY_BYTES
            if any(isinstance(part, DenseWeight) for part in parts):
                total += math.prod(parts[0].delta_shape) * itemsize + header
                continue
            m, n = parts[0].delta_shape
            bound = min(sum(part.rank for part in parts), m, n, rank or m)
            total += bound * (m + n) * itemsize + 2 * header  # lora_A and lora_B
        return total

    def _thresholds_task(
        self, parameters: MergeParameters, models: list[ModelReference], options
    ) -> TiesThresholdsTask:
        """One first pass for the whole run, over every module any adapter touches, with the
        adapters in the order the merge tasks see them (the bases depend on that order)."""
        if self.thresholds is None:
            adapter_order = list(self.adapters)
            ordered = [model for model in models if model in self.adapters]
            weight_names = dict.fromkeys(name for model in ordered for name in self.parts[model])
            modules = []
            for name in weight_names:
                present = [(m, self.parts[m][name]) for m in ordered if name in self.parts[m]]
                if any(len(parts) > 1 or isinstance(parts[0], DenseWeight) for _, parts in present):
                    raise _no_global_ties(name)
                modules.append(tuple((adapter_order.index(m), parts[0]) for m, parts in present))
            self.thresholds = TiesThresholdsTask(
                space=self.space,
                modules=tuple(modules),
                adapters=len(adapter_order),
                parameters=parameters,
                device=options.device or "cpu",
                quiet=options.quiet,
            )
        elif self.thresholds.parameters != parameters:
            raise CoreSpaceError(
                "parameters: ties_scope: global needs the same merge parameters (density, "
                "precision, …) for every module; remove the per-module filters or use "
                "ties_scope: module"
            )
        return self.thresholds


def validate_run(config, options) -> ValidatedRun:
    """Check the whole config and every adapter before mergekit plans or writes anything."""
    check_device_options(options)
    base_model = check_models(config)
    check_parameters(config)
    combine_duplicates(config)
    check_plain_weights(config)
    adapters = {}
    references = dict.fromkeys(model for model in listed_models(config) if model.lora is not None)
    for model in tqdm(references, desc="Checking adapters", disable=options.quiet):
        directory = adapter_directory(
            model.lora.path, model.lora.revision, cache_dir=options.transformers_cache
        )
        adapters[model] = LoraAdapter.open(directory)
        adapters[model].check_finite()
        named = adapters[model].base_model_name
        if named and _last_part(named) != _last_part(base_model.model.path):
            LOG.warning(
                "%s: base_model_name_or_path is %s, merging it into %s",
                model.lora,
                named,
                base_model.model.path,
            )
    checkpoint = BaseCheckpoint.read(base_model, options)
    run = ValidatedRun(
        space=METHOD_SPACES[config.merge_method],
        base_model=base_model,
        checkpoint=checkpoint,
        adapters=adapters,
    )
    for model, adapter in adapters.items():
        run.parts[model] = {}
        modules, unmatched = match_modules(adapter.modules, checkpoint.names)
        saved, unmatched_saved = match_modules(adapter.dense, checkpoint.names, suffix="")
        if unmatched or unmatched_saved:
            missing = [*unmatched, *unmatched_saved]
            raise CoreSpaceError(
                f"{adapter.weights_file}: changes {missing[0]!r}, which base model "
                f"{base_model.model.path} does not have"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        for module, weight_name in modules.items():
            lora = checkpoint.oriented(adapter.modules[module], weight_name, adapter.config)
            run.parts[model][weight_name] = (lora,)
        for name, weight_name in saved.items():
            dense = adapter.dense[name]
            checkpoint.check_shape(dense.delta_shape, weight_name, f"{dense.file}: {dense.key}")
            run.parts[model][weight_name] = (*run.parts[model].get(weight_name, ()), dense)
    if (config.parameters or {}).get("ties_scope") == "global":  # found before planning
        for parts in run.parts.values():
            for name, contributions in parts.items():
                if any(isinstance(part, DenseWeight) for part in contributions):
                    raise _no_global_ties(name)
    return run


def _no_global_ties(weight_name: str) -> CoreSpaceError:
    return CoreSpaceError(
        "parameters.ties_scope: global is not supported with adapters that save whole "
        f"weights (modules_to_save; {weight_name}); use ties_scope: module"
    )


def _last_part(path: str) -> str:
    return os.path.basename(os.path.normpath(path)).lower()


def every_name(weight) -> tuple[str, ...]:
    """Every name a checkpoint may store ``weight`` under (mergekit's ``WeightInfo``)."""
    return (weight.name, *(weight.aliases or ()), *(weight.tied_names or ()))


@dataclass
class BaseCheckpoint:
    """The base model's weight names (canonical -> all names incl. aliases), the name each
    is stored under, and the stored shapes — read from headers only."""

    reference: ModelReference
    config: Any
    directory: str  # local: the path itself, or the Hub snapshot mergekit resolved
    names: dict[str, tuple[str, ...]]
    stored: frozenset[str]  # every tensor name the checkpoint stores
    stored_names: dict[str, str]  # canonical name -> the name it is stored under
    shapes: dict[str, tuple[int, ...]]  # canonical name -> stored shape (safetensors)
    dtypes: dict[str, str]  # stored name -> safetensors dtype (F32, BF16, ...)
    shard_bytes: int  # the weight files
    other_bytes: int  # config, tokenizer and other files next to them
    _conv1d: set[str] | None = None

    @classmethod
    def read(cls, base_model: ModelReference, options) -> BaseCheckpoint:
        path = base_model.model.path
        if os.path.isabs(path) or path.startswith(".") or os.path.exists(path):
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise CoreSpaceError(
                    f"base_model: {path} is not a model directory (no config.json)"
                )
        try:
            base_config = base_model.config(trust_remote_code=options.trust_remote_code)
            if not getattr(base_config, "architectures", None):
                raise CoreSpaceError(f"base_model: {path}/config.json lists no `architectures`")
            arch_info = arch_info_for_config(base_config)
            index = base_model.tensor_index(cache_dir=options.transformers_cache)
        except CoreSpaceError:
            raise
        except Exception as error:
            raise CoreSpaceError(
                base_model_error(path, base_model.model.revision, options.transformers_cache, error)
            ) from None
        if arch_info is None:
            raise CoreSpaceError(
                f"base_model: {path}: mergekit has no architecture definition for "
                f"{base_config.architectures}, and cannot infer one through LoRA references"
            )
        for shard in index.shards:
            if not os.path.isfile(os.path.join(index.base_path, shard.filename)):
                raise CoreSpaceError(
                    f"{os.path.join(index.base_path, shard.filename)}: missing; the base "
                    f"model's index lists it ({len(shard.contained_keys)} tensors)"
                )
        weights = list(
            ConfiguredModelArchitecture(info=arch_info, config=base_config).all_weights()
        )
        names = {weight.name: (weight.name, *(weight.aliases or ())) for weight in weights}
        stored = frozenset(index.tensor_paths)
        _warn_about_architecture_mismatch(path, base_config, weights, stored)
        headers = _tensor_headers(index) if index.is_safetensors else {}
        stored_names, shapes = {}, {}
        for canonical, known in names.items():
            stored_name = next((name for name in known if name in stored), None)
            if stored_name is None:
                continue
            stored_names[canonical] = stored_name
            if stored_name in headers:
                shapes[canonical] = headers[stored_name][0]
        shard_files = {shard.filename for shard in index.shards}
        other_files = [
            entry
            for entry in os.scandir(index.base_path)
            if entry.is_file() and entry.name not in shard_files
            and not entry.name.endswith(_WEIGHT_SUFFIXES)
        ]  # fmt: skip
        return cls(
            reference=base_model,
            config=base_config,
            directory=index.base_path,
            names=names,
            stored=stored,
            stored_names=stored_names,
            shapes=shapes,
            dtypes={name: kind for name, (_, kind) in headers.items()},
            shard_bytes=sum(
                os.path.getsize(os.path.join(index.base_path, name)) for name in shard_files
            ),
            other_bytes=sum(entry.stat().st_size for entry in other_files),
        )

    def model_output_bytes(self, dtype: torch.dtype | None) -> int:
        """About what a model merge writes: every stored weight mergekit plans, in the output
        ``dtype`` (else its own), plus the base's other files (config, tokenizer)."""
        if not self.dtypes:  # no safetensors headers to read (.bin): the shards' size
            return self.shard_bytes + self.other_bytes
        weights = 0
        for canonical, stored_name in self.stored_names.items():
            kind = self.dtypes[stored_name]
            floating = kind.startswith(("F", "BF"))
            itemsize = dtype.itemsize if dtype is not None and floating else _itemsize(kind)
            weights += math.prod(self.shapes[canonical]) * itemsize
            weights += len(canonical) + _HEADER_BYTES_PER_TENSOR
        return weights + self.other_bytes

    def stores(self, weight) -> bool:
        """Whether the checkpoint stores mergekit's ``WeightInfo`` under any of its names
        (the output stores what the base stores)."""
        return not self.stored.isdisjoint(every_name(weight))

    def check_shape(self, shape: tuple[int, ...], weight_name: str, what: str) -> None:
        expected = self.shapes.get(weight_name)
        if expected is not None and tuple(shape) != expected:
            raise CoreSpaceError(
                f"{what} has shape {tuple(shape)} but base weight {weight_name} is {expected}"
            )

    def oriented(self, lora: LoraModule, weight_name: str, adapter_config) -> LoraModule:
        """``lora`` with ``transposed`` set for Conv1D weights (stored input-major), checked
        against the base weight's shape."""
        expected = self.shapes.get(weight_name)
        if expected is not None and not lora.embedding:
            normal, flipped = lora.delta_shape, lora.delta_shape[::-1]
            square = normal == flipped
            conv1d = (
                (
                    getattr(adapter_config, "fan_in_fan_out", False)
                    and self.stored_names.get(weight_name, weight_name).removesuffix(".weight")
                    in self.conv1d_modules()
                )
                if square
                else flipped == expected
            )
            if conv1d:
                lora = lora.model_copy(update={"transposed": True})
        if expected is not None and lora.delta_shape != expected:
            raise CoreSpaceError(
                f"{lora.file}: {lora.module} gives a {lora.delta_shape} delta (lora_B "
                f"{lora.out_features}×{lora.rank}, lora_A {lora.rank}×{lora.in_features}) "
                f"but base weight {weight_name} is {expected}"
            )
        return lora

    def conv1d_modules(self) -> set[str]:
        """Module names of transformers ``Conv1D`` layers, from the base model on the meta
        device (only built for square weights, whose layout the shape cannot tell)."""
        if self._conv1d is None:
            from mergekit.common import get_auto_cls
            from transformers.pytorch_utils import Conv1D

            with torch.device("meta"):
                model = get_auto_cls(self.config.architectures[0]).from_config(self.config)
            self._conv1d = {name for name, m in model.named_modules() if isinstance(m, Conv1D)}
        return self._conv1d


_HEADER_BYTES_PER_TENSOR = 96  # a safetensors header entry: name, dtype, shape, offsets
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx")


def _tensor_headers(index) -> dict[str, tuple[tuple[int, ...], str]]:
    """Stored name -> (shape, safetensors dtype) of every tensor, from the shard headers."""
    headers = {}
    for shard in index.shards:
        path = os.path.join(index.base_path, shard.filename)
        try:
            with safe_open(path, "pt") as handle:
                for name in handle.keys():
                    tensor = handle.get_slice(name)
                    headers[name] = (tuple(tensor.get_shape()), tensor.get_dtype())
        except Exception as error:
            raise CoreSpaceError(f"{path}: unreadable ({error})") from None
    return headers


def _itemsize(safetensors_dtype: str) -> int:
    """Bytes per element of a safetensors dtype name (F32, BF16, F8_E4M3, BOOL, ...)."""
    bits = re.search(r"\d+", safetensors_dtype)
    return int(bits[0]) // 8 if bits else 1


def _warn_about_architecture_mismatch(path, base_config, weights, stored: frozenset[str]) -> None:
    """mergekit's architecture definitions can lag the checkpoints transformers writes.
    A listed weight the base does not store is left out of the output (stock mergekit
    would stop half-way); a stored tensor no definition lists is left out by mergekit."""
    absent = [w.name for w in weights if not w.optional and stored.isdisjoint(every_name(w))]
    unlisted = sorted(stored - {name for w in weights for name in every_name(w)})
    architecture = base_config.architectures[0]
    if absent:
        LOG.warning(
            "base_model %s: mergekit's %s definition lists %d weights the checkpoint does "
            "not store (first: %s); the output leaves them out, as the base does",
            path, architecture, len(absent), absent[0],
        )  # fmt: skip
    if unlisted:
        LOG.warning(
            "base_model %s: the checkpoint stores %d tensors mergekit's %s definition does "
            "not list (first: %s); mergekit does not copy them to the output",
            path, len(unlisted), architecture, unlisted[0],
        )  # fmt: skip
