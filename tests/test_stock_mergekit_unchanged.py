"""Other merge methods behave exactly as stock mergekit, in the same interpreter."""

import hashlib

import torch
from helpers import load_model_tensors, run_in_process
from test_registration import WITHOUT_PTH_HOOK, python

from mergekit_corespace import toy


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_stock_without_plugin(config, out, extra=()):
    args = [str(config), str(out), "--no-copy-tokenizer", "--no-write-model-card", *extra]
    done = python(
        WITHOUT_PTH_HOOK + f"sys.argv = ['mergekit-yaml', *{args!r}]; "
        "from mergekit.scripts.run_yaml import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'mergekit_corespace.glue.internals' not in sys.modules"
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_stock_linear_gives_the_same_bytes_as_without_the_plugin(tmp_path):
    first = toy.save_tiny_model(str(tmp_path / "m1"), seed=1)
    second = toy.save_tiny_model(str(tmp_path / "m2"), seed=2)
    text = (
        f"merge_method: linear\nmodels:\n  - model: {first}\n    parameters: {{weight: 0.3}}\n"
        f"  - model: {second}\n    parameters: {{weight: 0.7}}\ndtype: float32\n"
    )
    config = tmp_path / "linear.yml"
    config.write_text(text)
    run_in_process(text, tmp_path / "with_plugin")
    _run_stock_without_plugin(config, tmp_path / "without_plugin")
    assert _sha256(tmp_path / "with_plugin" / "model.safetensors") == _sha256(
        tmp_path / "without_plugin" / "model.safetensors"
    )


def test_stock_lora_references_still_materialise_after_a_core_space_run(tmp_path):
    """A core-space run must not leave its adapter shortcut behind for stock methods."""
    base = toy.save_tiny_model(str(tmp_path / "base"))
    adapter = toy.save_lora_adapter(base, str(tmp_path / "a"), r=4, seed=3)
    models = f"models:\n  - model: {base}+{adapter}\n"
    run_in_process(f"merge_method: core_space\nbase_model: {base}\n{models}", tmp_path / "core")

    text = (
        f"merge_method: task_arithmetic\nbase_model: {base}\n{models}"
        "    parameters: {weight: 1.0}\n"
    )
    config = tmp_path / "ta.yml"
    config.write_text(text)
    cache_in, cache_out = tmp_path / "cache-in", tmp_path / "cache-out"
    run_in_process(text, tmp_path / "with_plugin", lora_merge_cache=str(cache_in))
    _run_stock_without_plugin(
        config, tmp_path / "without_plugin", ["--lora-merge-cache", str(cache_out)]
    )
    assert any(cache_in.iterdir())  # stock behaviour: the adapter was merged into a model copy
    assert _sha256(tmp_path / "with_plugin" / "model.safetensors") == _sha256(
        tmp_path / "without_plugin" / "model.safetensors"
    )
    # and the stock result agrees with the core-space one (a single adapter, TA)
    core, stock = (
        load_model_tensors(tmp_path / "core"),
        load_model_tensors(tmp_path / "with_plugin"),
    )
    for name in core:
        torch.testing.assert_close(core[name], stock[name], rtol=1e-5, atol=1e-6)
