"""What a tuning run gives back: each point's scores, where its time went, the winner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mergekit_corespace.tune.grid import at_grid_edge
from mergekit_corespace.tune.report import markdown_table


@dataclass
class Row:
    """One grid point's scores: per task, their mean and the normalised ones."""

    point: dict[str, Any]
    scores: dict[str, float]
    average: float
    normalised: dict[str, float] = field(default_factory=dict)
    normalised_average: float | None = None
    stderr: dict[str, float | None] = field(default_factory=dict)  # per task: of its score
    trial: int | None = None  # its trial's number in the study


@dataclass
class PointTimes:
    """Where one point's time went (seconds): merging in memory, putting the merge into
    the loaded model (its weights, or its adapter with PEFT), and evaluating. Reported to
    ``on_point``, never written."""

    merge: float
    apply: float
    evaluate: float


@dataclass
class TuneResult:
    """The scored grid, the chosen point and the files written."""

    out: str
    metrics: dict[str, str]  # task -> metric
    references: dict[str, float]  # task -> its own adapter's score
    rows: list[Row]
    best: Row
    selected_by: str  # "normalised average" or "average"
    recipe: str  # the winning recipe (YAML)
    merged: str | None = None
    run: dict[str, Any] = field(default_factory=dict)  # versions, settings, seconds per point
    search: dict[str, Any] = field(default_factory=dict)  # trials complete / pruned, examples
    holdout: list[dict[str, Any]] = field(default_factory=list)  # the best ones, held out

    def table(self) -> str:
        """The result as a Markdown table, the winning row marked with *."""
        return markdown_table(self)

    def at_edge(self) -> list[str]:
        """:func:`~mergekit_corespace.tune.grid.at_grid_edge` of the winner, in words."""
        edges = at_grid_edge(self.best.point, [row.point for row in self.rows])
        return [
            f"{key} {self.best.point[key]} is the {end} {key} tried" for key, end in edges.items()
        ]
