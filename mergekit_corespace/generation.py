"""Greedy generation as ``exact`` scores it: plain greedy decoding (the model's own
generation config does not apply), stopped at end-of-sequence or a stop string and cut
before it, as lm-evaluation-harness's ``generate_until`` cuts its answers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from transformers import StoppingCriteria

# lm-evaluation-harness's defaults for ``generate_until``: stop at a blank line (its
# ``fewshot_delimiter``) and end-of-sequence, after at most ``max_gen_toks`` new tokens
DEFAULT_STOP = ("\n\n",)
DEFAULT_MAX_NEW_TOKENS = 256


def normalise(text: str) -> str:
    """Case and whitespace normalised text, as ``exact`` compares answers."""
    return " ".join(text.split()).casefold()


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` before the first stop string (lm-eval's ``postprocess_generated_text``)."""
    for string in stop:
        text = text.split(string)[0]
    return text


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    tokenizer,
    *,
    pad_id: int,
    batch_size: int,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    stop: Sequence[str] = DEFAULT_STOP,
    answers: Sequence[str] | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches, longest first) until
    end-of-sequence or a stop string, cut before it, at most ``max_new_tokens`` tokens (and
    the model's positions). With ``answers``, a row whose text can no longer equal its
    answer (case and whitespace normalised) stops early: its text may be cut short."""
    from transformers import GenerationConfig, StoppingCriteriaList

    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    device = device_of(model)
    positions = max_positions(getattr(model, "config", None))
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    with _plain_greedy(model):  # the model's generation_config.json does not apply
        for batch in chunks(order, batch_size):
            width = max(len(prompts[i]) for i in batch)
            budget = max_new_tokens
            if positions is not None:
                budget = max(1, min(budget, positions - width + 1))
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long, device="cpu")
            mask = torch.zeros((len(batch), width), dtype=torch.long, device="cpu")
            for row, i in enumerate(batch):
                ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i], device="cpu")
                mask[row, width - len(prompts[i]) :] = 1
            rows_answers = None if answers is None else [answers[i] for i in batch]
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=GenerationConfig(
                    do_sample=False,
                    max_new_tokens=budget,
                    eos_token_id=sorted(eos) or None,
                    pad_token_id=pad_id,
                ),
                stopping_criteria=StoppingCriteriaList(
                    [_Finished(tokenizer, width, stop, rows_answers)]
                ),
            )
            for row, i in enumerate(batch):
                tokens = generated[row, width:].tolist()
                cut = next((k for k, t in enumerate(tokens) if t in eos), len(tokens))
                text = tokenizer.decode(tokens[:cut], skip_special_tokens=True)
                outputs[i] = cut_at_stop(text, stop)
    return outputs


class _Finished(StoppingCriteria):
    """Per row of a generated batch: done once a stop string is in its text, or (given the
    answers) once its text can no longer equal the answer. A row's normalised final text
    starts with its normalised text so far less a margin (a stop string may end in the
    next tokens and cut back into it; the last token's text, or a character spelled in byte
    tokens, may change with the next), so once that is not a prefix of the normalised
    answer, the row can only be a miss."""

    MARGIN_TOKENS = 1  # the last token's text may still change with the next one
    UTF8_TOKENS = 4  # a character split into byte tokens decodes to U+FFFD until whole

    def __init__(self, tokenizer, width: int, stop: Sequence[str], answers: Sequence[str] | None):
        self.tokenizer = tokenizer
        self.width = width
        self.stop = tuple(stop)
        self.answers = None if answers is None else [normalise(a) for a in answers]
        self.margin_chars = max(map(len, self.stop), default=1) - 1

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = []
        for row, tokens in enumerate(input_ids[:, self.width :].tolist()):
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            stopped = any(string in text for string in self.stop)
            if not stopped and self.answers is not None:
                settled = self._settled(tokens)
                settled = settled[: max(0, len(settled) - self.margin_chars)]
                stopped = not self.answers[row].startswith(normalise(settled))
            done.append(stopped)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _settled(self, tokens: list[int]) -> str:
        """The text of all but the last token, less any character still being spelled in
        byte tokens."""
        end = max(0, len(tokens) - self.MARGIN_TOKENS)
        text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True)
        floor = max(0, end - self.UTF8_TOKENS)
        while text.endswith("\ufffd") and end > floor:
            end -= 1
            text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True)
        return text


def chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def max_positions(config) -> int | None:
    """The positions a model's config allows (None: not stated)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


# oneDNN's own checks for native half-precision matrix products on this CPU
_NATIVE_CPU_CHECKS = {
    "bfloat16": "_is_mkldnn_bf16_supported",
    "float16": "_is_mkldnn_fp16_supported",
}


def native_on_cpu(dtype: str | None) -> bool | None:
    """Whether this CPU multiplies ``dtype`` matrices natively (bf16: AVX512-BF16 or AMX;
    fp16: AVX512-FP16 or AMX-FP16): False where PyTorch emulates them, several times slower
    than float32; None for other dtypes, or a torch that cannot tell."""
    dtype = dtype.removeprefix("torch.") if dtype else dtype  # as mergekit reads it
    if dtype not in _NATIVE_CPU_CHECKS:
        return None
    try:
        return bool(getattr(torch.ops.mkldnn, _NATIVE_CPU_CHECKS[dtype])())
    except (AttributeError, RuntimeError):
        return None


def device_of(model) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _plain_greedy(model) -> Iterator[None]:
    """Plain greedy decoding whatever the model ships: transformers fills every field a
    ``GenerationConfig`` leaves at its default from the model's own generation config
    (a shipped ``repetition_penalty`` or ``no_repeat_ngram_size`` would change the answer),
    so the model's config is a default one for the call."""
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    shipped = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = shipped
