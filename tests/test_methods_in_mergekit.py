"""Every inner method in every space through `mergekit-yaml`'s own command (in process;
tests/test_mergekit_yaml.py runs the installed script), and reproducibility across
processes and thread counts."""

import hashlib

import pytest
import reference
import torch
from helpers import invoke_cli, load_model_tensors, peft_factors, relative_error, run_cli

METHODS = ["ta", "mean", "ties", "dare", "dare_ties", "tsv", "cart", "iso_c", "iso_cts"]
SPACES = {"core_space": "core", "knots": "knots", "full_space": "full"}
WEIGHTS = [1.0, 0.6, 0.8]


def _config(root, base, adapters, merge_method, parameters):
    models = "".join(
        f"  - model: {base}+{a}\n    parameters: {{weight: {w}}}\n"
        for a, w in zip(adapters, WEIGHTS)
    )
    lines = "".join(f"  {k}: {v}\n" for k, v in parameters.items())
    path = root / f"{merge_method}-{hashlib.md5(lines.encode()).hexdigest()[:8]}.yml"
    path.write_text(
        f"merge_method: {merge_method}\nbase_model: {base}\nmodels:\n{models}parameters:\n{lines}"
    )
    return path


def _merge(config, out, *options, seed="7", run=invoke_cli):
    args = [str(config), str(out), "--no-copy-tokenizer", "--no-write-model-card"]
    done = run([*args, "--random-seed", seed, *options])
    assert done.returncode == 0, done.stderr[-3000:]
    return load_model_tensors(out)


@pytest.mark.parametrize("merge_method", SPACES)
@pytest.mark.parametrize("method", METHODS)
def test_method_through_mergekit_yaml_on_a_float32_model_matches_the_reference(
    llama32, tmp_path, merge_method, method
):
    """A float32 model, mixed ranks, partial targets and rsLoRA; the oracle is the
    independent reference (tests/reference.py) on the factors of PEFT's own LoRA layers.
    Float32 storage of W + ΔW bounds the agreement (tests/test_reference_merges.py holds
    float64 to 1e-10)."""
    root, base, adapters = llama32
    config = _config(root, base, adapters, merge_method, {"merge": method, "lambda": 0.9})
    merged = _merge(config, tmp_path / "out")

    base_tensors = load_model_tensors(base)
    per_adapter = [peft_factors(base, a) for a in adapters]
    touched = set().union(*per_adapter)
    for name, tensor in merged.items():
        if name not in touched:
            assert torch.equal(tensor, base_tensors[name]), name
            continue
        present = [(f[name], w) for f, w in zip(per_adapter, WEIGHTS) if name in f]
        delta = reference.merged_delta(
            [(b.numpy(), a.numpy()) for (b, a), _ in present],
            [w for _, w in present],
            {"merge": method, "lambda": 0.9},
            SPACES[merge_method],
            random_seed=7,
            weight_name=name,
        )
        assert torch.isfinite(tensor).all()
        actual = tensor.double() - base_tensors[name].double()
        assert relative_error(actual, torch.from_numpy(delta)) < 1e-5, name


def _digest(folder):
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.glob("*.safetensors"))
    }


@pytest.mark.parametrize("merge_method", ["core_space", "knots"])
def test_same_yaml_and_seed_give_identical_bytes_across_runs_and_thread_counts(
    llama32, tmp_path, merge_method
):
    root, base, adapters = llama32
    config = _config(root, base, adapters, merge_method, {"merge": "dare_ties", "density": 0.5})
    for threads in "12":  # new interpreters: -j holds for a whole process
        _merge(config, tmp_path / threads, "-j", threads, run=run_cli)
    _merge(config, tmp_path / "again")
    assert _digest(tmp_path / "1") == _digest(tmp_path / "2") == _digest(tmp_path / "again")

    _merge(config, tmp_path / "seed8", seed="8")
    assert _digest(tmp_path / "seed8") != _digest(tmp_path / "1")
