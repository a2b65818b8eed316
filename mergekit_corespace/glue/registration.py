"""The registry entries mergekit validates a config against: names, parameters, contract.

One :class:`AdapterMergeMethod` per space (``core_space``, ``knots``, ``full_space``), built
from :class:`~mergekit_corespace.options.MergeParameters`. Touches only mergekit's public
method API (``merge_methods.registry`` and ``merge_methods.base``); the merge itself is
planned by :mod:`mergekit_corespace.glue.run`, because it needs each adapter's LoRA
factors rather than merged dense weights.
"""

from __future__ import annotations

from typing import Any

import torch
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

from mergekit_corespace.errors import CoreSpaceError
from mergekit_corespace.options import PER_ADAPTER_DEFAULTS, MergeParameters, Space

# merge_method name -> space the inner method runs in
METHOD_SPACES: dict[str, Space] = {"core_space": "core", "knots": "knots", "full_space": "full"}
_PAPERS = {
    "core": ("Core Space", "https://arxiv.org/abs/2509.17786"),
    "knots": ("KnOTS", "https://arxiv.org/abs/2410.19735"),
    "full": ("Full space", None),
}


class AdapterMergeMethod(GroupMergeMethod):
    """A merge of LoRA adapters in one space, as mergekit's registry sees it."""

    def __init__(self, name: str, space: Space):
        self.space = space
        # Defaults stay None here so that the planner can tell what the user set;
        # MergeParameters fills in the real defaults.
        shared = [
            ParameterSpec(
                name=field_info.alias or field_name,
                value_type=field_info.annotation | None,
                scope=ParameterScope.SHARED,
                default=None,
                description=field_info.description,
            )
            for field_name, field_info in MergeParameters.model_fields.items()
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


METHODS = tuple(AdapterMergeMethod(name, space) for name, space in METHOD_SPACES.items())


def register_methods(merge_methods_module=None) -> None:
    """Add our methods to mergekit's registry (idempotent; the argument is the module the
    import hook just executed, unused here)."""
    known = {method.spec.name for method in registry.registered_methods()}
    for method in METHODS:
        if method.spec.name not in known:
            registry.register(method)


register_methods()  # imported directly, before the import hook ran: register now
