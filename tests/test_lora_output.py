"""Merging LoRAs into one LoRA: exact, truncated (Eckart–Young), loadable by PEFT and mergekit."""

import os
import re

import pytest
import torch
from helpers import (
    invoke_cli,
    load_model_tensors,
    merge_yaml,
    peft_deltas,
    relative_error,
    run_cli,
    run_in_process,
)
from safetensors import safe_open

from mergekit_corespace import merge_adapters, toy
from mergekit_corespace.options import MergeParameters
from mergekit_corespace.pipeline import merge_factors
from mergekit_corespace.spaces import truncate


def _yaml(base, adapters, merge_method, parameters):
    return merge_yaml(base, adapters, parameters=parameters, merge_method=merge_method)


def _apply_with_peft(base, adapter):
    from peft import PeftModel

    merged = PeftModel.from_pretrained(toy.load_model(base), adapter).merge_and_unload()
    return {name: tensor for name, tensor in merged.state_dict().items()}


@pytest.mark.parametrize(
    "merge_method, parameters",
    [
        ("core_space", "{merge: ta}"),
        ("core_space", "{merge: ties, density: 0.5}"),
        ("core_space", "{merge: tsv}"),
        ("knots", "{merge: dare_ties, density: 0.5}"),
    ],
)
def test_exact_adapter_reproduces_the_merged_model(llama32, tmp_path, merge_method, parameters):
    root, base, adapters = llama32
    text = _yaml(base, adapters, merge_method, parameters)
    config = tmp_path / "merge.yml"
    config.write_text(text)
    merged_model = run_in_process(text, tmp_path / "model")
    done = invoke_cli(
        [str(config), str(tmp_path / "lora"), "--random-seed", "0"],
        script="mergekit-corespace-lora",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # the summary line counts the modules written; an exact adapter loses nothing
    summary = re.search(
        r"merged adapter: (\d+) modules, rank \S+; relative truncation error worst (\S+) ",
        done.stderr,
    )
    with safe_open(tmp_path / "lora" / "adapter_model.safetensors", "pt") as handle:
        written = [k for k in handle.keys() if k.endswith("lora_A.weight")]
    assert summary and int(summary[1]) == len(written) > 0
    assert float(summary[2]) < 1e-6

    applied = _apply_with_peft(base, str(tmp_path / "lora"))
    for name, tensor in merged_model.items():
        assert torch.allclose(applied[name], tensor, rtol=1e-5, atol=1e-6), name

    # rank = Σ rₜ of the adapters on the module (minus null directions), never more
    with safe_open(tmp_path / "lora" / "adapter_model.safetensors", "pt") as handle:
        for key in handle.keys():
            if key.endswith("q_proj.lora_A.weight"):
                assert handle.get_slice(key).get_shape()[0] <= 4 + 8 + 6
            if (
                key.endswith("k_proj.lora_A.weight")
                and merge_method == "core_space"
                and "ta" in parameters
            ):
                assert handle.get_slice(key).get_shape()[0] == 4 + 6  # b has no k_proj


def test_adapter_loads_in_peft_and_gives_the_merged_models_logits(llama32, tmp_path):
    from peft import PeftModel

    root, base, adapters = llama32
    path = merge_adapters(
        base,
        list(zip(adapters, (1.0, 0.5, 0.8))),
        method="ties",
        out=str(tmp_path / "lora"),
        density=0.6,
    )
    model_path = merge_adapters(
        base,
        list(zip(adapters, (1.0, 0.5, 0.8))),
        method="ties",
        out=str(tmp_path / "model"),
        as_adapter=False,
        density=0.6,
        options={"copy_tokenizer": False},
    )
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    peft_model = PeftModel.from_pretrained(toy.load_model(base), path).eval()
    merged = toy.load_model(model_path).eval()
    with torch.no_grad():
        assert torch.allclose(peft_model(tokens).logits, merged(tokens).logits, atol=1e-5)


@pytest.mark.parametrize("layers", [None, [0]], ids=["every layer", "layers_to_transform"])
def test_the_written_target_modules_make_lora_layers_for_exactly_the_merged_modules(
    tmp_path, layers
):
    from peft import PeftConfig, PeftModel

    base = toy.save_tiny_model(str(tmp_path / "base"), "llama")
    options = {} if layers is None else dict(layers_to_transform=layers, layers_pattern="layers")
    adapters = [
        toy.save_lora_adapter(
            base, str(tmp_path / f"a{i}"), r=4, seed=i, target_modules=["q_proj", "v_proj"],
            **options,
        )
        for i in (1, 2)
    ]  # fmt: skip
    path = merge_adapters(base, adapters, method="ties", out=str(tmp_path / "lora"))
    with safe_open(os.path.join(path, "adapter_model.safetensors"), "pt") as handle:
        merged = {key.split(".lora_")[0].removeprefix("base_model.model.") for key in handle.keys()}
    model = PeftModel.from_pretrained(toy.load_model(base), path)
    made = {
        name.removeprefix("base_model.model.")
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }
    assert made == merged and len(merged) == 2 * (2 if layers is None else 1)
    targets = PeftConfig.from_pretrained(path).target_modules
    if layers is None:  # the inputs' own short names where they name exactly these
        assert sorted(targets) == ["q_proj", "v_proj"]


def test_mergekits_own_lora_syntax_reads_the_merged_adapter(llama32, tmp_path):
    root, base, adapters = llama32
    path = merge_adapters(base, adapters[:2], method="ta", out=str(tmp_path / "lora"))
    ours = run_in_process(
        f"merge_method: core_space\nbase_model: {base}\nmodels:\n"
        f"  - model: {base}+{adapters[0]}\n  - model: {base}+{adapters[1]}\n",
        tmp_path / "model",
    )
    stock = run_in_process(
        f"merge_method: passthrough\nmodels:\n  - model: {base}+{path}\n",
        tmp_path / "stock",
        lora_merge_cache=str(tmp_path / "cache"),
    )
    for name in ours:
        assert torch.allclose(stock[name], ours[name], rtol=1e-5, atol=1e-6), name


def test_adapter_is_small_and_never_dense(llama32, tmp_path):
    root, base, adapters = llama32
    path = merge_adapters(base, adapters, method="ties", out=str(tmp_path / "lora"))
    inputs = sum(os.path.getsize(os.path.join(a, "adapter_model.safetensors")) for a in adapters)
    assert os.path.getsize(os.path.join(path, "adapter_model.safetensors")) < 2 * inputs
    base_shapes = {n: t.shape for n, t in load_model_tensors(base).items()}
    with safe_open(os.path.join(path, "adapter_model.safetensors"), "pt") as handle:
        for key in handle.keys():
            rows, cols = handle.get_slice(key).get_shape()
            assert min(rows, cols) <= 4 + 8 + 6, key
            module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] + ".weight"
            assert module in base_shapes


@pytest.mark.parametrize("space", ["core", "knots", "full"])
def test_truncation_error_is_the_tail_of_the_singular_values(space):
    """Eckart–Young: the best rank-k error is the norm of the dropped singular values."""
    generator = torch.Generator().manual_seed(3)
    factors = [
        (
            torch.randn(40, r, generator=generator, dtype=torch.float64),
            torch.randn(r, 30, generator=generator, dtype=torch.float64),
        )
        for r in (3, 5, 4)
    ]
    delta = merge_factors(
        factors, [1.0, 0.7, 1.3], MergeParameters(merge="ties", density=0.6), space
    )
    dense = delta.to_dense()
    values = torch.linalg.svdvals(dense)  # independent of the factored path
    for k in (1, 4, 9):
        cut = truncate(delta, rank=k)
        tail = (values[k:] ** 2).sum().sqrt() / values.norm()
        assert cut.rank == k
        assert abs(cut.relative_error - tail.item()) < 1e-10
        assert abs(relative_error(cut.b @ cut.a, dense) - tail.item()) < 1e-10
    energy = truncate(delta, energy=0.9)
    share = (values[: energy.rank] ** 2).sum() / (values**2).sum()
    share_one_less = (values[: energy.rank - 1] ** 2).sum() / (values**2).sum()
    assert share >= 0.9 > share_one_less


def test_truncated_adapter_through_the_cli_reports_its_error(llama32, tmp_path):
    root, base, adapters = llama32
    config = tmp_path / "merge.yml"
    config.write_text(_yaml(base, adapters, "core_space", "{merge: ta}"))
    done = invoke_cli(
        [str(config), str(tmp_path / "lora"), "--rank", "3"], script="mergekit-corespace-lora"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # the reported errors are the singular-value tails of Σ wₜ ΔWₜ (PEFT's deltas) at rank 3
    tails = []
    for name in set().union(*(peft_deltas(base, a) for a in adapters)):
        delta = sum(
            w * peft_deltas(base, a)[name]
            for a, w in zip(adapters, (1.0, 0.5, 0.8))
            if name in peft_deltas(base, a)
        )
        values = torch.linalg.svdvals(delta.double())
        tails.append(((values[3:] ** 2).sum().sqrt() / values.norm()).item())
    summary = re.search(
        r"merged adapter: (\d+) modules, rank 3; relative truncation error worst (\S+) "
        r"\(\S+\), mean (\S+) ",
        done.stderr,
    )
    assert summary and int(summary[1]) == len(tails)
    assert float(summary[2]) == pytest.approx(max(tails), rel=1e-2)
    assert float(summary[3]) == pytest.approx(sum(tails) / len(tails), rel=1e-2)
    with safe_open(tmp_path / "lora" / "adapter_model.safetensors", "pt") as handle:
        assert all(3 in handle.get_slice(k).get_shape() for k in handle.keys())
    bad = invoke_cli(
        [str(config), str(tmp_path / "x"), "--rank", "zero"], script="mergekit-corespace-lora"
    )
    assert bad.returncode == 2 and "neither 'exact' nor an integer" in bad.stderr


def test_merged_adapter_is_byte_identical_across_runs(llama32, tmp_path):
    """Same YAML and seed: the same bytes, config included (PEFT keeps target_modules as a
    set, whose order changes with the interpreter's hash seed)."""
    root, base, adapters = llama32
    config = tmp_path / "merge.yml"
    config.write_text(_yaml(base, adapters, "core_space", "{merge: dare_ties, density: 0.5}"))
    outputs = []
    for hash_seed in ("1", "2"):  # new interpreters: the hash seed is fixed at start
        out = tmp_path / f"lora-{hash_seed}"
        done = run_cli(
            [str(config), str(out), "--random-seed", "4"],
            env={"PYTHONHASHSEED": hash_seed},
            script="mergekit-corespace-lora",
        )
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outputs[0] == outputs[1]
