"""Console scripts.

- ``mergekit-corespace``: ``mergekit-yaml`` with explicit registration — same arguments
  and options; the fallback for environments that skip ``.pth`` files.
- ``mergekit-corespace-lora CONFIG OUT_DIR``: the same YAML and run options, but the
  output is one merged PEFT LoRA adapter instead of a model.
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
