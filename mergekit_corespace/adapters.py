"""PEFT LoRA adapters: config, tensor index, PEFT scaling, and mapping to base weight names.

An adapter gives, for each module it targets, ``ΔW = s · B A`` (design §4) with
``s = alpha / r`` (``alpha / sqrt(r)`` with rslora; ``rank_pattern`` and ``alpha_pattern``
override r and alpha per module, matched exactly as PEFT matches them). Conv1D layers
(``fan_in_fan_out``) and embeddings store the weight transposed: ``ΔW = s · (B A)ᵀ``.
``modules_to_save`` (and embedding layers PEFT saves whole) are full replacement weights:
their delta is ``W_saved − W_base``.

Only the file header is read when an adapter is opened; the tensors of one module are
read when that module is merged, and checked for NaN/Inf then.
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
from mergekit_corespace.memory import release_file_pages

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
_PEFT_PREFIX = "base_model.model."
# check_finite releases the file's pages after this many bytes read: RSS stays bounded
# (a saved 1 GB embedding is released once read) with few reads of /proc/self/maps
_RELEASE_AFTER_BYTES = 256 << 20
# `<module>.lora_A.weight` or `<module>.lora_A.<adapter name>.weight` (older savers) ...
_LINEAR_KEY = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_A|lora_B)(?:\.[^.]+)?\.weight$")
# ... and `<module>.lora_embedding_A` (optionally `.<adapter name>`)
_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_embedding_[AB])(?:\.[^.]+)?$")
_REFUSED = {
    "use_dora": "DoRA rescales each column by a learnt magnitude, so ΔW is not a low-rank B·A",
    "lora_bias": "a LoRA bias adds a trained bias vector outside B·A",
    "target_parameters": "LoRA on raw parameters (e.g. MoE experts) is not supported",
}


class AdapterError(CoreSpaceError):
    """An adapter that cannot be merged; the message names the file and the field."""


class LoraModule(BaseModel):
    """One adapter's LoRA pair on one base weight: ``ΔW = scale · B @ A`` (transposed
    for Conv1D and embedding layers, whose weights are stored input-major)."""

    model_config = ConfigDict(frozen=True)

    file: str
    module: str  # PEFT module path, e.g. "model.layers.0.self_attn.q_proj"
    a_key: str
    b_key: str
    rank: int
    out_features: int  # rows of B
    in_features: int  # columns of A
    scale: float
    transposed: bool = False
    embedding: bool = False

    @property
    def delta_shape(self) -> tuple[int, ...]:
        if self.transposed:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)


class DenseWeight(BaseModel):
    """A full replacement weight (``modules_to_save``): its delta is ``saved − base``."""

    model_config = ConfigDict(frozen=True)

    file: str
    key: str
    name: str  # the weight's name in PEFT's module naming, e.g. "lm_head.weight"
    shape: tuple[int, ...]

    @property
    def delta_shape(self) -> tuple[int, ...]:
        return self.shape


Contribution = LoraModule | DenseWeight


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter directory, indexed by module path and by weight name."""

    path: str
    config: object  # peft.LoraConfig
    weights_file: str
    modules: dict[str, LoraModule] = field(default_factory=dict)
    dense: dict[str, DenseWeight] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str) -> LoraAdapter:
        config = read_lora_config(path)
        weights_file = _weights_file(path)
        shapes = _tensor_file(weights_file).shapes()
        modules, dense = _index_tensors(weights_file, shapes, config)
        if not modules and not dense:
            raise AdapterError(f"{weights_file}: holds no LoRA tensors")
        return cls(
            path=path, config=config, weights_file=weights_file, modules=modules, dense=dense
        )

    def check_finite(self) -> None:
        """Every floating-point tensor of the file holds finite values, so that a NaN or an
        Inf is named before a merge starts (one read of the adapter, its pages released)."""
        reader = _tensor_file(self.weights_file)
        read, read_bytes = [], 0
        for key in sorted(reader.shapes()):
            (tensor,) = reader.get(key)
            if tensor.is_floating_point():
                for block in tensor.reshape(-1).split(1 << 24):  # a bounded mask at a time
                    _finite(block, self.weights_file, key)
            read.append(tensor)
            read_bytes += tensor.numel() * tensor.element_size()
            if read_bytes >= _RELEASE_AFTER_BYTES:  # not per tensor: /proc/self/maps is slow
                release_file_pages(*read)
                read, read_bytes = [], 0
        release_file_pages(*read)

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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterError(f"{config_file}: unreadable JSON ({error})") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{config_file}: expected a JSON object")
    peft_type = str(raw.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(
            f"{config_file}: peft_type {raw.get('peft_type')!r} is not supported; only LoRA "
            "adapters (peft_type LORA) have the B·A factors core-space merging works on"
        )
    try:
        config = PeftConfig.from_pretrained(path)
    except Exception as error:  # PEFT raises ValueError/TypeError for bad fields
        raise AdapterError(f"{config_file}: PEFT cannot parse it ({error})") from None
    for name, why in _REFUSED.items():
        if getattr(config, name, None):
            raise AdapterError(f"{config_file}: {name} is set; {why}")
    return config


def _weights_file(path: str) -> str:
    for name in (WEIGHTS_FILE, PICKLE_WEIGHTS_FILE):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise AdapterError(
        f"{os.path.join(path, WEIGHTS_FILE)}: missing (nor is there an {PICKLE_WEIGHTS_FILE})"
    )


def _index_tensors(
    weights_file: str, shapes: Mapping[str, tuple[int, ...]], config
) -> tuple[dict[str, LoraModule], dict[str, DenseWeight]]:
    """Pair lora_A/lora_B per module; collect full replacement weights."""
    pairs: dict[str, dict[str, str]] = {}
    dense: dict[str, DenseWeight] = {}
    saved_modules = tuple(config.modules_to_save or ())
    for key, shape in shapes.items():
        name = key.removeprefix(_PEFT_PREFIX)
        match = _LINEAR_KEY.match(key) or _EMBEDDING_KEY.match(key)
        if match is not None:
            pairs.setdefault(match["module"], {})[match["factor"]] = key
        elif "lora_magnitude_vector" in key:
            raise AdapterError(f"{weights_file}: {key} is a DoRA magnitude; DoRA is not supported")
        elif ".base_layer." in name:  # an embedding layer PEFT saved whole
            target = name.replace(".base_layer.", ".")
            dense[target] = DenseWeight(file=weights_file, key=key, name=target, shape=shape)
        elif _in_saved_module(name, saved_modules):
            dense[name] = DenseWeight(file=weights_file, key=key, name=name, shape=shape)
        else:
            raise AdapterError(
                f"{weights_file}: tensor {key!r} is not a PEFT LoRA factor (lora_A/lora_B, "
                "lora_embedding_A/B) nor a modules_to_save weight; other formats (e.g. "
                "sd-scripts lora_up/lora_down) are not supported"
            )

    modules = {}
    for prefixed, keys in sorted(pairs.items()):
        embedding = "lora_embedding_A" in keys or "lora_embedding_B" in keys
        a_name, b_name = (
            ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        )
        if set(keys) != {a_name, b_name}:
            missing = ({a_name, b_name} - set(keys)) or set(keys)
            raise AdapterError(
                f"{weights_file}: {prefixed}: {', '.join(sorted(missing))} "
                "is missing or mixed with another kind of factor"
            )
        a_key, b_key = keys[a_name], keys[b_name]
        if len(shapes[a_key]) != 2 or len(shapes[b_key]) != 2:
            raise AdapterError(f"{weights_file}: {a_key} / {b_key} are not matrices")
        (rank, in_features), (out_features, rank_b) = shapes[a_key], shapes[b_key]
        module = prefixed.removeprefix(_PEFT_PREFIX)
        configured, scale = _peft_rank_and_scale(config, module)
        if (rank, rank_b) != (configured, configured) and (in_features, out_features) == (
            configured,
            configured,
        ):
            raise AdapterError(
                f"{weights_file}: {a_key} is {rank}×{in_features} and {b_key} is "
                f"{out_features}×{rank_b}: lora_A and lora_B look swapped (lora_A must be "
                f"r×in and lora_B out×r, r = {configured})"
            )
        if rank != rank_b:
            raise AdapterError(
                f"{weights_file}: {a_key} is {rank}×{in_features} and {b_key} is "
                f"{out_features}×{rank_b}: lora_A must be r×in and lora_B out×r"
            )
        if rank != configured:
            raise AdapterError(
                f"{weights_file}: {module} has rank {rank} in its tensors but the config "
                f"(r / rank_pattern) says {configured}"
            )
        modules[module] = LoraModule(
            file=weights_file,
            module=module,
            a_key=a_key,
            b_key=b_key,
            rank=rank,
            out_features=out_features,
            in_features=in_features,
            scale=scale,
            transposed=embedding,
            embedding=embedding,
        )
    return modules, dense


def _in_saved_module(name: str, saved_modules: tuple[str, ...]) -> bool:
    """Whether tensor ``name`` belongs to a ``modules_to_save`` module (PEFT matches those
    by module-name suffix)."""
    parts = name.split(".")
    prefixes = (".".join(parts[:i]) for i in range(1, len(parts)))
    return any(p == m or p.endswith("." + m) for p in prefixes for m in saved_modules)


def _peft_rank_and_scale(config, module: str) -> tuple[int, float]:
    """PEFT's rank and scaling for one module (peft/tuners/lora/model.py
    `_create_and_replace`: rank_pattern / alpha_pattern matched by `get_pattern_key`)."""
    from peft.utils.other import get_pattern_key

    rank_pattern = config.rank_pattern or {}
    alpha_pattern = config.alpha_pattern or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.r)
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.lora_alpha)
    return r, (alpha / math.sqrt(r) if config.use_rslora else alpha / r)


class _TensorFile:
    """Thread-safe lazy reader of one weights file: reads only the requested keys.

    safetensors files are memory-mapped; ``.bin`` files are loaded with
    ``weights_only=True`` (memory-mapped too), never with arbitrary unpickling."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._handle = None

    def _open(self):
        if self._handle is not None:
            return self._handle
        if self.path.endswith(".safetensors"):
            try:
                self._handle = safe_open(self.path, framework="pt")
            except Exception as error:
                raise AdapterError(
                    f"{self.path}: not a readable safetensors file ({error})"
                ) from None
        else:
            try:
                state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as error:
                raise AdapterError(
                    f"{self.path}: refused: it does not load with torch.load(weights_only=True) "
                    f"({type(error).__name__}); pickles that run code are never loaded"
                ) from None
            if not isinstance(state, dict) or not all(
                isinstance(v, torch.Tensor) for v in state.values()
            ):
                raise AdapterError(f"{self.path}: not a dict of tensors")
            self._handle = _DictHandle(state)
        return self._handle

    def shapes(self) -> dict[str, tuple[int, ...]]:
        with self._lock:
            handle = self._open()
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}

    def get(self, *keys: str) -> list[torch.Tensor]:
        with self._lock:
            handle = self._open()
            return [handle.get_tensor(key) for key in keys]


class _DictHandle:
    """The safe_open interface over a loaded state dict."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = state

    def keys(self):
        return self._state.keys()

    def get_tensor(self, key: str) -> torch.Tensor:
        return self._state[key]

    def get_slice(self, key: str):
        return _Shape(self._state[key].shape)


@dataclass
class _Shape:
    shape: torch.Size

    def get_shape(self) -> list[int]:
        return list(self.shape)


_OPEN_FILES: OrderedDict[tuple, _TensorFile] = OrderedDict()
_OPEN_FILES_LOCK = threading.Lock()
_MAX_OPEN_FILES = 128


def _tensor_file(path: str) -> _TensorFile:
    try:
        stat = os.stat(path)
    except OSError as error:
        raise AdapterError(f"{path}: {error.strerror}") from None
    key = (path, stat.st_mtime_ns, stat.st_size)  # a rewritten file is reopened
    with _OPEN_FILES_LOCK:
        reader = _OPEN_FILES.pop(key, None) or _TensorFile(path)
        _OPEN_FILES[key] = reader
        while len(_OPEN_FILES) > _MAX_OPEN_FILES:
            _OPEN_FILES.popitem(last=False)
        return reader


def _finite(tensor: torch.Tensor, file: str, key: str) -> torch.Tensor:
    if not torch.isfinite(tensor).all():
        raise AdapterError(f"{file}: {key} holds NaN or Inf values")
    return tensor


def read_factors(
    lora: LoraModule,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    views: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left, right)`` in ``dtype`` on ``device`` with ``ΔW = left @ right`` in the base
    weight's layout, the scale folded into ``left``. ``views`` collects the tensors as
    read from the file (views into its mapping, whose pages the caller may release)."""
    raw_a, raw_b = _tensor_file(lora.file).get(lora.a_key, lora.b_key)
    a = _finite(raw_a, lora.file, lora.a_key).to(device=device, dtype=dtype, copy=True)
    b = _finite(raw_b, lora.file, lora.b_key).to(device=device, dtype=dtype, copy=True)
    if views is not None:
        views += (raw_a, raw_b)
    if lora.transposed:  # ΔW = s (B A)ᵀ = (s Aᵀ)(Bᵀ)
        return a.T * lora.scale, b.T
    return b * lora.scale, a


def read_dense(
    weight: DenseWeight,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    views: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """A whole saved weight in ``dtype`` on ``device`` (``views`` as for read_factors)."""
    (raw,) = _tensor_file(weight.file).get(weight.key)
    if views is not None:
        views.append(raw)
    return _finite(raw, weight.file, weight.key).to(device=device, dtype=dtype, copy=True)


def read_raw(weight: DenseWeight, views: list[torch.Tensor] | None = None) -> torch.Tensor:
    """A whole saved weight as stored (a view into the file's mapping, not checked for
    NaN/Inf: the caller reads it in blocks and checks each); ``views`` as for read_factors."""
    (raw,) = _tensor_file(weight.file).get(weight.key)
    if views is not None:
        views.append(raw)
    return raw


def match_modules(
    modules: Iterable[str], weights: Mapping[str, Iterable[str]], suffix: str = ".weight"
) -> tuple[dict[str, str], list[str]]:
    """Map PEFT module paths (or weight names, with ``suffix=""``) to base weights.

    ``weights`` maps each base weight's canonical name to all names it is known by
    (aliases included). A module matches ``<module>.weight`` exactly, or else the one
    weight whose name ends with it (or that it ends with) at a dot boundary — adapters
    trained on a task head (``bert.encoder…``) or a bare backbone (``layers.0…``).
    Returns the mapping and the modules that match nothing.
    """
    by_name = {name: canonical for canonical, names in weights.items() for name in names}
    matched, unmatched = {}, []
    for module in modules:
        target = module + suffix
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
