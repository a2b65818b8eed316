"""Bad inputs: one clear error naming the file or field, before any output — and no
directory that looks like a finished model, nor any change to an existing one."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import expected_ta, invoke_cli, load_model_tensors, peft_deltas, run_in_process
from safetensors.torch import load_file, save_file

from mergekit_corespace import toy
from mergekit_corespace.errors import CoreSpaceError


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    base = toy.save_tiny_model(str(root / "base"), "llama")
    adapters = [toy.save_lora_adapter(base, str(root / f"a{i}"), r=8, seed=i) for i in (1, 2)]
    return root, base, adapters


def _copy(adapter, tmp_path, name="bad"):
    target = tmp_path / name
    shutil.copytree(adapter, target)
    return target


def _edit_config(adapter, **changes):
    path = Path(adapter) / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_tensors(adapter, edit):
    path = Path(adapter) / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _first(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


ADAPTER = r"bad/adapter_model\.safetensors: "  # the file every tensor problem names


class Unpicklable:
    """Stands for arbitrary pickled objects, which weights_only loading must refuse."""


def case_missing_adapter_dir(root, base, adapters, tmp):
    return [str(tmp / "nowhere")], {}, r"nowhere: adapter directory does not exist"


def case_missing_config(root, base, adapters, tmp):
    bad = _copy(adapters[0], tmp)
    os.remove(bad / "adapter_config.json")
    return [str(bad)], {}, r"bad/adapter_config\.json: missing"


def case_corrupt_config(root, base, adapters, tmp):
    bad = _copy(adapters[0], tmp)
    (bad / "adapter_config.json").write_text("{ not json")
    return [str(bad)], {}, r"bad/adapter_config\.json: unreadable JSON"


def case_missing_safetensors(root, base, adapters, tmp):
    bad = _copy(adapters[0], tmp)
    os.remove(bad / "adapter_model.safetensors")
    return [str(bad)], {}, r"bad/adapter_model\.safetensors: missing"


def case_corrupt_safetensors_header(root, base, adapters, tmp):
    bad = _copy(adapters[0], tmp)
    data = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(b"\xff" * 16 + data[16:])
    return [str(bad)], {}, r"bad/adapter_model\.safetensors: not a readable safetensors file"


def case_adapter_for_another_hidden_size(root, base, adapters, tmp):
    other = toy.save_tiny_model(
        str(tmp / "other-base"), "llama", hidden_size=32, intermediate_size=48
    )
    bad = toy.save_lora_adapter(other, str(tmp / "bad"), r=4, seed=3)
    return (
        [bad],
        {},
        ADAPTER + r".* gives a \(\d+, \d+\) delta .* but base weight .* is \(\d+, \d+\)",
    )


def case_transposed_a_and_b(root, base, adapters, tmp):
    bad = _copy(adapters[0], tmp)

    def swap(tensors):  # B stored under lora_A's key and A under lora_B's (o_proj is square)
        a, b = _first(tensors, "o_proj.lora_A.weight"), _first(tensors, "o_proj.lora_B.weight")
        tensors[a], tensors[b] = tensors[b], tensors[a]

    _edit_tensors(bad, swap)
    return (
        [str(bad)],
        {},
        ADAPTER + r".*o_proj\.lora_A\.weight is 64×8 .* lora_A and lora_B look swapped",
    )


def case_rank_pattern_disagrees_with_tensors(root, base, adapters, tmp):
    bad = _copy(adapters[0], tmp)
    _edit_config(bad, rank_pattern={"v_proj": 4})
    return (
        [str(bad)],
        {},
        ADAPTER + r".*v_proj has rank 8 in its tensors but the config .* says 4",
    )


def case_nan_in_one_lora_b(root, base, adapters, tmp):
    bad = _copy(adapters[0], tmp)
    _edit_tensors(
        bad,
        lambda t: t[_first(t, "layers.1.mlp.down_proj.lora_B.weight")].__setitem__(
            (0, 0), float("nan")
        ),
    )
    return (
        [adapters[1], str(bad)],
        {},
        r"bad/adapter_model\.safetensors: .*down_proj\.lora_B\.weight holds NaN or Inf",
    )


def case_inf_in_lora_a(root, base, adapters, tmp):
    bad = _copy(adapters[0], tmp)
    _edit_tensors(
        bad, lambda t: t[_first(t, "q_proj.lora_A.weight")].__setitem__((1, 2), float("inf"))
    )
    return (
        [str(bad)],
        {},
        r"bad/adapter_model\.safetensors: .*q_proj\.lora_A\.weight holds NaN or Inf",
    )


def case_dora(root, base, adapters, tmp):
    bad = toy.save_lora_adapter(base, str(tmp / "bad"), r=4, use_dora=True, seed=4)
    return [bad], {}, r"bad/adapter_config\.json: use_dora is set; DoRA rescales"


def case_lora_bias(root, base, adapters, tmp):
    bad = toy.save_lora_adapter(base, str(tmp / "bad"), r=4, lora_bias=True, seed=5)
    return [bad], {}, r"bad/adapter_config\.json: lora_bias is set"


def case_unknown_peft_type(root, base, adapters, tmp):
    from peft import IA3Config, get_peft_model

    model = get_peft_model(
        toy.load_model(base),
        IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    model.save_pretrained(tmp / "bad")
    return [str(tmp / "bad")], {}, r"bad/adapter_config\.json: peft_type 'IA3' is not supported"


def case_target_parameters(root, base, adapters, tmp):
    bad = _copy(adapters[0], tmp)
    _edit_config(bad, target_parameters=["mlp.experts.gate_up_proj"])
    return [str(bad)], {}, r"bad/adapter_config\.json: target_parameters is set"


def case_empty_adapter(root, base, adapters, tmp):
    bad = _copy(adapters[0], tmp)
    save_file({}, bad / "adapter_model.safetensors")
    return [str(bad)], {}, r"bad/adapter_model\.safetensors: holds no LoRA tensors"


def case_lora_a_without_lora_b(root, base, adapters, tmp):
    bad = _copy(adapters[0], tmp)
    _edit_tensors(bad, lambda t: t.pop(_first(t, "k_proj.lora_B.weight")))
    return [str(bad)], {}, r"bad/adapter_model\.safetensors: .*k_proj: lora_B is missing"


def case_not_peft_keys(root, base, adapters, tmp):
    bad = _copy(adapters[0], tmp)
    _edit_tensors(
        bad, lambda t: t.update({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 2)})
    )
    return (
        [str(bad)],
        {},
        ADAPTER + r"tensor 'lora_unet_down_blocks_0\.lora_down\.weight' is not a PEFT LoRA factor",
    )


def case_pickle_only_adapter(root, base, adapters, tmp):
    bad = _copy(adapters[0], tmp)
    os.remove(bad / "adapter_model.safetensors")
    torch.save({"payload": Unpicklable()}, bad / "adapter_model.bin")
    return (
        [str(bad)],
        {},
        r"bad/adapter_model\.bin: refused: it does not load with torch\.load\(weights_only=True\)",
    )


def case_module_the_base_does_not_have(root, base, adapters, tmp):
    bad = _copy(adapters[0], tmp)

    def rename(tensors):
        for key in [k for k in tensors if ".layers.0.self_attn.q_proj." in k]:
            tensors[key.replace("q_proj", "zz_proj")] = tensors.pop(key)

    _edit_tensors(bad, rename)
    _edit_config(
        bad,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "zz_proj",
        ],
    )
    return (
        [str(bad)],
        {},
        ADAPTER + r"changes 'model\.layers\.0\.self_attn\.zz_proj', which base model",
    )


def case_base_model_missing_a_shard(root, base, adapters, tmp):
    sharded = tmp / "sharded"
    toy.load_model(base).save_pretrained(sharded, max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    os.remove(sharded / victim)
    models = [f"{sharded}+{a}" for a in adapters]
    return (
        models,
        {"base": str(sharded)},
        rf"sharded/{victim}: missing; the base model's index lists it",
    )


def case_base_model_directory_missing(root, base, adapters, tmp):
    missing = tmp / "no-base"
    return (
        [f"{missing}+{adapters[0]}"],
        {"base": str(missing)},
        r"base_model: .*no-base is not a model directory",
    )


def case_unknown_inner_method(root, base, adapters, tmp):
    return adapters, {"parameters": "{merge: average}"}, r"parameters\.merge: .*'ta'"


def case_density_zero(root, base, adapters, tmp):
    return (
        adapters,
        {"parameters": "{merge: ties, density: 0}"},
        r"parameters\.density: Input should be greater than 0",
    )


def case_density_above_one(root, base, adapters, tmp):
    return (
        adapters,
        {"parameters": "{merge: dare, density: 1.5}"},
        r"parameters\.density: Input should be less than or equal to 1",
    )


def case_negative_weight_with_ties(root, base, adapters, tmp):
    return (
        adapters,
        {"parameters": "{merge: ties}", "weights": (1.0, -0.5)},
        r"models: .*a2 has weight -0\.5; merge: ties .* needs positive weights",
    )


def _negative_weight(method, weight):
    def case(root, base, adapters, tmp):
        return (
            adapters,
            {"parameters": f"{{merge: {method}}}", "weights": (1.0, weight)},
            rf"^models: .*a2 has weight {weight}; merge: {method} takes weighted means",
        )

    return case


for _method, _weight in [("dare_ties", -0.5), ("tsv", -1.0), ("cart", 0.0), ("iso_c", -2.0)]:
    globals()[f"case_weight_{_weight}_with_{_method}"] = _negative_weight(_method, _weight)
globals()["case_weight_-0.25_with_iso_cts"] = _negative_weight("iso_cts", -0.25)


def case_density_for_a_method_that_ignores_it(root, base, adapters, tmp):
    return (
        adapters,
        {"parameters": "{merge: tsv, density: 0.5}"},
        r"^parameters: density is only read by merge: ties / dare / dare_ties$",
    )


def case_global_ties_with_a_weight_saved_whole(root, base, adapters, tmp):
    saving = toy.save_lora_adapter(
        base,
        str(tmp / "saving"),
        r=4,
        seed=5,
        target_modules=["q_proj"],
        modules_to_save=["lm_head"],
    )
    return (
        [adapters[0], saving],
        {"parameters": "{merge: ties, ties_scope: global}"},
        r"^parameters\.ties_scope: global is not supported with adapters that save whole "
        r"weights \(modules_to_save; lm_head\.weight\); use ties_scope: module$",
    )


def case_output_is_a_folder_that_is_not_a_model(root, base, adapters, tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("mine")
    return adapters, {}, r"out: exists, is not empty and holds no model; refusing to replace it"


CASES = {name[5:]: function for name, function in globals().items() if name.startswith("case_")}


def _config(base, models, parameters="{merge: ta}", weights=None):
    weights = weights or [1.0] * len(models)
    entries = "".join(
        f"  - model: {m if '+' in m else base + '+' + m}\n    parameters: {{weight: {w}}}\n"
        for m, w in zip(models, weights)
    )
    return (
        f"merge_method: core_space\nbase_model: {base}\n"
        f"models:\n{entries}parameters: {parameters}\n"
    )


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_error_and_leaves_no_output(good, tmp_path, case, monkeypatch):
    from mergekit_corespace.glue.staging import ClaimedOutput

    root, base, adapters = good
    models, extra, message = CASES[case](root, base, adapters, tmp_path)
    config = _config(
        extra.get("base", base),
        models,
        extra.get("parameters", "{merge: ta}"),
        extra.get("weights"),
    )
    out = tmp_path / "out"
    existed = out.exists()
    before = _snapshot(out) if existed else None
    staged = []
    real_staging = ClaimedOutput.staging
    monkeypatch.setattr(
        ClaimedOutput, "staging", lambda self: staged.append(self) or real_staging(self)
    )
    with pytest.raises(CoreSpaceError, match=message) as raised:
        run_in_process(config, out)
    assert "\n" not in str(raised.value)  # one line
    # anchored: the message starts with what it names (a path may precede the file name)
    assert re.match(r"(?:\S*/)?(?:" + message.removeprefix("^") + ")", str(raised.value))
    assert not staged  # found before the merge started writing
    assert (_snapshot(out) == before) if existed else not out.exists()
    # mergekit-yaml itself: the same line on stderr, no traceback, exit status 1
    path = tmp_path / "config.yml"
    path.write_text(config)
    done = invoke_cli([str(path), str(out), "--no-copy-tokenizer", "--no-write-model-card"])
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert str(raised.value) in done.stderr
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]

    if not existed:  # and an existing model directory is left exactly as it was
        previous = toy.save_tiny_model(str(out), "llama", seed=9)
        before = _snapshot(out)
        with pytest.raises(CoreSpaceError, match=message):
            run_in_process(config, out)
        assert _snapshot(Path(previous)) == before
        assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_interrupt_while_writing_leaves_the_previous_output_untouched(good, tmp_path, monkeypatch):
    from mergekit.io import tensor_writer

    root, base, adapters = good
    out = Path(toy.save_tiny_model(str(tmp_path / "out"), "llama", seed=9))
    before = _snapshot(out)
    real_save = tensor_writer.TensorWriter.save_tensor
    calls = []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(tensor_writer.TensorWriter, "save_tensor", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_in_process(_config(base, adapters), out, out_shard_size=2000)
    assert len(calls) == 5
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------------------------------
# Accepted inputs, decided and documented


def test_negative_weight_subtracts_an_adapter_in_task_arithmetic(good, tmp_path):
    root, base, adapters = good
    out = run_in_process(_config(base, adapters, weights=(1.0, -0.5)), tmp_path / "out")
    expected = expected_ta(base, [(adapters[0], 1.0), (adapters[1], -0.5)])
    for name, tensor in out.items():
        assert torch.allclose(tensor.double(), expected[name], atol=1e-6), name


def test_an_adapter_listed_twice_is_merged_once_with_its_weights_added(good, tmp_path, caplog):
    root, base, adapters = good
    with caplog.at_level("WARNING"):
        twice = run_in_process(
            _config(
                base, [adapters[0], adapters[1], adapters[0]], "{merge: ties}", (0.5, 1.0, 0.25)
            ),
            tmp_path / "twice",
        )
    warned = [r.getMessage() for r in caplog.records if "listed twice" in r.getMessage()]
    assert warned == [f"{base}+{adapters[0]} is listed twice: merged once with weight 0.75"]
    once = run_in_process(_config(base, adapters, "{merge: ties}", (0.75, 1.0)), tmp_path / "once")
    for name in once:
        assert torch.equal(twice[name], once[name]), name


def test_an_adapter_naming_another_base_model_is_a_warning_not_an_error(good, tmp_path, caplog):
    root, base, adapters = good
    renamed = _copy(adapters[0], tmp_path, "renamed")
    _edit_config(renamed, base_model_name_or_path="someone/another-model")
    with caplog.at_level("WARNING"):
        merged = run_in_process(_config(base, [str(renamed)]), tmp_path / "out")
    assert any(
        "renamed: base_model_name_or_path is someone/another-model" in r.getMessage()
        for r in caplog.records
    )
    original = run_in_process(_config(base, [adapters[0]]), tmp_path / "original")
    for name in original:
        assert torch.equal(merged[name], original[name]), name


def test_weights_only_pickle_adapter_merges_like_its_safetensors_twin(good, tmp_path):
    from peft import PeftModel

    root, base, adapters = good
    model = PeftModel.from_pretrained(toy.load_model(base), adapters[0])
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    from_bin = run_in_process(_config(base, [str(tmp_path / "bin")]), tmp_path / "out-bin")
    from_st = run_in_process(_config(base, [adapters[0]]), tmp_path / "out-st")
    for name in from_st:
        assert torch.equal(from_bin[name], from_st[name]), name


def test_conv1d_gpt2_merge_equals_peft(tmp_path):
    base = toy.save_tiny_model(str(tmp_path / "base"), "gpt2", dtype=torch.float64)
    adapters = [
        toy.save_lora_adapter(base, str(tmp_path / f"a{i}"), r=2 * i, seed=i) for i in (1, 2)
    ]
    out = run_in_process(_config(base, adapters, weights=(1.0, 0.5)), tmp_path / "out")
    expected = expected_ta(base, [(adapters[0], 1.0), (adapters[1], 0.5)])
    changed = set(peft_deltas(base, adapters[0])) | set(peft_deltas(base, adapters[1]))
    assert any(".c_proj." in name for name in changed)  # square Conv1D weights included
    for name, tensor in out.items():
        if name in expected:
            assert torch.allclose(tensor, expected[name], rtol=1e-12, atol=1e-12), name


def test_embedding_lora_merge_equals_peft(tmp_path):
    base = toy.save_tiny_model(str(tmp_path / "base"), "llama", dtype=torch.float64)
    adapters = [
        toy.save_lora_adapter(
            base, str(tmp_path / f"a{i}"), r=4, seed=i, target_modules=["embed_tokens", "q_proj"]
        )
        for i in (1, 2)
    ]
    out = run_in_process(_config(base, adapters, weights=(1.0, 0.3)), tmp_path / "out")
    expected = expected_ta(base, [(adapters[0], 1.0), (adapters[1], 0.3)])
    assert "model.embed_tokens.weight" in peft_deltas(base, adapters[0])
    for name, tensor in out.items():
        assert torch.allclose(tensor, expected[name], rtol=1e-12, atol=1e-12), name


def test_modules_to_save_merge_as_dense_deltas_against_the_base(tmp_path):
    base = toy.save_tiny_model(str(tmp_path / "base"), "llama", dtype=torch.float64)
    adapters = []
    for i in (1, 2):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(i)
        model = get_peft_model(
            toy.load_model(base),
            LoraConfig(
                r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False
            ),
        )
        with torch.no_grad():  # a trained head: move it away from the base
            model.base_model.model.lm_head.modules_to_save["default"].weight.add_(
                torch.randn(128, 64)
            )
        model.save_pretrained(tmp_path / f"a{i}")
        adapters.append(str(tmp_path / f"a{i}"))
    out = run_in_process(_config(base, adapters, weights=(1.0, 0.5)), tmp_path / "out")
    expected = expected_ta(base, [(adapters[0], 1.0), (adapters[1], 0.5)])
    assert "lm_head.weight" in peft_deltas(base, adapters[0])
    for name, tensor in out.items():
        assert torch.allclose(tensor, expected[name], rtol=1e-12, atol=1e-12), name
    # and into a merged adapter: the head is saved whole again, the rest stays LoRA
    from mergekit_corespace import merge_adapters

    lora = merge_adapters(base, dict(zip(adapters, (1.0, 0.5))), out=str(tmp_path / "lora"))
    config = json.loads((Path(lora) / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"]
    applied = toy.load_model(base, dtype=torch.float64)
    from peft import PeftModel

    applied = PeftModel.from_pretrained(applied, lora).merge_and_unload().state_dict()
    for name, tensor in out.items():
        assert torch.allclose(applied[name].double(), tensor, atol=1e-6), name


def test_conv1d_and_embedding_adapters_round_trip_through_a_merged_adapter(tmp_path):
    from peft import PeftModel

    from mergekit_corespace import merge_adapters

    for model_type, targets in (("gpt2", None), ("llama", ["embed_tokens", "v_proj"])):
        base = toy.save_tiny_model(str(tmp_path / model_type / "base"), model_type)
        adapters = [
            toy.save_lora_adapter(
                base, str(tmp_path / model_type / f"a{i}"), r=4, seed=i, target_modules=targets
            )
            for i in (1, 2)
        ]
        merged = merge_adapters(
            base,
            adapters,
            method="ties",
            as_adapter=False,
            out=str(tmp_path / model_type / "model"),
            options={"copy_tokenizer": False},
        )
        lora = merge_adapters(
            base, adapters, method="ties", out=str(tmp_path / model_type / "lora")
        )
        applied = (
            PeftModel.from_pretrained(toy.load_model(base), lora).merge_and_unload().state_dict()
        )
        for name, tensor in load_model_tensors(merged).items():
            assert torch.allclose(applied[name], tensor, atol=1e-5), (model_type, name)
