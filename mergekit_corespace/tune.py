"""Grid search of a merge's top-level parameters on the user's own validation data.

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
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from mergekit_corespace.errors import CoreSpaceError
from mergekit_corespace.evaluate import Evaluator, Task, check_tokenizer, normalised_score
from mergekit_corespace.options import METHOD_PARAMETERS, parameter_names
from mergekit_corespace.pipeline import SpaceCache

LOG = logging.getLogger(__name__)

DEFAULT_GRID = {"lambda": [0.25, 0.5, 0.75, 1.0, 1.5]}
LOG_FILE = "points.jsonl"
SPACES = ("core_space", "knots", "full_space")
GRID_KEYS = ("merge_method", *parameter_names())
FORMAT = 1  # of the points log; part of the fingerprint


@dataclass
class Row:
    """One grid point's scores: per task, their mean and the normalised ones."""

    point: dict[str, Any]
    scores: dict[str, float]
    average: float
    normalised: dict[str, float] = field(default_factory=dict)
    normalised_average: float | None = None


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

    def table(self) -> str:
        """The result as a Markdown table, the winning row marked with *."""
        return _markdown(self)

    def at_edge(self) -> list[str]:
        """:func:`at_grid_edge` of the winner, in words."""
        edges = at_grid_edge(self.best.point, [row.point for row in self.rows])
        return [
            f"{key} {self.best.point[key]} is the {end} {key} tried" for key, end in edges.items()
        ]


def at_grid_edge(point: Mapping[str, Any], points: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """``point``'s numeric settings that are the largest or smallest of three or more values
    tried with its other settings in ``points`` (the best may lie beyond the grid): each
    setting's name -> ``"largest"`` or ``"smallest"``."""
    edges = {}
    for key, value in point.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        tried = {
            other[key]
            for other in points
            if key in other and all(other.get(k) == v for k, v in point.items() if k != key)
        }
        if len(tried) < 3:  # of two values, one always wins at an edge
            continue
        if value == max(tried) and not (key == "density" and value >= 1):
            edges[key] = "largest"
        elif value == min(tried):
            edges[key] = "smallest"
    return edges


def parse_grid(specs: Sequence[str] | Mapping[str, Sequence[Any]] | None) -> dict[str, list]:
    """``["lambda=0.5,1 merge=ta,ties", "density=0.3"]`` (or a mapping) -> values per
    key, each checked: known top-level parameter or ``merge_method``, listed once."""
    if specs is None or len(specs) == 0:
        return {key: list(values) for key, values in DEFAULT_GRID.items()}
    if isinstance(specs, Mapping):
        items = [(str(key), list(values), f"{key}") for key, values in specs.items()]
    else:
        items = []
        for spec in specs:
            for token in spec.split():
                key, sep, values = token.partition("=")
                if not sep or not key or not values or "" in values.split(","):
                    raise CoreSpaceError(
                        f"--grid {token}: expected NAME=VALUE[,VALUE...], e.g. lambda=0.5,1,2"
                    )
                items.append((key, [yaml.safe_load(v) for v in values.split(",")], token))
    grid: dict[str, list] = {}
    for key, values, token in items:
        if key == "weight":
            raise CoreSpaceError(
                f"--grid {token}: weight is a per-adapter parameter; the grid sets top-level "
                "parameters (and merge_method)"
            )
        if key not in GRID_KEYS:
            raise CoreSpaceError(
                f"--grid {token}: unknown parameter {key!r} (known: {', '.join(GRID_KEYS)})"
            )
        if key in grid:
            raise CoreSpaceError(f"--grid {token}: {key} is given twice")
        for value in values if key == "merge_method" else ():
            if value not in SPACES:
                raise CoreSpaceError(f"--grid {token}: {value!r} is not one of {', '.join(SPACES)}")
        if not values:
            raise CoreSpaceError(f"--grid {token}: no values")
        grid[key] = list(dict.fromkeys(values))  # a value listed twice is one point
    return grid


def grid_points(grid: Mapping[str, list], recipe: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in order (the last key varies fastest). A
    method-specific value (``density``, ...) is only combined with the methods that read
    it, so ``merge=ta,ties density=0.3,0.7`` is three points, not four."""
    base_merge = (recipe.get("parameters") or {}).get("merge", "ta")
    points = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        merge = point.get("merge", base_merge)
        for name, methods in METHOD_PARAMETERS.items():
            if name in point and merge not in methods:
                del point[name]
        if "knots_scale_tasks" in point and _space(point, recipe) != "knots":
            del point["knots_scale_tasks"]
        if point not in points:
            points.append(point)
    return points


def point_recipe(recipe: Mapping[str, Any], point: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe with the point's values; every other setting is kept, except top-level
    parameters that the point's method does not read (``density`` for ``tsv``, ...)."""
    recipe = copy.deepcopy(dict(recipe))
    parameters = dict(recipe.get("parameters") or {})
    for key, value in point.items():
        if key == "merge_method":
            recipe["merge_method"] = value
        else:
            parameters[key] = value
    merge = parameters.get("merge", "ta")
    for name, methods in METHOD_PARAMETERS.items():
        if name in parameters and name not in point and merge not in methods:
            del parameters[name]
    if "knots_scale_tasks" in parameters and recipe.get("merge_method") != "knots":
        del parameters["knots_scale_tasks"]
    recipe["parameters"] = parameters
    return recipe


def lambda_groups(points: Sequence[Mapping[str, Any]]) -> list[list[dict[str, Any]]]:
    """The points in groups that differ only in a numeric λ (in order of first
    appearance): one merge serves a whole group, scaled per point."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for point in points:
        lam = point.get("lambda")
        if isinstance(lam, (int, float)) and not isinstance(lam, bool):
            key = _key({k: v for k, v in point.items() if k != "lambda"})
        else:
            key = _key(point) + " alone"
        groups.setdefault(key, []).append(dict(point))
    return list(groups.values())


def label(point: Mapping[str, Any]) -> str:
    return " ".join(f"{key}={value}" for key, value in point.items())


def tune(
    config: str | os.PathLike,
    data: str | os.PathLike,
    grid: Sequence[str] | Mapping[str, Sequence[Any]] | None = None,
    *,
    metric: str | Mapping[str, str] = "auto",
    out: str | os.PathLike | None = None,
    device: str = "cpu",
    merge: str | None = None,
    normalise: bool = True,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    random_seed: int | None = None,
    fresh: bool = False,
    progress: bool = True,
    on_point: Callable[[Row, PointTimes], None] | None = None,
    score_as: str | None = None,
) -> TuneResult:
    """Score every grid point of the recipe ``config`` on the task files in ``data``.

    Args:
        config: a recipe of this project (``merge_method: core_space``, ``knots`` or
            ``full_space``), as for ``mergekit-yaml``.
        data: a directory of ``*.jsonl`` task files (:mod:`mergekit_corespace.evaluate`);
            ``nli.jsonl`` is the task of the adapter named ``nli``.
        grid: ``["lambda=0.5,1,2", "merge=ta,ties density=0.3,0.7"]`` or
            ``{"lambda": [0.5, 1, 2]}``, or a list of such mappings (their points, in
            order: e.g. a λ range per inner method); default ``lambda=0.25,0.5,0.75,1,1.5``.
        metric: ``auto``, ``choice``, ``exact`` or ``loglik`` for every task, or
            ``{task: metric}`` (``"*"`` for the rest).
        out: output directory (default ``<config stem>-tune``): points log, tables, plot,
            winning recipe, and with ``merge`` the final merge in ``OUT/merged``.
        device: ``cpu`` or ``cuda``: where the model runs and the merges are computed.
        merge: ``model`` or ``adapter``: also write the winning merge.
        normalise: score each task's own adapter alone as the task's reference.
        batch_size, max_new_tokens: evaluation settings (``exact`` generates at most as
            many tokens as the task's longest answer unless ``max_new_tokens`` is given).
        random_seed: mergekit's ``--random-seed`` (DARE masks).
        fresh: discard the points a previous run in ``out`` scored.
        progress: show a progress bar over the grid points.
        on_point: called after each newly scored point with its row and times.
        score_as: ``model`` (the merged weights in the loaded base: what ``mergekit-yaml``
            writes) or ``adapter`` (the merged adapter on it with PEFT: what
            ``mergekit-corespace-lora`` writes); default ``adapter`` with
            ``merge="adapter"``, else ``model``.
    """
    from tqdm import tqdm

    plan = _Plan.prepare(
        config, data, grid, metric, out, device, merge, batch_size, max_new_tokens, random_seed,
        score_as,
    )  # fmt: skip
    os.makedirs(plan.out, exist_ok=True)
    log = _PointsLog(os.path.join(plan.out, LOG_FILE), plan.fingerprint, fresh)
    session = _Session(plan)
    references = {}
    if normalise:
        for task in plan.tasks:
            if task.name not in plan.own_adapters:
                continue
            cached = log.reference(task.name)
            references[task.name] = (
                cached
                if cached is not None
                else log.add_reference(task.name, session.reference(task))
            )
    for task in plan.tasks:
        if task.metric != "loglik" and references.get(task.name) == 0:
            LOG.warning(
                "%s: its own adapter alone scores 0 (%s); the task is not normalised",
                task.path,
                task.metric,
            )
            del references[task.name]
    rows = {}
    bar = tqdm(total=len(plan.points), desc="Grid points", unit="point", disable=not progress)

    def scored(point, scores):
        rows[_key(point)] = row = _row(point, scores, plan, references)
        bar.update()
        bar.set_postfix_str(
            f"{label(point)}: "
            + " ".join(f"{task} {score:.3f}" for task, score in scores.items())
            + f" | avg {row.average:.3f}"
        )
        return row

    pending = []
    for point in plan.points:
        scores = log.scores(point)
        if scores is None:
            pending.append(point)
        else:
            scored(point, scores)
    for group in lambda_groups(pending):
        for point, scores, times in session.score(group):
            log.add_point(point, scores)
            row = scored(point, scores)
            if on_point is not None:
                on_point(row, times)
    bar.close()
    session.close()
    result = _result(plan, references, [rows[_key(point)] for point in plan.points])
    _write_outputs(plan, result)
    for note in result.at_edge():
        LOG.warning("the best point is at the grid's edge: %s; a wider grid may score higher", note)
    if merge is not None:
        result.merged = _final_merge(plan, result, merge)
    return result


@dataclass
class _Plan:
    """Everything checked before any work: recipe, points, tasks, tokenizer, fingerprint."""

    config_path: str
    recipe: dict[str, Any]
    points: list[dict[str, Any]]
    configs: list[Any]  # mergekit MergeConfiguration per point
    tasks: list[Task]
    own_adapters: dict[str, str]  # task name -> adapter directory
    base_path: str
    base_revision: str | None
    tokenizer: Any
    options: Any  # mergekit MergeOptions
    device: str
    dtype: str | None
    evaluation: dict[str, Any]
    fingerprint: str
    out: str
    score_as: str  # "model" or "adapter"

    @classmethod
    def prepare(
        cls, config, data, grid, metric, out, device, merge, batch_size, max_new_tokens, seed,
        score_as=None,
    ) -> _Plan:  # fmt: skip
        from mergekit.config import MergeConfiguration
        from mergekit.options import MergeOptions
        from pydantic import ValidationError
        from transformers import AutoTokenizer

        from mergekit_corespace.evaluate import read_tasks
        from mergekit_corespace.glue.internals import install
        from mergekit_corespace.glue.run import validate_run
        from mergekit_corespace.glue.validation import check_parameters
        from mergekit_corespace.hub import adapter_directory

        install()
        config_path = os.fspath(config)
        if device not in ("cpu", "cuda"):
            raise CoreSpaceError(f"--device {device}: expected cpu or cuda")
        if merge not in (None, "model", "adapter"):
            raise CoreSpaceError(f"--merge {merge}: expected model or adapter")
        if score_as is None:
            score_as = "adapter" if merge == "adapter" else "model"
        if score_as not in ("model", "adapter"):
            raise CoreSpaceError(f"--score-as {score_as}: expected model or adapter")
        if batch_size < 1:
            raise CoreSpaceError(f"--batch-size {batch_size}: must be at least 1")
        recipe = _read_recipe(config_path)
        several = isinstance(grid, Sequence) and grid and all(isinstance(g, Mapping) for g in grid)
        grids = [parse_grid(one) for one in (grid if several else [grid])]
        metrics = {"*": metric} if isinstance(metric, str) else dict(metric)
        tasks = read_tasks(os.fspath(data), metrics)
        points = []
        for one in grids:
            points += [p for p in grid_points(one, recipe) if p not in points]
        options = MergeOptions(
            quiet=True,
            write_model_card=False,
            device=device,
            random_seed=seed,
        )
        configs, run = [], None
        for point in points:
            try:
                merge_config = MergeConfiguration.model_validate(point_recipe(recipe, point))
                check_parameters(merge_config)
            except ValidationError as error:
                raise CoreSpaceError(f"--grid {label(point)}: {_first_lines(error)}") from None
            except CoreSpaceError as error:
                raise CoreSpaceError(f"--grid {label(point)}: {error.message}") from None
            if merge_config.merge_method not in SPACES:
                raise CoreSpaceError(
                    f"{config_path}: merge_method {merge_config.merge_method!r}; the tuner "
                    f"merges with {', '.join(SPACES)}"
                )
            configs.append(merge_config)
            if run is None:
                run = validate_run(merge_config, options)  # adapters and base, headers only
        base = run.base_model.model
        adapters = {}
        for model in run.adapters:
            name = os.path.basename(os.path.normpath(model.lora.path))
            directory = adapter_directory(model.lora.path, model.lora.revision)
            adapters.setdefault(name, []).append(directory)
        own = {}
        for task in tasks:
            found = adapters.get(task.name, [])
            if len(found) > 1:
                raise CoreSpaceError(
                    f"{task.path}: {len(found)} adapters are named {task.name} "
                    f"({', '.join(found)}); rename one so the task has one own adapter"
                )
            if found:
                own[task.name] = found[0]
        try:
            tokenizer = AutoTokenizer.from_pretrained(base.path, revision=base.revision)
        except Exception as error:
            raise CoreSpaceError(
                f"base_model: {base.path}: no tokenizer to evaluate with ({_first_lines(error)})"
            ) from None
        check_tokenizer(tasks, tokenizer, base.path)
        dtype = configs[0].dtype
        evaluation = dict(batch_size=batch_size, max_new_tokens=max_new_tokens)
        settings = dict(evaluation, device=device, dtype=dtype, seed=seed)
        if score_as == "model":  # logs scored as adapters, before this choice, stay valid
            settings["scored_as"] = score_as
        fingerprint = _fingerprint(recipe, run, tasks, settings)
        if out is None:
            out = os.path.splitext(os.path.basename(config_path))[0] + "-tune"
        return cls(
            config_path=config_path,
            recipe=recipe,
            points=points,
            configs=configs,
            tasks=tasks,
            own_adapters=own,
            base_path=base.path,
            base_revision=base.revision,
            tokenizer=tokenizer,
            options=options,
            device=device,
            dtype=dtype,
            evaluation=evaluation,
            fingerprint=fingerprint,
            out=os.path.abspath(os.fspath(out)),
            score_as=score_as,
        )

    def config_of(self, point: Mapping[str, Any]):
        return self.configs[self.points.index(dict(point))]


class _Session:
    """The base model, loaded once, with one point's merged weights in it, or one adapter
    on it at a time (the task references are always adapters)."""

    def __init__(self, plan: _Plan):
        self.plan = plan
        self.evaluator = Evaluator(plan.tokenizer, **plan.evaluation)
        self.model = None  # the PeftModel, once the first adapter is on
        self.active: str | None = None
        self.count = 0
        self._base = None
        self.spaces = SpaceCache()  # KnOTS spaces, shared by every point
        self.score_as = plan.score_as

    def _base_model(self):
        if self._base is None:
            from transformers import AutoModelForCausalLM

            self._base = AutoModelForCausalLM.from_pretrained(
                self.plan.base_path,
                revision=self.plan.base_revision,
                dtype=self.plan.dtype or "auto",
            )
            self._base.to(self.plan.device).eval()
        return self._base

    def _swap(self, add: Callable[[Any, str], None]) -> None:
        """Put a new adapter on (``add(model, name)``), then delete the previous one: the
        PeftModel always holds an adapter, and the base weights are not changed."""
        self.count += 1
        name = f"point{self.count}"
        add(self.model, name)
        self.model.set_adapter(name)
        if self.active is not None:
            self.model.delete_adapter(self.active)
        self.active = name
        self.model.eval()

    def _apply(self, export) -> None:
        import torch
        from peft import PeftModel, set_peft_model_state_dict

        # As PEFT loads a saved adapter onto a half-precision base (autocast_adapter_dtype):
        # LoRA weights in float32. Created empty and assigned, not initialised first.
        tensors = {
            name: tensor.to(
                self.plan.device, torch.float32 if tensor.dtype.itemsize < 4 else tensor.dtype
            )
            for name, tensor in export.tensors.items()
        }

        def add(model, name):
            if model is None:
                self.model = PeftModel(
                    self._base_model(), export.config, adapter_name=name, low_cpu_mem_usage=True
                )
            else:
                model.add_adapter(name, export.config, low_cpu_mem_usage=True)
            set_peft_model_state_dict(
                self.model, tensors, adapter_name=name, low_cpu_mem_usage=True
            )

        self._swap(add)

    def reference(self, task: Task) -> float:
        """The task's own adapter alone, loaded from disk by PEFT, on its task."""
        from peft import PeftModel

        directory = self.plan.own_adapters[task.name]

        def add(model, name):
            if model is None:
                self.model = PeftModel.from_pretrained(
                    self._base_model(), directory, adapter_name=name
                )
            else:
                model.load_adapter(directory, adapter_name=name)

        self._swap(add)
        return self.evaluator.score(self.model, task)

    def _plain_base(self):
        """The loaded base with no adapter on it: loaded again once an adapter was on (an
        adapter that saved a tied weight whole leaves it untied when taken off)."""
        if self.model is not None:
            self._base = self.model = self.active = None
        return self._base_model()

    def _put(self, weights) -> None:
        """Overwrite the loaded base's weights with ``(name, tensor)`` pairs."""
        import torch

        parameters = dict(self._plain_base().named_parameters())
        with torch.no_grad():
            for name, weight in weights:
                parameters[name].copy_(weight)

    def _scored_as_model(self, merged) -> bool:
        """Whether every weight of this merge is a parameter of its own in the loaded base;
        one that is not (tied to another, or named otherwise) is scored as an adapter."""
        parameters = dict(self._plain_base().named_parameters())  # tied ones: once
        stray = [n for n in [*merged.deltas, *merged.saved] if n not in parameters]
        if stray:
            LOG.warning(
                "%s is not a parameter of its own in the loaded model: points are scored as "
                "the merged adapter instead",
                stray[0],
            )
        return not stray

    def score(self, group: Sequence[Mapping[str, Any]]):
        """Score each point of a group from :func:`lambda_groups`: merged once, before λ,
        and scaled per point (unless an adapter saved a weight whole, which holds its λ).
        Yields ``(point, scores, times)``."""
        from mergekit_corespace.glue.adapter_output import factored_merge, merged_weights

        merged = None
        for point in group:
            started = time.perf_counter()
            if merged is None or merged.saved:
                config = self.plan.config_of(point)
                merge = merged_weights if self.score_as == "model" else factored_merge
                merged = merge(config, self.plan.options, spaces=self.spaces)
                if self.score_as == "model" and not self._scored_as_model(merged):
                    self.score_as = "adapter"
                    self._base = self.model = self.active = None  # reloaded unchanged
                    merged = factored_merge(config, self.plan.options, spaces=self.spaces)
            lambda_ = point["lambda"] if len(group) > 1 and not merged.saved else None
            if self.score_as == "model":
                merged_at = time.perf_counter()
                self._put(merged.weights(lambda_, self.plan.device))
                model = self._base_model()
            else:
                adapter = merged.adapter(lambda_)
                merged_at = time.perf_counter()
                self._apply(adapter.export)
                model = self.model
            applied_at = time.perf_counter()
            scores = {task.name: self.evaluator.score(model, task) for task in self.plan.tasks}
            done = time.perf_counter()
            times = PointTimes(merged_at - started, applied_at - merged_at, done - applied_at)
            yield point, scores, times

    def close(self) -> None:
        if self.model is not None and self.active is not None:
            self.model.delete_adapter(self.active)
        self.model = self.active = None


class _PointsLog:
    """``points.jsonl``: one JSON object a line, appended and flushed as each point (or
    reference) is scored; every line carries the run's fingerprint."""

    def __init__(self, path: str, fingerprint: str, fresh: bool):
        self.path = path
        self.fingerprint = fingerprint
        self.points: dict[str, dict[str, float]] = {}
        self.references: dict[str, float] = {}
        if fresh and os.path.exists(path):
            os.remove(path)
        if os.path.exists(path):
            self._read()

    def _read(self) -> None:
        with open(self.path, encoding="utf-8") as handle:
            text = handle.read()
        lines = text.split("\n")
        complete = lines[:-1]  # the part after the last line break is an interrupted write
        for number, line in enumerate(complete, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise CoreSpaceError(
                    f"{self.path}:{number}: not a points log line; use --fresh to start over"
                ) from None
            if record.get("fingerprint") != self.fingerprint:
                raise CoreSpaceError(
                    f"{self.path}:{number}: scored for another recipe, adapters, data, metric or "
                    "evaluation settings; use --fresh to start over, or another --out"
                )
            if "reference" in record:
                self.references[record["reference"]] = record["score"]
            else:
                self.points[_key(record["point"])] = record["scores"]
        if lines[-1]:
            LOG.warning("%s: dropping an unfinished last line (an interrupted run)", self.path)
            with open(self.path, "w", encoding="utf-8") as handle:
                handle.write("".join(line + "\n" for line in complete))

    def scores(self, point: Mapping[str, Any]) -> dict[str, float] | None:
        return self.points.get(_key(point))

    def reference(self, task: str) -> float | None:
        return self.references.get(task)

    def add_point(self, point: Mapping[str, Any], scores: dict[str, float]) -> None:
        self._append({"fingerprint": self.fingerprint, "point": dict(point), "scores": scores})
        self.points[_key(point)] = scores

    def add_reference(self, task: str, score: float) -> float:
        self._append({"fingerprint": self.fingerprint, "reference": task, "score": score})
        self.references[task] = score
        return score

    def _append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def _key(point: Mapping[str, Any]) -> str:
    return json.dumps(point, sort_keys=True)


def _read_recipe(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            recipe = yaml.safe_load(handle)
    except OSError as error:
        raise CoreSpaceError(f"{path}: unreadable ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise CoreSpaceError(f"{path}: not valid YAML ({_first_lines(error)})") from None
    if not isinstance(recipe, dict):
        raise CoreSpaceError(f"{path}: a recipe must be a YAML mapping (merge_method, models, ...)")
    return recipe


def _space(point: Mapping[str, Any], recipe: Mapping[str, Any]) -> str | None:
    return point.get("merge_method", recipe.get("merge_method"))


def _first_lines(error: Exception) -> str:
    """Up to three lines of an error's message, joined (pydantic's name the field second)."""
    return " ".join(str(error).split("\n")[:3]).strip()


def _fingerprint(recipe, run, tasks: Sequence[Task], settings: Mapping[str, Any]) -> str:
    """What decides the scores: the recipe, the adapters' files, the base model's config and
    weight file sizes (not their contents: too large to hash per run), the task files,
    their metrics and the evaluation settings."""
    digest = hashlib.sha256()

    def add(value: Any) -> None:
        digest.update(json.dumps(value, sort_keys=True, default=str).encode() + b"\n")

    add({"format": FORMAT, "recipe": recipe, "settings": dict(settings)})
    for adapter in run.adapters.values():
        for path in (os.path.join(adapter.path, "adapter_config.json"), adapter.weights_file):
            add(_file_digest(path))
    base = run.checkpoint.reference.model.path
    if os.path.isdir(base):
        for name in sorted(os.listdir(base)):
            full = os.path.join(base, name)
            if name == "config.json":
                add(_file_digest(full))
            elif os.path.isfile(full) and name.endswith((".safetensors", ".bin")):
                add([name, os.path.getsize(full)])
    for task in tasks:
        add([task.name, task.metric, _file_digest(task.path)])
    return digest.hexdigest()[:16]


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _row(point, scores, plan: _Plan, references: Mapping[str, float]) -> Row:
    metrics = {task.name: task.metric for task in plan.tasks}
    normalised = {
        task: normalised_score(metrics[task], scores[task], reference)
        for task, reference in references.items()
    }
    return Row(
        point=dict(point),
        scores=dict(scores),
        average=sum(scores.values()) / len(scores),
        normalised=normalised,
        normalised_average=sum(normalised.values()) / len(normalised) if normalised else None,
    )


def _result(plan: _Plan, references: Mapping[str, float], rows: list[Row]) -> TuneResult:
    metrics = {task.name: task.metric for task in plan.tasks}
    by_normalised = len(references) == len(plan.tasks)
    if not by_normalised and len(set(metrics.values())) > 1:
        LOG.warning(
            "tasks are scored with different metrics (%s) and not every task has its own "
            "adapter to normalise by: the average mixes scales",
            ", ".join(f"{task} {metric}" for task, metric in metrics.items()),
        )

    def selected(row: Row) -> float:
        value = row.normalised_average if by_normalised else row.average
        return -math.inf if value is None or math.isnan(value) else value

    best = max(rows, key=selected)  # the first of equal scores, in grid order
    recipe = point_recipe(plan.recipe, best.point)
    return TuneResult(
        out=plan.out,
        metrics=metrics,
        references=dict(references),
        rows=rows,
        best=best,
        selected_by="normalised average" if by_normalised else "average",
        recipe=yaml.safe_dump(recipe, sort_keys=False),
    )


def _columns(result: TuneResult) -> tuple[list[str], list[str]]:
    keys = list(dict.fromkeys(key for row in result.rows for key in row.point))
    return keys, list(result.metrics)


def _markdown(result: TuneResult) -> str:
    keys, tasks = _columns(result)
    normalised = bool(result.references)
    header = [*keys, *(f"{t} ({result.metrics[t]})" for t in tasks), "average"]
    if normalised:
        header.append("normalised")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result.rows:
        mark = " *" if row is result.best else ""
        cells = [str(row.point.get(key, "")) for key in keys]
        cells += [f"{row.scores[t]:.4f}" for t in tasks] + [f"{row.average:.4f}"]
        if normalised:
            cells.append(f"{row.normalised_average:.4f}")
        cells[-1] += mark
        lines.append("| " + " | ".join(cells) + " |")
    if result.references:
        shown = ", ".join(f"{task} {score:.4f}" for task, score in result.references.items())
        lines.append(f"\nOwn adapter alone (references): {shown}")
    lines.append(f"Best by {result.selected_by}: {label(result.best.point)} (marked *)")
    lines += [
        f"At the grid's edge: {note}; a wider grid may score higher" for note in result.at_edge()
    ]
    return "\n".join(lines)


def _write_outputs(plan: _Plan, result: TuneResult) -> None:
    keys, tasks = _columns(result)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    normalised = bool(result.references)
    writer.writerow(
        [*keys, *tasks, "average"]
        + ([*(f"{t} normalised" for t in result.references), "normalised"] if normalised else [])
    )
    for row in result.rows:
        writer.writerow(
            [row.point.get(key, "") for key in keys]
            + [repr(row.scores[t]) for t in tasks]
            + [repr(row.average)]
            + (
                [
                    *(repr(row.normalised[t]) for t in result.references),
                    repr(row.normalised_average),
                ]
                if normalised
                else []
            )
        )
    _write(os.path.join(plan.out, "results.csv"), buffer.getvalue())
    summary = {
        "config": plan.config_path,
        "metrics": result.metrics,
        "references": result.references,
        "selected_by": result.selected_by,
        "best": _row_json(result.best),
        "points": [_row_json(row) for row in result.rows],
    }
    _write(os.path.join(plan.out, "results.json"), json.dumps(summary, indent=1) + "\n")
    _write(os.path.join(plan.out, "best.yml"), result.recipe)
    _plot(plan, result, os.path.join(plan.out, "score_vs_lambda.png"))


def _row_json(row: Row) -> dict[str, Any]:
    return {
        "point": row.point,
        "scores": row.scores,
        "average": row.average,
        "normalised": row.normalised,
        "normalised_average": row.normalised_average,
    }


def _write(path: str, text: str) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)


def _plot(plan: _Plan, result: TuneResult, path: str) -> None:
    """Selection score against λ, one line per inner method (and every other grid key)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_parameters = plan.recipe.get("parameters") or {}
    lines: dict[str, list[tuple[float, float]]] = {}
    for row in result.rows:
        parameters = {**base_parameters, **row.point}
        lam = parameters.get("lambda", 1.0)
        if not isinstance(lam, (int, float)):
            LOG.warning("%s: lambda is not one number (%s); no plot", plan.config_path, lam)
            return
        rest = {k: v for k, v in row.point.items() if k != "lambda"}
        rest.setdefault("merge", base_parameters.get("merge", "ta"))
        name = " · ".join(
            str(v) if k in ("merge", "merge_method") else f"{k} {v}" for k, v in rest.items()
        )
        score = row.normalised_average if result.selected_by != "average" else row.average
        lines.setdefault(name, []).append((float(lam), score))
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, values in lines.items():
        values.sort()
        axes.plot([v[0] for v in values], [v[1] for v in values], marker="o", label=name)
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


def _final_merge(plan: _Plan, result: TuneResult, kind: str) -> str:
    """The winning recipe merged by the same code ``mergekit-yaml`` (a model) or
    ``mergekit-corespace-lora`` (an adapter) run, into ``OUT/merged``."""
    config = plan.config_of(result.best.point)
    path = os.path.join(plan.out, "merged")
    if kind == "adapter":
        from mergekit_corespace.glue.adapter_output import merge_to_adapter

        return merge_to_adapter(config, path, plan.options).path
    import mergekit.merge

    options = plan.options.model_copy(update={"copy_tokenizer": True})
    mergekit.merge.run_merge(config, path, options=options)
    return path
