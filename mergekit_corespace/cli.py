"""Console scripts.

- ``mergekit-corespace``: ``mergekit-yaml`` with explicit registration — same arguments
  and options; the fallback for environments that skip ``.pth`` files.
- ``mergekit-corespace-lora CONFIG OUT_DIR``: the same YAML and run options, but the
  output is one merged PEFT LoRA adapter instead of a model.
- ``mergekit-corespace-tune CONFIG --data DIR``: a grid search of the recipe's top-level
  parameters on the user's task files (:mod:`mergekit_corespace.tune`).
"""

from __future__ import annotations

import click


def main() -> None:
    from mergekit_corespace.glue.internals import install

    install()  # before run_yaml binds mergekit.merge.run_merge
    from mergekit.scripts.run_yaml import main as run_yaml

    run_yaml(prog_name="mergekit-corespace")


class _Rank(click.ParamType):
    name = "exact|N"

    def convert(self, value, param, ctx):
        if value in (None, "exact") or isinstance(value, int):
            return None if value in (None, "exact") else value
        try:
            rank = int(value)
        except ValueError:
            self.fail(f"{value!r} is neither 'exact' nor an integer", param, ctx)
        if rank < 1:
            self.fail(f"{rank} is not a positive rank", param, ctx)
        return rank


def _lora_command():
    from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

    @click.command("mergekit-corespace-lora", cls=PrettyPrintHelp)
    @click.argument("config_file")
    @click.argument("out_path")
    @click.option(
        "--rank",
        type=_Rank(),
        default="exact",
        show_default=True,
        help="rank of the merged adapter: 'exact' keeps every non-null direction",
    )
    @click.option(
        "--energy",
        type=click.FloatRange(0, 1, min_open=True),
        default=None,
        help="keep the fewest directions holding this share of each module's ‖ΔW‖²",
    )
    @add_merge_options
    def lora(merge_options: MergeOptions, config_file: str, out_path: str, rank, energy):
        import yaml
        from mergekit.config import MergeConfiguration

        from mergekit_corespace.glue.adapter_output import merge_to_adapter
        from mergekit_corespace.glue.internals import install

        install()
        merge_options.apply_global_options()
        with open(config_file, encoding="utf-8") as handle:
            config = MergeConfiguration.model_validate(yaml.safe_load(handle))
        report = merge_to_adapter(config, out_path, merge_options, rank=rank, energy=energy)
        click.echo(report.summary(), err=True)

    return lora


def lora_main() -> None:
    _lora_command()(prog_name="mergekit-corespace-lora")


def _tune_command():
    from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

    @click.command("mergekit-corespace-tune", cls=PrettyPrintHelp)
    @click.argument("config_file", type=click.Path(dir_okay=False))
    @click.option(
        "--data",
        type=click.Path(file_okay=False),
        help="directory of task files, one NAME.jsonl per task (NAME: its adapter's name)",
    )
    @click.option(
        "--tasks",
        metavar="NAME[,NAME]",
        help="lm-evaluation-harness tasks, scored by lm-eval on the model in memory "
        "(instead of or besides --data; needs the lm-eval extra)",
    )
    @click.option(
        "--include-path",
        type=click.Path(file_okay=False),
        help="a directory of lm-eval task YAML files for --tasks",
    )
    @click.option(
        "--limit", type=click.IntRange(min=1), help="score on the first N examples of each task"
    )
    @click.option(
        "--grid",
        multiple=True,
        metavar="NAME=V1,V2|LOW:HIGH[:log] ...",
        help="values of top-level parameters, merge_method and weight (one dimension per "
        "adapter; weight[NAME] for adapter NAME alone) to try, e.g. 'lambda=0.5,1,2 "
        "merge=ta,ties density=0.3,0.7', or ranges for "
        "a tpe/cmaes search, e.g. 'lambda=0.05:3:log weight=0:2'; repeatable "
        "[default: lambda=0.25,0.5,0.75,1,1.5]",
    )
    @click.option(
        "--search",
        type=click.Choice(["grid", "tpe", "cmaes"]),
        default="grid",
        show_default=True,
        help="every point of the grid, or --trials points drawn by Optuna's TPE or CMA-ES "
        "sampler (seeded by --random-seed)",
    )
    @click.option("--trials", type=int, help="the trials of a tpe or cmaes search [default: 40]")
    @click.option(
        "--prune",
        type=click.Choice(["median", "wilcoxon"]),
        is_flag=False,
        flag_value="median",
        help="score each trial on every task file in parts and stop hopeless ones: median "
        "(--prune alone) after a third, when below the median of earlier trials; wilcoxon "
        "after a third and two thirds, when worse than the best trial on the same examples "
        "by a signed-rank test (p < 0.3)",
    )
    @click.option(
        "--holdout-fraction",
        type=float,
        metavar="F",
        help="keep this share of each task file's examples out of the search; score the "
        "winner and two runners-up on them, with 95%% intervals",
    )
    @click.option(
        "--storage",
        metavar="URL|FILE",
        help="the Optuna study's storage, shared by workers running the same command: a "
        "database URL (sqlite:///tune.db) or a journal file [default: OUT/study.journal]",
    )
    @click.option(
        "--study-name", help="the study's name in --storage [default: mergekit-corespace-tune]"
    )
    @click.option(
        "--metric",
        multiple=True,
        metavar="[TASK=]METRIC",
        help="auto | choice | exact | loglik, for every task or for one; repeatable "
        "[default: auto: choice where examples give choices, else loglik]",
    )
    @click.option("--out", type=click.Path(file_okay=False), help="[default: CONFIG-tune]")
    @click.option(
        "--merge",
        type=click.Choice(["model", "adapter"]),
        help="also write the winning merge to OUT/merged, as a model or as an adapter",
    )
    @click.option(
        "--score-as",
        type=click.Choice(["model", "adapter"]),
        help="score each point as the merged model mergekit-yaml writes (as fast as the base) or "
        "as the merged adapter mergekit-corespace-lora writes, on the base with PEFT "
        "[default: adapter with --merge adapter, else model]",
    )
    @click.option(
        "--normalise/--no-normalise",
        default=True,
        show_default=True,
        help="score each task's own adapter alone, and divide by it",
    )
    @click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
    @click.option(
        "--max-new-tokens",
        type=click.IntRange(min=1),
        help="exact: at most this many new tokens [default: 256, as lm-eval's generate_until]",
    )
    @click.option(
        "--stop",
        multiple=True,
        metavar="TEXT",
        help="exact: cut the generation before TEXT (escapes such as \\n read as in Python); "
        "repeatable [default: \\n\\n, as lm-eval's generate_until]",
    )
    @click.option(
        "--task-adapter",
        multiple=True,
        metavar="TASK=ADAPTER",
        help="the task's own adapter (as the recipe names it, its path, or its directory name) "
        "where names do not match; repeatable [default: the adapter named TASK]",
    )
    @click.option(
        "--fresh",
        is_flag=True,
        help="discard the study an earlier run in OUT (or --storage) scored",
    )
    @add_merge_options
    def tune(
        merge_options: MergeOptions, config_file, data, tasks, include_path, limit, grid, metric,
        out, merge, score_as, normalise, **settings,
    ):  # fmt: skip
        """Score a merge recipe's grid points (or search its settings with Optuna) on your
        own validation data; write the table, plots, the winning recipe (and with --merge,
        the merge itself)."""
        from mergekit_corespace.errors import CoreSpaceError
        from mergekit_corespace.tune import tune as run_tune

        metrics = {}
        for spec in metric:
            task, sep, name = spec.rpartition("=")
            key = task if sep else "*"
            if key in metrics:
                raise CoreSpaceError(
                    f"--metric {spec}: {key if sep else 'the default'} given twice"
                )
            metrics[key] = name
        merge_options.apply_global_options()
        result = run_tune(
            config_file,
            data,
            grid,
            tasks=tasks,
            include_path=include_path,
            limit=limit,
            metric=metrics or "auto",
            out=out,
            merge=merge,
            score_as=score_as,
            normalise=normalise,
            batch_size=settings["batch_size"],
            max_new_tokens=settings["max_new_tokens"],
            stop=[_unescape(text) for text in settings["stop"]] or None,
            task_adapter=_pairs("--task-adapter", settings["task_adapter"]),
            fresh=settings["fresh"],
            search=settings["search"],
            trials=settings["trials"],
            prune=settings["prune"],
            holdout_fraction=settings["holdout_fraction"],
            storage=settings["storage"],
            study_name=settings["study_name"],
            progress=not merge_options.quiet,
            merge_options=merge_options,
        )
        click.echo(result.table())
        click.echo(
            f"\nwritten to {result.out}: results.csv, results.json, predictions.jsonl, "
            "score_vs_lambda.png, optimization_history.png, best.yml"
        )
        if result.merged:
            click.echo(f"winning merge ({merge}): {result.merged}")

    return tune


def __getattr__(name: str):
    if name == "tune_command":  # built on first use: it imports mergekit
        return _tune_command()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _pairs(option: str, specs) -> dict[str, str]:
    """``NAME=VALUE`` arguments as a mapping; a name given twice or no ``=`` is an error."""
    from mergekit_corespace.errors import CoreSpaceError

    pairs = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not (sep and name and value):
            raise CoreSpaceError(f"{option} {spec}: expected NAME=VALUE")
        if name in pairs:
            raise CoreSpaceError(f"{option} {spec}: {name} given twice")
        pairs[name] = value
    return pairs


def _unescape(text: str) -> str:
    """``\\n``, ``\\t`` and other Python escapes as the characters they stand for."""
    from mergekit_corespace.errors import CoreSpaceError

    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as error:
        raise CoreSpaceError(f"--stop {text}: {error.reason}") from None


def tune_main() -> None:
    _tune_command()(prog_name="mergekit-corespace-tune")
