import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Test processes side by side (pytest -n): one torch thread in each, and in the merges
    # they start, or OpenMP workers of several processes fight over the cores (a merge of
    # 4.8 s took 31.5 s beside one other busy process on 2 cores).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

from mergekit_corespace import toy


@pytest.fixture(scope="session")
def llama64(tmp_path_factory):
    """A tiny float64 Llama and PEFT adapters of every kind issue 3 names."""
    root = tmp_path_factory.mktemp("llama64")
    base = toy.save_tiny_model(str(root / "base"), "llama", dtype=torch.float64)
    qv = ["q_proj", "v_proj"]
    specs = {
        "r8a": dict(r=8, lora_alpha=16, seed=1),
        "r8b": dict(r=8, lora_alpha=8, seed=2),
        "r8c": dict(r=8, lora_alpha=32, seed=3),
        "r4": dict(r=4, lora_alpha=8, seed=4),
        "r16": dict(r=16, lora_alpha=16, seed=5),
        "rslora": dict(r=8, lora_alpha=16, use_rslora=True, seed=6),
        "patterns": dict(
            r=4,
            lora_alpha=8,
            rank_pattern={"v_proj": 2, "model.layers.1.self_attn.q_proj": 12},
            alpha_pattern={"k_proj": 3, "layers.0.mlp.down_proj": 40},
            seed=7,
        ),
        "qv_only": dict(r=8, lora_alpha=16, target_modules=qv, seed=8),
        "mlp_only": dict(r=4, lora_alpha=4, target_modules=["gate_proj", "down_proj"], seed=9),
    }
    adapters = {
        name: toy.save_lora_adapter(base, str(root / name), **spec) for name, spec in specs.items()
    }
    return base, adapters


@pytest.fixture(scope="session")
def llama32(tmp_path_factory):
    """A tiny float32 Llama and three PEFT adapters: mixed ranks, partial targets, rsLoRA."""
    root = tmp_path_factory.mktemp("llama32")
    base = toy.save_tiny_model(str(root / "base"), "llama", dtype=torch.float32)
    adapters = [
        toy.save_lora_adapter(base, str(root / "a"), r=4, lora_alpha=8, seed=1),
        toy.save_lora_adapter(
            base,
            str(root / "b"),
            r=8,
            lora_alpha=8,
            seed=2,
            target_modules=["q_proj", "v_proj", "down_proj"],
        ),
        toy.save_lora_adapter(base, str(root / "c"), r=6, lora_alpha=3, use_rslora=True, seed=3),
    ]
    return root, base, adapters
