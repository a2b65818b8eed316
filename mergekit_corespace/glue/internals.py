"""The only file that touches mergekit internals: each one named in ``INTERNALS``, checked
by :func:`check_internals` before anything is patched, and fingerprinted by
``tests/test_mergekit_internals.py``.

- ``mergekit.merge.run_merge`` — wrapped. A run of one of our methods claims ``out_path``
  (:mod:`~mergekit_corespace.glue.staging`), is validated before any output exists,
  written to a staging directory that replaces ``out_path`` only when complete, and
  marked active for the hooks below.
- ``mergekit.io.tasks.LoaderCache.get`` — during an active run a ``base+adapter``
  reference resolves to the base model's own loader, instead of
  ``ModelReference.merged()``, which would write a merged model per adapter to
  ``--lora-merge-cache``. ``LoaderCache.setup`` configures it for adapter output.
- ``mergekit.plan.MergePlanner.plan_tensor`` — during an active run each weight is
  planned by the run (:meth:`~mergekit_corespace.glue.run.ValidatedRun.plan_weight`) on
  top of a ``mergekit.io.tasks.LoadTensor`` of the base weight, with parameters from
  ``mergekit.parameter_resolver.resolve_parameters``; the result is appended to
  ``MergePlanner._tensors`` (which ``MergePlanner.plan_to_disk`` turns into save tasks).
  Optional weights with ``aliases`` keep ``tuple`` aliases here, which also sidesteps
  mergekit 0.1.5's ``list + tuple`` TypeError on BERT-family models.
- ``mergekit.plan.MergePlanner.__init__`` and ``MergePlanner._plan`` — the merged-adapter
  output plans like a model merge and takes the planned tasks from ``_tensors``.

Other merge methods never see any of this: every hook defers to mergekit unless a run of
ours is active.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import inspect
import sys
from collections.abc import Iterator

from mergekit.architecture import get_architecture_info
from mergekit.common import ModelReference, dtype_from_name
from mergekit.graph import Task
from mergekit.io.tasks import LoaderCache, LoadTensor

from mergekit_corespace.glue.registration import METHOD_SPACES, register_methods
from mergekit_corespace.glue.run import ValidatedRun, validate_run
from mergekit_corespace.glue.staging import claimed_output

SUPPORTED_MERGEKIT = ">=0.1.5,<0.2"
INTERNALS = (
    "mergekit.merge.run_merge",  # wrapped
    "mergekit.io.tasks.LoaderCache.get",  # wrapped
    "mergekit.io.tasks.LoaderCache.setup",  # called before planning an adapter output
    "mergekit.plan.MergePlanner.plan_tensor",  # wrapped; appends to MergePlanner._tensors
    "mergekit.plan.MergePlanner.plan_to_disk",  # turns MergePlanner._tensors into SaveTensor tasks
    "mergekit.io.tasks.LoadTensor",  # built for base weights
    "mergekit.parameter_resolver.resolve_parameters",  # per-weight parameters
    "mergekit.plan.MergePlanner.__init__",  # adapter output plans like a model merge ...
    "mergekit.plan.MergePlanner._plan",  # ... and reads the planned tasks from _tensors
)

_ACTIVE_RUN: contextvars.ContextVar[ValidatedRun | None] = contextvars.ContextVar(
    "mergekit_corespace_active_run", default=None
)


def check_internals(merge_module) -> None:
    """Refuse to patch a mergekit whose version or internals we have not checked."""
    from importlib.metadata import version

    from mergekit.parameter_resolver import resolve_parameters
    from mergekit.plan import MergePlanner
    from packaging.specifiers import SpecifierSet

    found = version("mergekit")
    if found not in SpecifierSet(SUPPORTED_MERGEKIT):
        raise RuntimeError(f"mergekit {found} is not supported (need {SUPPORTED_MERGEKIT})")
    expected = {
        merge_module.run_merge: ["merge_config", "out_path", "options", "config_source"],
        LoaderCache.get: ["self", "model"],
        LoaderCache.setup: ["self", "options"],
        MergePlanner.plan_tensor: ["self", "weight", "weights_in", "models", "cfg_reader"],
        MergePlanner.__init__: ["self", "config", "arch_info", "options", "out_model_config"],
        MergePlanner._plan: ["self"],
        resolve_parameters: ["spec", "tensor_name", "inputs", "sources", "base_model", "t"],
    }
    for function, parameters in expected.items():
        function = inspect.unwrap(function)
        if list(inspect.signature(function).parameters) != parameters:
            raise RuntimeError(f"mergekit internal {function.__qualname__} changed signature")
    if "_tensors" not in MergePlanner.__annotations__:
        raise RuntimeError("mergekit internal MergePlanner._tensors is gone")


@contextlib.contextmanager
def active(run: ValidatedRun) -> Iterator[None]:
    """Route mergekit's loading and planning through ``run`` inside the block."""
    token = _ACTIVE_RUN.set(run)
    try:
        yield
    finally:
        _ACTIVE_RUN.reset(token)


def _planned_weight(run: ValidatedRun, planner, weight, weights_in, models, cfg_reader):
    """Hand one weight of mergekit's plan to the run, in the run's terms."""
    from mergekit.parameter_resolver import resolve_parameters

    base_model = cfg_reader.base_model
    base_in = weights_in[models.index(base_model)]
    if not run.checkpoint.stores(base_in):
        return None  # the output stores what the base stores
    load = LoadTensor(
        model=base_model,
        tensor=base_in.name,
        dtype=base_in.force_dtype or planner.config.dtype,
        device=planner.options.device if planner.options.read_to_gpu else None,
        optional=base_in.optional,
        aliases=base_in.aliases,
        tied_names=base_in.tied_names,
    )
    input_names = {model: w_in.name for model, w_in in zip(models, weights_in)}
    return run.plan_weight(
        weight.name,
        load,
        input_names,
        lambda: resolve_parameters(
            planner._method.spec,
            tensor_name=weight.name,
            inputs=input_names,
            sources=cfg_reader.parameter_sources,
            base_model=base_model,
            t=cfg_reader.t,
        ),
        planner.options,
    )


def planned_merge_tasks(config, options, run: ValidatedRun) -> list[Task]:
    """Plan ``config`` with mergekit's ``MergePlanner`` and return the planned task of each
    output weight, without scheduling any writes."""
    from mergekit.plan import MergePlanner

    LoaderCache().setup(options)
    with active(run):
        planner = MergePlanner(
            config,
            get_architecture_info(config, options),
            options=options,
            out_model_config=run.base_model.config(trust_remote_code=options.trust_remote_code),
        )
        planner._plan()  # plan_in_memory would wrap tasks in ReturnTensor, which rejects ours
        return [task for _, task in planner._tensors]


def patch_merge_pipeline(merge_module=None) -> None:
    """Install the hooks once, on the executed ``mergekit.merge`` module."""
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
        with claimed_output(out_path) as output:
            run = validate_run(merge_config, options)
            dtype = dtype_from_name(merge_config.out_dtype or merge_config.dtype)
            output.check_free_space(run.checkpoint.model_output_bytes(dtype))
            with active(run), output.staging() as staging:
                original_run_merge(merge_config, staging, options, config_source=config_source)

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
        task = _planned_weight(run, self, weight, weights_in, models, cfg_reader)
        if task is not None:
            self._tensors.append((weight, task))

    run_merge.__corespace__ = True
    merge_module.run_merge = run_merge
    LoaderCache.get = get
    MergePlanner.plan_tensor = plan_tensor


def install() -> None:
    """Explicit registration, for environments that skip ``.pth`` files."""
    patch_merge_pipeline()


def _attach_to_loaded_mergekit() -> None:
    """Imported directly (not from the hook): attach to what mergekit has loaded so far."""
    from mergekit_corespace._hook import _is_initializing

    if "mergekit.merge" in sys.modules and not _is_initializing("mergekit.merge"):
        patch_merge_pipeline(sys.modules["mergekit.merge"])


_attach_to_loaded_mergekit()
