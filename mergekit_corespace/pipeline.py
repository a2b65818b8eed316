"""One module, end to end: adapters → basis → tasks → inner merge → back to weights.

This is the spine the mergekit glue and the Python API call for every merged weight.
Pure torch plus safetensors reads; no mergekit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergekit_corespace.adapters import LoraModule, read_factors
from mergekit_corespace.merges import task_arithmetic, weighted_mean
from mergekit_corespace.options import MergeParameters, Space
from mergekit_corespace.spaces import SPACES, LowRank, MergedDelta

INNER_METHODS = {
    "ta": task_arithmetic,
    "mean": weighted_mean,
}

COMPUTE_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def merge_factors(
    factors: Sequence[LowRank],
    weights: Sequence[float],
    parameters: MergeParameters,
    space: Space = "core",
) -> MergedDelta:
    """Merge the LoRA factors of one module in ``space`` with the inner method of ``parameters``."""
    inner = INNER_METHODS[parameters.merge]

    def merge(tasks: Sequence[torch.Tensor]) -> torch.Tensor:
        return parameters.lambda_ * inner(tasks, weights)

    return SPACES[space](factors, merge)


def merge_lora_modules(
    loras: Sequence[LoraModule],
    weights: Sequence[float],
    parameters: MergeParameters,
    space: Space = "core",
    device: torch.device | str = "cpu",
) -> MergedDelta:
    """Read the factors of one module from each adapter (lazily, now) and merge them."""
    dtype = COMPUTE_DTYPES[parameters.precision]
    factors = [read_factors(lora, dtype=dtype, device=device) for lora in loras]
    return merge_factors(factors, weights, parameters, space)
