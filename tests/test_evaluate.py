"""The evaluation's ``exact`` metric decodes greedily, whatever the model's own generation
config ships (the oracle: a plain argmax loop that recomputes the whole sequence), and its
early stop never changes a hit; sequences are checked against the model's positions.
Agreement with lm-evaluation-harness: ``test_lm_eval_agreement.py``."""

from __future__ import annotations

import json

import pytest
import torch

from mergekit_corespace import toy
from mergekit_corespace.errors import CoreSpaceError
from mergekit_corespace.evaluate import Evaluator, normalise, read_task

BUDGET = 12


@torch.no_grad()
def _argmax_decode(model, ids: list[int], steps: int, eos: int | None) -> list[int]:
    out: list[int] = []
    for _ in range(steps):
        token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
        if token == eos:
            break
        out.append(token)
    return out


@pytest.mark.parametrize("wrapped", [False, True], ids=["model", "peft"])
def test_exact_is_plain_greedy_whatever_the_generation_config_ships(tmp_path, wrapped):
    from peft import PeftModel
    from transformers import AutoTokenizer

    base = toy.save_tiny_model(str(tmp_path / "base"), "llama")
    toy.save_tiny_tokenizer(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = toy.load_model(base).eval()
    if wrapped:
        adapter = toy.save_lora_adapter(base, str(tmp_path / "a"), r=4, lora_alpha=8, seed=1)
        model = PeftModel.from_pretrained(model, adapter).eval()
    prompts = ["abcab", "hello", "zz"]
    inner = model.get_base_model() if wrapped else model
    shipped = inner.generation_config
    shipped.repetition_penalty, shipped.no_repeat_ngram_size = 10.0, 1  # as a Hub model may
    expected = []
    repeats = False
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        tokens = _argmax_decode(model, ids, BUDGET, tokenizer.eos_token_id)
        repeats |= len(set(tokens)) < len(tokens)
        expected.append(tokenizer.decode(tokens, skip_special_tokens=True).split("\n\n")[0])
    assert repeats  # the shipped settings would change these answers
    evaluator = Evaluator(tokenizer, batch_size=2, max_new_tokens=BUDGET)
    assert evaluator.generate(model, [tokenizer(p)["input_ids"] for p in prompts]) == expected
    assert inner.generation_config is shipped  # given back after the call
    assert shipped.repetition_penalty == 10.0


def _task(tmp_path, records, metric):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return read_task(str(path), metric)


def test_stopping_a_generation_that_can_no_longer_be_the_answer_changes_no_hit(tmp_path):
    from transformers import AutoTokenizer

    base = toy.save_tiny_model(str(tmp_path / "base"), "llama", max_position_embeddings=128)
    toy.save_tiny_tokenizer(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = toy.load_model(base).eval()
    prompts = ["abcab", "hello", "zz", "The answer is", "q"]
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    raw = Evaluator(tokenizer, batch_size=2, max_new_tokens=BUDGET).generate(model, ids)
    # two-character stop strings from the middle of the texts: each is cut by one, which
    # shows only a token later than the text that still equals the answer
    stop = tuple(dict.fromkeys(text[len(text) // 2 :][:2] for text in raw))
    evaluator = Evaluator(tokenizer, batch_size=2, max_new_tokens=BUDGET, stop=stop)
    free = evaluator.generate(model, ids)
    assert all(3 < len(f) < len(r) for f, r in zip(free, raw))
    variants = {
        "itself": lambda t: t,
        "re-cased and re-spaced": lambda t: "  " + t.upper().replace(t[1], t[1] + " ", 1),
        "one character short": lambda t: t[:-1],
        "one character long": lambda t: t + "a",
        "first three characters": lambda t: t[:3],
    }
    for name, variant in variants.items():
        answers = [variant(text) for text in free]
        records = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)]
        task = _task(tmp_path, records, "exact")
        expected = [int(normalise(f) == normalise(a)) for f, a in zip(free, answers)]
        assert Evaluator.hits(task, evaluator.predictions(model, task)) == expected, name
        if name == "itself":
            assert expected == [1] * len(prompts)


@pytest.mark.parametrize(
    ("metric", "answer", "needed"),
    [("loglik", "cde", 5), ("exact", "cde", 5), ("choice", "cde", 5), ("choice", "c", 3)],
)  # <s>ab + the answer: the model runs over all but its last token, scored or generated
def test_the_positions_a_sequence_needs_are_counted_exactly(tmp_path, metric, answer, needed):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(toy.save_tiny_tokenizer(str(tmp_path)))
    record = {"prompt": "ab", "answer": answer}
    if metric == "choice":
        record["choices"] = ["z", answer]  # "z": one token
    task = _task(tmp_path, [record], metric)
    Evaluator(tokenizer).check_fits([task], needed, "base")
    message = rf"t\.jsonl:1: the prompt and answer take {needed} positions, more than the "
    message += rf"{needed - 1} of base \(max_position_embeddings\)$"
    with pytest.raises(CoreSpaceError, match=message):
        Evaluator(tokenizer).check_fits([task], needed - 1, "base")
