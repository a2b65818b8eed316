"""A tuning run checked before any work: the recipe read, its points validated as mergekit
configurations, the task files read and matched to adapters, the tokenizer, the
fingerprint. Every bad input stops here, before anything is loaded or written."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from mergekit_corespace.errors import CoreSpaceError
from mergekit_corespace.evaluate import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_STOP,
    Evaluation,
    Evaluator,
    Task,
    check_tokenizer,
)
from mergekit_corespace.generation import max_positions, native_on_cpu
from mergekit_corespace.harness import HarnessTasks
from mergekit_corespace.tune.fingerprint import fingerprint
from mergekit_corespace.tune.grid import (
    SPACES,
    check_every_value_is_read,
    grid_points,
    label,
    parse_grid,
    point_key,
    point_recipe,
)
from mergekit_corespace.tune.search import (
    PRUNE_CUTS,
    check_prune,
    check_search,
    corner_points,
    search_space,
)

LOG = logging.getLogger(__package__)  # one logger for the tuner: mergekit_corespace.tune


@dataclass
class Plan:
    """Everything checked before any work: recipe, points (or the space a search draws
    them from), tasks, tokenizer, fingerprint."""

    config_path: str
    recipe: dict[str, Any]
    points: list[dict[str, Any]]  # a grid's points; none for a sampled search
    configs: dict[str, Any]  # mergekit MergeConfiguration per point key (those validated)
    tasks: list[Task]  # what points are scored on (less the held-out examples)
    own_adapters: dict[str, str]  # task name -> adapter directory
    base_path: str
    base_revision: str | None
    options: Any  # mergekit MergeOptions for scoring: quiet, no model card
    merge_options: Any  # the user's MergeOptions, for the final merge
    device: str
    dtype: str | None
    evaluator: Evaluator  # the base's tokenizer; the tasks already encoded and checked
    fingerprint: str
    out: str
    score_as: str  # "model" or "adapter"
    harness: HarnessTasks | None = None  # the tasks named by --tasks
    limit: int | None = None  # examples per task
    search: str = "grid"  # grid, tpe or cmaes
    space: dict[str, Any] | None = None  # a sampled search's dimensions (weights expanded)
    trials: int = 0  # the trials the study ends with
    seed: int = 0  # the sampler's (and DARE's) seed
    prune: str | None = None  # median or wilcoxon: score each task in parts; stop hopeless trials
    holdout: list[Task] | None = None  # the held-out examples of each task file
    storage: str | None = None  # --storage (default: a journal file in out)
    study_name: str | None = None
    fresh: bool = False

    @property
    def harnessed(self) -> frozenset[str]:
        """The names of the tasks lm-eval scores (the rest are task files)."""
        return frozenset(self.harness.tasks) if self.harness else frozenset()

    def evaluations(self, model, tasks: Sequence[Task] | None = None) -> dict[str, Evaluation]:
        """``model``'s evaluation on every task (or on ``tasks``: the plan's, or parts of
        them), in order: task files by the evaluator, lm-eval tasks by lm-eval."""
        wanted = list(self.tasks if tasks is None else tasks)
        files = [t for t in wanted if t.name not in self.harnessed]
        evaluations = {t.name: self.evaluator.evaluate(model, t) for t in files}
        names = [t.name for t in wanted if t.name in self.harnessed]
        if names:
            evaluations |= self.harness.evaluate(
                model, self.evaluator.tokenizer, self.evaluator.batch_size, names
            )
        return {t.name: evaluations[t.name] for t in wanted}

    def parts(self) -> list[list[Task]]:
        """The tasks a trial is scored on, in turn: with pruning, each task file cut at the
        pruner's shares (:data:`~mergekit_corespace.tune.search.PRUNE_CUTS`), the lm-eval
        tasks with the last part; else all at once."""
        if self.prune is None:
            return [self.tasks]
        shares = PRUNE_CUTS[self.prune]
        parts: list[list[Task]] = [[] for _ in range(len(shares) + 1)]
        for task in self.tasks:
            size = len(task.examples)
            cuts = [0, *(math.ceil(size * share) for share in shares), size]
            if task.name in self.harnessed or cuts[1] >= size:
                parts[-1].append(task)
                continue
            for part, start, end in zip(parts, cuts, cuts[1:]):
                if end > start:
                    part.append(dataclasses.replace(task, examples=task.examples[start:end]))
        return [part for part in parts if part]

    @classmethod
    def prepare(
        cls, config, *, data, grid, metric, out, device, merge, batch_size, max_new_tokens,
        seed, score_as=None, stop=None, task_adapter=None, harness_tasks=None,
        include_path=None, limit=None, merge_options=None, search="grid", trials=None,
        prune=False, holdout_fraction=None, storage=None, study_name=None, fresh=False,
    ) -> Plan:  # fmt: skip
        from transformers import AutoTokenizer

        from mergekit_corespace.glue.internals import install
        from mergekit_corespace.glue.run import validate_run

        install()
        config_path = os.fspath(config)
        user_options = merge_options_of(merge_options)
        device = checked_device(device, user_options)
        if seed is None:
            seed = user_options.random_seed
        prune = check_prune(prune)
        if merge not in (None, "model", "adapter"):
            raise CoreSpaceError(f"--merge {merge}: expected model or adapter")
        if score_as is None:
            score_as = "adapter" if merge == "adapter" else "model"
        if score_as not in ("model", "adapter"):
            raise CoreSpaceError(f"--score-as {score_as}: expected model or adapter")
        if batch_size < 1:
            raise CoreSpaceError(f"--batch-size {batch_size}: must be at least 1")
        recipe = read_recipe(config_path)
        several = isinstance(grid, Sequence) and grid and all(isinstance(g, Mapping) for g in grid)
        grids = [parse_grid(one) for one in (grid if several else [grid])]
        metrics = {"*": metric} if isinstance(metric, str) else dict(metric)
        file_tasks, harness = read_all_tasks(data, metrics, harness_tasks, include_path, limit)
        holdout = None
        if holdout_fraction is not None:
            file_tasks, holdout = split_holdout(file_tasks, holdout_fraction, harness, seed or 0)
        tasks = file_tasks + (harness.as_tasks() if harness else [])
        for one in grids:
            check_every_value_is_read(one, recipe)
        points, space = [], None
        if search == "grid":
            for one in grids:
                points += [p for p in grid_points(one, recipe) if p not in points]
        elif len(grids) > 1:
            raise CoreSpaceError(f"--search {search}: searches one space; give one grid")
        else:
            space = search_space(grids[0], recipe)
        trials = check_search(search, trials, len(points))
        # the user's mergekit options (the final merge takes them as they are), quiet and
        # with no model card while scoring
        user_options = user_options.model_copy(update=dict(device=device, random_seed=seed))
        options = user_options.model_copy(update=dict(quiet=True, write_model_card=False))
        configs, run = {}, None
        for point in points or corner_points(space, recipe):
            merge_config = validated_config(recipe, point, config_path)
            configs[point_key(point)] = merge_config
            if run is None:
                run = validate_run(merge_config, options)  # adapters and base, headers only
        base = run.base_model.model
        own = own_adapters(tasks, run, task_adapter)
        try:
            tokenizer = AutoTokenizer.from_pretrained(base.path, revision=base.revision)
        except Exception as error:
            raise CoreSpaceError(
                f"base_model: {base.path}: no tokenizer to evaluate with ({first_lines(error)})"
            ) from None
        check_tokenizer(file_tasks, tokenizer, base.path)
        dtype = scored_dtype(next(iter(configs.values())), run.checkpoint)
        evaluation = dict(
            batch_size=batch_size,
            max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
            stop=list(DEFAULT_STOP if stop is None else stop),
        )
        evaluator = Evaluator(tokenizer, **evaluation)
        base_config = run.checkpoint.config
        positions = max_positions(base_config)
        evaluator.check_fits(file_tasks + (holdout or []), positions, base.path)
        # the device's kind only: workers on cuda:0 and cuda:1 share a study
        kind = device.split(":")[0]
        if kind == "cpu" and native_on_cpu(dtype) is False:
            LOG.warning(
                "points are scored in %s, which this CPU emulates several times slower than "
                "float32 (bf16: ~7x on an AVX2 CPU); tune on a GPU, or in float32 (dtype: "
                "float32) if that is the model you will use", dtype,
            )  # fmt: skip
        settings = dict(evaluation, device=kind, dtype=dtype, seed=seed, own=own, limit=limit)
        if holdout_fraction is not None:  # which examples the search scores
            settings["holdout_fraction"] = holdout_fraction
        if harness is not None:
            settings["lm-eval"] = harness.digests
        if score_as == "model":  # logs scored as adapters, before this choice, stay valid
            settings["scored_as"] = score_as
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
            options=options,
            merge_options=user_options,
            device=device,
            dtype=dtype,
            evaluator=evaluator,
            fingerprint=fingerprint(recipe, run, file_tasks, settings),
            harness=harness,
            limit=limit,
            out=os.path.abspath(os.fspath(out)),
            score_as=score_as,
            search=search,
            space=space,
            trials=trials,
            seed=seed or 0,
            prune=prune,
            holdout=holdout,
            storage=None if storage is None else os.fspath(storage),
            study_name=study_name,
            fresh=fresh,
        )

    def config_of(self, point: Mapping[str, Any]):
        """The point's mergekit configuration (validated on first use)."""
        key = point_key(point)
        if key not in self.configs:
            self.configs[key] = validated_config(self.recipe, point, self.config_path)
        return self.configs[key]


def validated_config(recipe: Mapping[str, Any], point: Mapping[str, Any], config_path: str):
    """``recipe`` with ``point``'s settings as a mergekit configuration, checked as
    ``mergekit-yaml`` would; a bad one is one line naming the point."""
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    from mergekit_corespace.glue.validation import check_parameters, check_plain_weights

    try:
        merge_config = MergeConfiguration.model_validate(point_recipe(recipe, point))
        check_parameters(merge_config)
        check_plain_weights(merge_config)
    except ValidationError as error:
        raise CoreSpaceError(f"--grid {label(point)}: {first_lines(error)}") from None
    except CoreSpaceError as error:
        raise CoreSpaceError(f"--grid {label(point)}: {error.message}") from None
    if merge_config.merge_method not in SPACES:
        raise CoreSpaceError(
            f"{config_path}: merge_method {merge_config.merge_method!r}; the tuner "
            f"merges with {', '.join(SPACES)}"
        )
    return merge_config


def split_holdout(tasks: Sequence[Task], fraction: float, harness, seed: int):
    """Each task file's examples parted into those searched on and those held out (a
    ``fraction`` of them, at least one, chosen by a hash of the seed, the task and the
    example's line: the same on every machine and run)."""
    import hashlib

    if not 0 < fraction < 1:
        raise CoreSpaceError(f"--holdout-fraction {fraction}: must lie between 0 and 1")
    if harness is not None:
        raise CoreSpaceError(
            "--holdout-fraction: holds out examples of task files (--data); lm-eval tasks "
            "(--tasks) keep their own splits"
        )
    searched, held = [], []
    for task in tasks:
        count = math.ceil(len(task.examples) * fraction)
        if count >= len(task.examples):
            raise CoreSpaceError(
                f"{task.path}: {len(task.examples)} example(s) leave none to search on with "
                f"--holdout-fraction {fraction}"
            )

        def rank(example, name=task.name):
            return hashlib.sha256(f"{seed}:{name}:{example.line}".encode()).digest()

        out = {id(e) for e in sorted(task.examples, key=rank)[:count]}
        kept = tuple(e for e in task.examples if id(e) not in out)
        searched.append(dataclasses.replace(task, examples=kept))
        left_out = tuple(e for e in task.examples if id(e) in out)
        held.append(dataclasses.replace(task, examples=left_out))
    return searched, held


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def scored_dtype(merge_config, checkpoint) -> str | None:
    """The dtype of the weights the user gets, which points are scored in: ``out_dtype``
    (what mergekit-yaml writes), else ``dtype``, else the base's stored floating dtype (the
    most common; mergekit keeps it), else None (config.json's)."""
    if merge_config.out_dtype or merge_config.dtype:
        return merge_config.out_dtype or merge_config.dtype
    stored = [_SAFETENSORS_DTYPES[kind] for kind in checkpoint.dtypes.values() if kind in
              _SAFETENSORS_DTYPES]  # fmt: skip
    return max(sorted(set(stored)), key=stored.count) if stored else None


def merge_options_of(given):
    """mergekit's ``MergeOptions`` from an instance, a mapping of its fields, or None;
    a bad field is one line."""
    from mergekit.options import MergeOptions
    from pydantic import ValidationError

    if isinstance(given, MergeOptions):
        return given
    try:
        return MergeOptions(**dict(given or {}))
    except ValidationError as error:
        raise CoreSpaceError(f"merge options: {first_lines(error)}") from None


def checked_device(device: str | None, options) -> str:
    """The torch device the model runs on and merges are computed on: ``device``, else
    mergekit's ``--device`` / ``--cuda``, else cpu; checked to exist before any work."""
    import torch

    device = device or options.device or ("cuda" if options.cuda else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise CoreSpaceError(f"--device {device}: not a torch device (cpu, cuda, cuda:N)") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (parsed.index or 0) >= count:
            raise CoreSpaceError(
                f"--device {device}: this machine has {count} CUDA device(s) that torch sees"
            )
    elif parsed.type != "cpu":
        raise CoreSpaceError(f"--device {device}: expected cpu, cuda or cuda:N")
    return device


def read_all_tasks(data, metrics, harness_names, include_path, limit):
    """The task files of ``data`` (their first ``limit`` examples) and the lm-eval tasks
    ``harness_names``; at least one of the two, and no name in both."""
    import dataclasses

    from mergekit_corespace.evaluate import read_tasks
    from mergekit_corespace.harness import load_harness_tasks

    if include_path is not None and not harness_names:
        raise CoreSpaceError(f"--include-path {include_path}: give --tasks to use its tasks")
    if data is None and not harness_names:
        raise CoreSpaceError("nothing to score on: give --data DIR (task files) or --tasks NAME")
    if limit is not None and limit < 1:
        raise CoreSpaceError(f"--limit {limit}: must be at least 1")
    file_tasks = read_tasks(os.fspath(data), metrics) if data is not None else []
    if data is None and set(metrics) - {"*"}:
        raise CoreSpaceError("--metric TASK=METRIC sets a task file's metric; give --data too")
    if limit is not None:
        file_tasks = [dataclasses.replace(t, examples=t.examples[:limit]) for t in file_tasks]
    if isinstance(harness_names, str):
        harness_names = [n for n in harness_names.split(",") if n]
    harness = None
    if harness_names:
        harness = load_harness_tasks(list(harness_names), include_path, limit)
        both = sorted({t.name for t in file_tasks} & set(harness.tasks))
        if both:
            raise CoreSpaceError(f"--tasks {both[0]}: also a task file of --data; rename one")
    return file_tasks, harness


def own_adapters(
    tasks: Sequence[Task], run, task_adapter: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Each task's own adapter directory: the one ``task_adapter`` maps it to (by the
    reference written in the recipe, its path, or its directory name), else the adapter
    whose directory (or Hub repository) has the task's name. A name two adapters share is
    ambiguous: an error."""
    from mergekit_corespace.hub import adapter_directory

    by_name, by_reference = {}, {}
    for model in run.adapters:
        reference = model.lora.path
        directory = adapter_directory(reference, model.lora.revision)
        name = os.path.basename(os.path.normpath(reference))
        by_name.setdefault(name, []).append(directory)
        for key in {reference, os.path.normpath(reference), os.path.abspath(reference)}:
            by_reference[key] = directory
    names = {task.name: task for task in tasks}
    mapping = dict(task_adapter or {})
    for task_name, adapter in mapping.items():
        where = f"--task-adapter {task_name}={adapter}"
        if task_name not in names:
            raise CoreSpaceError(f"{where}: no task file {task_name}.jsonl in the data")
        known = adapter in by_reference or os.path.abspath(adapter) in by_reference
        if not known and len(by_name.get(adapter, [])) != 1:
            listed = ", ".join(model.lora.path for model in run.adapters)
            shared = " (a name several adapters share)" if by_name.get(adapter) else ""
            raise CoreSpaceError(f"{where}: not an adapter of the recipe{shared}; it has {listed}")
    own = {}
    for task in tasks:
        if task.name in mapping:
            adapter = mapping[task.name]
            own[task.name] = by_reference.get(adapter) or by_reference.get(
                os.path.abspath(adapter), by_name.get(adapter, [None])[0]
            )
            continue
        found = by_name.get(task.name, [])
        if len(found) > 1:
            raise CoreSpaceError(
                f"{task.path}: {len(found)} adapters are named {task.name} "
                f"({', '.join(found)}); rename one, or map it with --task-adapter"
            )
        if found:
            own[task.name] = found[0]
    return own


def read_recipe(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            recipe = yaml.safe_load(handle)
    except OSError as error:
        raise CoreSpaceError(f"{path}: unreadable ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise CoreSpaceError(f"{path}: not valid YAML ({first_lines(error)})") from None
    if not isinstance(recipe, dict):
        raise CoreSpaceError(f"{path}: a recipe must be a YAML mapping (merge_method, models, ...)")
    return recipe


def first_lines(error: Exception) -> str:
    """Up to three lines of an error's message, joined (pydantic's name the field second)."""
    return " ".join(str(error).split("\n")[:3]).strip()
