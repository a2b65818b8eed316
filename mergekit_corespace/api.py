"""Python API: merge LoRA adapters without writing a YAML file.

    from mergekit_corespace import merge_adapters
    merge_adapters("/models/base", ["/adapters/a", "/adapters/b"], method="ties",
                   out="merged-lora", density=0.7, **{"lambda": 0.5})

The call builds the same mergekit configuration a YAML file would and runs the same
code path as ``mergekit-yaml`` (a model) or ``mergekit-corespace-lora`` (an adapter).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from mergekit_corespace.errors import CoreSpaceError

SPACE_METHODS = {"core": "core_space", "knots": "knots", "full": "full_space"}


def merge_adapters(
    base: str,
    adapters: Sequence[str] | Sequence[tuple[str, float]] | Mapping[str, float],
    method: str = "ta",
    space: str = "core",
    out: str = "merged",
    as_adapter: bool = True,
    *,
    rank: int | None = None,
    energy: float | None = None,
    dtype: str | None = None,
    options: Mapping[str, Any] | None = None,
    **parameters: Any,
) -> str:
    """Merge ``adapters`` (LoRA adapters of ``base``) and write the result to ``out``.

    Args:
        base: path of the base model (HF format), or its Hub id (``org/name[@revision]``).
        adapters: adapter paths or Hub ids, or ``(adapter, weight)`` pairs, or
            ``{adapter: weight}``.
        method: the inner method (``merge`` parameter): ta, mean, ties, dare, dare_ties,
            tsv, cart, iso_c, iso_cts.
        space: ``core`` (default), ``knots`` or ``full``.
        out: output directory; replaced only once the merge has finished.
        as_adapter: write one merged PEFT LoRA adapter (default) or a full merged model.
        rank, energy: adapter output only; see ``mergekit-corespace-lora --help``.
        dtype: mergekit's ``dtype`` (load and output dtype).
        options: mergekit run options (``MergeOptions`` fields, e.g. ``cuda=True``,
            ``random_seed=1``, ``out_shard_size=10**9``).
        **parameters: merge parameters as in YAML (``density=0.7``, ``lambda_=0.5`` or
            ``**{"lambda": 0.5}``).

    Returns:
        The absolute path written.
    """
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_corespace.glue.adapter_output import merge_to_adapter
    from mergekit_corespace.glue.internals import install

    install()
    if space not in SPACE_METHODS:
        raise CoreSpaceError(f"space: {space!r} is not one of {', '.join(SPACE_METHODS)}")
    if not as_adapter and (rank is not None or energy is not None):
        raise CoreSpaceError("rank / energy only apply to adapter output (as_adapter=True)")
    if "lambda_" in parameters:
        parameters["lambda"] = parameters.pop("lambda_")
    pairs = adapters.items() if isinstance(adapters, Mapping) else adapters
    pairs = [(item, 1.0) if isinstance(item, (str, os.PathLike)) else item for item in pairs]
    base = _reference(base)
    config = MergeConfiguration.model_validate(
        {
            "merge_method": SPACE_METHODS[space],
            "base_model": base,
            "models": [
                {"model": f"{base}+{_reference(path)}", "parameters": {"weight": weight}}
                for path, weight in pairs
            ],
            "parameters": {"merge": method, **parameters},
            "dtype": dtype,
        }
    )
    run_options = MergeOptions(**{"quiet": True, "write_model_card": False, **(options or {})})
    if as_adapter:
        return merge_to_adapter(config, out, run_options, rank=rank, energy=energy).path

    import mergekit.merge

    mergekit.merge.run_merge(config, out, options=run_options)
    return os.path.abspath(out)


def _reference(path: str | os.PathLike) -> str:
    """A local path made absolute (mergekit's model card asks the Hub about relative
    ones); anything else is a Hub id, ``org/name[@revision]``, kept as written."""
    path = os.fspath(path)
    return os.path.abspath(path) if os.path.exists(path) else path
