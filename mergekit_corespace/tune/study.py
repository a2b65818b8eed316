"""Where a tuning run keeps what it scored: an Optuna study, by default in
``OUT/study.journal`` (rerunning the same command resumes it), or in ``--storage`` shared by
several workers. The study records the fingerprint of everything that decides the scores
and refuses a run with another; each trial holds its point, its scores and their standard
errors, and the study holds each task's reference."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from mergekit_corespace.errors import CoreSpaceError
from mergekit_corespace.tune.grid import Range, point_key

LOG = logging.getLogger(__package__)  # one logger for the tuner: mergekit_corespace.tune

STUDY_FILE = "study.journal"
STUDY_NAME = "mergekit-corespace-tune"
# a dead worker's trial on a database stops counting as running after this many seconds
HEARTBEAT_SECONDS = 60


def storage_of(out: str, url: str | None, fresh: bool):
    """The Optuna storage: a journal file in ``out`` by default, else ``url`` (a database
    URL such as ``sqlite:///study.db``, with heartbeats, or a journal file's path); and
    whether this run is its only writer (its stale running trials are its own)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if url is None:
        path = os.path.join(out, STUDY_FILE)
        if fresh and os.path.exists(path):
            os.remove(path)
        return JournalStorage(JournalFileBackend(path)), path, True
    try:
        if "://" in url:
            storage = optuna.storages.RDBStorage(
                url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=2 * HEARTBEAT_SECONDS
            )
        else:
            os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
            storage = JournalStorage(JournalFileBackend(url))
    except Exception as error:  # a bad URL, a missing database driver, an unwritable path
        raise CoreSpaceError(f"--storage {url}: {str(error).splitlines()[0]}") from None
    return storage, url, False


def describe_search(kind: str, space: Mapping[str, Any]) -> str:
    """What a sampled study's trials were drawn from: resuming it with another is refused."""
    shown = {key: str(v) if isinstance(v, Range) else v for key, v in space.items()}
    return json.dumps({"search": kind, "space": shown}, sort_keys=True, default=str)


def open_study(plan, pruner, description: str | None):
    """The run's study, created or resumed, checked against ``plan``'s fingerprint (and,
    for a sampled search, its search space); and whether this run is its only writer."""
    import optuna
    from optuna.trial import TrialState

    storage, where, only_writer = storage_of(plan.out, plan.storage, plan.fresh)
    name = plan.study_name or STUDY_NAME
    if plan.fresh and not only_writer:
        try:
            optuna.delete_study(study_name=name, storage=storage)
        except KeyError:
            pass
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=storage,
        pruner=pruner,
        study_name=name,
        direction="maximize",
        load_if_exists=True,
    )
    attrs = study.user_attrs
    if attrs.get("fingerprint", plan.fingerprint) != plan.fingerprint:
        raise CoreSpaceError(
            f"{where}: study {name} was scored for another recipe, adapters, data, metric or "
            "evaluation settings; use --fresh to start over, or another --out"
        )
    if description is not None and attrs.get("search", description) != description:
        raise CoreSpaceError(
            f"{where}: study {name} searched another space ({attrs['search']}); use --fresh "
            "to start over, or another --out / --study-name"
        )
    # the rules report different steps (a part's score, each example's): one per study
    pruned_by = attrs.get("pruner")
    if plan.prune is not None and pruned_by not in (None, plan.prune):
        raise CoreSpaceError(
            f"{where}: study {name} was pruned by the {pruned_by} rule, not --prune "
            f"{plan.prune}; use --prune {pruned_by}, --fresh to start over, or another --out"
        )
    study.set_user_attr("fingerprint", plan.fingerprint)
    if plan.prune is not None:
        study.set_user_attr("pruner", plan.prune)
    if description is not None:
        study.set_user_attr("search", description)
    if only_writer:  # this run holds OUT: a trial left running was interrupted
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            LOG.warning("%s: trial %d was interrupted; it is scored again", where, trial.number)
    return study, only_writer


def reference(study, task: str, part: str = "search") -> float | None:
    return study.user_attrs.get(f"reference:{part}:{task}")


def add_reference(study, task: str, score: float, part: str = "search") -> float:
    study.set_user_attr(f"reference:{part}:{task}", score)
    return score


def record(trial, point, scores, stderr, part: str = "search") -> None:
    """A trial's point, its scores and their standard errors, on the trial itself."""
    trial.set_user_attr("point", dict(point))
    trial.set_user_attr(f"scores:{part}", dict(scores))
    trial.set_user_attr(f"stderr:{part}", dict(stderr))


def scored_trials(study) -> dict[str, Any]:
    """The completed trials by their point (the first of a point scored twice)."""
    from optuna.trial import TrialState

    found = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "scores:search" in trial.user_attrs:
            found.setdefault(point_key(trial.user_attrs["point"]), trial)
    return found
