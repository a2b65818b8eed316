"""``OUT/points.jsonl``: every scored point (and reference) appended as it is scored, under
a fingerprint of everything that decides the scores, so an interrupted run resumes where it
stopped and a log scored for anything else is refused."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from mergekit_corespace.errors import CoreSpaceError
from mergekit_corespace.evaluate import Task
from mergekit_corespace.task_files import file_digest
from mergekit_corespace.tune.grid import point_key

LOG = logging.getLogger(__package__)  # one logger for the tuner: mergekit_corespace.tune

LOG_FILE = "points.jsonl"
FORMAT = 2  # of the points log; part of the fingerprint (2: standard errors)
# a base's files fingerprinted by size only: weights in any format, too large to hash per run
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".onnx")


class PointsLog:
    """``points.jsonl``: one JSON object a line, appended and flushed as each point (or
    reference) is scored; every line carries the run's fingerprint."""

    def __init__(self, path: str, fingerprint: str, fresh: bool):
        self.path = path
        self.fingerprint = fingerprint
        self.points: dict[str, dict[str, float]] = {}
        self.stderrs: dict[str, dict[str, float | None]] = {}
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
                self.points[point_key(record["point"])] = record["scores"]
                self.stderrs[point_key(record["point"])] = record.get("stderr", {})
        if lines[-1]:
            LOG.warning("%s: dropping an unfinished last line (an interrupted run)", self.path)
            with open(self.path, "w", encoding="utf-8") as handle:
                handle.write("".join(line + "\n" for line in complete))

    def scores(self, point: Mapping[str, Any]) -> dict[str, float] | None:
        return self.points.get(point_key(point))

    def reference(self, task: str) -> float | None:
        return self.references.get(task)

    def stderr(self, point: Mapping[str, Any]) -> dict[str, float | None]:
        return self.stderrs.get(point_key(point), {})

    def add_point(
        self, point: Mapping[str, Any], scores: dict[str, float], stderr: dict[str, float | None]
    ) -> None:
        record = {"point": dict(point), "scores": scores, "stderr": stderr}
        self._append({"fingerprint": self.fingerprint, **record})
        self.points[point_key(point)] = scores
        self.stderrs[point_key(point)] = stderr

    def add_reference(self, task: str, score: float) -> float:
        self._append({"fingerprint": self.fingerprint, "reference": task, "score": score})
        self.references[task] = score
        return score

    def _append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def fingerprint(recipe, run, tasks: Sequence[Task], settings: Mapping[str, Any]) -> str:
    """What decides the scores: this package's version and evaluation conventions, the
    recipe, the adapters' files, the base model's files (local or the Hub snapshot:
    config, tokenizer, chat template, generation config; the weight files by size, too
    large to hash per run), the task files, their metrics and the evaluation settings."""
    from importlib.metadata import version

    from mergekit_corespace.evaluate import CONVENTIONS

    digest = hashlib.sha256()

    def add(value: Any) -> None:
        digest.update(json.dumps(value, sort_keys=True, default=str).encode() + b"\n")

    add({"format": FORMAT, "recipe": recipe, "settings": dict(settings)})
    add({"version": version("mergekit-corespace"), "evaluation": CONVENTIONS})
    for adapter in run.adapters.values():
        for path in (os.path.join(adapter.path, "adapter_config.json"), adapter.weights_file):
            add(file_digest(path))
    base = run.checkpoint.directory
    for name in sorted(os.listdir(base)):
        full = os.path.join(base, name)
        if not os.path.isfile(full):
            continue
        if name.endswith(WEIGHT_SUFFIXES) or os.path.getsize(full) > (64 << 20):
            add([name, os.path.getsize(full)])
        elif not name.startswith("."):
            add([name, file_digest(full)])
    for task in tasks:
        add([task.name, task.metric, file_digest(task.path)])
    return digest.hexdigest()[:16]
