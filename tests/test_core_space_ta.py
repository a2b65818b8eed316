"""Core-space task arithmetic through mergekit's own run_merge equals PEFT's merges."""

import pytest
import torch
from helpers import assert_merge_matches, expected_ta, peft_deltas, run_in_process

from mergekit_corespace import toy

CASES = {
    "equal_ranks": [("r8a", 1.0), ("r8b", 0.5), ("r8c", -0.25)],
    "mixed_ranks_4_8_16": [("r4", 1.0), ("r8a", 0.7), ("r16", 0.3)],
    "rslora": [("rslora", 1.0), ("r8a", 1.0)],
    "rank_and_alpha_pattern": [("patterns", 0.8), ("r16", 0.6)],
    "differing_target_modules": [("qv_only", 1.0), ("mlp_only", 2.0), ("r4", 0.5)],
    "single_adapter": [("patterns", 1.0)],
}


def _yaml(base, adapters, weights, merge="ta", extra=""):
    models = "\n".join(
        f"  - model: {base}+{adapters[name]}\n    parameters: {{weight: {weight}}}"
        for name, weight in weights
    )
    return (
        f"merge_method: core_space\nbase_model: {base}\nmodels:\n{models}\n"
        f"parameters:\n  merge: {merge}\n{extra}"
    )


@pytest.mark.parametrize("case", CASES)
def test_core_ta_equals_sum_of_peft_deltas(llama64, tmp_path, case):
    base, adapters = llama64
    weights = CASES[case]
    out = run_in_process(_yaml(base, adapters, weights), tmp_path / "out")
    expected = expected_ta(base, [(adapters[name], w) for name, w in weights])
    changed = set().union(*(peft_deltas(base, adapters[name]) for name, _ in weights))
    assert changed
    assert_merge_matches(out, base, expected, changed, rtol=1e-10)


def test_single_adapter_equals_peft_merge_and_unload(llama64, tmp_path):
    base, adapters = llama64
    out = run_in_process(_yaml(base, adapters, [("r16", 1.0)]), tmp_path / "out")
    merged = toy.load_model(base, dtype=torch.float64)
    from peft import PeftModel

    merged = PeftModel.from_pretrained(merged, adapters["r16"]).merge_and_unload().state_dict()
    for name, tensor in out.items():
        assert torch.allclose(tensor, merged[name], rtol=1e-12, atol=1e-14), name


def test_lambda_scales_the_merged_delta(llama64, tmp_path):
    base, adapters = llama64
    weights = [("r4", 1.0), ("r8a", 0.5)]
    out = run_in_process(_yaml(base, adapters, weights, extra="  lambda: 0.3\n"), tmp_path / "o")
    expected = expected_ta(base, [(adapters[n], w) for n, w in weights], scale=0.3)
    changed = set(peft_deltas(base, adapters["r4"])) | set(peft_deltas(base, adapters["r8a"]))
    assert_merge_matches(out, base, expected, changed, rtol=1e-10)


def test_mean_averages_the_adapters_present_in_each_module(llama64, tmp_path):
    base, adapters = llama64
    weights = [("qv_only", 1.0), ("r4", 3.0)]  # k/o/mlp only in r4
    out = run_in_process(_yaml(base, adapters, weights, merge="mean"), tmp_path / "out")
    qv, r4 = peft_deltas(base, adapters["qv_only"]), peft_deltas(base, adapters["r4"])
    expected = expected_ta(base, [])
    for name in set(qv) | set(r4):
        present = [(d[name], w) for d, w in ((qv, 1.0), (r4, 3.0)) if name in d]
        expected[name] = expected[name] + sum(w * d for d, w in present) / sum(
            w for _, w in present
        )
    assert_merge_matches(out, base, expected, set(qv) | set(r4), rtol=1e-10)


@pytest.mark.parametrize("model_type", sorted(toy.ARCHITECTURES))
def test_every_architecture_maps_adapter_keys_to_base_weights(tmp_path, model_type):
    """Llama/Mistral/Qwen/Gemma/Phi-3 names, BERT/RoBERTa q/k/v names and prefixes."""
    base = toy.save_tiny_model(str(tmp_path / "base"), model_type, dtype=torch.float64)
    first = toy.save_lora_adapter(base, str(tmp_path / "a"), r=4, seed=1)
    second = toy.save_lora_adapter(base, str(tmp_path / "b"), r=6, lora_alpha=3, seed=2)
    config = (
        f"merge_method: core_space\nbase_model: {base}\nmodels:\n"
        f"  - model: {base}+{first}\n  - model: {base}+{second}\n"
        f"    parameters: {{weight: 0.5}}\n"
    )
    out = run_in_process(config, tmp_path / "out", clone_tensors=True)
    expected = expected_ta(base, [(first, 1.0), (second, 0.5)])
    changed = set(peft_deltas(base, first)) | set(peft_deltas(base, second))
    assert changed
    assert_merge_matches(out, base, expected, changed, rtol=1e-10)


def test_architecture_definition_and_checkpoint_disagreeing_is_a_warning(tmp_path, caplog):
    """gpt_neox: mergekit lists attention buffers transformers 5 does not save; an extra
    stored tensor no definition lists. The output stores what the base stores, less the
    unlisted tensor (mergekit never copies those), and says so."""
    from safetensors.torch import load_file, save_file

    base = toy.save_tiny_model(str(tmp_path / "base"), "gpt_neox")
    adapter = toy.save_lora_adapter(base, str(tmp_path / "a"), r=4, seed=1)
    shard = tmp_path / "base" / "model.safetensors"
    save_file({**load_file(shard), "extra.scale": torch.ones(3)}, shard, {"format": "pt"})
    config = f"merge_method: core_space\nbase_model: {base}\nmodels:\n  - model: {base}+{adapter}\n"
    with caplog.at_level("WARNING"):
        out = run_in_process(config, tmp_path / "out")
    messages = " ".join(r.getMessage() for r in caplog.records)
    # per layer: attention.bias, attention.masked_bias, attention.rotary_emb.inv_freq
    assert "GPTNeoXForCausalLM definition lists 6 weights the checkpoint does not store" in messages
    assert "stores 1 tensors mergekit's GPTNeoXForCausalLM definition does not list" in messages
    assert set(out) == set(load_file(shard)) - {"extra.scale"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merges_never_write_into_the_loaded_base(tmp_path, dtype):
    """mergekit keeps the base's memory-mapped loader across runs in one process: a merge
    that wrote into those pages would change every later run."""
    base = toy.save_tiny_model(str(tmp_path / "base"), "llama", dtype=dtype)
    adapter = toy.save_lora_adapter(base, str(tmp_path / "a"), r=4, seed=1)
    config = (
        f"merge_method: core_space\nbase_model: {base}\nmodels:\n"
        f"  - model: {base}+{adapter}\n    parameters: {{weight: WEIGHT}}\n"
    )
    first = run_in_process(config.replace("WEIGHT", "1.0"), tmp_path / "first")
    run_in_process(config.replace("WEIGHT", "-3.0"), tmp_path / "other")
    again = run_in_process(config.replace("WEIGHT", "1.0"), tmp_path / "again")
    for name in first:
        assert torch.equal(first[name], again[name]), name
