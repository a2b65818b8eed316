"""The fingerprint of everything that decides a point's scores: a study scored under
another is refused, so a resumed (or shared) study never mixes scores of two setups."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from mergekit_corespace.evaluate import Task
from mergekit_corespace.task_files import file_digest

LOG = logging.getLogger(__package__)  # one logger for the tuner: mergekit_corespace.tune

FORMAT = 3  # of the scores a study holds; part of the fingerprint (3: an Optuna study)
# a base's files fingerprinted by size only: weights in any format, too large to hash per run
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".onnx")


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
