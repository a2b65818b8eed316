"""One tuning run, start to end: plan, references, every point not yet in the log scored
(λ groups sharing one merge), the winner chosen and written, and optionally merged."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mergekit_corespace.glue.staging import exclusive_lock
from mergekit_corespace.tune.grid import label, lambda_groups, point_key
from mergekit_corespace.tune.plan import Plan
from mergekit_corespace.tune.points_log import LOG_FILE, PointsLog
from mergekit_corespace.tune.report import near_zero_references, write_outputs
from mergekit_corespace.tune.results import PointTimes, Row, TuneResult
from mergekit_corespace.tune.selection import scored_row, select_best
from mergekit_corespace.tune.session import Session

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
    fresh: bool = False,
    progress: bool = True,
    on_point: Callable[[Row, PointTimes], None] | None = None,
    score_as: str | None = None,
    merge_options: Any = None,
) -> TuneResult:
    """Score every grid point of the recipe ``config`` on the task files in ``data``.

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
        random_seed: mergekit's ``--random-seed`` (DARE masks).
        fresh: discard the points a previous run in ``out`` scored.
        progress: show a progress bar over the grid points.
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
        merge_options=merge_options,
    )  # fmt: skip
    os.makedirs(os.path.dirname(plan.out), exist_ok=True)
    with exclusive_lock(plan.out, holder="tuning run"):  # one points log, one writer
        return _tune(plan, fresh, normalise, progress, on_point, merge)


def _tune(
    plan: Plan,
    fresh: bool,
    normalise: bool,
    progress: bool,
    on_point: Callable[[Row, PointTimes], None] | None,
    merge: str | None,
) -> TuneResult:
    """The run in ``plan.out``, which this process holds."""
    from tqdm import tqdm

    os.makedirs(plan.out, exist_ok=True)
    log = PointsLog(os.path.join(plan.out, LOG_FILE), plan.fingerprint, fresh)
    session = Session(plan)
    references = _references(plan, log, session) if normalise else {}
    rows = {}
    bar = tqdm(total=len(plan.points), desc="Grid points", unit="point", disable=not progress)

    def scored(point, scores, stderr):
        rows[point_key(point)] = row = scored_row(point, scores, plan, references, stderr)
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
            scored(point, scores, log.stderr(point))
    examples, times = {}, []  # of the points scored by this run
    for group in lambda_groups(pending):
        for point, evaluations, point_times in session.score(group):
            scores = {task: e.score for task, e in evaluations.items()}
            stderr = {task: e.stderr for task, e in evaluations.items()}
            log.add_point(point, scores, stderr)
            examples[point_key(point)] = {t: e.examples for t, e in evaluations.items()}
            times.append(point_times)
            row = scored(point, scores, stderr)
            if on_point is not None:
                on_point(row, point_times)
    bar.close()
    result = select_best(plan, references, [rows[point_key(point)] for point in plan.points])
    best = point_key(result.best.point)
    if best not in examples:  # scored by an earlier run: again, for its predictions
        for _, evaluations, _ in session.score([result.best.point]):
            examples[best] = {t: e.examples for t, e in evaluations.items()}
    session.close()
    result.run, timing = run_metadata(plan, session, times)
    write_outputs(plan, result, examples[best], timing)
    for note in result.at_edge():
        LOG.warning("the best point is at the grid's edge: %s; a wider grid may score higher", note)
    if merge is not None:
        result.merged = final_merge(plan, result, merge)
    return result


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


def _references(plan: Plan, log: PointsLog, session: Session) -> dict[str, float]:
    """Each task's own adapter's score on it (from the log when scored before); a choice
    or exact task whose adapter scores 0 is left unnormalised."""
    references = {}
    for task in plan.tasks:
        if task.name not in plan.own_adapters:
            continue
        cached = log.reference(task.name)
        references[task.name] = (
            cached if cached is not None else log.add_reference(task.name, session.reference(task))
        )
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
