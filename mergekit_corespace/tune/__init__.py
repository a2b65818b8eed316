"""Grid search of a merge's top-level parameters on the user's own validation data
(``mergekit-corespace-tune``; :func:`tune` from Python).

The base model is loaded once. Each grid point is the user's recipe with some top-level
``parameters`` (and ``merge_method``) replaced; it is merged in memory and scored on every
task file by :mod:`mergekit_corespace.evaluate`, as one of:

- ``model`` (the default): the merged weights written into the loaded base by the code of
  ``mergekit-yaml`` (:func:`~mergekit_corespace.glue.adapter_output.merged_weights`): the
  model ``mergekit-yaml`` writes, bit for bit, evaluated as fast as the base;
- ``adapter`` (the default with ``merge="adapter"``): the merged LoRA adapter that
  ``mergekit-corespace-lora`` writes
  (:func:`~mergekit_corespace.glue.adapter_output.factored_merge`), put on with PEFT next
  to the previous point's adapter, which is then deleted.

Points that differ only in λ share one merge (λ scales the merged delta last, so the
scaled delta is bit for bit a fresh merge's), and KnOTS points share each module's KnOTS
space (its SVD is most of a KnOTS merge's time).

Task files are matched to adapters by name: ``DIR/nli.jsonl`` is the task of the adapter
whose directory (or Hub repository) is named ``nli``. Its score with that adapter alone is
the task's reference, and scores divided by it are the normalised scores.

Every scored point is appended to ``OUT/points.jsonl`` with a fingerprint of everything
that decides its scores (recipe, adapters, base, task files, metrics, evaluation
settings), so an interrupted run resumes where it stopped; a log with another fingerprint
is refused (``fresh=True`` starts over).

One file per job, in the order a run uses them:

- ``grid.py`` — ``--grid`` parsed; its points; a point ↔ its recipe; λ groups; grid edges.
- ``plan.py`` — everything checked before any work: recipe, points, tasks ↔ adapters,
  tokenizer, fingerprint.
- ``points_log.py`` — ``points.jsonl`` and the fingerprint that makes resuming safe.
- ``session.py`` — the loaded base; one point's merge put into it and scored.
- ``results.py`` — the result types: a point's row, its times, the whole result.
- ``selection.py`` — scores made rows (normalised), and the winner chosen.
- ``report.py`` — the Markdown table, ``results.csv``, ``results.json``, ``best.yml``.
- ``plot.py`` — ``score_vs_lambda.png``.
- ``run.py`` — :func:`tune`: the steps above in order, and the final merge.
"""

import sys
import types

from mergekit_corespace.tune.grid import (
    DEFAULT_GRID,
    GRID_KEYS,
    SPACES,
    at_grid_edge,
    grid_points,
    label,
    lambda_groups,
    parse_grid,
    point_recipe,
)
from mergekit_corespace.tune.points_log import FORMAT, LOG_FILE
from mergekit_corespace.tune.results import PointTimes, Row, TuneResult
from mergekit_corespace.tune.run import tune

__all__ = [
    "DEFAULT_GRID",
    "FORMAT",
    "GRID_KEYS",
    "LOG_FILE",
    "SPACES",
    "PointTimes",
    "Row",
    "TuneResult",
    "at_grid_edge",
    "grid_points",
    "label",
    "lambda_groups",
    "parse_grid",
    "point_recipe",
    "tune",
]


class _CallableModule(types.ModuleType):
    """``from mergekit_corespace import tune`` gives this package, not the function: Python
    imports the subpackage of that name, then reads the attribute, now the package. Calling
    the package calls the function, so ``tune(...)`` works however it was imported."""

    def __call__(self, *args, **kwargs):
        return tune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
