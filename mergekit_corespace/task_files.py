"""Task files: what the tuner and the benchmarks evaluate on, read and checked before any
work, each problem one line naming ``file:line``.

A task is a JSON Lines file, one example a line, in the formats fine-tuning tools use:

- ``{"prompt": "...", "answer": "..."}`` — the answer follows the prompt directly (write
  the separating space where your training data has it; the two are encoded together, as
  lm-evaluation-harness encodes them);
- ``{"messages": [{"role": ..., "content": ...}, ...]}`` — a chat; the last turn, which must
  be the assistant's, is the answer, and the turns before it are rendered with the
  tokenizer's own chat template (``add_generation_prompt=True``);
- either with ``"choices": [...]`` (alternative answers, the right one among them).

A task is scored with one metric (:mod:`mergekit_corespace.evaluate`); ``auto`` picks
``choice`` for a task whose examples all give choices, else ``loglik``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from mergekit_corespace.errors import CoreSpaceError

Metric = Literal["choice", "exact", "loglik"]
METRICS: tuple[str, ...] = ("choice", "exact", "loglik")
TASK_SUFFIX = ".jsonl"


@dataclass(frozen=True)
class Example:
    """One example: a plain ``prompt`` or chat ``messages`` (without the answer turn)."""

    line: int
    answer: str
    prompt: str | None = None
    messages: tuple[dict, ...] | None = None
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Task:
    """A task file: its name (the file stem), examples and the metric it is scored with."""

    name: str
    path: str
    examples: tuple[Example, ...]
    metric: Metric


def read_task(path: str, metric: str = "auto") -> Task:
    """Read and check one task file; any problem is one line naming ``path:line``."""
    if metric not in (*METRICS, "auto"):
        known = ", ".join(("auto", *METRICS))
        raise CoreSpaceError(f"{path}: unknown metric {metric!r} (known: {known})")
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise CoreSpaceError(f"{path}: unreadable ({error})") from None
    examples = [
        _example(path, number, text) for number, text in enumerate(lines, 1) if text.strip()
    ]
    if not examples:
        raise CoreSpaceError(f"{path}: no examples (the file is empty)")
    if metric == "auto":
        metric = "choice" if all(e.choices for e in examples) else "loglik"
    if metric == "choice":
        for example in examples:
            if not example.choices:
                raise CoreSpaceError(
                    f"{path}:{example.line}: metric choice needs a `choices` list in every example"
                )
    name = os.path.basename(path).removesuffix(TASK_SUFFIX)
    return Task(name=name, path=path, examples=tuple(examples), metric=metric)


def read_tasks(directory: str, metrics: Mapping[str, str] | None = None) -> list[Task]:
    """Every ``*.jsonl`` file of ``directory``, sorted by name. ``metrics``: task name ->
    metric, ``"*"`` for the others (default ``auto``)."""
    metrics = dict(metrics or {})
    if not os.path.isdir(directory):
        raise CoreSpaceError(f"{directory}: no such data directory")
    names = sorted(n for n in os.listdir(directory) if n.endswith(TASK_SUFFIX))
    if not names:
        raise CoreSpaceError(f"{directory}: holds no task files (*{TASK_SUFFIX})")
    stems = {name.removesuffix(TASK_SUFFIX) for name in names}
    for task in metrics:
        if task != "*" and task not in stems:
            raise CoreSpaceError(
                f"--metric {task}={metrics[task]}: {directory} has no task file {task}{TASK_SUFFIX}"
            )
    default = metrics.get("*", "auto")
    return [
        read_task(os.path.join(directory, n), metrics.get(n.removesuffix(TASK_SUFFIX), default))
        for n in names
    ]


def _example(path: str, number: int, text: str) -> Example:
    where = f"{path}:{number}"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        message = f"{where}: not valid JSON ({error.msg}, column {error.colno})"
        raise CoreSpaceError(message) from None
    if not isinstance(record, dict):
        raise CoreSpaceError(f"{where}: an example must be a JSON object")
    if "messages" in record and "prompt" in record:
        raise CoreSpaceError(f"{where}: give either `prompt` or `messages`, not both")
    prompt, messages = None, None
    if "messages" in record:
        turns = record["messages"]
        if not isinstance(turns, list) or not turns:
            raise CoreSpaceError(f"{where}: `messages` must be a non-empty list of turns")
        for i, turn in enumerate(turns):
            if not (
                isinstance(turn, dict)
                and isinstance(turn.get("role"), str)
                and isinstance(turn.get("content"), str)
            ):
                raise CoreSpaceError(
                    f"{where}: messages[{i}] must be an object with string `role` and `content`"
                )
        if turns[-1]["role"] != "assistant":
            raise CoreSpaceError(
                f"{where}: missing answer: the last of `messages` must be the assistant's turn "
                f"(got role {turns[-1]['role']!r})"
            )
        if "answer" in record:
            raise CoreSpaceError(
                f"{where}: a chat example's answer is its last assistant turn; drop `answer`"
            )
        answer, messages = turns[-1]["content"], tuple(turns[:-1])
    elif "prompt" in record:
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            raise CoreSpaceError(f"{where}: `prompt` must be a string")
        if "answer" not in record:
            raise CoreSpaceError(f"{where}: missing answer (no `answer` field)")
        answer = record["answer"]
    else:
        raise CoreSpaceError(f"{where}: an example needs `prompt` and `answer`, or `messages`")
    if not isinstance(answer, str) or not answer.strip():
        raise CoreSpaceError(f"{where}: missing answer (the answer must be a non-empty string)")
    choices = record.get("choices")
    if choices is not None:
        if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
            raise CoreSpaceError(f"{where}: `choices` must be a non-empty list of strings")
        if answer not in choices:
            raise CoreSpaceError(f"{where}: the answer {answer!r} is not one of the `choices`")
        choices = tuple(choices)
    return Example(line=number, answer=answer, prompt=prompt, messages=messages, choices=choices)


def check_tokenizer(tasks: Sequence[Task], tokenizer, model_path: str) -> None:
    """Chat examples need a chat template: checked before any work."""
    if getattr(tokenizer, "chat_template", None):
        return
    for task in tasks:
        for example in task.examples:
            if example.messages is not None:
                raise CoreSpaceError(
                    f"{task.path}:{example.line}: a chat example (`messages`) needs a chat "
                    f"template, and the tokenizer of {model_path} has none"
                )


def file_digest(path: str) -> str:
    """SHA-256 of a file, read in blocks: task files, lm-eval data files, a base's files."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
