"""One module, end to end: adapters → basis → tasks → inner merge → back to weights.

This is the spine the mergekit glue and the Python API call for every merged weight.
Pure torch plus safetensors reads; no mergekit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch

from mergekit_corespace import dense, merges
from mergekit_corespace.adapters import (
    Contribution,
    DenseWeight,
    LoraModule,
    read_dense,
    read_factors,
)
from mergekit_corespace.memory import release_file_pages
from mergekit_corespace.options import MergeParameters, Space
from mergekit_corespace.spaces import SPACES, LowRank, MergedDelta

# One adapter's part of one weight: LoRA factors, or a dense delta (modules_to_save).
TaskInput = LowRank | torch.Tensor
# Methods built on SVDs; on 1-D deltas (biases) they fall back to the weighted mean.
SVD_METHODS = ("tsv", "cart", "iso_c", "iso_cts")
# Methods that keep or drop single entries: float32's rounding changes which.
SELECTION_METHODS = ("ties", "dare", "dare_ties")

COMPUTE_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def compute_dtype(
    parameters: MergeParameters,
    space: Space,
    device: torch.device | str,
    saved_whole: bool = False,
) -> torch.dtype:
    """The dtype of one module's merge. ``precision: auto`` is float64 (linear merges stay
    lossless to the last bf16 bit; cheap on CPUs and for core space's thin SVDs), except
    where an SVD of a dense m×n matrix runs on an accelerator — KnOTS's space, full-space
    TSV / CART / Iso — as GPUs run float64 at 1/2–1/64 of float32's rate; there it is
    float32 (on an H200, 1/2, full-space TSV of an 8 B MLP module: 25.3 s in float64,
    17.6 s in float32; bench/perf/README.md, "GPU timings"). TIES and DARE keep float64
    everywhere: they keep or drop single entries, and float32's rounding changes which
    (up to 75 % of the bf16 weights of a merged 8 B module: bench/perf/README.md,
    "Precision"). So do weights saved whole: on tall ones
    their SVDs come from Gram matrices, whose float32 rounding floor is √(max(shape)·eps),
    12 % of σ_max at a 128k vocabulary."""
    if parameters.precision != "auto":
        return COMPUTE_DTYPES[parameters.precision]
    dense_svd = space == "knots" or (space == "full" and parameters.merge in SVD_METHODS)
    pays = dense_svd and not saved_whole and parameters.merge not in SELECTION_METHODS
    return torch.float32 if pays and torch.device(device).type != "cpu" else torch.float64


def module_seed(random_seed: int | None, weight_name: str) -> int:
    """DARE's seed for one weight: a function of ``--random-seed`` (0 when unset) and the
    weight's name only, so reruns, thread counts and devices give the same masks."""
    digest = hashlib.sha256(f"{random_seed or 0}:{weight_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def inner_merge(
    parameters: MergeParameters,
    weights: Sequence[float],
    seed: int = 0,
    thresholds: Sequence[float] | None = None,
):
    """The inner method of ``parameters`` as a function of the T task matrices (λ is
    applied to the merged delta, by :func:`merge_factors`).

    ``seed`` seeds DARE's masks; ``thresholds`` (per task) replace TIES' per-module top-k
    under ``ties_scope: global``."""
    p, weights = parameters, list(weights)

    def generator() -> torch.Generator:  # a fresh one per merge: masks never carry over
        return torch.Generator().manual_seed(seed)

    methods = {
        "ta": lambda tasks: merges.task_arithmetic(tasks, weights),
        "mean": lambda tasks: merges.weighted_mean(tasks, weights),
        "ties": lambda tasks: merges.ties(tasks, weights, p.effective_density, thresholds),
        "dare": lambda tasks: merges.dare(tasks, weights, p.effective_density, generator()),
        "dare_ties": lambda tasks: merges.dare_ties(
            tasks, weights, p.effective_density, generator()
        ),
        "tsv": lambda tasks: merges.tsv(tasks, weights, p.tsv_budget),
        "cart": lambda tasks: merges.cart(tasks, weights, p.cart_rank_ratio, p.cart_alpha),
        "iso_c": lambda tasks: merges.iso_c(tasks, weights),
        "iso_cts": lambda tasks: merges.iso_cts(tasks, weights, p.iso_common_fraction),
    }

    def merge(tasks: Sequence[torch.Tensor]) -> torch.Tensor:
        if tasks[0].dim() < 2 and p.merge in SVD_METHODS:
            return merges.weighted_mean(tasks, weights)
        return methods[p.merge](tasks)

    return merge


def task_space(inputs: Sequence[TaskInput], parameters: MergeParameters, space: Space):
    """The module's task inputs in ``space`` (an object with ``tasks`` and ``back``).

    Dense inputs (``modules_to_save``) have no factors, so such a module runs in full space."""
    if any(isinstance(item, torch.Tensor) for item in inputs):
        space = "full"
    if space == "knots":
        return SPACES[space](inputs, scale_tasks=parameters.knots_scale_tasks)
    return SPACES[space](inputs)


def read_inputs(
    contributions: Sequence[Sequence[Contribution]],
    parameters: MergeParameters,
    device: torch.device | str = "cpu",
    base: torch.Tensor | None = None,
    views: list[torch.Tensor] | None = None,
    space: Space = "core",
) -> list[TaskInput]:
    """Read one module's parts from each adapter (lazily, now), in the dtype of its merge
    in ``space``: the LoRA factors, or — where an adapter also saved the weight whole — its
    dense delta (merged in full space).

    Each module is read once, so the adapter files' mapped pages are released afterwards
    — or, when ``views`` is given, the views read are added to it for the caller to
    release together with its own."""
    saved = any(isinstance(p, DenseWeight) for parts in contributions for p in parts)
    dtype = compute_dtype(parameters, space, device, saved_whole=saved)
    inputs, read = [], []
    cast_base = None
    for parts in contributions:
        if len(parts) == 1 and isinstance(parts[0], LoraModule):
            inputs.append(read_factors(parts[0], dtype, device, read))
            continue
        delta = torch.zeros(parts[0].delta_shape, dtype=dtype, device=device)
        for part in parts:
            if isinstance(part, LoraModule):
                left, right = read_factors(part, dtype, device, read)
                delta.addmm_(left, right)
            else:
                if cast_base is None:  # once per weight, not per adapter
                    cast_base = base.to(device, dtype)
                delta += read_dense(part, dtype, device, read) - cast_base
        inputs.append(delta)
    if views is None:
        release_file_pages(*read)
    else:
        views += read
    return inputs


def merge_module(
    contributions: Sequence[Sequence[Contribution]],
    weights: Sequence[float],
    parameters: MergeParameters,
    space: Space = "core",
    device: torch.device | str = "cpu",
    base: torch.Tensor | None = None,
    views: list[torch.Tensor] | None = None,
    seed: int = 0,
    thresholds: Sequence[float] | None = None,
    *,
    scaled: bool = True,
    spaces: SpaceCache | None = None,
    name: str = "",
) -> MergedDelta:
    """One module's merged ΔW from each adapter's parts of it (``read_inputs`` then
    ``merge_factors``). Where some adapter saved the weight whole, the T dense deltas are
    merged in row blocks instead (:mod:`mergekit_corespace.dense`), never all in memory.

    ``scaled=False``: before λ. ``spaces``: core and KnOTS spaces kept across merges of
    the same adapters, under the weight's ``name``."""
    saved = any(isinstance(p, DenseWeight) for parts in contributions for p in parts)
    lambda_ = parameters.lambda_ if scaled else 1.0
    if saved and dense.streams(parameters, tuple(base.shape), len(contributions)):
        dtype = compute_dtype(parameters, "full", device, saved_whole=True)
        tasks = dense.DenseTasks(contributions, base, dtype, device, views)
        return dense.merge_saved(tasks, weights, parameters, seed).scaled(lambda_)

    def build():
        inputs = read_inputs(contributions, parameters, device, base, views, space)
        return task_space(inputs, parameters, space)

    if spaces is not None and space in ("core", "knots") and not saved:
        dtype = compute_dtype(parameters, space, device)
        scaled_tasks = parameters.knots_scale_tasks if space == "knots" else None
        chosen = spaces.get((name, space, scaled_tasks, dtype, str(device)), build)
    else:
        chosen = build()
    return merged_in(chosen, weights, parameters, seed, thresholds).scaled(lambda_)


def merge_factors(
    inputs: Sequence[TaskInput],
    weights: Sequence[float],
    parameters: MergeParameters,
    space: Space = "core",
    seed: int = 0,
    thresholds: Sequence[float] | None = None,
) -> MergedDelta:
    """Merge one module's task inputs in ``space`` with the inner method of ``parameters``,
    λ applied."""
    chosen = task_space(inputs, parameters, space)
    merged = merged_in(chosen, weights, parameters, seed, thresholds)
    return merged.scaled(parameters.lambda_)


def merged_in(chosen, weights, parameters, seed, thresholds) -> MergedDelta:
    """The inner method run on the tasks of the space ``chosen``, mapped back; before λ."""
    return chosen.back(inner_merge(parameters, weights, seed, thresholds)(chosen.tasks))


class SpaceCache:
    """Core and KnOTS spaces of modules, kept from one merge of the same adapters to the
    next (the tuner's points). A KnOTS space's SVD of the concatenated dense deltas is most
    of a KnOTS merge's time; a core space's bases and unweighted cores save reading the
    factors again. Neither depends on the inner method, its settings, the adapters'
    weights or λ; full-space tasks are too large to keep. Holds at most ``max_bytes``;
    modules past that are rebuilt each time."""

    def __init__(self, max_bytes: int = 2 << 30):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.spaces: dict[tuple, object] = {}

    def get(self, key: tuple, build: Callable[[], object]):
        chosen = self.spaces.get(key)
        if chosen is None:
            chosen = build()
            tensors = [v for v in vars(chosen).values() if isinstance(v, torch.Tensor)]
            size = sum(t.numel() * t.element_size() for t in [*tensors, *chosen.tasks])
            if self.bytes + size <= self.max_bytes:
                self.spaces[key] = chosen
                self.bytes += size
        return chosen


def global_ties_thresholds(
    modules: Sequence[Sequence[tuple[int, LoraModule]]],
    adapters: int,
    parameters: MergeParameters,
    space: Space,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[float, ...]:
    """First pass of ``ties_scope: global``: for each adapter, the magnitude above which
    its top-``density`` share of task entries lies, over all modules of the run.

    ``modules`` lists, per merged weight, ``(adapter index, LoRA)`` in merge order (the
    core basis depends on it). Memory: one module's tasks plus a fixed-size sketch."""
    from tqdm import tqdm

    sketch = merges.MagnitudeSketch(adapters)
    for module in tqdm(modules, desc="TIES global magnitudes", disable=not progress):
        inputs = read_inputs([(lora,) for _, lora in module], parameters, device, space=space)
        for (adapter, _), task in zip(module, task_space(inputs, parameters, space).tasks):
            sketch.add(adapter, task)
    density = parameters.effective_density
    return tuple(sketch.threshold(adapter, density) for adapter in range(adapters))
