"""Build a Llama-architecture model with random weights (HF format, several safetensors
shards) and T random LoRA adapters in PEFT format, at a chosen scale.

    python bench/perf/build.py OUT_DIR [--preset 8b|1b|small] [--layers N] [--adapters 6]
                                       [--rank 16] [--mixed-ranks] [--modules-to-save]

Weights are generated tensor by tensor and written one safetensors shard at a time, so
building needs about one shard of memory (5 GB shards for the 8 B preset, 1 GiB for the
others). The adapters are PEFT adapters as PEFT writes
them (``LoraConfig.save_pretrained`` + ``base_model.model.<module>.lora_A/B.weight``),
with random non-zero A and B on q, k, v, o, gate, up, down. With ``--modules-to-save`` each
adapter also saves ``embed_tokens`` and ``lm_head`` whole, as adapters trained with added
tokens do (``modules_to_save``; the base weights plus a random update, in the model's dtype).
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch
from safetensors.torch import save_file

from mergekit_corespace.toy import LLAMA_TARGETS

PRESETS = {
    # Llama-3-8B shapes: 8.0 B parameters, ~16 GB in bfloat16
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    # Llama-3.2-1B-like, with a 32k vocabulary: 1.1 B parameters
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
    "small": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=1000,
    ),
}
SHARD_BYTES = {"8b": 5 * 10**9}  # as the 8 B checkpoints people download are sharded
TARGETS = LLAMA_TARGETS  # the modules every adapter targets


def layer_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    return {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
        "input_layernorm": (h,),
        "post_attention_layernorm": (h,),
    }


def build_model(path: str, config: dict, dtype=torch.bfloat16, shard_bytes: int = 1 << 30) -> int:
    """Write the model one shard at a time; returns the number of parameters."""
    from transformers import LlamaConfig

    os.makedirs(path, exist_ok=True)
    LlamaConfig(
        **config,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        torch_dtype=str(dtype).removeprefix("torch."),
    ).save_pretrained(path)
    h, vocab = config["hidden_size"], config["vocab_size"]
    shapes = {"model.embed_tokens.weight": (vocab, h)}
    for layer in range(config["num_hidden_layers"]):
        for name, shape in layer_shapes(config).items():
            shapes[f"model.layers.{layer}.{name}.weight"] = shape
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (vocab, h)})

    shards, size = [[]], 0  # plan the shards from the shapes, then fill them one by one
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for index, names in enumerate(shards, 1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            if len(shapes[name]) == 1:
                tensors[name] = torch.ones(shapes[name], dtype=dtype)
            else:
                tensors[name] = torch.empty(shapes[name], dtype=dtype).normal_(
                    0, 0.02, generator=generator
                )
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys(names, file))
    total_size = sum(math.prod(shape) * dtype.itemsize for shape in shapes.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, handle)
    return sum(math.prod(shape) for shape in shapes.values())


SAVED = {"embed_tokens": "model.embed_tokens.weight", "lm_head": "lm_head.weight"}


def saved_weights(base: str, seed: int) -> dict[str, torch.Tensor]:
    """``embed_tokens`` and ``lm_head`` as an adapter saves them whole: the base weights plus
    a random update of 1/10 of their scale, rounded to their dtype."""
    from safetensors import safe_open

    with open(os.path.join(base, "model.safetensors.index.json")) as handle:
        where = json.load(handle)["weight_map"]
    generator = torch.Generator().manual_seed(2000 + seed)
    tensors = {}
    for module, name in SAVED.items():
        with safe_open(os.path.join(base, where[name]), "pt") as handle:
            weight = handle.get_tensor(name)
        saved = torch.empty_like(weight)
        for start in range(0, weight.shape[0], 8192):  # in blocks: ~1 GB matrices at 8 B
            rows = weight[start : start + 8192].float()
            rows += torch.randn(rows.shape, generator=generator) * 0.002
            saved[start : start + 8192] = rows
        prefix = "base_model.model." + ("model." if module == "embed_tokens" else "")
        tensors[f"{prefix}{module}.weight"] = saved
    return tensors


def build_adapter(
    path: str, base: str, config: dict, rank: int, seed: int, modules_to_save: bool = False
) -> None:
    from peft import LoraConfig

    generator = torch.Generator().manual_seed(1000 + seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for name, shape in layer_shapes(config).items():
            if name.rsplit(".", 1)[-1] not in TARGETS:
                continue
            out_features, in_features = shape
            prefix = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = (
                torch.randn(rank, in_features, generator=generator) / in_features**0.5
            )
            tensors[f"{prefix}.lora_B.weight"] = (
                torch.randn(out_features, rank, generator=generator) * 0.01
            )
    if modules_to_save:
        tensors.update(saved_weights(base, seed))
    LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(TARGETS),
        modules_to_save=list(SAVED) if modules_to_save else None,
        base_model_name_or_path=base,
        task_type="CAUSAL_LM",
    ).save_pretrained(path)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--preset", choices=PRESETS, default="small")
    parser.add_argument("--layers", type=int, help="override the number of layers")
    parser.add_argument("--adapters", type=int, default=6)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--mixed-ranks", action="store_true", help="ranks 8, 16, 32, ... in turn")
    parser.add_argument(
        "--modules-to-save",
        action="store_true",
        help="adapters also save embed_tokens and lm_head whole (modules_to_save)",
    )
    args = parser.parse_args()
    config = dict(PRESETS[args.preset])
    if args.layers:
        config["num_hidden_layers"] = args.layers
    base = os.path.abspath(os.path.join(args.out, "base"))
    params = build_model(base, config, shard_bytes=SHARD_BYTES.get(args.preset, 1 << 30))
    print(f"base: {params / 1e9:.3f} B parameters -> {base}")
    for t in range(args.adapters):
        rank = (8, 16, 32)[t % 3] if args.mixed_ranks else args.rank
        path = os.path.join(args.out, f"adapter{t}")
        build_adapter(path, base, config, rank, t, modules_to_save=args.modules_to_save)
    print(f"{args.adapters} adapters -> {os.path.abspath(args.out)}/adapter*")


if __name__ == "__main__":
    main()
