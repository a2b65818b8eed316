"""Shared test helpers: in-process and subprocess merges, PEFT oracles."""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from mergekit_corespace import toy

BIN = Path(sys.executable).parent


def merge_config(text: str):
    from mergekit.config import MergeConfiguration

    return MergeConfiguration.model_validate(yaml.safe_load(text))


def run_in_process(config_text: str, out: str | os.PathLike, **options) -> dict[str, torch.Tensor]:
    """Run mergekit's own ``run_merge`` (patched by the plugin) and load the output."""
    from mergekit.merge import MergeOptions, run_merge

    defaults = dict(copy_tokenizer=False, write_model_card=False, quiet=True)
    run_merge(merge_config(config_text), str(out), MergeOptions(**{**defaults, **options}))
    return load_model_tensors(out)


def run_cli(args: list[str], cwd=None, env=None, script: str = "mergekit-yaml"):
    """Run a console script in a subprocess; returns the CompletedProcess.

    For what only a new interpreter shows: the installed script itself, the ``.pth`` hook,
    ``-j`` (torch's inter-op threads are set once per process), signals, and environment
    variables that libraries read at import (``HF_HUB_OFFLINE``, ``PYTHONHASHSEED``)."""
    return subprocess.run(
        [str(BIN / script), *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _click_command(script: str):
    """The click command behind a console script."""
    if script == "mergekit-yaml":
        from mergekit.scripts.run_yaml import main

        return main
    if script == "mergekit-corespace-lora":
        from mergekit_corespace.cli import _lora_command

        return _lora_command()
    raise ValueError(f"no in-process runner for {script}: use run_cli")


class _LogToCurrentStderr(logging.StreamHandler):
    """Log records to whatever ``sys.stderr`` is when they are emitted, formatted as the
    scripts' ``logging.basicConfig`` formats them."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter(logging.BASIC_FORMAT))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def invoke_cli(args: list[str], cwd=None, env=None, script: str = "mergekit-yaml"):
    """``run_cli`` without a new interpreter (which costs seconds of imports): the console
    script's own click command runs here, with the same arguments, exit code, stdout and
    stderr — log records included, and an unexpected exception's traceback, so that
    "one line, no traceback" assertions keep their meaning."""
    from click.testing import CliRunner

    if {"-j", "--num-threads"} & set(args):
        raise ValueError("-j sets torch's inter-op threads once per process: use run_cli")
    handler = _LogToCurrentStderr()
    logging.getLogger().addHandler(handler)
    previous = os.getcwd()
    try:
        os.chdir(cwd or previous)
        result = CliRunner(env=env).invoke(_click_command(script), args, prog_name=script)
    finally:
        os.chdir(previous)
        logging.getLogger().removeHandler(handler)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return subprocess.CompletedProcess([script, *args], result.exit_code, result.stdout, stderr)


def run_cli_batch(runs: list[tuple[str, list[str]]], env=None):
    """Several ``(script, args)`` invocations in one new interpreter with ``env``, one after
    another (``invoke_cli`` there): for runs that need environment variables read at
    import, paying the interpreter's start-up once."""
    with tempfile.TemporaryDirectory() as work:
        jobs, results = Path(work, "runs.json"), Path(work, "results.json")
        jobs.write_text(json.dumps(runs))
        done = subprocess.run(
            [sys.executable, __file__, str(jobs), str(results)],
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0 and results.exists(), done.stderr[-3000:]
        return [
            subprocess.CompletedProcess([script, *args], code, stdout, stderr)
            for (script, args), (code, stdout, stderr) in zip(runs, json.loads(results.read_text()))
        ]


def load_model_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@functools.cache
def peft_deltas(base: str, adapter: str) -> dict[str, torch.Tensor]:
    return toy.peft_deltas(base, adapter)


def expected_ta(base: str, adapters: list[tuple[str, float]], scale: float = 1.0):
    """``W + λ Σ_t w_t ΔW_t`` from PEFT's merge_and_unload, in float64."""
    expected = {
        name: tensor.double()
        for name, tensor in load_model_tensors(base).items()
        if tensor.is_floating_point()
    }
    for adapter, weight in adapters:
        for name, delta in peft_deltas(base, adapter).items():
            expected[name] = expected[name] + scale * weight * delta
    return expected


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def assert_merge_matches(out, base, expected, changed, rtol):
    """Changed weights match ``expected`` to ``rtol`` (relative Frobenius on the delta);
    every other tensor is bit-identical to the base."""
    base_tensors = load_model_tensors(base)
    assert set(base_tensors) <= set(out)
    for name, tensor in out.items():
        if name not in base_tensors:  # a tied weight mergekit writes out (e.g. lm_head)
            assert any(torch.equal(tensor, t) for t in base_tensors.values()), name
        elif name in changed:
            delta = tensor.double() - base_tensors[name].double()
            want = expected[name] - base_tensors[name].double()
            assert relative_error(delta, want) <= rtol, name
        else:
            assert torch.equal(tensor, base_tensors[name]), f"{name} changed"


@functools.cache
def peft_factors(base: str, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per base weight name, ``(s·B, A)`` as PEFT's own LoRA layers hold them (float64)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(toy.load_model(base, dtype=torch.float64), adapter)
    model = model.to(torch.float64)
    factors = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            b = module.lora_B["default"].weight.detach() * module.scaling["default"]
            factors[name + ".weight"] = (b, module.lora_A["default"].weight.detach())
    return factors


def merge_yaml(
    base: str,
    adapters,
    weights=(1.0, 0.5, 0.8),
    parameters: str = "{merge: ta}",
    merge_method: str = "core_space",
    base_model: str | None = None,
) -> str:
    """A mergekit config merging ``base+adapter`` for each adapter, weighted in turn."""
    models = "".join(
        f"  - model: {base}+{adapter}\n    parameters: {{weight: {weight}}}\n"
        for adapter, weight in zip(adapters, weights)
    )
    return (
        f"merge_method: {merge_method}\nbase_model: {base_model or base}\nmodels:\n{models}"
        f"parameters: {parameters}\n"
    )


if __name__ == "__main__":  # run_cli_batch's interpreter
    runs = json.loads(Path(sys.argv[1]).read_text())
    results = []
    for script, args in runs:
        done = invoke_cli(args, script=script)
        results.append((done.returncode, done.stdout, done.stderr))
    Path(sys.argv[2]).write_text(json.dumps(results))


def two_adapter_recipe(root, base_dtype=torch.float32, recipe_extra: str = ""):
    """A tiny Llama with the toy tokenizer, adapters ``a`` and ``b`` of it, and a core-space
    ``ta`` recipe of both: what a tuning test starts from. Returns (base, recipe path)."""
    base = toy.save_tiny_model(str(Path(root) / "base"), "llama", dtype=base_dtype)
    toy.save_tiny_tokenizer(base)
    adapters = [
        toy.save_lora_adapter(base, str(Path(root) / name), r=4, lora_alpha=8, seed=seed)
        for name, seed in (("a", 1), ("b", 2))
    ]
    recipe = toy.write_yaml(
        str(Path(root) / "recipe.yml"),
        f"merge_method: core_space\nbase_model: {base}\nmodels:\n"
        + "".join(f"  - model: {base}+{adapter}\n" for adapter in adapters)
        + f"parameters: {{merge: ta}}\n{recipe_extra}",
    )
    return base, recipe
