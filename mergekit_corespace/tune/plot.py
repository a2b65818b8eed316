"""``score_vs_lambda.png``: the selection score against λ, one line per inner method (and
every other grid setting; points only, per method, for a sampled search), the chosen point
starred; and Optuna's own plots of the study: ``optimization_history.png`` and, for a
sampled search, ``param_importances.png``."""

from __future__ import annotations

import logging
import os
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mergekit_corespace.tune.plan import Plan
    from mergekit_corespace.tune.results import TuneResult

LOG = logging.getLogger(__package__)  # one logger for the tuner: mergekit_corespace.tune


def plot_score_vs_lambda(plan: Plan, result: TuneResult, path: str) -> None:
    """Selection score against λ, one line per inner method (and every other grid key)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_parameters = plan.recipe.get("parameters") or {}
    sampled = plan.search != "grid"
    lines: dict[str, list[tuple[float, float]]] = {}
    for row in result.rows:
        parameters = {**base_parameters, **row.point}
        lam = parameters.get("lambda", 1.0)
        if not isinstance(lam, (int, float)):
            LOG.warning("%s: lambda is not one number (%s); no plot", plan.config_path, lam)
            return
        rest = {k: v for k, v in row.point.items() if k != "lambda"}
        if sampled:  # every trial differs: one series per method
            rest = {k: v for k, v in rest.items() if k in ("merge", "merge_method")}
        rest.setdefault("merge", base_parameters.get("merge", "ta"))
        name = " · ".join(
            str(v) if k in ("merge", "merge_method") else f"{k} {v}" for k, v in rest.items()
        )
        score = row.normalised_average if result.selected_by != "average" else row.average
        lines.setdefault(name, []).append((float(lam), score))
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, values in lines.items():
        values.sort()
        axes.plot(
            [v[0] for v in values],
            [v[1] for v in values],
            marker="o",
            linestyle="none" if sampled else "-",
            label=name,
        )
    best = result.best
    axes.plot(
        [float({**base_parameters, **best.point}.get("lambda", 1.0))],
        [best.normalised_average if result.selected_by != "average" else best.average],
        marker="*",
        markersize=16,
        color="black",
        linestyle="none",
        label="chosen",
    )
    axes.set_xlabel("λ")
    axes.set_ylabel(result.selected_by)
    axes.set_title(f"{os.path.basename(plan.config_path)}: {len(result.metrics)} tasks")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(figure)


def plot_study(plan: Plan, study) -> None:
    """Optuna's optimisation history of the study (and, for a sampled search, each
    setting's importance to the score), as PNG files in ``plan.out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.exceptions import ExperimentalWarning
    from optuna.visualization import matplotlib as optuna_plots

    plots = {"optimization_history.png": optuna_plots.plot_optimization_history}
    if plan.search != "grid":
        plots["param_importances.png"] = optuna_plots.plot_param_importances
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():  # Optuna marks its matplotlib plots experimental
                warnings.simplefilter("ignore", ExperimentalWarning)
                axes = plot(study)
        except (ValueError, RuntimeError) as error:  # too few trials, one setting only
            LOG.warning("%s: not drawn (%s)", name, str(error).splitlines()[0])
            continue
        figure = axes.get_figure()
        figure.tight_layout()
        figure.savefig(os.path.join(plan.out, name), dpi=100, metadata={"Software": None})
        plt.close(figure)
