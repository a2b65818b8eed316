"""What README.md promises about merges and outputs, each against an oracle of its own:
filters and layer gradients, the tokenizer copy, a replaced output, the adapter size
estimate, ``--energy``, and the rank / alpha patterns of a written adapter."""

import json

import pytest
import torch
from helpers import (
    invoke_cli,
    load_model_tensors,
    merge_yaml,
    peft_deltas,
    relative_error,
    run_in_process,
)
from safetensors import safe_open

from mergekit_corespace import merge_adapters, toy


def _lambda_of(name: str) -> float:
    """README's example: λ 0.5 on self_attn, elsewhere 1.0 → 0.6 from the first layer to
    the last (two layers here)."""
    if "self_attn" in name:
        return 0.5
    return 1.0 if ".layers.0." in name else 0.6


def test_filters_and_layer_gradients_set_lambda_per_weight(llama64, tmp_path):
    base, adapters = llama64
    chosen = [adapters["r8a"], adapters["r4"]]
    parameters = (
        "\n  merge: ta\n  lambda:\n    - filter: self_attn\n      value: 0.5\n"
        "    - value: [1.0, 0.6]"
    )
    merged = run_in_process(merge_yaml(base, chosen, (1.0, 0.7), parameters), tmp_path / "out")
    base_tensors = load_model_tensors(base)
    names = set(peft_deltas(base, chosen[0])) | set(peft_deltas(base, chosen[1]))
    assert {_lambda_of(n) for n in names} == {0.5, 1.0, 0.6}
    for name, tensor in merged.items():
        if name not in names:
            assert torch.equal(tensor, base_tensors[name]), name
            continue
        expected = _lambda_of(name) * sum(
            w * peft_deltas(base, a)[name] for a, w in zip(chosen, (1.0, 0.7))
        )
        assert relative_error(tensor - base_tensors[name], expected) < 1e-10, name


def test_the_output_carries_the_base_tokenizer_and_replaces_an_existing_model(tmp_path):
    from transformers import AutoTokenizer

    base = toy.save_tiny_model(str(tmp_path / "base"), "llama")
    toy.save_tiny_tokenizer(base)
    adapters = [
        toy.save_lora_adapter(base, str(tmp_path / name), r=4, seed=seed)
        for name, seed in (("a", 1), ("b", 2))
    ]
    out = tmp_path / "out"
    configs = {}
    for name, weights in (("first", (1.0, 1.0)), ("second", (0.3, 0.9))):
        configs[name] = tmp_path / f"{name}.yml"
        configs[name].write_text(merge_yaml(base, adapters, weights, "{merge: ties}"))
    for name in ("first", "second"):  # the second run replaces the first's model
        done = invoke_cli([str(configs[name]), str(out), "--no-write-model-card"])
        assert done.returncode == 0, done.stderr[-3000:]
    fresh = run_in_process(configs["second"].read_text(), tmp_path / "fresh")
    written = load_model_tensors(out)
    assert written.keys() == fresh.keys()
    assert all(torch.equal(written[k], fresh[k]) for k in fresh)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]
    # the base's tokenizer, chat template included
    theirs, ours = AutoTokenizer.from_pretrained(base), AutoTokenizer.from_pretrained(out)
    text = "Merged: 12 + 30 = 42?\n"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    chat = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(chat, tokenize=False) == theirs.apply_chat_template(
        chat, tokenize=False
    )


@pytest.mark.parametrize("method", ["ta", "ties"])
def test_the_adapter_size_estimate_bounds_what_is_written_closely(llama32, tmp_path, method):
    """README: for an adapter, rank ≤ Σ rₜ times (m + n) per module — the estimate is at
    least what is written, and not far above it."""
    from helpers import merge_config
    from mergekit.options import MergeOptions

    from mergekit_corespace.glue.run import validate_run

    root, base, adapters = llama32
    text = merge_yaml(base, adapters, parameters=f"{{merge: {method}}}")
    path = merge_adapters(base, adapters, method=method, out=str(tmp_path / "lora"))
    written = sum(p.stat().st_size for p in (tmp_path / "lora").iterdir())
    estimate = validate_run(merge_config(text), MergeOptions()).adapter_output_bytes(4)
    assert written <= estimate <= written * 1.1 + 4096, (written, estimate)
    assert path == str(tmp_path / "lora")


def _ranks(adapter) -> dict[str, int]:
    with safe_open(f"{adapter}/adapter_model.safetensors", "pt") as handle:
        return {
            key.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight": (
                handle.get_slice(key).get_shape()[0]
            )
            for key in handle.keys()
            if key.endswith("lora_A.weight")
        }


def test_energy_keeps_the_fewest_directions_holding_that_share(llama32, tmp_path):
    """``--energy 0.9`` (CLI) and ``energy=0.9`` (API): each module keeps the fewest
    singular directions of Σ wₜΔWₜ (PEFT's deltas) holding 90 % of its squared norm."""
    root, base, adapters = llama32
    weights = (1.0, 0.5, 0.8)
    expected = {}
    for name in set().union(*(peft_deltas(base, a) for a in adapters)):
        delta = sum(
            w * peft_deltas(base, a)[name]
            for a, w in zip(adapters, weights)
            if name in peft_deltas(base, a)
        )
        energy = torch.linalg.svdvals(delta.double()) ** 2
        share = energy.cumsum(0) / energy.sum()
        expected[name] = int((share < 0.9).sum()) + 1
    assert len(set(expected.values())) > 1  # the modules differ: a real per-module cut
    config = tmp_path / "merge.yml"
    config.write_text(merge_yaml(base, adapters, weights))
    done = invoke_cli(
        [str(config), str(tmp_path / "cli"), "--energy", "0.9"], script="mergekit-corespace-lora"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert _ranks(tmp_path / "cli") == expected
    api = merge_adapters(
        base, dict(zip(adapters, weights)), method="ta", out=str(tmp_path / "api"), energy=0.9
    )
    assert _ranks(api) == expected


def test_a_written_adapter_of_mixed_ranks_is_read_by_peft_at_scale_one(llama32, tmp_path):
    """README: ``lora_alpha = r`` and ``rank_pattern`` / ``alpha_pattern`` for modules of
    another rank, so that PEFT's scaling is 1 everywhere and ΔW = B A as written."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    root, base, adapters = llama32
    path = merge_adapters(base, adapters, method="ta", out=str(tmp_path / "lora"))
    ranks = _ranks(path)
    assert len(set(ranks.values())) > 1  # b has no k_proj / o_proj: other ranks there
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] and config["rank_pattern"]
    model = PeftModel.from_pretrained(toy.load_model(base), path)
    seen = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            seen[name + ".weight"] = module.r["default"]
            assert module.scaling["default"] == 1.0, name
            assert module.lora_A["default"].weight.shape[0] == module.r["default"], name
    assert seen == ranks


def _head_and_backbone(root):
    """A tiny BertModel and the same weights under a sequence-classification head
    (``bert.``-prefixed), each saved as a model of its own."""
    from transformers import AutoConfig, BertForSequenceClassification

    backbone = toy.save_tiny_model(str(root / "backbone"), "bert")
    config = AutoConfig.from_pretrained(backbone, num_labels=3)
    config.architectures = ["BertForSequenceClassification"]
    torch.manual_seed(0)
    head = BertForSequenceClassification(config)
    head.bert.load_state_dict(toy.load_model(backbone).state_dict())
    head.save_pretrained(root / "head")
    return backbone, str(root / "head")


def _adapter_deltas(adapter) -> dict[str, torch.Tensor]:
    """``α/r · B A`` per PEFT module path, straight from the adapter's files."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    with safe_open(adapter / "adapter_model.safetensors", "pt") as handle:
        keys = [k for k in handle.keys() if k.endswith("lora_A.weight")]
        return {
            key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): scale
            * handle.get_tensor(key.replace("lora_A", "lora_B")).double()
            @ handle.get_tensor(key).double()
            for key in keys
        }


def test_adapters_of_a_task_head_and_of_a_bare_backbone_merge_into_either(tmp_path):
    """README: adapters trained on a task head (``bert.encoder…``) or on a bare backbone
    (``encoder…``) merge into either base, each delta onto the weight it was trained on."""
    backbone, head = _head_and_backbone(tmp_path)
    trained_on_head = toy.save_lora_adapter(head, str(tmp_path / "on-head"), r=4, seed=1)
    trained_on_backbone = toy.save_lora_adapter(backbone, str(tmp_path / "on-bb"), r=4, seed=2)
    deltas = {}
    for adapter in (trained_on_head, trained_on_backbone):
        for module, delta in _adapter_deltas(tmp_path / adapter.rsplit("/", 1)[1]).items():
            backbone_name = module.removeprefix("bert.") + ".weight"
            deltas[backbone_name] = deltas.get(backbone_name, 0) + delta
    assert any(".query" in name for name in deltas) and len(deltas) > 8
    for base, prefix in ((backbone, ""), (head, "bert.")):
        text = merge_yaml(base, [trained_on_head, trained_on_backbone], (1.0, 1.0))
        merged = run_in_process(text, tmp_path / f"into-{prefix or 'backbone'}")
        base_tensors = load_model_tensors(base)
        for name, tensor in merged.items():
            key = name.removeprefix(prefix)
            if key in deltas:
                actual = tensor.double() - base_tensors[name].double()
                assert relative_error(actual, deltas[key]) < 1e-5, name
            else:
                assert torch.equal(tensor, base_tensors[name]), name
