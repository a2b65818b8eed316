"""mergekit glue — the only module that touches mergekit internals.

Registers ``core_space`` in mergekit's registry and routes runs of it through a planner
that never materialises a merged model. Internals touched (``INTERNALS``), each checked
by :func:`check_internals` before anything is patched and pinned by
``tests/test_mergekit_internals.py``:

- ``mergekit.merge.run_merge`` — wrapped. A run of one of our methods is validated first
  (before any output exists), written to a staging directory that replaces ``out_path``
  only when complete, and marked active for the two hooks below.
- ``mergekit.io.tasks.LoaderCache.get`` — during an active run a ``base+adapter``
  reference resolves to the base model's own loader, instead of
  ``ModelReference.merged()``, which would write a merged model per adapter to
  ``--lora-merge-cache``.
- ``mergekit.plan.MergePlanner.plan_tensor`` — during an active run each weight is
  planned as the base weight (read once, by mergekit's ``LoadTensor``) plus, where
  adapters touch it, a :class:`CoreSpaceMergeTask` that reads only that module's LoRA
  factors; the result is appended to ``MergePlanner._tensors`` (which
  ``MergePlanner.plan_to_disk`` turns into save tasks). Optional weights with
  ``aliases`` are looked up with ``tuple`` aliases here, which also sidesteps
  mergekit 0.1.5's ``list + tuple`` TypeError on BERT-family models.
- ``mergekit.plan.MergePlanner.__init__`` and ``MergePlanner._plan`` — the merged-adapter
  output (:func:`merge_to_adapter`) plans like a model merge and takes the planned merge
  tasks from ``MergePlanner._tensors``.
- ``mergekit.io.tasks.LoadTensor`` — built by our planner for the base weights.

Other merge methods never see any of this: every hook defers to mergekit unless a
core-space run is active.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import inspect
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from mergekit.architecture import (
    ConfiguredModelArchitecture,
    arch_info_for_config,
    get_architecture_info,
)
from mergekit.common import ModelReference
from mergekit.graph import Task
from mergekit.io.tasks import LoaderCache, LoadTensor
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)
from pydantic import TypeAdapter, ValidationError
from safetensors import safe_open

from mergekit_corespace.adapters import (
    Contribution,
    DenseWeight,
    LoraAdapter,
    LoraModule,
    match_modules,
)
from mergekit_corespace.errors import CoreSpaceError
from mergekit_corespace.memory import release_file_pages
from mergekit_corespace.options import (
    PER_ADAPTER_DEFAULTS,
    POSITIVE_WEIGHTS,
    MergeParameters,
    Space,
)
from mergekit_corespace.pipeline import (
    global_ties_thresholds,
    merge_factors,
    module_seed,
    read_inputs,
)
from mergekit_corespace.spaces import MergedDelta, truncate

LOG = logging.getLogger(__name__)

SUPPORTED_MERGEKIT = ">=0.1.5,<0.2"
INTERNALS = (
    "mergekit.merge.run_merge",  # wrapped
    "mergekit.io.tasks.LoaderCache.get",  # wrapped
    "mergekit.plan.MergePlanner.plan_tensor",  # wrapped; appends to MergePlanner._tensors
    "mergekit.plan.MergePlanner.plan_to_disk",  # turns MergePlanner._tensors into SaveTensor tasks
    "mergekit.io.tasks.LoadTensor",  # built by our planner for base weights
    "mergekit.plan.MergePlanner.__init__",  # merge_to_adapter plans like a model merge ...
    "mergekit.plan.MergePlanner._plan",  # ... and reads the planned tasks from _tensors
)
# merge_method name -> space the inner method runs in
METHOD_SPACES: dict[str, Space] = {"core_space": "core", "knots": "knots", "full_space": "full"}
_PAPERS = {
    "core": ("Core Space", "https://arxiv.org/abs/2509.17786"),
    "knots": ("KnOTS", "https://arxiv.org/abs/2410.19735"),
    "full": ("Full space", None),
}


# ---------------------------------------------------------------------------------------
# Registration


class CoreSpaceMethod(GroupMergeMethod):
    """Registry entry: the name, the parameters and the input contract mergekit checks.

    One entry per space (``core_space``, ``knots``, ``full_space``). The merge itself runs
    in :class:`CoreSpaceMergeTask`, planned by the hooks below, because it needs each
    adapter's LoRA factors, not merged dense weights.
    """

    def __init__(self, name: str, space: Space):
        self.space = space
        # Defaults stay None here so that the planner can tell what the user set;
        # MergeParameters fills in the real defaults.
        shared = [
            ParameterSpec(
                name=field_info.alias or name_,
                value_type=field_info.annotation | None,
                scope=ParameterScope.SHARED,
                default=None,
                description=field_info.description,
            )
            for name_, field_info in MergeParameters.model_fields.items()
        ]
        per_adapter = [
            ParameterSpec(name=name_, value_type=float, scope=ParameterScope.INPUT, default=value)
            for name_, value in PER_ADAPTER_DEFAULTS.items()
        ]
        self.spec = MergeMethodSpec(
            name=name,
            pretty_name=_PAPERS[space][0],
            reference_url=_PAPERS[space][1],
            parameters=tuple(shared + per_adapter),
            contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
        )

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        raise CoreSpaceError(
            f"{self.spec.name} merges LoRA adapters, not dense tensors: run it through "
            "`mergekit-yaml` (or `mergekit-corespace`) with `base+adapter` models"
        )


METHODS = tuple(CoreSpaceMethod(name, space) for name, space in METHOD_SPACES.items())


def register_methods(merge_methods_module=None) -> None:
    """Add our methods to mergekit's registry (idempotent; the argument is the module the
    import hook just executed, unused here)."""
    known = {method.spec.name for method in registry.registered_methods()}
    for method in METHODS:
        if method.spec.name not in known:
            registry.register(method)


# ---------------------------------------------------------------------------------------
# Internals: checked, then patched


def check_internals(merge_module) -> None:
    """Refuse to patch a mergekit whose version or internals we have not checked."""
    from importlib.metadata import version

    from mergekit.plan import MergePlanner
    from packaging.specifiers import SpecifierSet

    run_merge = merge_module.run_merge
    found = version("mergekit")
    if found not in SpecifierSet(SUPPORTED_MERGEKIT):
        raise RuntimeError(f"mergekit {found} is not supported (need {SUPPORTED_MERGEKIT})")
    expected = {
        run_merge: ["merge_config", "out_path", "options", "config_source"],
        LoaderCache.get: ["self", "model"],
        MergePlanner.plan_tensor: ["self", "weight", "weights_in", "models", "cfg_reader"],
        MergePlanner.__init__: ["self", "config", "arch_info", "options", "out_model_config"],
        MergePlanner._plan: ["self"],
    }
    for function, parameters in expected.items():
        function = inspect.unwrap(function)
        if list(inspect.signature(function).parameters) != parameters:
            raise RuntimeError(f"mergekit internal {function.__qualname__} changed signature")
    if "_tensors" not in MergePlanner.__annotations__:
        raise RuntimeError("mergekit internal MergePlanner._tensors is gone")


def patch_merge_pipeline(merge_module=None) -> None:
    """Install the three hooks once, on the executed ``mergekit.merge`` module."""
    from mergekit.plan import MergePlanner

    if merge_module is None:
        merge_module = importlib.import_module("mergekit.merge")
    register_methods()
    if getattr(merge_module.run_merge, "__corespace__", False):
        return
    check_internals(merge_module)

    original_run_merge = merge_module.run_merge
    original_get = LoaderCache.get
    original_plan_tensor = MergePlanner.plan_tensor

    @functools.wraps(original_run_merge)
    def run_merge(merge_config, out_path, options, config_source=None):
        if merge_config.merge_method not in METHOD_SPACES:
            return original_run_merge(merge_config, out_path, options, config_source=config_source)
        run = prepare_run(merge_config, options)
        token = _ACTIVE_RUN.set(run)
        try:
            with staged_output(out_path) as staging:
                original_run_merge(merge_config, staging, options, config_source=config_source)
        finally:
            _ACTIVE_RUN.reset(token)

    @functools.wraps(original_get)
    def get(self, model: ModelReference):
        if model.lora is not None and _ACTIVE_RUN.get() is not None:
            return original_get(self, model.model_copy(update={"lora": None}))
        return original_get(self, model)

    @functools.wraps(original_plan_tensor)
    def plan_tensor(self, weight, weights_in, models, cfg_reader):
        run = _ACTIVE_RUN.get()
        if run is None or self._method.spec.name not in METHOD_SPACES:
            return original_plan_tensor(self, weight, weights_in, models, cfg_reader)
        task = run.plan_tensor(self, weight, weights_in, models, cfg_reader)
        if task is not None:
            self._tensors.append((weight, task))

    run_merge.__corespace__ = True
    merge_module.run_merge = run_merge
    LoaderCache.get = get
    MergePlanner.plan_tensor = plan_tensor


def install() -> None:
    """Explicit registration, for environments that skip ``.pth`` files."""
    patch_merge_pipeline()


# ---------------------------------------------------------------------------------------
# One run: validation before any output, then planning


_ACTIVE_RUN: contextvars.ContextVar[CoreSpaceRun | None] = contextvars.ContextVar(
    "mergekit_corespace_active_run", default=None
)


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

    def duplicate_per_gpu(self) -> bool:
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


class CoreSpaceMergeTask(Task[torch.Tensor]):
    """``W + ΔW`` for one weight: the base tensor comes from mergekit, each adapter's part
    of this module (its LoRA factors, or a saved whole weight) is read here, merged in
    ``space``, and added in one step."""

    base: LoadTensor
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
        delta = self.merged_delta(base.device, thresholds, base=base)
        merged = delta.applied_to(base)
        release_file_pages(base)  # read once; its mapped pages need not stay resident
        return merged

    def merged_delta(
        self, device, thresholds: tuple | None = None, base: torch.Tensor | None = None
    ) -> MergedDelta:
        """This weight's merged ΔW, factored where the space allows. ``base`` is only read
        for weights some adapter saved whole (their delta is saved − base)."""
        inputs = read_inputs(self.contributions, self.parameters, device=device, base=base)
        return merge_factors(
            inputs,
            self.weights,
            self.parameters,
            self.space,
            seed=self.seed,
            thresholds=None
            if thresholds is None
            else [thresholds[i] for i in self.adapter_indices],
        )


@dataclass
class CoreSpaceRun:
    """What one validated run knows: its adapters and what each changes in which weight."""

    space: Space
    base_model: ModelReference
    adapters: dict[ModelReference, LoraAdapter]  # in the order the config lists them
    # adapter reference -> base weight name -> that adapter's parts of it
    parts: dict[ModelReference, dict[str, tuple[Contribution, ...]]] = field(default_factory=dict)
    # base weight name -> the name it is stored under in the base checkpoint
    stored_names: dict[str, str] = field(default_factory=dict)
    thresholds: TiesThresholdsTask | None = None

    def plan_tensor(self, planner, weight, weights_in, models, cfg_reader) -> Task | None:
        from mergekit.parameter_resolver import resolve_parameters

        base_model = cfg_reader.base_model
        base_in = weights_in[models.index(base_model)]
        index = LoaderCache().get(base_model).index
        if not any(name in index.tensor_paths for name in _every_name(base_in)):
            return None  # the output stores what the base stores (see _BaseModel.read)
        load = LoadTensor(
            model=base_model,
            tensor=base_in.name,
            dtype=base_in.force_dtype or planner.config.dtype,
            device=planner.options.device if planner.options.read_to_gpu else None,
            optional=base_in.optional,
            aliases=base_in.aliases,
            tied_names=base_in.tied_names,
        )
        edits = [
            (self.parts[model][w_in.name], model)
            for model, w_in in zip(models, weights_in)
            if model != base_model and w_in.name in self.parts[model]
        ]
        if not edits:
            return load  # untouched: copied from the base, bit for bit
        shared, per_input = resolve_parameters(
            planner._method.spec,
            tensor_name=weight.name,
            inputs={model: w_in.name for model, w_in in zip(models, weights_in)},
            sources=cfg_reader.parameter_sources,
            base_model=base_model,
            t=cfg_reader.t,
        )
        parameters = self._validated(shared, weight.name)
        weights = tuple(per_input[model]["weight"] for _, model in edits)
        _check_weights(parameters, weights, [model for _, model in edits], weight.name)
        thresholds = None
        if parameters.merge == "ties" and parameters.ties_scope == "global":
            thresholds = self._thresholds_task(parameters, models, planner.options)
        adapter_order = list(self.adapters)
        return CoreSpaceMergeTask(
            base=load,
            weight_name=weight.name,
            space=self.space,
            contributions=tuple(parts for parts, _ in edits),
            adapter_indices=tuple(adapter_order.index(model) for _, model in edits),
            weights=weights,
            parameters=parameters,
            seed=module_seed(planner.options.random_seed, weight.name),
            thresholds=thresholds,
        )

    def _validated(self, shared: Mapping[str, Any], weight_name: str) -> MergeParameters:
        given = {name: value for name, value in shared.items() if value is not None}
        try:
            parameters = MergeParameters.model_validate(given)
        except ValidationError as error:
            raise CoreSpaceError(f"parameters for {weight_name}: {_first_error(error)}") from None
        if "knots_scale_tasks" in given and self.space != "knots":
            raise CoreSpaceError("parameters.knots_scale_tasks: only read by merge_method: knots")
        return parameters

    def _thresholds_task(self, parameters, models, options) -> TiesThresholdsTask:
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
                    raise CoreSpaceError(
                        f"parameters.ties_scope: global is not supported with adapters that "
                        f"save whole weights (modules_to_save; {name}); use ties_scope: module"
                    )
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


def _check_weights(parameters, weights, models, weight_name: str) -> None:
    if parameters.merge == "mean" and sum(weights) == 0:
        raise CoreSpaceError(
            f"models: the weights of the adapters on {weight_name} sum to 0; merge: mean "
            "divides by that sum"
        )
    if parameters.merge in POSITIVE_WEIGHTS:
        for model, weight in zip(models, weights):
            if weight <= 0:
                raise CoreSpaceError(
                    f"models: {model} has weight {weight}; merge: {parameters.merge} takes "
                    "weighted means and needs positive weights (ta, mean and dare accept any)"
                )


def prepare_run(config, options) -> CoreSpaceRun:
    """Check the whole config and every adapter before mergekit plans or writes anything."""
    base_model = _check_models(config)
    _check_parameters(config)
    _combine_duplicates(config)
    adapters = {}
    for model in _listed_models(config):
        if model.lora is not None and model not in adapters:
            adapters[model] = LoraAdapter.open(model.lora.path)
            named = adapters[model].base_model_name
            if named and _last_part(named) != _last_part(base_model.model.path):
                LOG.warning(
                    "%s: base_model_name_or_path is %s, merging it into %s",
                    model.lora.path,
                    named,
                    base_model.model.path,
                )
    run = CoreSpaceRun(
        space=METHOD_SPACES[config.merge_method], base_model=base_model, adapters=adapters
    )
    base = _BaseModel.read(config, options, base_model)
    run.stored_names = base.stored_names
    for model, adapter in adapters.items():
        run.parts[model] = {}
        modules, unmatched = match_modules(adapter.modules, base.names)
        saved, unmatched_saved = match_modules(adapter.dense, base.names, suffix="")
        if unmatched or unmatched_saved:
            missing = [*unmatched, *unmatched_saved]
            raise CoreSpaceError(
                f"{adapter.weights_file}: changes {missing[0]!r}, which base model "
                f"{base_model.model.path} does not have"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        for module, weight_name in modules.items():
            lora = base.oriented(adapter.modules[module], weight_name, adapter.config)
            run.parts[model][weight_name] = (lora,)
        for name, weight_name in saved.items():
            dense = adapter.dense[name]
            base.check_shape(dense.delta_shape, weight_name, f"{dense.file}: {dense.key}")
            run.parts[model][weight_name] = (*run.parts[model].get(weight_name, ()), dense)
    return run


def _every_name(weight) -> tuple[str, ...]:
    """Every name a checkpoint may store ``weight`` under (mergekit's ``WeightInfo``)."""
    return (weight.name, *(weight.aliases or ()), *(weight.tied_names or ()))


def _warn_about_architecture_mismatch(path, base_config, weights, stored: set[str]) -> None:
    """mergekit's architecture definitions can lag the checkpoints transformers writes.
    A listed weight the base does not store is left out of the output (stock mergekit
    would stop half-way); a stored tensor no definition lists is left out by mergekit."""
    absent = [w.name for w in weights if not w.optional and stored.isdisjoint(_every_name(w))]
    unlisted = sorted(stored - {name for w in weights for name in _every_name(w)})
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


@dataclass
class _BaseModel:
    """The base model's weight names (canonical -> all names incl. aliases), the name each
    is stored under, and the stored shapes — read from headers only."""

    reference: ModelReference
    config: Any
    names: dict[str, tuple[str, ...]]
    stored_names: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    _conv1d: set[str] | None = None

    @classmethod
    def read(cls, config, options, base_model: ModelReference) -> _BaseModel:
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
            raise CoreSpaceError(f"base_model: {path}: {error}") from None
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
        _warn_about_architecture_mismatch(path, base_config, weights, set(index.tensor_paths))
        stored_names, shapes = {}, {}
        for canonical, known in names.items():
            stored = next((name for name in known if name in index.tensor_paths), None)
            if stored is None:
                continue
            stored_names[canonical] = stored
            if index.is_safetensors:
                shard = os.path.join(index.base_path, index.tensor_paths[stored])
                try:
                    with safe_open(shard, "pt") as handle:
                        shapes[canonical] = tuple(handle.get_slice(stored).get_shape())
                except Exception as error:
                    raise CoreSpaceError(f"{shard}: unreadable ({error})") from None
        return cls(base_model, base_config, names, stored_names, shapes)

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


def _combine_duplicates(config) -> None:
    """An adapter listed twice under ``models:`` is merged once, with its weights added."""
    combined = {}
    for entry in config.models or ():
        if entry.model not in combined:
            combined[entry.model] = entry
            continue
        first = combined[entry.model]
        default = (config.parameters or {}).get("weight", 1.0)
        weights = [(e.parameters or {}).get("weight", default) for e in (first, entry)]
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
            raise CoreSpaceError(
                f"models: {entry.model} is listed twice with per-layer or filtered weights; "
                "list it once"
            )
        LOG.warning("%s is listed twice: merged once with weight %s", entry.model, sum(weights))
        first.parameters = {**(first.parameters or {}), "weight": float(sum(weights))}
    if config.models:
        config.models = list(combined.values())


def _last_part(path: str) -> str:
    return os.path.basename(os.path.normpath(path)).lower()


def _check_models(config) -> ModelReference:
    base_model = config.base_model
    method = config.merge_method
    if base_model is None:
        raise CoreSpaceError(
            f"{method}: `base_model` is required (the model the LoRAs were trained on)"
        )
    if base_model.lora is not None:
        raise CoreSpaceError(f"base_model: {base_model} must be a plain model, not base+adapter")
    if config.tokenizer is not None or config.tokenizer_source is not None:
        raise CoreSpaceError(
            f"{method}: `tokenizer`/`tokenizer_source` are not supported; adapters share the "
            "base model's tokenizer, which is copied to the output"
        )
    adapters = 0
    for model in dict.fromkeys(_listed_models(config)):
        if model == base_model:
            continue
        if model.lora is None:
            raise CoreSpaceError(
                f"models: {model} is not a LoRA adapter; {method} merges `base+adapter` "
                f"references of base_model {base_model}"
            )
        if model.model != base_model.model:
            raise CoreSpaceError(
                f"models: {model} applies an adapter to {model.model}, but base_model is "
                f"{base_model.model}; write it as {base_model.model}+{model.lora}"
            )
        adapters += 1
    if adapters == 0:
        raise CoreSpaceError(f"models: {method} needs at least one `base+adapter` model")
    return base_model


def _listed_models(config) -> Iterator[ModelReference]:
    """Every input model reference, in the order the config lists them."""
    for model in config.models or ():
        yield model.model
    for slice_ in config.slices or ():
        yield from (source.model for source in slice_.sources)
    for module in (config.modules or {}).values():
        yield from (model.model for model in module.models or ())
        for slice_ in module.slices or ():
            yield from (source.model for source in slice_.sources)


def _check_parameters(config) -> None:
    """Unknown or ill-typed parameters are errors that name the field, at every level."""
    shared = {
        (field_info.alias or name): TypeAdapter(field_info.annotation)
        for name, field_info in MergeParameters.model_fields.items()
    }
    per_adapter = {name: TypeAdapter(float) for name in PER_ADAPTER_DEFAULTS}
    for where, settings, of_one_adapter in _parameter_blocks(config):
        allowed = per_adapter if of_one_adapter else {**shared, **per_adapter}
        for name, setting in (settings or {}).items():
            if name not in allowed:
                hint = (
                    f"`{name}` applies to the whole merge; put it under the top-level `parameters`"
                    if name in shared
                    else f"known: {', '.join(sorted(allowed))}"
                )
                raise CoreSpaceError(
                    f"{where}.{name}: unknown parameter for {config.merge_method} ({hint})"
                )
            for value in _leaf_values(setting):
                try:
                    allowed[name].validate_python(value)
                except ValidationError as error:
                    raise CoreSpaceError(f"{where}.{name}: {_first_error(error)}") from None
    top = {k: v for k, v in (config.parameters or {}).items() if k in shared}
    if all(isinstance(v, (str, int, float, bool)) for v in top.values()):
        try:  # combinations, e.g. a parameter the chosen method does not read
            MergeParameters.model_validate(top)
        except ValidationError as error:
            raise CoreSpaceError(f"parameters: {_first_error(error)}") from None


def _parameter_blocks(config) -> Iterator[tuple[str, Mapping | None, bool]]:
    """(where, settings, whether they belong to one adapter) for every `parameters:` block."""
    yield "parameters", config.parameters, False
    for i, model in enumerate(config.models or ()):
        yield f"models[{i}].parameters", model.parameters, True
    for i, slice_ in enumerate(config.slices or ()):
        yield f"slices[{i}].parameters", slice_.parameters, False
        for j, source in enumerate(slice_.sources):
            yield f"slices[{i}].sources[{j}].parameters", source.parameters, True
    for name, module in (config.modules or {}).items():
        yield f"modules.{name}.parameters", module.parameters, False
        for i, model in enumerate(module.models or ()):
            yield f"modules.{name}.models[{i}].parameters", model.parameters, True


def _leaf_values(setting) -> Iterator[Any]:
    """The scalar values inside a mergekit setting (scalar, gradient list, conditionals)."""
    if isinstance(setting, list):
        for item in setting:
            yield from _leaf_values(item)
    elif hasattr(setting, "value"):  # ConditionalParameter
        yield from _leaf_values(setting.value)
    else:
        yield setting


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error":  # a whole-model check: the input is the whole dict
        return message
    return f"{where + ': ' if where else ''}{message} (got {first.get('input')!r})"


# ---------------------------------------------------------------------------------------
# Merged adapter output


@dataclass
class AdapterReport:
    """What :func:`merge_to_adapter` wrote: per module, its rank and truncation error."""

    path: str
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


def merge_to_adapter(
    config, out_path: str, options, rank: int | None = None, energy: float | None = None
) -> AdapterReport:
    """Merge the config's adapters into one PEFT LoRA adapter at ``out_path``.

    Planned by mergekit's ``MergePlanner`` like a model merge (so filters, gradients,
    seeds and ``ties_scope: global`` resolve identically), but only the merge tasks run,
    without the base weights: each module's merged delta is cut to ``rank`` or ``energy``
    (default: every non-null direction, i.e. exact) from its factored form.
    """
    from mergekit.common import dtype_from_name
    from mergekit.plan import MergePlanner
    from tqdm import tqdm

    from mergekit_corespace.lora_export import write_lora_adapter

    if config.merge_method not in METHOD_SPACES:
        raise CoreSpaceError(
            f"merge_method: {config.merge_method!r}; an adapter can only be merged with "
            f"{', '.join(METHOD_SPACES)}"
        )
    run = prepare_run(config, options)
    LoaderCache().setup(options)
    token = _ACTIVE_RUN.set(run)
    try:
        planner = MergePlanner(
            config,
            get_architecture_info(config, options),
            options=options,
            out_model_config=run.base_model.config(trust_remote_code=options.trust_remote_code),
        )
        planner._plan()  # plan_in_memory would wrap tasks in ReturnTensor, which rejects ours
        planned = [task for _, task in planner._tensors]
    finally:
        _ACTIVE_RUN.reset(token)
    tasks = [task for task in planned if isinstance(task, CoreSpaceMergeTask)]
    thresholds = run.thresholds.execute() if run.thresholds is not None else None
    device = options.device or "cpu"
    modules, layouts, saved = {}, {}, {}
    for task in tqdm(tasks, desc="Merging adapters", disable=options.quiet):
        stored = run.stored_names.get(task.weight_name, task.weight_name)
        if task.dense:  # some adapter saved this weight whole: so does the merged one
            base = task.base.execute().to(device)
            delta = task.merged_delta(device, thresholds, base=base)
            saved[stored] = delta.applied_to(base)
            continue
        module = stored.removesuffix(".weight")
        modules[module] = truncate(task.merged_delta(device, thresholds), rank=rank, energy=energy)
        first = task.contributions[0][0]
        layouts[module] = (
            "embedding" if first.embedding else "conv1d" if first.transposed else "linear"
        )
        LOG.info(
            "%s: rank %d, relative truncation error %.3e",
            module,
            modules[module].rank,
            modules[module].relative_error,
        )
    dtype = dtype_from_name(config.out_dtype or config.dtype) or torch.float32
    with staged_output(out_path) as staging:
        os.makedirs(staging)
        write_lora_adapter(
            staging,
            modules,
            base_model_name_or_path=run.base_model.model.path,
            inputs=[adapter.config for adapter in run.adapters.values()],
            layouts=layouts,
            saved=saved,
            dtype=dtype,
        )
    return AdapterReport(
        path=os.path.abspath(out_path),
        ranks={name: delta.rank for name, delta in modules.items() if delta.rank},
        errors={name: delta.relative_error for name, delta in modules.items() if delta.rank},
    )


# ---------------------------------------------------------------------------------------
# Output written in full, or not at all


@contextlib.contextmanager
def staged_output(out_path: str) -> Iterator[str]:
    """Yield a staging directory next to ``out_path``; move it into place only on success.

    On any exception (KeyboardInterrupt included) the staging directory is removed and an
    existing ``out_path`` is left untouched. On success an existing ``out_path`` is
    replaced — but only if it is empty or holds a model or adapter, never another folder.
    """
    out_path = os.path.abspath(out_path)
    if os.path.isdir(out_path) and os.listdir(out_path):
        if not any(
            os.path.exists(os.path.join(out_path, marker))
            for marker in ("config.json", "adapter_config.json")
        ):
            raise CoreSpaceError(
                f"{out_path}: exists, is not empty and holds no model; refusing to replace it"
            )
    elif os.path.exists(out_path) and not os.path.isdir(out_path):
        raise CoreSpaceError(f"{out_path}: exists and is not a directory")
    parent = os.path.dirname(out_path)
    os.makedirs(parent, exist_ok=True)
    holder = tempfile.mkdtemp(prefix=f".{os.path.basename(out_path)}.partial-", dir=parent)
    staging = os.path.join(holder, os.path.basename(out_path))
    try:
        yield staging
        if not os.path.isdir(staging):
            raise CoreSpaceError(f"{out_path}: the merge wrote nothing")
        if os.path.exists(out_path):
            previous = os.path.join(holder, "previous")
            os.rename(out_path, previous)
        os.rename(staging, out_path)
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def _attach_to_loaded_mergekit() -> None:
    """Imported directly (not from the hook): attach to what mergekit has loaded so far."""
    import sys

    from mergekit_corespace._hook import _is_initializing

    register_methods()
    if "mergekit.merge" in sys.modules and not _is_initializing("mergekit.merge"):
        patch_merge_pipeline(sys.modules["mergekit.merge"])


_attach_to_loaded_mergekit()
