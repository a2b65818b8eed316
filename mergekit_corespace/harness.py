"""lm-evaluation-harness tasks as the tuner's tasks (``--tasks``): found in lm-eval's own
registry or in YAML files under ``--include-path``, and scored with lm-eval's own task
definitions and metrics on the model in memory — ``HFLM`` takes the model object, so
nothing is written or reloaded per point, as mergekit-evolve scores its merges.

Each task is scored by its first metric (``metric_list``; ``acc`` for a multiple-choice
task by default), under its first filter, as lm-eval prints it. Needs the ``lm-eval``
extra (``pip install mergekit-corespace[lm-eval]``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mergekit_corespace.errors import CoreSpaceError
from mergekit_corespace.evaluate import Evaluation
from mergekit_corespace.task_files import file_digest

# lm-eval's standard errors: closed form for means (accuracy), bootstrapped for the rest
BOOTSTRAP_ITERS = 1000


@dataclass
class HarnessTasks:
    """lm-eval tasks, loaded once: each leaf task's name, its metric and what decides its
    scores (its resolved configuration and local data files)."""

    tasks: dict[str, Any]  # leaf task name -> lm-eval Task
    metrics: dict[str, str]  # task name -> metric (``acc``, ``exact_match``, ...)
    limit: int | None = None
    digests: dict[str, str] = field(default_factory=dict)  # task name -> fingerprint part

    def as_tasks(self) -> list:
        """The tasks as the tuner lists them (no examples of their own: lm-eval holds them)."""
        from mergekit_corespace.task_files import Task

        return [
            Task(name=name, path=f"lm-eval task {name}", examples=(), metric=metric)
            for name, metric in self.metrics.items()
        ]

    def evaluate(
        self, model, tokenizer, batch_size: int, names: Sequence[str] | None = None
    ) -> dict[str, Evaluation]:
        """``model``'s score on each task (or on ``names``) as lm-eval's ``evaluate``
        reports it, with its standard error and lm-eval's per-sample record."""
        from lm_eval import evaluator
        from lm_eval.models.huggingface import HFLM

        chosen = {name: task for name, task in self.tasks.items() if names is None or name in names}
        quiet = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
        levels = [logger.level for logger in quiet]
        for logger in quiet:  # lm-eval warns about the model object on every call
            logger.setLevel(logging.ERROR)
        try:
            harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            output = evaluator.evaluate(
                lm=harness,
                task_dict=chosen,
                limit=self.limit,
                bootstrap_iters=BOOTSTRAP_ITERS,
                log_samples=True,
                verbosity="ERROR",
            )
        finally:
            for logger, level in zip(quiet, levels):
                logger.setLevel(level)
        evaluations = {}
        for name in chosen:
            metric = self.metrics[name]
            result = output["results"][name]
            key = _metric_key(result, metric, name)
            stderr = result.get(key.replace(",", "_stderr,", 1))
            samples = [
                {
                    "doc_id": sample.get("doc_id"),
                    "target": sample.get("target"),
                    "response": sample.get("filtered_resps"),
                    metric: sample.get(metric),
                }
                for sample in output.get("samples", {}).get(name, [])
            ]
            stderr = float(stderr) if isinstance(stderr, (int, float)) else None
            evaluations[name] = Evaluation(float(result[key]), stderr, samples)
        return evaluations


def load_harness_tasks(
    names: Sequence[str], include_path: str | None = None, limit: int | None = None
) -> HarnessTasks:
    """The lm-eval tasks ``names`` (a group or tag stands for its tasks), checked before any work:
    an unknown name, or a metric where lower is better, is one line."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise CoreSpaceError(
            "--tasks needs lm-evaluation-harness: pip install 'mergekit-corespace[lm-eval]'"
        ) from None
    if include_path is not None and not os.path.isdir(include_path):
        raise CoreSpaceError(f"--include-path {include_path}: no such directory")
    manager = None
    if include_path is not None:  # its own tasks only: indexing lm-eval's takes long
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if not all(name in manager.all_tasks for name in names):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=include_path)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        where = f" (nor under --include-path {include_path})" if include_path else ""
        raise CoreSpaceError(
            f"--tasks {','.join(names)}: lm-eval knows no task {unknown[0]!r}{where}; "
            "`lm-eval ls tasks` lists them"
        )
    try:
        loaded = manager.load(list(names))
    except Exception as error:  # a YAML or dataset problem, in lm-eval's words
        message = " ".join(str(error).split())
        raise CoreSpaceError(f"--tasks {','.join(names)}: {message}") from None
    tasks = dict(loaded["tasks"])  # every leaf task, groups unfolded
    metrics, digests = {}, {}
    for name, task in tasks.items():
        metric = next(iter(task.aggregation()))
        if not task.higher_is_better().get(metric, True):
            raise CoreSpaceError(
                f"--tasks {name}: its metric {metric} is better when lower; the tuner "
                "maximises scores: choose a task scored by accuracy or exact match"
            )
        metrics[name] = metric
        digests[name] = _digest(task)
    return HarnessTasks(tasks=tasks, metrics=metrics, limit=limit, digests=digests)


def _metric_key(result: Mapping[str, Any], metric: str, name: str) -> str:
    """The key lm-eval reports ``metric`` under: ``metric,filter`` (the first filter)."""
    keys = [k for k in result if k.startswith(metric + ",") and "_stderr" not in k]
    if not keys:
        raise CoreSpaceError(f"--tasks {name}: lm-eval reported no {metric} ({sorted(result)})")
    return keys[0]


def _digest(task) -> str:
    """lm-eval's version, the task's resolved configuration, and the contents of the
    local data files it reads."""
    from importlib.metadata import version

    config = task.dump_config()
    digest = hashlib.sha256()
    digest.update(version("lm-eval").encode())
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    data_files = (config.get("dataset_kwargs") or {}).get("data_files") or {}
    paths = [data_files] if isinstance(data_files, str) else list(_strings(data_files))
    for path in paths:
        if os.path.isfile(path):
            digest.update(bytes.fromhex(file_digest(path)))
    return digest.hexdigest()


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    return [s for item in value for s in _strings(item)] if isinstance(value, list) else []
