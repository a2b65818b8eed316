"""mergekit-corespace-tune: the grid point known to be best wins, its recipe merged by plain
mergekit scores what the tuner reported, bad input stops before any work, and an
interrupted run resumes where it stopped.

The construction: two random PEFT adapters ``a`` and ``b`` of a tiny Llama with a
character tokenizer; each task's answers are the greedy outputs of the base with *both*
adapters active in PEFT (an oracle that shares no code with the merge), so task
arithmetic with λ = 1 reproduces them exactly and other λ do not.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mergekit_corespace import toy
from mergekit_corespace.errors import CoreSpaceError
from mergekit_corespace.evaluate import Evaluator, read_task, read_tasks
from mergekit_corespace.tune import (
    Row,
    TuneResult,
    grid_points,
    lambda_groups,
    parse_grid,
    point_recipe,
    tune,
)

ANSWER_TOKENS = 4
EXAMPLES = 10


def _context(tokenizer, record) -> list[int]:
    """The oracle's context: the tokenizer's own chat tokenization (not the evaluator's
    render-then-encode), or the prompt with special tokens."""
    if "messages" in record:
        ids = tokenizer.apply_chat_template(
            record["messages"][:-1], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer(record["prompt"])["input_ids"]


@torch.no_grad()
def _greedy(model, ids, steps: int) -> list[int]:
    """Greedy decoding one example at a time, the whole sequence recomputed each step."""
    out = []
    for _ in range(steps):
        out.append(int(model(torch.tensor([list(ids) + out])).logits[0, -1].argmax()))
    return out


@torch.no_grad()
def _logprob(model, context, continuation) -> float:
    ids = torch.tensor([list(context) + list(continuation)])
    logprobs = torch.log_softmax(model(ids).logits[0].double(), -1)
    return sum(float(logprobs[len(context) - 1 + k, t]) for k, t in enumerate(continuation))


def _both_adapters(base, adapters):
    """The base with both adapters active in PEFT: ΔW_a + ΔW_b, i.e. ``ta`` at λ = 1."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(toy.load_model(base), adapters["a"], adapter_name="a")
    model.load_adapter(adapters["b"], adapter_name="b")
    model.base_model.set_adapter(["a", "b"])
    return model.eval()


def _write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Base, adapters, tokenizer, and task files built from the both-adapter model."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tune")
    base = toy.save_tiny_model(str(root / "base"), "llama")
    toy.save_tiny_tokenizer(base)
    adapters = {
        name: toy.save_lora_adapter(base, str(root / name), r=4, lora_alpha=8, seed=seed)
        for name, seed in (("a", 1), ("b", 2))
    }
    tokenizer = AutoTokenizer.from_pretrained(base)
    merged, plain = _both_adapters(base, adapters), toy.load_model(base).eval()
    rng = random.Random(0)
    records = {"a": [], "b": []}
    while min(len(r) for r in records.values()) < EXAMPLES:
        text = "".join(rng.choice("abcdefghij") for _ in range(6))
        task = "a" if len(records["a"]) <= len(records["b"]) else "b"
        record = (
            {"prompt": text + ":"}
            if task == "a"
            else {"messages": [{"role": "user", "content": text}, {"role": "assistant"}]}
        )
        context = _context(tokenizer, record)
        answer_ids = _greedy(merged, context, ANSWER_TOKENS)
        other_ids = _greedy(plain, context, ANSWER_TOKENS)
        answer, other = tokenizer.decode(answer_ids), tokenizer.decode(other_ids)
        if (
            # only characters: no special tokens, no ids beyond the tokenizer's vocabulary
            not all(len(toy.TOY_SPECIAL) <= t < len(tokenizer) for t in answer_ids + other_ids)
            or not answer.strip()
            or answer == other
            or _logprob(merged, context, answer_ids) <= _logprob(merged, context, other_ids)
        ):
            continue
        if task == "a":
            record.update(answer=answer, choices=sorted([answer, other]))
        else:
            record["messages"][-1]["content"] = answer
        records[task].append(record)
    data = root / "data"
    data.mkdir()
    for task, rows in records.items():
        _write_jsonl(data / f"{task}.jsonl", rows)
    recipe = toy.write_yaml(
        str(root / "recipe.yml"),
        f"merge_method: core_space\nbase_model: {base}\nmodels:\n"
        f"  - model: {base}+{adapters['a']}\n  - model: {base}+{adapters['b']}\n"
        "parameters: {merge: ta}\n",
    )
    return dict(root=root, base=base, adapters=adapters, data=str(data), recipe=recipe)


@pytest.fixture(scope="module")
def exact_run(setup):
    """λ ∈ {0.5, 1, 2} with task arithmetic, scored by exact match; writes the adapter."""
    out = setup["root"] / "exact"
    result = tune(
        setup["recipe"],
        setup["data"],
        ["lambda=0.5,1,2"],
        metric="exact",
        out=out,
        merge="adapter",
        max_new_tokens=ANSWER_TOKENS,  # the toy model never stops: the answers are cut there
        progress=False,
    )
    return result


def test_ta_lambda_one_wins_on_the_both_adapter_outputs(exact_run, setup):
    best = exact_run.best
    assert best.point == {"lambda": 1}
    assert best.scores == {"a": 1.0, "b": 1.0}  # the greedy outputs, reproduced exactly
    for row in exact_run.rows:
        if row is not best:  # by a margin: λ ≠ 1 changes most greedy outputs
            assert max(row.scores.values()) <= 0.5, row
    # each adapter alone reproduces few of the both-adapter outputs (by hand: one example
    # at a time); a reference of 0 cannot normalise, and then the plain average decides
    from peft import PeftModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(setup["base"])
    expected = {}
    for task in ("a", "b"):
        model = PeftModel.from_pretrained(toy.load_model(setup["base"]), setup["adapters"][task])
        records = [json.loads(line) for line in open(os.path.join(setup["data"], f"{task}.jsonl"))]
        hits = 0
        for record in records:
            answer = record["answer"] if "answer" in record else record["messages"][-1]["content"]
            tokens = _greedy(model.eval(), _context(tokenizer, record), ANSWER_TOKENS)
            hits += tokenizer.decode(tokens) == answer
        if hits:
            expected[task] = hits / len(records)
    assert exact_run.references == expected
    assert exact_run.selected_by == ("normalised average" if len(expected) == 2 else "average")


def test_scores_equal_an_unbatched_oracle(setup):
    """Batched, padded scores of the evaluator = one example at a time, by hand."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(setup["base"])
    model = _both_adapters(setup["base"], setup["adapters"])
    # several batches, padding in each; generation cut where the answers were
    evaluator = Evaluator(tokenizer, batch_size=3, max_new_tokens=ANSWER_TOKENS)
    for name in ("a", "b"):
        path = os.path.join(setup["data"], f"{name}.jsonl")
        records = [json.loads(line) for line in open(path, encoding="utf-8")]
        contexts = [_context(tokenizer, r) for r in records]
        answers = [r["answer"] if "answer" in r else r["messages"][-1]["content"] for r in records]
        ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
        loglik = sum(_logprob(model, c, i) / len(i) for c, i in zip(contexts, ids)) / len(ids)
        got = evaluator.score(model, read_task(path, "loglik"))
        assert got == pytest.approx(loglik, abs=1e-5)
        greedy = [tokenizer.decode(_greedy(model, c, ANSWER_TOKENS)) for c in contexts]
        exact = sum(g == a for g, a in zip(greedy, answers)) / len(answers)
        assert evaluator.score(model, read_task(path, "exact")) == exact == 1.0
    # choices: the base model (no adapter) picks differently from the adapted one
    plain = toy.load_model(setup["base"]).eval()
    path = os.path.join(setup["data"], "a.jsonl")
    records = [json.loads(line) for line in open(path, encoding="utf-8")]
    hits = 0
    for record in records:
        context = _context(tokenizer, record)
        scores = [
            _logprob(plain, context, tokenizer(c, add_special_tokens=False)["input_ids"])
            for c in record["choices"]
        ]
        hits += record["choices"][scores.index(max(scores))] == record["answer"]
    assert evaluator.score(plain, read_task(path, "choice")) == hits / len(records)
    assert evaluator.score(model, read_task(path)) == 1.0  # auto: choice; by construction


def test_one_token_choices_are_picked_as_the_unbatched_oracle_picks(setup, tmp_path):
    """Choices of one token (scored from the context's pass) mixed with longer ones (a pass
    each; some examples have only longer ones): the prediction per example is the
    oracle's argmax."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(setup["base"])
    model = _both_adapters(setup["base"], setup["adapters"])
    rng = random.Random(1)
    records = []
    for number in range(12):
        letters = rng.sample("abcdefghij", 4)
        choices = [letters[2] + letters[3], letters[1] + letters[0]]
        if number % 2:  # mixed; else only two-token choices
            choices += [letters[0], letters[1]]
        records.append(
            {
                "prompt": "".join(rng.choice("abcdefghij") for _ in range(6)) + ":",
                "answer": rng.choice(choices),
                "choices": choices,
            }  # fmt: skip
        )
    task = read_task(_write_jsonl(tmp_path / "mixed.jsonl", records), "choice")
    expected = []
    for record in records:
        context = _context(tokenizer, record)
        scores = [
            _logprob(model, context, tokenizer(c, add_special_tokens=False)["input_ids"])
            for c in record["choices"]
        ]
        expected.append(record["choices"][scores.index(max(scores))])
    assert len({len(c) for c in expected}) > 1  # both paths decided some examples
    evaluator = Evaluator(tokenizer, batch_size=5)
    predictions = evaluator.predictions(model, task)
    assert predictions == expected
    hits = Evaluator.hits(task, predictions)
    assert hits == [int(p == r["answer"]) for p, r in zip(expected, records)]
    assert evaluator.score(model, task) == sum(hits) / len(hits)


class _FullLogitsOnly(torch.nn.Module):
    """A causal LM whose forward takes no ``logits_to_keep``: every position's logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def test_logits_at_the_scored_positions_only_score_as_all_logits(setup):
    """The evaluator sends only the scored positions through the output layer where the
    model allows it (plain and PEFT-wrapped); a model without that gets the same scores."""
    from transformers import AutoTokenizer

    from mergekit_corespace.evaluate import _keeps_logits

    tokenizer = AutoTokenizer.from_pretrained(setup["base"])
    model = _both_adapters(setup["base"], setup["adapters"])
    plain = toy.load_model(setup["base"]).eval()
    assert _keeps_logits(model) and _keeps_logits(plain)
    assert not _keeps_logits(_FullLogitsOnly(plain))
    evaluator = Evaluator(tokenizer, batch_size=3)
    for net in (model, plain):
        for name, metric in (("a", "loglik"), ("b", "loglik"), ("a", "choice")):
            task = read_task(os.path.join(setup["data"], f"{name}.jsonl"), metric)
            kept = evaluator.score(net, task)
            assert evaluator.score(_FullLogitsOnly(net), task) == pytest.approx(kept, abs=1e-6)


def test_written_adapter_is_the_one_the_tuner_scored(setup, exact_run):
    """``--merge adapter`` writes the in-memory adapter of the winning point; PEFT loading
    it from disk scores exactly what the tuner reported."""
    from helpers import expected_ta, peft_deltas
    from peft import PeftModel
    from transformers import AutoTokenizer

    # the winner, ta at λ = 1, is ΔW_a + ΔW_b by PEFT's own merge of each adapter
    assert exact_run.best.point == {"lambda": 1}
    base, adapters = setup["base"], setup["adapters"]
    expected = expected_ta(base, [(adapters["a"], 1.0), (adapters["b"], 1.0)])
    model = PeftModel.from_pretrained(toy.load_model(base, dtype=torch.float64), exact_run.merged)
    applied = model.merge_and_unload().state_dict()
    for name in set(peft_deltas(base, adapters["a"])) | set(peft_deltas(base, adapters["b"])):
        assert torch.allclose(applied[name], expected[name], rtol=0, atol=1e-6), name
    model = PeftModel.from_pretrained(toy.load_model(setup["base"]), exact_run.merged).eval()
    evaluator = Evaluator(
        AutoTokenizer.from_pretrained(setup["base"]), max_new_tokens=ANSWER_TOKENS
    )
    for task in read_tasks(setup["data"], {"*": "exact"}):
        assert evaluator.score(model, task) == exact_run.best.scores[task.name]


@pytest.fixture(scope="module")
def loglik_run(setup):
    """Every task by log-likelihood, a third task file no adapter belongs to, a grid over
    two inner methods, through the console script; the winning merge written as a model."""
    data = setup["root"] / "data3"
    shutil.copytree(setup["data"], data)
    shutil.copy(data / "a.jsonl", data / "extra.jsonl")
    out = setup["root"] / "loglik"
    from mergekit_corespace.cli import tune_command

    result = CliRunner().invoke(
        tune_command,
        [setup["recipe"], "--data", str(data), "--out", str(out), "--metric", "loglik"]
        + ["--grid", "lambda=0.5,1 merge=ta,ties", "--grid", "density=0.5", "--merge", "model"],
    )
    assert result.exit_code == 0, result.output
    return dict(out=out, data=str(data), output=result.output)


def test_recipe_merged_by_mergekit_reproduces_the_reported_scores(setup, loglik_run):
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = loglik_run["out"]
    summary = json.loads((out / "results.json").read_text())
    best = summary["best"]
    recipe = yaml.safe_load((out / "best.yml").read_text())
    assert recipe["parameters"] == {"merge": best["point"]["merge"], **best["point"]}
    assert recipe["models"] == yaml.safe_load(open(setup["recipe"]))["models"]  # kept
    merged = setup["root"] / "mergekit-out"
    options = MergeOptions(write_model_card=False, quiet=True)
    run_merge(MergeConfiguration.model_validate(recipe), str(merged), options)
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    evaluator = Evaluator(AutoTokenizer.from_pretrained(setup["base"]))
    for task in read_tasks(loglik_run["data"], {"*": "loglik"}):
        assert evaluator.score(model, task) == best["scores"][task.name]  # scored as this model
    # --merge model wrote that same merge
    ours, theirs = _tensors(out / "merged"), _tensors(merged)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def _tensors(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def test_a_task_without_an_adapter_is_scored_and_the_outputs_agree(loglik_run):
    out, output = loglik_run["out"], loglik_run["output"]
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["references"]) == {"a", "b"}  # extra has no adapter of its name
    assert summary["selected_by"] == "average"  # not every task can be normalised
    points = summary["points"]
    assert [p["point"] for p in points] == [
        {"lambda": 0.5, "merge": "ta"},
        {"lambda": 0.5, "merge": "ties", "density": 0.5},
        {"lambda": 1, "merge": "ta"},
        {"lambda": 1, "merge": "ties", "density": 0.5},
    ]
    for p in points:
        assert set(p["scores"]) == {"a", "b", "extra"}
        assert p["scores"]["extra"] == p["scores"]["a"]  # the same examples
        assert p["average"] == pytest.approx(sum(p["scores"].values()) / 3)
    assert summary["best"] == max(points, key=lambda p: p["average"])
    rows = list(csv.DictReader(open(out / "results.csv", encoding="utf-8")))
    assert len(rows) == len(points)
    for row, p in zip(rows, points):
        assert [float(row[t]) for t in ("a", "b", "extra")] == [
            p["scores"][t] for t in ("a", "b", "extra")
        ]
    assert (out / "score_vs_lambda.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| lambda | merge | density | a (loglik) | b (loglik) | extra (loglik)" in output
    assert " *" in output and "Best by average" in output


def test_grid_combines_method_parameters_only_with_their_methods():
    grid = parse_grid(["lambda=0.5,1 merge=ta,ties,tsv", "density=0.3,0.7"])
    points = grid_points(grid, {"parameters": {"merge": "ta"}})
    assert len(points) == 2 * (1 + 2 + 1)
    assert {"lambda": 1, "merge": "tsv"} in points
    assert all(("density" in p) == (p["merge"] == "ties") for p in points)
    recipe = {
        "merge_method": "core_space",
        "models": [{"model": "x+y", "parameters": {"weight": 0.3}}],
        "parameters": {"merge": "ties", "density": 0.6, "tsv_budget": 0.5},
        "dtype": "bfloat16",
    }
    tsv = point_recipe(recipe, {"merge": "tsv", "lambda": 2})
    assert tsv["parameters"] == {"merge": "tsv", "tsv_budget": 0.5, "lambda": 2}  # no density
    assert tsv["models"] == recipe["models"] and tsv["dtype"] == "bfloat16"
    assert recipe["parameters"]["density"] == 0.6  # the recipe itself is left alone


def _bad_data(tmp_path, name, text):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / name).write_text(text)
    return data


GOOD = '{"prompt": "x:", "answer": "y"}\n'
BAD_DATA = {
    "unreadable JSON": ("a.jsonl", GOOD + '{"prompt": "x", \n', "a.jsonl:2: not valid JSON"),
    "missing answer": ("a.jsonl", GOOD + '{"prompt": "x"}\n', "a.jsonl:2: missing answer"),
    "empty answer": ("a.jsonl", '{"prompt": "x", "answer": " "}\n', "a.jsonl:1: missing answer"),
    "chat without answer": (
        "b.jsonl",
        '{"messages": [{"role": "user", "content": "hi"}]}\n',
        "b.jsonl:1: missing answer: the last of `messages` must be the assistant's turn",
    ),
    "empty file": ("a.jsonl", "\n", "a.jsonl: no examples"),
    "answer not a choice": (
        "a.jsonl",
        GOOD + '{"prompt": "x", "answer": "y", "choices": ["n", "m"]}\n',
        "a.jsonl:2: the answer 'y' is not one of the `choices`",
    ),
    "not an object": ("a.jsonl", "[1, 2]\n", "a.jsonl:1: an example must be a JSON object"),
    "longer than the model's positions": (  # <s> + 70 characters: the one-token answer is
        "a.jsonl",  # scored after them, at no position of its own
        GOOD + json.dumps({"prompt": "x" * 70, "answer": "y"}) + "\n",
        "a.jsonl:2: the prompt and answer take 71 positions, more than the 64 of",
    ),
}


@pytest.mark.parametrize("case", BAD_DATA, ids=list(BAD_DATA))
def test_bad_task_file_is_one_line_before_any_work(setup, tmp_path, case):
    name, text, message = BAD_DATA[case]
    data = _bad_data(tmp_path, name, text)
    _assert_refused(setup, tmp_path, ["--data", str(data)], str(data / message))


BAD_OPTIONS = {
    "grid without values": (["--grid", "lambda"], "--grid lambda: expected NAME=VALUE"),
    "grid empty value": (["--grid", "lambda=1,,2"], "--grid lambda=1,,2: expected NAME=VALUE"),
    "unknown grid parameter": (["--grid", "lamda=1"], "--grid lamda=1: unknown parameter 'lamda'"),
    "range in a grid": (["--grid", "weight=0:2"], "--grid weight=0.0:2.0: a range is searched"),
    "trials of a grid": (["--trials", "3"], "--trials 3: a grid scores each of its 5 points"),
    "no trials": (["--search", "tpe", "--trials", "0"], "--trials 0: must be at least 1"),
    "holdout fraction": (["--holdout-fraction", "1"], "--holdout-fraction 1.0: must lie between"),
    "grid key twice": (["--grid", "lambda=1", "--grid", "lambda=2"], "lambda is given twice"),
    "bad grid value": (
        ["--grid", "merge=ties density=1.5"],
        "--grid merge=ties density=1.5: parameters.density:",
    ),
    "bad space": (
        ["--grid", "merge_method=linear"],
        "--grid merge_method=linear: 'linear' is not one of core_space",
    ),
    "grid setting no point reads": (
        ["--grid", "density=0.3,0.7"],
        "--grid density=0.3,0.7: no point reads it: density is only read by merge: ties / dare / "
        "dare_ties, and the points merge with ta",
    ),
    "grid setting no listed method reads": (
        ["--grid", "merge=ta,tsv cart_alpha=0.1,0.2"],
        "--grid cart_alpha=0.1,0.2: no point reads it: cart_alpha is only read by merge: cart, "
        "and the points merge with ta / tsv",
    ),
    "knots setting outside knots": (
        ["--grid", "knots_scale_tasks=true,false"],
        "--grid knots_scale_tasks=True,False: no point reads it; only merge_method: knots does",
    ),
    "choice without choices": (["--metric", "b=choice"], "b.jsonl:1: metric choice needs"),
    "unknown metric": (["--metric", "f1"], "unknown metric 'f1'"),
    "metric of no task": (["--metric", "zz=exact"], "--metric zz=exact: "),
}


@pytest.mark.parametrize("case", BAD_OPTIONS, ids=list(BAD_OPTIONS))
def test_bad_option_is_one_line_before_any_work(setup, tmp_path, case):
    args, message = BAD_OPTIONS[case]
    _assert_refused(setup, tmp_path, ["--data", setup["data"], *args], message)


def test_bad_data_directory_and_recipe(setup, tmp_path):
    _assert_refused(setup, tmp_path, ["--data", str(tmp_path / "no")], "no such data directory")
    (tmp_path / "empty").mkdir()
    _assert_refused(setup, tmp_path, ["--data", str(tmp_path / "empty")], "holds no task files")
    recipe = toy.write_yaml(str(tmp_path / "bad.yml"), "merge_method: [core_space\n")
    args = ["--data", setup["data"]]
    _assert_refused(setup, tmp_path, args, f"{recipe}: not valid YAML", recipe=recipe)


def test_chat_task_needs_a_chat_template(setup, tmp_path):
    base = tmp_path / "plain" / "base"
    shutil.copytree(setup["base"], base)
    for name in os.listdir(base):  # drop the chat template, wherever it was saved
        if name.startswith("chat_template"):
            os.remove(base / name)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    recipe = toy.write_yaml(
        str(tmp_path / "r.yml"),
        open(setup["recipe"]).read().replace(setup["base"] + "\n", f"{base}\n")
        .replace(f"{setup['base']}+", f"{base}+"),
    )  # fmt: skip
    message = f"{setup['data']}/b.jsonl:1: a chat example (`messages`) needs a chat template"
    _assert_refused(setup, tmp_path, ["--data", setup["data"]], message, recipe=recipe)


def _assert_refused(setup, tmp_path, args, message, recipe=None):
    from mergekit_corespace.cli import tune_command

    out = tmp_path / "out"
    result = CliRunner().invoke(tune_command, [recipe or setup["recipe"], "--out", str(out), *args])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert message in lines[0]
    assert not out.exists()  # before any work


def test_a_second_run_on_the_same_out_stops_at_once_naming_the_first(setup, tmp_path):
    from mergekit_corespace.glue.staging import exclusive_lock

    out = tmp_path / "tuned"
    lock = str(tmp_path / ".tuned.lock")
    with exclusive_lock(str(out), holder="tuning run"):  # as a first run holds it
        assert os.path.exists(lock)
        with pytest.raises(CoreSpaceError) as refused:
            tune(setup["recipe"], setup["data"], ["lambda=1"], out=out, progress=False)
    assert refused.value.message.startswith(
        f"{out}: another tuning run is writing it (pid {os.getpid()} on "
    )
    assert not out.exists()  # nothing scored, nothing logged
    assert not os.path.exists(lock)  # the first run's lock is gone with it


class _Stop(Exception):
    pass


def _study(out):
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(str(out / "study.journal")))
    return optuna.load_study(study_name="mergekit-corespace-tune", storage=storage)


def test_interrupted_run_resumes_with_only_the_remaining_points(setup, tmp_path):
    grid = ["lambda=0.5,1,2 merge=ta,mean"]
    run = dict(metric="loglik", progress=False)
    scored = []

    def stop_after_two(row, times):
        scored.append(row.point)
        if len(scored) == 2:
            raise _Stop

    out = tmp_path / "resumed"
    with pytest.raises(_Stop):
        tune(setup["recipe"], setup["data"], grid, out=out, on_point=stop_after_two, **run)
    study = _study(out)
    assert [t.state.name for t in study.get_trials()][:2] == ["COMPLETE", "COMPLETE"]
    assert sorted(study.user_attrs) == ["fingerprint", "reference:search:a", "reference:search:b"]
    scored_again = []
    resumed = tune(
        setup["recipe"],
        setup["data"],
        grid,
        out=out,
        on_point=lambda row, times: scored_again.append(row.point),
        **run,
    )
    # the rest of the queue, λ group by λ group (one merge per method)
    queue = [p for group in lambda_groups(grid_points(parse_grid(grid), {})) for p in group]
    assert scored_again == [p for p in queue if p not in scored]
    fresh = tune(setup["recipe"], setup["data"], grid, out=tmp_path / "fresh", **run)
    for name in ("results.csv", "results.json", "best.yml"):
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
    assert resumed.table() == fresh.table()
    # loglik references never vanish: every task is normalised, and that decides
    assert fresh.selected_by == "normalised average" and set(fresh.references) == {"a", "b"}
    assert fresh.best is max(fresh.rows, key=lambda row: row.normalised_average)
    for row in fresh.rows:
        for task, reference in fresh.references.items():
            assert row.normalised[task] == pytest.approx(math.exp(row.scores[task] - reference))
    # scores do not depend on which adapter was on the model before (reversed order)
    reverse = tune(
        setup["recipe"], setup["data"], ["merge=mean,ta lambda=2,1,0.5"],
        out=tmp_path / "reverse", **run,
    )  # fmt: skip
    by_point = {json.dumps(r.point, sort_keys=True): r.scores for r in fresh.rows}
    for row in reverse.rows:
        assert row.scores == by_point[json.dumps(row.point, sort_keys=True)]


def test_a_log_of_another_recipe_is_refused_and_fresh_starts_over(setup, tmp_path):
    out = tmp_path / "out"
    run = dict(metric="loglik", progress=False, out=out)
    tune(setup["recipe"], setup["data"], ["lambda=1"], **run)
    other = toy.write_yaml(
        str(tmp_path / "other.yml"),
        open(setup["recipe"]).read().replace("{merge: ta}", "{merge: ta, precision: float32}"),
    )
    with pytest.raises(CoreSpaceError, match=r"study.journal: study \S+ was scored for another"):
        tune(other, setup["data"], ["lambda=1"], **run)
    scored = []
    tune(
        other,
        setup["data"],
        ["lambda=1"],
        fresh=True,
        on_point=lambda r, t: scored.append(r),
        **run,
    )
    assert len(scored) == 1
    # scored as the merged adapter: another log (a model and an adapter score apart)
    with pytest.raises(CoreSpaceError, match=r"study.journal: study \S+ was scored for another"):
        tune(other, setup["data"], ["lambda=1"], score_as="adapter", **run)


def test_lambda_groups_pair_points_that_differ_only_in_lambda():
    points = grid_points(parse_grid(["lambda=0.5,1 merge=ta,ties density=0.3,0.6"]), {})
    groups = lambda_groups(points)
    assert [len(g) for g in groups] == [2, 2, 2]
    for group in groups:
        rest = [{k: v for k, v in p.items() if k != "lambda"} for p in group]
        assert all(r == rest[0] for r in rest) and [p["lambda"] for p in group] == [0.5, 1]
    assert sorted(map(str, (p for g in groups for p in g))) == sorted(map(str, points))
    assert lambda_groups([{"merge": "ta"}, {"merge": "ties"}]) == [
        [{"merge": "ta"}],
        [{"merge": "ties"}],
    ]


@pytest.mark.parametrize(
    "space,merge", [("knots", "ties"), ("core_space", "dare"), ("full_space", "tsv")]
)
def test_one_merge_scaled_per_lambda_is_a_fresh_merge_bit_for_bit(setup, tmp_path, space, merge):
    """The tuner's shortcut: a merge before λ, its factors scaled, and KnOTS spaces reused
    from a cache, give exactly the adapter ``mergekit-corespace-lora`` and the weights
    ``mergekit-yaml`` write at that λ."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from mergekit_corespace.glue.adapter_output import (
        factored_merge,
        merged_adapter,
        merged_weights,
    )
    from mergekit_corespace.glue.internals import install
    from mergekit_corespace.pipeline import SpaceCache

    install()  # what the tuner does first: recipes name adapters as BASE+ADAPTER
    recipe = yaml.safe_load(open(setup["recipe"]))

    def config(lam, method=merge, **extra):
        point = {"merge_method": space, "merge": method, "lambda": lam, **extra}
        return MergeConfiguration.model_validate(point_recipe(recipe, point))

    options, spaces = MergeOptions(quiet=True, random_seed=3), SpaceCache()
    factored_merge(config(1.0, "ta"), options, spaces=spaces)  # fills the cache
    assert (len(spaces.spaces) > 0) == (space in ("knots", "core_space"))
    merged = factored_merge(config(1.0), options, spaces=spaces)
    for lam in (0.5, 2, -1.5):
        fresh = merged_adapter(config(lam), options).export.tensors
        scaled = merged.adapter(lam).export.tensors
        assert fresh.keys() == scaled.keys()
        assert all(torch.equal(fresh[k], scaled[k]) for k in fresh), lam
    one = merged.adapter(1.0).export.tensors
    two = merged.adapter(2.0).export.tensors
    name = next(k for k in one if k.endswith("lora_B.weight"))
    assert torch.allclose(two[name], 2 * one[name]) and one[name].abs().max() > 0
    # the cached spaces hold unweighted tasks: other weights give a fresh merge's adapter
    weighted = config(1.0, **{"weight[a]": 2.0, "weight[b]": 0.5})
    cached = factored_merge(weighted, options, spaces=spaces).adapter(1.0).export.tensors
    fresh = merged_adapter(weighted, options).export.tensors
    assert all(torch.equal(fresh[k], cached[k]) for k in fresh)
    assert not torch.allclose(fresh[name], one[name])
    if space == "knots":  # the cache keeps S·Vₜ and Vₜ tasks apart
        unscaled = config(1.0, knots_scale_tasks=False)
        cached = factored_merge(unscaled, options, spaces=spaces).adapter(1.0).export.tensors
        fresh = merged_adapter(unscaled, options).export.tensors
        assert all(torch.equal(fresh[k], cached[k]) for k in fresh)
        assert not torch.allclose(fresh[name], one[name])
    # scored as a model: each λ's weights are those mergekit-yaml's code writes at that λ
    weights = merged_weights(config(1.0), options, spaces=spaces)
    for lam in (0.5, 2, -1.5):
        out = tmp_path / f"merged-{lam}"
        run_merge(config(lam), str(out), MergeOptions(quiet=True, random_seed=3))
        written, put = _tensors(out), dict(weights.weights(lam))
        assert len(put) == 14 and all(torch.equal(put[k], written[k]) for k in put), lam


@pytest.mark.parametrize(
    "score_as, function", [("model", "merged_weights"), ("adapter", "factored_merge")]
)
def test_a_grid_merges_once_per_lambda_group(setup, tmp_path, monkeypatch, score_as, function):
    from mergekit_corespace.glue import adapter_output

    calls = []
    original = getattr(adapter_output, function)

    def counted(config, *args, **kwargs):
        calls.append(config.parameters["merge"])
        return original(config, *args, **kwargs)

    monkeypatch.setattr(adapter_output, function, counted)
    grid = ["lambda=0.5,1,2 merge=ta,ties"]
    result = tune(
        setup["recipe"],
        setup["data"],
        grid,
        out=tmp_path,
        metric="loglik",
        progress=False,
        score_as=score_as,
    )
    assert len(result.rows) == 6 and calls == ["ta", "ties"]


def test_a_list_of_grids_scores_the_union_of_their_points(setup, tmp_path):
    grids = [
        {"merge": ["ta"], "lambda": [0.25, 0.5]},
        {"merge": ["ties"], "lambda": [1, 2], "density": [0.5]},
        {"merge": ["ta"], "lambda": [0.5]},  # already listed: one point
    ]
    result = tune(
        setup["recipe"], setup["data"], grids, out=tmp_path, metric="loglik", progress=False
    )
    assert [row.point for row in result.rows] == [
        {"merge": "ta", "lambda": 0.25},
        {"merge": "ta", "lambda": 0.5},
        {"merge": "ties", "lambda": 1, "density": 0.5},
        {"merge": "ties", "lambda": 2, "density": 0.5},
    ]


def test_a_winner_at_the_edge_of_the_grid_is_pointed_out():
    """λ or density the largest or smallest of three or more values tried with the winner's
    other settings is named in the table; a density of 1 cannot grow, an inner value and
    one of two values are not named."""

    def result(best, *points):
        rows = [Row(point=p, scores={"t": 0.5}, average=0.5) for p in points]
        winner = next(row for row in rows if row.point == best)
        return TuneResult("out", {"t": "exact"}, {}, rows, winner, "average", "")

    ties = [
        {"merge": "ties", "lambda": x, "density": d} for x in (0.5, 1, 2) for d in (0.3, 0.5, 1)
    ]
    other = {"merge": "ta", "lambda": 4}  # other settings: not compared with
    assert result(ties[1], *ties, other).at_edge() == ["lambda 0.5 is the smallest lambda tried"]
    assert result(ties[6], *ties).at_edge() == [
        "lambda 2 is the largest lambda tried",
        "density 0.3 is the smallest density tried",
    ]
    assert result(ties[5], *ties).at_edge() == []  # λ 1 inside, density 1 cannot grow
    middle = [{"lambda": x} for x in (0.5, 1, 2)]
    assert result(middle[1], *middle).at_edge() == []
    table = result(middle[2], *middle).table()
    assert table.endswith("lambda 2 is the largest lambda tried; a wider grid may score higher")
    assert result(middle[0], *middle[:2]).at_edge() == []  # two values: no edge to speak of


def test_a_weight_tied_to_another_is_scored_as_the_merged_adapter(tmp_path, caplog):
    """A tied model whose ``lm_head`` an adapter saved whole: that weight is no parameter of
    its own, so the points are scored as the merged adapter, with one warning, and score
    what ``score_as="adapter"`` scores."""
    base = toy.save_tiny_model(str(tmp_path / "tied"), "llama", tie_word_embeddings=True)
    toy.save_tiny_tokenizer(base)
    saving = toy.save_lora_adapter(
        base, str(tmp_path / "a"), r=4, seed=1, modules_to_save=["lm_head"]
    )
    plain = toy.save_lora_adapter(base, str(tmp_path / "b"), r=4, seed=2)
    recipe = toy.write_yaml(
        str(tmp_path / "recipe.yml"),
        f"merge_method: core_space\nbase_model: {base}\nmodels:\n"
        f"  - model: {base}+{saving}\n  - model: {base}+{plain}\nparameters: {{merge: ta}}\n",
    )
    data = tmp_path / "data"
    data.mkdir()
    _write_jsonl(
        data / "a.jsonl", [{"prompt": "abc:", "answer": "de"}, {"prompt": "fg:", "answer": "h"}]
    )
    scores = {}
    for score_as in ("model", "adapter"):
        caplog.clear()
        with caplog.at_level("WARNING"):
            result = tune(
                recipe,
                data,
                ["lambda=0.5,1"],
                metric="loglik",
                out=tmp_path / score_as,
                progress=False,
                score_as=score_as,
            )
        scores[score_as] = [row.scores for row in result.rows]
        warned = [r for r in caplog.records if "not a parameter of its own" in r.getMessage()]
        assert len(warned) == (score_as == "model")
    assert scores["model"] == scores["adapter"]


def test_score_as_is_model_or_adapter(setup, tmp_path):
    with pytest.raises(CoreSpaceError, match="--score-as weights: expected model or adapter"):
        tune(setup["recipe"], setup["data"], out=tmp_path, score_as="weights", progress=False)
    assert not any(tmp_path.iterdir())


def test_task_adapter_maps_a_task_to_its_own_adapter_by_path_or_name(setup, tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    adapters = setup["adapters"]
    swapped = {"a": adapters["b"], "b": "a"}  # by path, and by directory name
    result = tune(
        setup["recipe"], setup["data"], ["lambda=1"], metric="loglik", out=tmp_path / "out",
        task_adapter=swapped, progress=False,
    )  # fmt: skip
    evaluator = Evaluator(AutoTokenizer.from_pretrained(setup["base"]))
    for task, adapter in (("a", adapters["b"]), ("b", adapters["a"])):
        model = PeftModel.from_pretrained(toy.load_model(setup["base"]), adapter).eval()
        path = os.path.join(setup["data"], f"{task}.jsonl")
        assert result.references[task] == evaluator.score(model, read_task(path, "loglik"))
    for mapping, message in (
        ({"c": "a"}, r"^--task-adapter c=a: no task file c\.jsonl in the data$"),
        ({"a": "nowhere"}, r"^--task-adapter a=nowhere: not an adapter of the recipe; it has "),
    ):
        with pytest.raises(CoreSpaceError, match=message):
            tune(
                setup["recipe"], setup["data"], ["lambda=1"], out=tmp_path / "bad",
                task_adapter=mapping, progress=False,
            )  # fmt: skip
        assert not (tmp_path / "bad").exists()


def test_a_near_zero_reference_is_named_in_the_table():
    rows = [
        Row(
            point={"lambda": 1},
            scores={"t": 0.05, "u": 0.9, "v": -2.0},
            average=0.5,
            normalised={"t": 2.0, "u": 1.0, "v": 1.0},
            normalised_average=4 / 3,
        )
    ]
    metrics = {"t": "exact", "u": "choice", "v": "loglik"}
    references = {"t": 0.025, "u": 0.9, "v": -2.0}  # loglik: no accuracy, never named
    table = TuneResult("out", metrics, references, rows, rows[0], "normalised average", "").table()
    assert (
        "Near-zero references (each normalised score of these tasks is their score × t 40)" in table
    )
    references["t"] = 0.1
    table = TuneResult("out", metrics, references, rows, rows[0], "normalised average", "").table()
    assert "Near-zero" not in table


def test_mergekit_options_reach_the_final_merge(setup, tmp_path):
    result = tune(
        setup["recipe"], setup["data"], ["lambda=1"], metric="loglik", out=tmp_path / "out",
        merge="model", normalise=False, progress=False,
        merge_options={"copy_tokenizer": False, "out_shard_size": 60_000},
    )  # fmt: skip
    files = os.listdir(result.merged)
    assert len([f for f in files if f.endswith(".safetensors")]) > 1  # sharded as asked
    assert not [f for f in files if f.startswith("tokenizer")]  # not copied, as asked
    again = tune(
        setup["recipe"], setup["data"], ["lambda=1"], metric="loglik", out=tmp_path / "again",
        merge="model", normalise=False, progress=False,
    )  # fmt: skip
    assert "tokenizer.json" in os.listdir(again.merged)  # mergekit's default: copied


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu", r"^--device gpu: not a torch device \(cpu, cuda, cuda:N\)$"),
        ("cuda:7", r"^--device cuda:7: this machine has \d+ CUDA device\(s\) that torch sees$"),
        ("meta", r"^--device meta: expected cpu, cuda or cuda:N$"),
    ],
)
def test_a_device_that_is_not_there_is_one_line_before_any_work(setup, tmp_path, device, message):
    with pytest.raises(CoreSpaceError, match=message):
        tune(setup["recipe"], setup["data"], out=tmp_path / "out", device=device, progress=False)
    assert not (tmp_path / "out").exists()


def test_the_winners_predictions_standard_errors_and_run_are_written(exact_run, setup):
    out = exact_run.out
    written = [json.loads(line) for line in open(os.path.join(out, "predictions.jsonl"))]
    for task in ("a", "b"):
        records = [json.loads(line) for line in open(os.path.join(setup["data"], f"{task}.jsonl"))]
        mine = [line for line in written if line["task"] == task]
        assert [line["line"] for line in mine] == list(range(1, len(records) + 1))
        answers = [r["answer"] if "answer" in r else r["messages"][-1]["content"] for r in records]
        assert [line["answer"] for line in mine] == answers
        assert sum(line["hit"] for line in mine) / len(mine) == exact_run.best.scores[task]
        for row in exact_run.rows:  # a mean of 0/1 values: √(p(1 − p)/(n − 1))
            p, n = row.scores[task], len(records)
            assert row.stderr[task] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)), abs=1e-12)
    assert any(0 < row.scores["a"] < 1 for row in exact_run.rows)  # a non-zero error shown
    assert " ± " in exact_run.table()
    summary = json.load(open(os.path.join(out, "results.json")))
    assert summary["run"]["versions"]["mergekit"] and summary["run"]["dtype"] == "float32"
    assert summary["run"]["examples"] == {"a": EXAMPLES, "b": EXAMPLES}
    timing = json.load(open(os.path.join(out, "timing.json")))
    assert timing["points_scored_by_this_run"] == len(exact_run.rows)
    assert timing["seconds_per_point"]["evaluate"] > 0


def test_the_plot_draws_each_methods_scores_against_lambda_and_stars_the_winner(
    tmp_path, monkeypatch
):
    from types import SimpleNamespace

    import matplotlib.figure

    from mergekit_corespace.tune.plot import plot_score_vs_lambda

    drawn = {}
    save = matplotlib.figure.Figure.savefig

    def record(figure, *args, **kwargs):
        for line in figure.axes[0].get_lines():
            drawn[line.get_label()] = list(zip(line.get_xdata(), line.get_ydata()))
        drawn["ylabel"] = figure.axes[0].get_ylabel()
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    points = [
        ({"lambda": 1, "merge": "ties", "density": 0.5}, 0.6),
        ({"lambda": 0.5, "merge": "ties", "density": 0.5}, 0.7),
        ({"lambda": 0.5}, 0.2),  # the recipe's method: ta
        ({"lambda": 2}, 0.4),
    ]
    rows = [
        Row(point=p, scores={"t": v / 2}, average=v / 2, normalised={"t": v}, normalised_average=v)
        for p, v in points
    ]
    result = TuneResult("out", {"t": "exact"}, {"t": 0.5}, rows, rows[1], "normalised average", "")
    plan = SimpleNamespace(
        recipe={"parameters": {"merge": "ta"}}, config_path="r.yml", search="grid"
    )
    path = tmp_path / "plot.png"
    plot_score_vs_lambda(plan, result, str(path))
    assert drawn == {
        "ties · density 0.5": [(0.5, 0.7), (1.0, 0.6)],  # sorted by λ
        "ta": [(0.5, 0.2), (2.0, 0.4)],
        "chosen": [(0.5, 0.7)],
        "ylabel": "normalised average",
    }
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("change", ["chat template", "generation config", "package version"])
def test_a_log_scored_before_an_upgrade_or_a_tokenizer_change_is_refused(
    setup, tmp_path, monkeypatch, change
):
    import importlib.metadata

    from helpers import two_adapter_recipe

    base, recipe = two_adapter_recipe(tmp_path)
    run = dict(metric="loglik", out=tmp_path / "out", normalise=False, progress=False)
    tune(recipe, setup["data"], ["lambda=1"], **run)
    tune(recipe, setup["data"], ["lambda=1"], **run)  # unchanged: resumed, not refused
    if change == "chat template":
        config = os.path.join(base, "tokenizer_config.json")
        settings = json.load(open(config))
        settings["chat_template"] = toy.TOY_CHAT_TEMPLATE.replace("<assistant>", "<bot>")
        json.dump(settings, open(config, "w"))
        if os.path.exists(os.path.join(base, "chat_template.jinja")):
            with open(os.path.join(base, "chat_template.jinja"), "a") as handle:
                handle.write(" ")
    elif change == "generation config":
        with open(os.path.join(base, "generation_config.json"), "w") as handle:
            json.dump({"repetition_penalty": 1.3}, handle)
    else:
        real = importlib.metadata.version
        monkeypatch.setattr(
            importlib.metadata,
            "version",
            lambda name: "9.9.9" if name == "mergekit-corespace" else real(name),
        )
    with pytest.raises(CoreSpaceError, match=r"study.journal: study \S+ was scored for another"):
        tune(recipe, setup["data"], ["lambda=1"], **run)
