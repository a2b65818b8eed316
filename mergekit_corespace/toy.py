"""Tiny random HF models and real PEFT adapters, built on the fly (no hub access).

Used by the tests, the demo and the benchmarks. The adapters are made by PEFT itself
(``get_peft_model`` + ``save_pretrained``) with random, non-zero ``lora_B``, and
:func:`peft_deltas` gives PEFT's own ``merge_and_unload`` result as the oracle.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

# model_type -> (architecture, config overrides, LoRA target modules)
_DECODER = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
_ENCODER = {key: value for key, value in _DECODER.items() if key != "num_key_value_heads"}
# the common LLM LoRA recipe: every attention and MLP projection of a Llama
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", _DECODER, LLAMA_TARGETS),
    "mistral": ("MistralForCausalLM", _DECODER, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "qwen2": ("Qwen2ForCausalLM", _DECODER, ["q_proj", "v_proj", "down_proj"]),
    "bert": ("BertModel", _ENCODER, ["query", "key", "value", "dense"]),
    "roberta": ("RobertaForMaskedLM", dict(_ENCODER, pad_token_id=1), ["query", "value"]),
    "phi3": (
        "Phi3ForCausalLM",
        dict(_DECODER, pad_token_id=0, bos_token_id=0, eos_token_id=1),
        ["qkv_proj", "o_proj", "gate_up_proj"],
    ),
    "gemma2": ("Gemma2ForCausalLM", dict(_DECODER, head_dim=16), ["q_proj", "v_proj", "up_proj"]),
    "qwen3": ("Qwen3ForCausalLM", dict(_DECODER, head_dim=16), ["q_proj", "k_proj", "down_proj"]),
    # Conv1D layers, stored input-major: PEFT needs fan_in_fan_out (c_proj is square)
    "gpt2": (
        "GPT2LMHeadModel",
        dict(
            vocab_size=128,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=1,
        ),
        ["c_attn", "c_proj", "c_fc"],
    ),
    # mergekit 0.1.5 lists attention buffers that transformers 5 no longer saves
    "gpt_neox": ("GPTNeoXForCausalLM", _ENCODER, ["query_key_value", "dense_4h_to_h"]),
}


def _auto_class(architecture: str):
    import transformers

    if architecture.endswith(("ForCausalLM", "LMHeadModel")):
        return transformers.AutoModelForCausalLM
    if architecture.endswith("ForMaskedLM"):
        return transformers.AutoModelForMaskedLM
    return transformers.AutoModel


def save_tiny_model(
    path: str,
    model_type: str = "llama",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **overrides,
) -> str:
    """Save a randomly initialised model of ``model_type`` in HF format; returns ``path``."""
    from transformers import AutoConfig

    architecture, defaults, _ = ARCHITECTURES[model_type]
    config = AutoConfig.for_model(model_type, **{**defaults, **overrides})
    config.architectures = [architecture]
    torch.manual_seed(seed)
    model = _auto_class(architecture).from_config(config).to(dtype)
    model.save_pretrained(path)
    return path


# Special tokens of the toy tokenizer, at the ids the toy Llama config expects (bos 1, eos 2).
TOY_SPECIAL = ("<unk>", "<s>", "</s>", "<pad>")
# A chat template in the usual shape: role markers, turns ended by a line break.
TOY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def save_tiny_tokenizer(path: str) -> str:
    """Save a character-level tokenizer (special tokens, line break, space and printable
    ASCII: 100 ids, within the toy models' vocabulary of 128) with a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    characters = ["\n", " ", *(chr(code) for code in range(33, 127))]
    vocab = {token: index for index, token in enumerate([*TOY_SPECIAL, *characters])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m)."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = TOY_CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def load_model(path: str, dtype: torch.dtype | None = None):
    from transformers import AutoConfig

    architecture = AutoConfig.from_pretrained(path).architectures[0]
    return _auto_class(architecture).from_pretrained(path, dtype=dtype)


def save_lora_adapter(
    base_path: str,
    path: str,
    *,
    target_modules: Sequence[str] | None = None,
    r: int = 8,
    lora_alpha: float = 16,
    seed: int = 0,
    **lora_options,
) -> str:
    """Save a PEFT LoRA adapter of ``base_path`` with random non-zero A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(base_path).model_type
    if target_modules is None:
        target_modules = ARCHITECTURES[model_type][2]
    if model_type == "gpt2":
        lora_options.setdefault("fan_in_fan_out", True)
    torch.manual_seed(seed)
    model = get_peft_model(
        load_model(base_path),
        LoraConfig(
            r=r,
            lora_alpha=lora_alpha,
            target_modules=list(target_modules),
            init_lora_weights=False,  # random B: a real, non-zero delta
            **lora_options,
        ),
    )
    model.save_pretrained(path)
    return path


def peft_deltas(
    base_path: str, adapter_path: str, dtype: torch.dtype = torch.float64
) -> dict[str, torch.Tensor]:
    """PEFT's own ``merge_and_unload`` minus the base: the ΔW of every weight it changes."""
    from peft import PeftModel

    base = load_model(base_path, dtype=dtype).state_dict()
    merged = PeftModel.from_pretrained(load_model(base_path, dtype=dtype), adapter_path)
    merged = merged.to(dtype).merge_and_unload().state_dict()
    deltas = {}
    for name, weight in merged.items():
        if name in base and weight.is_floating_point():
            delta = weight - base[name]
            if delta.any():
                deltas[name] = delta
    return deltas


def write_yaml(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path
