"""Plain `mergekit-yaml` in a subprocess: PEFT parity, nothing materialised, and nothing
big written outside out/."""

import os

import pytest
import torch
from helpers import assert_merge_matches, expected_ta, load_model_tensors, peft_deltas, run_cli

from mergekit_corespace import toy


def _files(root):
    for folder, _, files in os.walk(root):
        for name in files:
            yield os.path.join(folder, name)


@pytest.mark.parametrize("model_type", ["llama", "bert"])
def test_mergekit_yaml_subprocess_matches_peft(tmp_path, model_type, llama32):
    if model_type == "llama":
        _, base, adapters = llama32
    else:
        base = toy.save_tiny_model(str(tmp_path / "base"), "bert")
        adapters = [
            toy.save_lora_adapter(base, str(tmp_path / f"a{i}"), r=4 * i, seed=i) for i in (1, 2)
        ]
    weights = [1.0, 0.5, 0.75][: len(adapters)]
    models = "\n".join(
        f"  - model: {base}+{a}\n    parameters: {{weight: {w}}}" for a, w in zip(adapters, weights)
    )
    config = tmp_path / "merge.yml"
    config.write_text(f"merge_method: core_space\nbase_model: {base}\nmodels:\n{models}\n")
    work, cache, out = tmp_path / "work", tmp_path / "lora-cache", tmp_path / "work" / "out"
    work.mkdir()
    done = run_cli(
        [str(config), str(out), "--lora-merge-cache", str(cache), "--no-copy-tokenizer"],
        cwd=work,
        env={"TMPDIR": str(work), "HF_HOME": str(work / "hf"), "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]

    merged = load_model_tensors(out)
    expected = expected_ta(base, list(zip(adapters, weights)))
    changed = set().union(*(peft_deltas(base, a) for a in adapters))
    assert_merge_matches(merged, base, expected, changed, rtol=1e-5)
    assert torch.float32 == next(iter(merged.values())).dtype

    # Nothing materialised: no LoRA merge cache, and no file outside out/ as big as a shard.
    assert not cache.exists() or not any(cache.iterdir())
    largest_shard = max(os.path.getsize(f) for f in _files(base) if f.endswith(".safetensors"))
    outside = [f for f in _files(work) if not f.startswith(str(out) + os.sep)]
    assert all(os.path.getsize(f) < largest_shard for f in outside), outside
    assert not [f for f in os.listdir(tmp_path) if ".partial-" in f]
