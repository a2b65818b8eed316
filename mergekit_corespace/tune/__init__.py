"""Search of a merge's settings on the user's own validation data
(``mergekit-corespace-tune``; :func:`tune` from Python): every point of a grid, or trials
drawn by TPE or CMA-ES (Optuna) from values and ranges of top-level parameters,
``merge_method`` and per-adapter weights.

The base model is loaded once. Each point is the user's recipe with some settings
replaced; it is merged in memory and scored on every task by
:mod:`mergekit_corespace.evaluate` (or lm-eval), as one of:

- ``model`` (the default): the merged weights written into the loaded base by the code of
  ``mergekit-yaml`` (:func:`~mergekit_corespace.glue.adapter_output.merged_weights`): the
  model ``mergekit-yaml`` writes, bit for bit, evaluated as fast as the base;
- ``adapter`` (the default with ``merge="adapter"``): the merged LoRA adapter that
  ``mergekit-corespace-lora`` writes
  (:func:`~mergekit_corespace.glue.adapter_output.factored_merge`), put on with PEFT next
  to the previous point's adapter, which is then deleted.

A point that differs from the one before only in λ reuses its merge (λ scales the merged
delta last, so the scaled delta is bit for bit a fresh merge's), and every point reuses
each module's core or KnOTS space (KnOTS's SVD is most of a KnOTS merge's time; the core
space's unweighted cores do not depend on the weights drawn).

Task files are matched to adapters by name: ``DIR/nli.jsonl`` is the task of the adapter
whose directory (or Hub repository) is named ``nli``. Its score with that adapter alone is
the task's reference, and scores divided by it are the normalised scores.

Every scored trial is kept in an Optuna study (``OUT/study.journal``, or ``storage``
shared by workers) under a fingerprint of everything that decides its scores (recipe,
adapters, base, task files, metrics, evaluation settings), so an interrupted run resumes
where it stopped; a study with another fingerprint is refused (``fresh=True`` starts over).

One file per job, in the order a run uses them:

- ``grid.py`` — ``--grid`` parsed (values, ranges, weights); a grid's points; a point ↔
  its recipe; λ groups; grid edges.
- ``search.py`` — the sampler (grid, TPE, CMA-ES), the pruner, a trial's point.
- ``plan.py`` — everything checked before any work: recipe, points, tasks ↔ adapters,
  held-out examples, tokenizer, fingerprint.
- ``fingerprint.py`` — the fingerprint that makes resuming and sharing safe.
- ``study.py`` — the Optuna study: storage, fingerprint check, references, trial records.
- ``session.py`` — the loaded base; one point's merge put into it.
- ``trials.py`` — the objective (a trial scored, pruned after a part) and the
  loop that runs trials until the study holds as many as asked.
- ``results.py`` — the result types: a point's row, its times, the whole result.
- ``selection.py`` — scores made rows (normalised), and the winner chosen.
- ``holdout.py`` — the winner and runners-up scored on held-out examples.
- ``report.py`` — the Markdown table, ``results.csv``, ``results.json``, ``best.yml``.
- ``plot.py`` — ``score_vs_lambda.png`` and Optuna's plots of the study.
- ``run.py`` — :func:`tune`: the steps above in order, and the final merge.
"""

import sys
import types

from mergekit_corespace.tune.fingerprint import FORMAT
from mergekit_corespace.tune.grid import (
    DEFAULT_GRID,
    GRID_KEYS,
    SPACES,
    Range,
    at_grid_edge,
    grid_points,
    label,
    lambda_groups,
    parse_grid,
    point_recipe,
)
from mergekit_corespace.tune.results import PointTimes, Row, TuneResult
from mergekit_corespace.tune.run import tune
from mergekit_corespace.tune.search import SEARCHES
from mergekit_corespace.tune.study import STUDY_FILE

__all__ = [
    "DEFAULT_GRID",
    "FORMAT",
    "GRID_KEYS",
    "SEARCHES",
    "SPACES",
    "STUDY_FILE",
    "PointTimes",
    "Range",
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
