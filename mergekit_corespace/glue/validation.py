"""Checks of a whole merge configuration, raised before anything is planned or written.

Each check raises one :class:`~mergekit_corespace.errors.CoreSpaceError` that names the
field (``models[1].parameters.density``, ``parameters.lamda``, …). Reads mergekit's public
configuration objects (``MergeConfiguration``, ``ModelReference``); no internals.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from mergekit.common import ModelReference
from pydantic import TypeAdapter, ValidationError

from mergekit_corespace.errors import CoreSpaceError
from mergekit_corespace.options import (
    PER_ADAPTER_DEFAULTS,
    POSITIVE_WEIGHTS,
    MergeParameters,
    Space,
)

LOG = logging.getLogger(__name__)


def check_device_options(options) -> None:
    """The device options of mergekit's ``MergeOptions`` name devices this torch has.

    Checked before any work: mergekit itself fails on them only once tasks run, with a
    traceback (``Torch not compiled with CUDA enabled``, ``'NoneType' object has no
    attribute 'type'``, ``pin_memory=True requires ...``)."""
    import torch

    def accelerators(kind: str) -> int:
        module = getattr(torch, kind, None)
        if module is None or not module.is_available():
            return 0
        return module.device_count()

    build = f"torch {torch.__version__}"
    try:
        device = torch.device(options.device or "cpu")
    except RuntimeError:
        raise CoreSpaceError(f"--device {options.device}: not a device torch knows") from None
    flag = f"--device {options.device}"
    if options.cuda and device.type == "cuda":
        flag = "--gpu-rich" if options.gpu_rich else "--cuda"
    if device.type != "cpu":
        count = accelerators(device.type)
        if count == 0:
            raise CoreSpaceError(
                f"{flag}: {build} sees no {device.type} device; leave the option out to merge "
                "on the CPU"
            )
        if device.index is not None and device.index >= count:
            raise CoreSpaceError(f"{flag}: {build} sees {count} {device.type} device(s)")
    gpus = accelerators("cuda") or accelerators("xpu")
    for given, name in ((options.multi_gpu, "--multi-gpu"), (options.read_to_gpu, "--read-to-gpu")):
        if given and not gpus:
            raise CoreSpaceError(f"{name}: {build} sees no GPU; leave the option out")


def check_models(config) -> ModelReference:
    """The base model, once every input is known to be ``base+adapter`` of it."""
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
    for model in dict.fromkeys(listed_models(config)):
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


def listed_models(config) -> Iterator[ModelReference]:
    """Every input model reference, in the order the config lists them."""
    for model in config.models or ():
        yield model.model
    for slice_ in config.slices or ():
        yield from (source.model for source in slice_.sources)
    for module in (config.modules or {}).values():
        yield from (model.model for model in module.models or ())
        for slice_ in module.slices or ():
            yield from (source.model for source in slice_.sources)


def combine_duplicates(config) -> None:
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


def check_parameters(config) -> None:
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
                    raise CoreSpaceError(f"{where}.{name}: {first_error(error)}") from None
    top = {k: v for k, v in (config.parameters or {}).items() if k in shared}
    if all(isinstance(v, (str, int, float, bool)) for v in top.values()):
        try:  # combinations, e.g. a parameter the chosen method does not read
            MergeParameters.model_validate(top)
        except ValidationError as error:
            raise CoreSpaceError(f"parameters: {first_error(error)}") from None


def weight_parameters(shared: Mapping[str, Any], weight_name: str, space: Space) -> MergeParameters:
    """The merge parameters mergekit resolved for one weight (filters and gradients
    applied), checked as a whole."""
    given = {name: value for name, value in shared.items() if value is not None}
    try:
        parameters = MergeParameters.model_validate(given)
    except ValidationError as error:
        raise CoreSpaceError(f"parameters for {weight_name}: {first_error(error)}") from None
    if "knots_scale_tasks" in given and space != "knots":
        raise CoreSpaceError("parameters.knots_scale_tasks: only read by merge_method: knots")
    return parameters


def check_weights(
    parameters: MergeParameters,
    weights: Sequence[float],
    models: Sequence[ModelReference],
    weight_name: str,
) -> None:
    """Adapter weights the inner method can use: positive for weighted means, and a
    non-zero sum for ``mean``."""
    if parameters.merge == "mean" and sum(weights) == 0:
        raise CoreSpaceError(
            f"models: the weights of the adapters on {weight_name} sum to 0; merge: mean "
            "divides by that sum"
        )
    if parameters.merge in POSITIVE_WEIGHTS:
        for model, weight in zip(models, weights):
            _check_positive(model, weight, parameters.merge)


def check_plain_weights(config) -> None:
    """The per-layer check of :func:`check_weights` for weights given as plain numbers,
    made before anything is planned or written (per-layer weights are checked as planned)."""
    merge = (config.parameters or {}).get("merge", "ta")
    if not isinstance(merge, str) or merge not in POSITIVE_WEIGHTS:
        return
    for entry in config.models or ():
        weight = (entry.parameters or {}).get("weight", 1.0)
        if entry.model.lora is not None and isinstance(weight, (int, float)):
            _check_positive(entry.model, weight, merge)


def _check_positive(model, weight: float, merge: str) -> None:
    if weight <= 0:
        raise CoreSpaceError(
            f"models: {model} has weight {weight}; merge: {merge} takes weighted means and "
            "needs positive weights (ta, mean and dare accept any)"
        )


def first_error(error: ValidationError) -> str:
    """pydantic's first error as one line: where, what, and the value given."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error":  # a whole-model check: the input is the whole dict
        return message
    return f"{where + ': ' if where else ''}{message} (got {first.get('input')!r})"


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
