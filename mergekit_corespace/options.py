"""The merge parameters users write under ``parameters:`` — one pydantic model, no mergekit.

The mergekit method spec is derived from these fields (see :mod:`mergekit_corespace.method`),
so the YAML, the Python API and the README table all name the same things.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

InnerMethod = Literal["ta", "mean"]
Space = Literal["core", "knots", "full"]  # chosen by `merge_method`, not a parameter
Precision = Literal["float64", "float32"]


class MergeParameters(BaseModel):
    """Shared (not per-adapter) parameters of a core-space merge, resolved per weight."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    merge: InnerMethod = Field(
        "ta", description="inner merge method applied to the task matrices of each module"
    )
    lambda_: float = Field(
        1.0, alias="lambda", description="global scale of the merged delta"
    )
    precision: Precision = Field(
        "float64",
        description="dtype of the SVDs and the merge; `float32` is meant for GPUs",
    )


# Per-adapter parameters, written under each model's `parameters:`.
PER_ADAPTER_DEFAULTS = {"weight": 1.0}


def parameter_names() -> list[str]:
    """The names users write in YAML (aliases, e.g. `lambda`)."""
    return [field.alias or name for name, field in MergeParameters.model_fields.items()]
