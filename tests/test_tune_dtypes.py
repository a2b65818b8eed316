"""The tuner scores the bytes the user gets: a point's score is the score of the written
merge as the user loads it — the merged adapter by ``PeftModel.from_pretrained`` on a
bfloat16 base (LoRA upcast to float32 by PEFT), the merged model in ``out_dtype``."""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import two_adapter_recipe

from mergekit_corespace.evaluate import Evaluator, read_tasks
from mergekit_corespace.tune import tune


def _setup(root, base_dtype, recipe_extra):
    base, recipe = two_adapter_recipe(root, base_dtype, recipe_extra)
    data = root / "data"
    data.mkdir()
    rng = random.Random(0)
    for name in ("a", "b"):
        lines = [
            json.dumps({"prompt": "".join(rng.choices("abcdef", k=5)) + ":", "answer": "xyz"})
            for _ in range(6)
        ]
        (data / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return base, str(data), recipe


def test_an_adapter_point_scores_as_peft_loads_the_written_adapter_on_a_bf16_base(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, data, recipe = _setup(tmp_path, torch.bfloat16, "dtype: bfloat16\n")
    result = tune(
        recipe, data, ["lambda=0.5,1"], metric="loglik", out=tmp_path / "out",
        merge="adapter", score_as="adapter", progress=False,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, result.merged).eval()
    kinds = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert kinds == {torch.float32}  # PEFT upcasts LoRA on a half-precision base
    evaluator = Evaluator(AutoTokenizer.from_pretrained(base))
    for task in read_tasks(data, {"*": "loglik"}):
        assert evaluator.score(model, task) == result.best.scores[task.name]


@pytest.mark.parametrize(
    ("extra", "written"),
    [("out_dtype: bfloat16\n", torch.bfloat16), ("", torch.bfloat16)],
    ids=["out_dtype", "stored dtype"],
)
def test_a_model_point_scores_the_written_merge_in_its_dtype(tmp_path, extra, written):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # a float32 base written as bfloat16, or a bfloat16 base whose config.json says float32
    base_dtype = torch.float32 if extra else torch.bfloat16
    base, data, recipe = _setup(tmp_path, base_dtype, extra)
    if not extra:
        config = json.loads((tmp_path / "base" / "config.json").read_text())
        config["dtype"] = "float32"
        (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    result = tune(
        recipe, data, ["lambda=0.5,1"], metric="loglik", out=tmp_path / "out", merge="model",
        progress=False,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(result.merged, dtype=written).eval()
    stored = {t.dtype for t in model.state_dict().values()}
    assert stored == {written}
    evaluator = Evaluator(AutoTokenizer.from_pretrained(base))
    for task in read_tasks(data, {"*": "loglik"}):
        assert evaluator.score(model, task) == result.best.scores[task.name]


def test_native_on_cpu_is_onednns_own_check():
    from mergekit_corespace.generation import native_on_cpu

    mkldnn = torch.ops.mkldnn
    assert native_on_cpu("bfloat16") is mkldnn._is_mkldnn_bf16_supported()
    assert native_on_cpu("torch.float16") is mkldnn._is_mkldnn_fp16_supported()
    assert native_on_cpu("float32") is None and native_on_cpu(None) is None


@pytest.mark.parametrize("native", [False, True, None], ids=["emulated", "native", "unknown"])
def test_scoring_in_a_dtype_the_cpu_emulates_is_said_before_any_point(
    tmp_path, monkeypatch, caplog, native
):
    """A CPU without bf16 instructions scores a bf16 model ~7x slower than float32: the
    tuner says so once, up front, and only then."""
    from mergekit_corespace.tune import plan

    asked = []
    monkeypatch.setattr(plan, "native_on_cpu", lambda dtype: asked.append(dtype) or native)
    _, data, recipe = _setup(tmp_path, torch.float32, "dtype: bfloat16\n")
    with caplog.at_level("WARNING", logger="mergekit_corespace.tune"):
        tune(recipe, data, ["lambda=1"], metric="loglik", out=tmp_path / "out", progress=False)
    said = [r.getMessage() for r in caplog.records if "emulates" in r.getMessage()]
    assert asked == ["bfloat16"]
    assert len(said) == (1 if native is False else 0)
    if said:
        assert said[0].startswith("points are scored in bfloat16") and "dtype: float32" in said[0]
