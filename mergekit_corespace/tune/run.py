"""One tuning run, start to end: plan, the study opened (or resumed), references, trials
until the study holds as many as asked, the winner chosen, re-scored on held-out
examples, written, and optionally merged."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mergekit_corespace.errors import CoreSpaceError
from mergekit_corespace.glue.staging import exclusive_lock
from mergekit_corespace.tune.grid import label, point_key
from mergekit_corespace.tune.holdout import rescored_on_holdout
from mergekit_corespace.tune.plan import Plan
from mergekit_corespace.tune.report import near_zero_references, write_outputs
from mergekit_corespace.tune.results import PointTimes, Row, TuneResult
from mergekit_corespace.tune.search import pruner_of, sampler_of
from mergekit_corespace.tune.selection import scored_row, select_best
from mergekit_corespace.tune.session import Session
from mergekit_corespace.tune.study import (
    add_reference,
    describe_search,
    open_study,
    reference,
    scored_trials,
)
from mergekit_corespace.tune.trials import Objective, run_trials

LOG = logging.getLogger(__package__)  # one logger for the tuner: mergekit_corespace.tune


def tune(
    config: str | os.PathLike,
    data: str | os.PathLike | None = None,
    grid: Sequence[str] | Mapping[str, Sequence[Any]] | None = None,
    *,
    tasks: str | Sequence[str] | None = None,
    include_path: str | os.PathLike | None = None,
    limit: int | None = None,
    metric: str | Mapping[str, str] = "auto",
    out: str | os.PathLike | None = None,
    device: str | None = None,
    merge: str | None = None,
    normalise: bool = True,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    stop: Sequence[str] | None = None,
    task_adapter: Mapping[str, str] | None = None,
    random_seed: int | None = None,
    search: str = "grid",
    trials: int | None = None,
    prune: bool | str = False,
    holdout_fraction: float | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    fresh: bool = False,
    progress: bool = True,
    on_point: Callable[[Row, PointTimes], None] | None = None,
    score_as: str | None = None,
    merge_options: Any = None,
) -> TuneResult:
    """Score every grid point of the recipe ``config`` on the task files in ``data``, or
    search its settings with TPE or CMA-ES.

    Args:
        config: a recipe of this project (``merge_method: core_space``, ``knots`` or
            ``full_space``), as for ``mergekit-yaml``.
        data: a directory of ``*.jsonl`` task files (:mod:`mergekit_corespace.evaluate`);
            ``nli.jsonl`` is the task of the adapter named ``nli``.
        tasks: lm-evaluation-harness tasks (names, or one comma-separated string), scored
            by lm-eval itself on the model in memory (:mod:`mergekit_corespace.harness`),
            instead of or besides ``data``; ``include_path``: a directory of lm-eval task
            YAML files.
        limit: score on the first ``limit`` examples of each task only.
        grid: ``["lambda=0.5,1,2", "merge=ta,ties density=0.3,0.7"]`` or
            ``{"lambda": [0.5, 1, 2]}``, or a list of such mappings (their points, in
            order: e.g. a λ range per inner method); default ``lambda=0.25,0.5,0.75,1,1.5``.
            ``weight=0.5,1`` (or ``weight=0:2``) is one dimension per adapter, written into
            each model's ``parameters.weight``, ``weight[NAME]`` the weight of adapter NAME
            alone (an adapter given neither keeps its recipe's); ``LOW:HIGH[:log]`` (or a
            :class:`~mergekit_corespace.tune.grid.Range`) is a range, for a tpe or cmaes
            search.
        search: ``grid`` (every point: queued λ group by λ group, or taken from Optuna's
            ``GridSampler`` by workers sharing a study), ``tpe`` or ``cmaes`` (``trials``
            points drawn from the grid's values and ranges, default 40), seeded by
            ``random_seed``: the same seed gives the same trials.
        prune: score each trial on every task file in parts and stop a hopeless one:
            ``"median"`` (or ``True``) after the first third, when it falls below the
            median of earlier trials (Optuna's ``MedianPruner``); ``"wilcoxon"`` after a
            third and after two thirds, racing the best trial on the same examples
            (Optuna's ``WilcoxonPruner``, p < 0.3: worse than it by a one-sided
            signed-rank test).
        holdout_fraction: keep this share of each task file's examples out of the search;
            the winner and two runners-up are scored on them (with 95 % intervals).
        storage: where the study lives: a database URL (``sqlite:///tune.db``,
            ``postgresql://...``) or a journal file's path, shared by workers running the
            same command; default ``OUT/study.journal``. ``study_name``: the study's name
            in it (default ``mergekit-corespace-tune``).
        metric: ``auto``, ``choice``, ``exact`` or ``loglik`` for every task, or
            ``{task: metric}`` (``"*"`` for the rest).
        out: output directory (default ``<config stem>-tune``): points log, tables, plot,
            winning recipe, and with ``merge`` the final merge in ``OUT/merged``.
        device: ``cpu``, ``cuda`` or ``cuda:N``: where the model runs and the merges are
            computed (default: ``merge_options``' device, else cpu).
        merge: ``model`` or ``adapter``: also write the winning merge.
        normalise: score each task's own adapter alone as the task's reference.
        batch_size, max_new_tokens, stop: evaluation settings: ``exact`` generates at
            most ``max_new_tokens`` tokens (default 256) and cuts the text before the first
            stop string (default ``["\\n\\n"]``) or end-of-sequence, as lm-eval's
            ``generate_until`` does.
        task_adapter: ``{task: adapter}``: a task's own adapter (its reference in the
            recipe, its path or its directory name) where names do not match, e.g.
            adapters all saved as ``checkpoint-500``.
        random_seed: mergekit's ``--random-seed`` (DARE masks), and the sampler's seed.
        fresh: discard the study a previous run in ``out`` (or ``storage``) scored.
        progress: show a progress bar over the trials.
        on_point: called after each newly scored point with its row and times.
        score_as: ``model`` (the merged weights in the loaded base: what ``mergekit-yaml``
            writes) or ``adapter`` (the merged adapter on it with PEFT: what
            ``mergekit-corespace-lora`` writes); default ``adapter`` with
            ``merge="adapter"``, else ``model``.
        merge_options: mergekit's ``MergeOptions`` (or a mapping of its fields), as
            ``mergekit-yaml`` takes them: ``trust_remote_code``, ``transformers_cache``,
            ``lazy_unpickle``, ``out_shard_size``, ``copy_tokenizer``, ... for the merges
            and the final merge.
    """
    plan = Plan.prepare(
        config, data=data, grid=grid, metric=metric, out=out, device=device, merge=merge,
        batch_size=batch_size, max_new_tokens=max_new_tokens, seed=random_seed,
        score_as=score_as, stop=stop, task_adapter=task_adapter, harness_tasks=tasks,
        include_path=None if include_path is None else os.fspath(include_path), limit=limit,
        merge_options=merge_options, search=search, trials=trials, prune=prune,
        holdout_fraction=holdout_fraction, storage=storage, study_name=study_name, fresh=fresh,
    )  # fmt: skip
    os.makedirs(os.path.dirname(plan.out), exist_ok=True)
    with exclusive_lock(plan.out, holder="tuning run"):  # one writer of OUT
        return _tune(plan, normalise, progress, on_point, merge)


def _tune(
    plan: Plan,
    normalise: bool,
    progress: bool,
    on_point: Callable[[Row, PointTimes], None] | None,
    merge: str | None,
) -> TuneResult:
    """The run in ``plan.out``, which this process holds."""
    from tqdm import tqdm

    os.makedirs(plan.out, exist_ok=True)
    # a sampled search resumes only over its own space; a grid's points may change from
    # run to run (the points scored before are kept)
    described = None if plan.search == "grid" else describe_search(plan.search, plan.space)
    study, only_writer = open_study(plan, pruner_of(plan.prune), described)
    # a fresh study draws from the seed itself (the same seed, the same trials); a resumed
    # one, or one shared with other workers, from a seed of its own, so that it does not
    # draw the points drawn before again
    seed = plan.seed + len(study.get_trials(deepcopy=False))
    if not only_writer:
        seed += os.getpid() * 1_000_003
    study.sampler = sampler_of(plan.search, plan.points, seed % 2**32, queued=only_writer)
    session = Session(plan)
    references = _references(plan, study, session) if normalise else {}
    bar = tqdm(total=plan.trials, desc="Trials", unit="trial", disable=not progress)

    def shown(point, scores, value):
        bar.update()
        scored = "pruned" if scores is None else " ".join(f"{t} {s:.3f}" for t, s in scores.items())
        bar.set_postfix_str(f"{label(point)}: {scored} | {value:.3f}")

    objective = Objective(plan, session, study, references, shown)
    objective.on_point = on_point
    bar.update(min(plan.trials, _finished(plan, study)))
    run_trials(study, plan, objective, in_order=only_writer)
    bar.close()
    rows = _rows(plan, study, references)
    if not rows:
        raise CoreSpaceError(f"{plan.out}: no trial of the study finished; nothing to choose from")
    result = select_best(plan, references, rows)
    best = point_key(result.best.point)
    if best not in objective.examples:  # scored by an earlier run: again, for its predictions
        model, _, _ = session.put(result.best.point)
        evaluations = plan.evaluations(model)
        objective.examples[best] = {t: e.examples for t, e in evaluations.items()}
    if plan.holdout:
        result.holdout = rescored_on_holdout(plan, study, session, result, normalise)
    session.close()
    result.run, timing = run_metadata(plan, session, objective.times)
    result.search = search_summary(plan, study)
    write_outputs(plan, result, objective.examples[best], timing, study)
    for note in result.at_edge():
        LOG.warning("the best point is at the grid's edge: %s; a wider grid may score higher", note)
    if merge is not None:
        result.merged = final_merge(plan, result, merge)
    return result


def _finished(plan: Plan, study) -> int:
    """The trials (or, for a grid, its points) the study holds finished already."""
    from optuna.trial import TrialState

    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    if plan.search != "grid":
        return len(finished)
    done = {point_key(t.user_attrs["point"]) for t in finished if "point" in t.user_attrs}
    return sum(point_key(p) in done for p in plan.points)


def _rows(plan: Plan, study, references) -> list[Row]:
    """The scored rows: a grid's in the order of its points, a search's by trial number."""
    scored = scored_trials(study)
    if plan.search == "grid":
        trials = [scored[point_key(p)] for p in plan.points if point_key(p) in scored]
    else:
        trials = sorted(scored.values(), key=lambda trial: trial.number)
    rows = []
    for trial in trials:
        attrs = trial.user_attrs
        row = scored_row(attrs["point"], attrs["scores:search"], plan, references,
                         attrs["stderr:search"])  # fmt: skip
        row.trial = trial.number
        rows.append(row)
    return rows


def search_summary(plan: Plan, study) -> dict[str, Any]:
    """How the search went: its trials by state, and the examples scored against the
    examples that scoring every finished trial whole would have taken."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    whole = sum(len(t.examples) for t in plan.tasks if t.examples)
    first = sum(len(t.examples) for t in plan.parts()[0] if t.examples)
    return {
        "search": plan.search,
        "trials": plan.trials,
        "prune": plan.prune,
        "complete": len(complete),
        "pruned": len(pruned),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        # a trial pruned by an earlier version of the tuner was always pruned after a third
        "examples_scored": len(complete) * whole
        + sum(t.user_attrs.get("examples scored", first) for t in pruned),
        "examples_unpruned": (len(complete) + len(pruned)) * whole,
        "pruned_trials": [
            {
                "trial": t.number,
                "point": t.user_attrs.get("point"),
                "scored_part": t.user_attrs.get("scored part", t.user_attrs.get("first part")),
                "examples_scored": t.user_attrs.get("examples scored", first),
            }  # fmt: skip
            for t in pruned
        ],
    }


def run_metadata(
    plan: Plan, session: Session, times: list[PointTimes]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What results.json records of the run (versions, where and how it scored: the same
    for the same inputs), and what timing.json records (the seconds a point took, mean
    over the points this run scored: results.json stays byte-identical across runs)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("mergekit-corespace", "mergekit", "torch", "transformers", "peft", "lm-eval"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    evaluator = plan.evaluator
    seconds = {
        part: sum(getattr(t, part) for t in times) / len(times) if times else None
        for part in ("merge", "apply", "evaluate")
    }
    return {
        "versions": versions,
        "device": plan.device,
        "dtype": plan.dtype,
        "scored_as": session.score_as,
        "batch_size": evaluator.batch_size,
        "max_new_tokens": evaluator.max_new_tokens,
        "stop": list(evaluator.stop),
        "limit": plan.limit,
        "examples": {t.name: len(t.examples) for t in plan.tasks if t.examples},
    }, {"points_scored_by_this_run": len(times), "seconds_per_point": seconds}


def _references(plan: Plan, study, session: Session) -> dict[str, float]:
    """Each task's own adapter's score on it (from the study when scored before); a choice
    or exact task whose adapter scores 0 is left unnormalised."""
    references = {}
    for task in plan.tasks:
        if task.name not in plan.own_adapters:
            continue
        cached = reference(study, task.name)
        if cached is None:
            cached = add_reference(study, task.name, session.reference(task))
        references[task.name] = cached
    for task in plan.tasks:
        if task.metric != "loglik" and references.get(task.name) == 0:
            LOG.warning(
                "%s: its own adapter alone scores 0 (%s); the task is not normalised",
                task.path,
                task.metric,
            )
            del references[task.name]
    metrics = {task.name: task.metric for task in plan.tasks}
    for task, score in near_zero_references(metrics, references).items():
        LOG.warning(
            "%s: its own adapter alone scores only %.4f; its normalised scores are its scores "
            "× %.0f and weigh most in the normalised average",
            task,
            score,
            1 / score,
        )
    return references


def final_merge(plan: Plan, result: TuneResult, kind: str) -> str:
    """The winning recipe merged by the same code ``mergekit-yaml`` (a model) or
    ``mergekit-corespace-lora`` (an adapter) run, into ``OUT/merged``."""
    config = plan.config_of(result.best.point)
    path = os.path.join(plan.out, "merged")
    if kind == "adapter":
        from mergekit_corespace.glue.adapter_output import merge_to_adapter

        return merge_to_adapter(config, path, plan.merge_options).path
    import mergekit.merge

    mergekit.merge.run_merge(config, path, options=plan.merge_options)
    return path
