"""The trials of a study run until it holds as many as asked (every point, for a grid):
each trial's point merged, put into the model and scored, part by part when pruning
(stopped after a part the pruner finds hopeless), and recorded on the trial."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from mergekit_corespace.evaluate import Evaluation, joined, normalised_score
from mergekit_corespace.tune.grid import lambda_groups, point_key
from mergekit_corespace.tune.results import PointTimes, Row
from mergekit_corespace.tune.search import suggested_point
from mergekit_corespace.tune.selection import scored_row, selection_value
from mergekit_corespace.tune.study import record, scored_trials

LOG = logging.getLogger(__package__)  # one logger for the tuner: mergekit_corespace.tune


class Surplus(Exception):
    """A trial started after the study already held as many as asked (another worker took
    the last one): not scored, left failed."""


class Objective:
    """What Optuna maximises: a trial's selection score (the normalised average when every
    task has a reference, else the average)."""

    def __init__(self, plan, session, study, references: Mapping[str, float], progress):
        self.plan, self.session, self.study = plan, session, study
        self.references = dict(references)
        self.by_normalised = len(references) == len(plan.tasks)
        self.metrics = {task.name: task.metric for task in plan.tasks}
        self.offsets, seen = {}, 0  # each task's first example's step, when racing
        for task in plan.tasks:
            self.offsets[task.name] = seen
            seen += len(task.examples)
        self.space = (
            {"point": [point_key(p) for p in plan.points]} if plan.search == "grid" else plan.space
        )
        self.progress = progress
        self.on_point: Callable[[Row, PointTimes], None] | None = None
        self.examples: dict[str, dict[str, list]] = {}  # of the points this run scored
        self.times: list[PointTimes] = []
        self._finished: dict[int, tuple[Row, PointTimes]] = {}  # for on_point, once told

    def __call__(self, trial) -> float:
        import optuna
        from optuna.trial import TrialState

        point = suggested_point(trial, self.plan.search, self.space, self.plan.recipe)
        if self.plan.search != "grid":
            counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
            earlier = self.study.get_trials(deepcopy=False, states=counted)
            if sum(t.number < trial.number for t in earlier) >= self.plan.trials:
                raise Surplus(f"trial {trial.number}: the study already holds its trials")
        scored = scored_trials(self.study).get(point_key(point))
        if scored is not None:  # scored by an earlier run, or by another worker
            record(trial, point, scored.user_attrs["scores:search"],
                   scored.user_attrs["stderr:search"])  # fmt: skip
            self.progress(point, scored.user_attrs["scores:search"], scored.value)
            return scored.value
        model, merge_seconds, apply_seconds = self.session.put(point)
        started = time.perf_counter()
        parts: list[dict[str, Evaluation]] = []
        steps = self.plan.parts()
        for step, tasks in enumerate(steps):
            parts.append(self.plan.evaluations(model, tasks))
            last = step == len(steps) - 1
            if self.plan.prune == "wilcoxon":  # every example, so that the best has them all
                for example, value in self._example_values(parts):
                    trial.report(value, example)
            elif not last:
                trial.report(self._partial_value(parts), step)
            if not last and trial.should_prune():
                so_far = self._joined(parts)
                trial.set_user_attr("point", dict(point))
                trial.set_user_attr("scored part", {n: e.score for n, e in so_far.items()})
                trial.set_user_attr(
                    "examples scored", sum(len(e.examples) for e in so_far.values())
                )
                self.progress(point, None, self._partial_value(parts))
                raise optuna.TrialPruned()
        evaluations = self._joined(parts)
        scores = {name: e.score for name, e in evaluations.items()}
        stderr = {name: e.stderr for name, e in evaluations.items()}
        record(trial, point, scores, stderr)
        row = scored_row(point, scores, self.plan, self.references, stderr)
        times = PointTimes(merge_seconds, apply_seconds, time.perf_counter() - started)
        self.examples[point_key(point)] = {n: e.examples for n, e in evaluations.items()}
        self.times.append(times)
        value = selection_value(row, self.by_normalised)
        self.progress(point, scores, value)
        self._finished[trial.number] = (row, times)
        return value

    def told(self, study, trial) -> None:
        """Optuna's callback once a trial is finished and stored: ``on_point`` with its row
        (so an exception there, or a kill, never loses a scored trial)."""
        finished = self._finished.pop(trial.number, None)
        if finished is not None and self.on_point is not None:
            self.on_point(*finished)

    def _joined(self, parts: list[dict[str, Evaluation]]) -> dict[str, Evaluation]:
        """Each task's evaluation over the parts scored so far, in the plan's order."""
        joined_tasks = {}
        for task in self.plan.tasks:
            scored = [part[task.name] for part in parts if task.name in part]
            if scored:
                joined_tasks[task.name] = scored[0] if len(scored) == 1 else joined(scored)
        return joined_tasks

    def _partial_value(self, parts: list[dict[str, Evaluation]]) -> float:
        """The selection score on the parts scored so far (the tasks in them)."""
        evaluations = self._joined(parts)
        if self.by_normalised:
            values = [
                normalised_score(self.metrics[n], e.score, self.references[n])
                for n, e in evaluations.items()
            ]
        else:
            values = [e.score for e in evaluations.values()]
        return sum(values) / len(values)

    def _example_values(self, parts: list[dict[str, Evaluation]]):
        """(step, value) of each task-file example of the last part, for the racing rule
        to pair across trials: the step the same in every trial (the task's offset + the
        example's place in it), the value the example's score (normalised, when the
        selection score is)."""
        for name, evaluation in parts[-1].items():
            if name in self.plan.harnessed:
                continue
            start = self.offsets[name] + sum(
                len(part[name].examples) for part in parts[:-1] if name in part
            )
            for place, example in enumerate(evaluation.examples):
                value = float(example["hit"]) if "hit" in example else example["loglik"]
                if self.by_normalised:
                    value = normalised_score(self.metrics[name], value, self.references[name])
                yield start + place, value


def run_trials(study, plan, objective: Objective, in_order: bool = False) -> None:
    """Trials until the study holds ``plan.trials`` finished ones (or, for a grid, a
    finished trial of every point), counting those of earlier runs and other workers.

    ``in_order`` (a study this run alone writes): a grid's points are queued λ group by
    λ group (:func:`~mergekit_corespace.tune.grid.lambda_groups`), so that points differing
    only in λ follow each other and share one merge; workers sharing a study take the
    points Optuna's ``GridSampler`` gives them instead."""
    from optuna.trial import TrialState

    finished_states = (TrialState.COMPLETE, TrialState.PRUNED)
    if plan.search == "grid" and in_order:
        kept = (*finished_states, TrialState.WAITING)
        queued = {  # a finished trial's point, or a waiting one's
            point_key(t.user_attrs["point"])
            if "point" in t.user_attrs
            else t.system_attrs.get("fixed_params", {}).get("point")
            for t in study.get_trials(deepcopy=False, states=kept)
        }
        for group in lambda_groups(plan.points):
            for point in group:
                if point_key(point) not in queued:
                    study.enqueue_trial({"point": point_key(point)})
    while True:
        trials = study.get_trials(deepcopy=False)
        finished = [t for t in trials if t.state in finished_states]
        running = [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        if plan.search == "grid":
            done = {point_key(t.user_attrs["point"]) for t in finished if "point" in t.user_attrs}
            busy = {t.params.get("point") for t in running}  # another worker scores these
            left = [p for p in plan.points if point_key(p) not in done]
            if not left or all(point_key(p) in busy for p in left):
                return
        elif len(finished) >= plan.trials or len(finished) + len(running) >= plan.trials:
            return
        study.optimize(objective, n_trials=1, catch=(Surplus,), callbacks=[objective.told])
