"""The merge parameters users write under ``parameters:`` — one pydantic model, no mergekit.

The mergekit method spec, the README table and the Python API all derive from these
fields, so the YAML, the API and the docs name the same things.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

InnerMethod = Literal["ta", "mean", "ties", "dare", "dare_ties", "tsv", "cart", "iso_c", "iso_cts"]
Space = Literal["core", "knots", "full"]  # chosen by `merge_method`, not a parameter
Precision = Literal["auto", "float64", "float32"]
Fraction = Annotated[float, Field(gt=0, le=1)]

# Defaults from the Core Space paper's LLM setting (top-k 70 %, DARE p = 0.9).
DEFAULT_DENSITY = {"ties": 0.7, "dare": 0.1, "dare_ties": 0.1}
# Which method reads which method-specific parameter.
METHOD_PARAMETERS = {
    "density": ("ties", "dare", "dare_ties"),
    "ties_scope": ("ties",),
    "tsv_budget": ("tsv",),
    "cart_rank_ratio": ("cart",),
    "cart_alpha": ("cart",),
    "iso_common_fraction": ("iso_cts",),
}
# Methods whose weighted means need positive adapter weights.
POSITIVE_WEIGHTS = ("ties", "dare_ties", "tsv", "cart", "iso_c", "iso_cts")


class MergeParameters(BaseModel):
    """Shared (not per-adapter) parameters of a merge, resolved per weight."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    merge: InnerMethod = Field("ta", description="inner merge method applied to the task matrices")
    lambda_: float = Field(1.0, alias="lambda", description="global scale of the merged delta")
    density: Fraction | None = Field(
        None,
        description="ties / dare / dare_ties: fraction of entries kept "
        f"(default {DEFAULT_DENSITY['ties']} for ties, {DEFAULT_DENSITY['dare']} for dare*)",
    )
    ties_scope: Literal["module", "global"] = Field(
        "module",
        description="ties: top-k per module, or one threshold per adapter over all merged "
        "modules (a first pass collects magnitudes)",
    )
    tsv_budget: Fraction = Field(
        1.0, description="tsv: share of min(a, b) singular vectors kept in total, split evenly"
    )
    cart_rank_ratio: Fraction = Field(
        0.04, description="cart: rank of each centred task, as a share of min(a, b)"
    )
    cart_alpha: float = Field(0.1, description="cart: scale of the low-rank task residuals")
    iso_common_fraction: Fraction = Field(
        0.8, description="iso_cts: share of the rank kept for the common subspace"
    )
    knots_scale_tasks: bool = Field(
        True, description="knots: represent each task by S·Vₜ (KnOTS paper) rather than Vₜ"
    )
    precision: Precision = Field(
        "auto",
        description="dtype of the SVDs and the merge; auto: float64, but float32 for dense "
        "SVDs of LoRA deltas on a GPU (knots, and full_space tsv / cart / iso) except under "
        "ties / dare",
    )

    @model_validator(mode="after")
    def _only_parameters_the_method_reads(self) -> MergeParameters:
        for name, methods in METHOD_PARAMETERS.items():
            if name in self.model_fields_set and self.merge not in methods:
                raise ValueError(f"{name} is only read by merge: {' / '.join(methods)}")
        return self

    @property
    def effective_density(self) -> float:
        return self.density if self.density is not None else DEFAULT_DENSITY[self.merge]


# Per-adapter parameters, written under each model's `parameters:`.
PER_ADAPTER_DEFAULTS = {"weight": 1.0}


def parameter_names() -> list[str]:
    """The names users write in YAML (aliases, e.g. `lambda`)."""
    return [field.alias or name for name, field in MergeParameters.model_fields.items()]
