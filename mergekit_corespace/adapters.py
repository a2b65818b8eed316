"""PEFT LoRA adapters: config, tensor index, PEFT scaling, and mapping to base weight names.

An adapter gives, for each module it targets, ``ΔW = s · B A`` (design §4) with
``s = alpha / r`` (``alpha / sqrt(r)`` with rslora; ``rank_pattern`` and ``alpha_pattern``
override r and alpha per module, matched exactly as PEFT matches them). Only the
safetensors header is read when an adapter is opened; the factors of one module are
read when that module is merged.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict
from safetensors import safe_open

from mergekit_corespace.errors import CoreSpaceError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_A|lora_B)\.weight$")


class AdapterError(CoreSpaceError):
    """An adapter that cannot be merged; the message names the file and the field."""


class LoraModule(BaseModel):
    """One adapter's LoRA pair on one base weight: ``ΔW = scale · B @ A``."""

    model_config = ConfigDict(frozen=True)

    file: str
    module: str  # PEFT module path, e.g. "model.layers.0.self_attn.q_proj"
    a_key: str
    b_key: str
    rank: int
    out_features: int
    in_features: int
    scale: float

    @property
    def delta_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter directory, indexed by module path."""

    path: str
    config: object  # peft.LoraConfig
    modules: dict[str, LoraModule] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str) -> LoraAdapter:
        config = read_lora_config(path)
        weights = os.path.join(path, WEIGHTS_FILE)
        if not os.path.isfile(weights):
            raise AdapterError(f"{weights}: missing; a PEFT LoRA adapter needs {WEIGHTS_FILE}")
        adapter = cls(path=path, config=config)
        adapter.modules = _index_modules(weights, config)
        if not adapter.modules:
            raise AdapterError(f"{weights}: holds no lora_A/lora_B tensors")
        return adapter

    @property
    def base_model_name(self) -> str | None:
        return getattr(self.config, "base_model_name_or_path", None)


def read_lora_config(path: str):
    """Parse ``adapter_config.json`` with PEFT; refuse what changes the LoRA math."""
    from peft import PeftConfig  # heavy import, only when a merge runs

    config_file = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(path):
        raise AdapterError(f"{path}: adapter directory does not exist")
    if not os.path.isfile(config_file):
        raise AdapterError(f"{config_file}: missing; not a PEFT adapter directory")
    try:
        with open(config_file, encoding="utf-8") as handle:
            raw = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise AdapterError(f"{config_file}: unreadable JSON ({error})") from None
    peft_type = str(raw.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(
            f"{config_file}: peft_type {raw.get('peft_type')!r} is not supported; "
            "core-space merging needs LoRA adapters (peft_type LORA)"
        )
    try:
        config = PeftConfig.from_pretrained(path)
    except Exception as error:  # PEFT raises ValueError/TypeError for bad fields
        raise AdapterError(f"{config_file}: PEFT cannot parse it ({error})") from None
    refusals = {
        "use_dora": "DoRA rescales each column by a learnt magnitude, so ΔW is not B·A",
        "lora_bias": "a LoRA bias adds a trained bias vector that is not part of B·A",
        "target_parameters": "LoRA on raw parameters (e.g. MoE experts) is not supported",
        "modules_to_save": "full replacement modules are not supported",
        "fan_in_fan_out": "fan_in_fan_out (Conv1D) layouts are not supported",
    }
    for field_name, why in refusals.items():
        if getattr(config, field_name, None):
            raise AdapterError(f"{config_file}: {field_name} is set; {why}")
    return config


def _index_modules(weights_file: str, config) -> dict[str, LoraModule]:
    """Pair lora_A/lora_B keys per module, from the safetensors header only."""
    try:
        with safe_open(weights_file, framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as error:
        raise AdapterError(f"{weights_file}: not a readable safetensors file ({error})") from None

    pairs: dict[str, dict[str, str]] = {}
    for key in shapes:
        match = _LORA_KEY.match(key)
        if match is None:
            raise AdapterError(f"{weights_file}: tensor {key!r} is not a LoRA factor")
        pairs.setdefault(match["module"], {})[match["factor"]] = key

    modules = {}
    for prefixed, keys in sorted(pairs.items()):
        if set(keys) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(keys)).pop()
            raise AdapterError(f"{weights_file}: {prefixed}.{missing}.weight is missing")
        a_key, b_key = keys["lora_A"], keys["lora_B"]
        (rank, in_features), (out_features, rank_b) = shapes[a_key], shapes[b_key]
        if rank != rank_b:
            raise AdapterError(
                f"{weights_file}: {a_key} has rank {rank} but {b_key} has rank {rank_b}"
            )
        module = prefixed.removeprefix(_PEFT_PREFIX)
        modules[module] = LoraModule(
            file=weights_file,
            module=module,
            a_key=a_key,
            b_key=b_key,
            rank=rank,
            out_features=out_features,
            in_features=in_features,
            scale=_peft_scale(config, module, rank, weights_file),
        )
    return modules


def _peft_scale(config, module: str, rank: int, weights_file: str) -> float:
    """PEFT's scaling for one module (peft/tuners/lora/model.py `_create_and_replace`)."""
    from peft.utils.other import get_pattern_key

    rank_pattern = config.rank_pattern or {}
    alpha_pattern = config.alpha_pattern or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.r)
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.lora_alpha)
    if r != rank:
        raise AdapterError(
            f"{weights_file}: {module} has rank {rank} in its tensors but the config "
            f"(r / rank_pattern) says {r}"
        )
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


class _TensorFile:
    """Thread-safe lazy reader of one safetensors file: reads only the requested keys."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._handle = None

    def get(self, *keys: str) -> list[torch.Tensor]:
        with self._lock:
            if self._handle is None:
                self._handle = safe_open(self.path, framework="pt")
            return [self._handle.get_tensor(key) for key in keys]


_OPEN_FILES: OrderedDict[tuple, _TensorFile] = OrderedDict()
_OPEN_FILES_LOCK = threading.Lock()
_MAX_OPEN_FILES = 128


def _tensor_file(path: str) -> _TensorFile:
    stat = os.stat(path)
    key = (path, stat.st_mtime_ns, stat.st_size)  # a rewritten file is reopened
    with _OPEN_FILES_LOCK:
        reader = _OPEN_FILES.pop(key, None) or _TensorFile(path)
        _OPEN_FILES[key] = reader
        while len(_OPEN_FILES) > _MAX_OPEN_FILES:
            _OPEN_FILES.popitem(last=False)
        return reader


def read_factors(
    lora: LoraModule, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s·B, A)`` in ``dtype`` on ``device``, so that ``ΔW = (s·B) @ A``."""
    a, b = _tensor_file(lora.file).get(lora.a_key, lora.b_key)
    a = a.to(device=device, dtype=dtype)
    b = b.to(device=device, dtype=dtype) * lora.scale
    return b, a


def match_modules(
    modules: Iterable[str], weights: Mapping[str, Iterable[str]]
) -> tuple[dict[str, str], list[str]]:
    """Map PEFT module paths to base weights.

    ``weights`` maps each base weight's canonical name to all names it is known by
    (aliases included). A module matches ``<module>.weight`` exactly, or else the one
    weight whose name ends with it (or that it ends with) at a dot boundary — adapters
    trained on a task head (``bert.encoder…``) or a bare backbone (``layers.0…``).
    Returns the mapping and the modules that match nothing.
    """
    by_name = {name: canonical for canonical, names in weights.items() for name in names}
    matched, unmatched = {}, []
    for module in modules:
        target = module + ".weight"
        if target in by_name:
            matched[module] = by_name[target]
            continue
        candidates = {
            canonical
            for name, canonical in by_name.items()
            if name.endswith("." + target) or target.endswith("." + name)
        }
        if len(candidates) == 1:
            matched[module] = candidates.pop()
        else:
            unmatched.append(module)
    return matched, unmatched
