"""Every inner method in every space through `mergekit-yaml`'s own command (in process;
tests/test_mergekit_yaml.py runs the installed script), and reproducibility across
processes and thread counts."""

import hashlib

import pytest
import torch
from helpers import invoke_cli, load_model_tensors, peft_factors, relative_error, run_cli

from mergekit_corespace.options import MergeParameters
from mergekit_corespace.pipeline import merge_factors, module_seed

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
def test_method_through_mergekit_yaml_matches_the_math_on_peft_factors(
    llama32, tmp_path, merge_method, method
):
    root, base, adapters = llama32
    config = _config(root, base, adapters, merge_method, {"merge": method, "lambda": 0.9})
    merged = _merge(config, tmp_path / "out")

    # Oracle: the same method on the factors of PEFT's own LoRA layers, per weight.
    base_tensors = load_model_tensors(base)
    parameters = MergeParameters(merge=method, **{"lambda": 0.9})
    per_adapter = [peft_factors(base, a) for a in adapters]
    touched = set().union(*per_adapter)
    for name, tensor in merged.items():
        if name not in touched:
            assert torch.equal(tensor, base_tensors[name]), name
            continue
        present = [(f[name], w) for f, w in zip(per_adapter, WEIGHTS) if name in f]
        delta = merge_factors(
            [factor for factor, _ in present],
            [w for _, w in present],
            parameters,
            SPACES[merge_method],
            seed=module_seed(7, name),
        ).to_dense()
        assert torch.isfinite(tensor).all()
        assert relative_error(tensor.double() - base_tensors[name].double(), delta) < 1e-5, name


def test_global_ties_scope_trims_each_adapter_to_its_density_over_all_modules(llama32, tmp_path):
    from mergekit_corespace.merges import MagnitudeSketch
    from mergekit_corespace.spaces import CoreSpace

    root, base, adapters = llama32
    module = _merge(
        _config(root, base, adapters, "core_space", {"merge": "ties", "density": 0.3}),
        tmp_path / "module",
    )
    glob = _merge(
        _config(
            root,
            base,
            adapters,
            "core_space",
            {"merge": "ties", "density": 0.3, "ties_scope": "global"},
        ),
        tmp_path / "global",
    )
    assert any(not torch.equal(module[n], glob[n]) for n in module)

    # Oracle: first pass over PEFT factors, then the per-adapter thresholds in each module.
    per_adapter = [peft_factors(base, a) for a in adapters]
    names = sorted(set().union(*per_adapter))
    sketch = MagnitudeSketch(len(adapters))
    for name in names:
        present = [i for i, f in enumerate(per_adapter) if name in f]
        for i, task in zip(present, CoreSpace([per_adapter[i][name] for i in present]).tasks):
            sketch.add(i, task)
    thresholds = [sketch.threshold(i, 0.3) for i in range(len(adapters))]
    base_tensors = load_model_tensors(base)
    for name in names:
        present = [i for i, f in enumerate(per_adapter) if name in f]
        delta = merge_factors(
            [per_adapter[i][name] for i in present],
            [WEIGHTS[i] for i in present],
            MergeParameters(merge="ties", density=0.3, ties_scope="global"),
            "core",
            thresholds=[thresholds[i] for i in present],
        ).to_dense()
        actual = glob[name].double() - base_tensors[name].double()
        assert relative_error(actual, delta) < 1e-5, name


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
