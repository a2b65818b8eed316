"""What the benchmark's models answer on test: each task's predictions and hits, free
generation, sample answers, and how often two models give the same answer. Scores come from
:mod:`mergekit_corespace.evaluate`, the tuner's own evaluation."""

from __future__ import annotations

import dataclasses
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[1:1] = [os.path.join(os.path.dirname(HERE), "accuracy")]

import chat_tasks  # noqa: E402
import report  # noqa: E402
import torch  # noqa: E402
from train import bf16_autocast  # noqa: E402

from mergekit_corespace.evaluate import Evaluator, normalise, read_tasks  # noqa: E402

ZERO_SHOT = "zero-shot base"
INDIVIDUAL = report.INDIVIDUAL
AGREEMENT = 100  # test examples per task on which the merged adapter is compared
SAMPLE_TOKENS = 12  # of each shown answer
# The dtype the models are written and scored in: bf16, except on a CPU without bf16
# instructions, which emulates bf16 products ~7× slower than float32 (one validation pass
# of the README demo: 330 s against 46 s on a 2-core AVX2 EPYC)
DTYPE = "bfloat16" if bf16_autocast() else "float32"


def short_dtype(dtype: str = DTYPE) -> str:
    """As the pages name it."""
    return "bf16" if dtype == "bfloat16" else dtype


def saved_dtype(saved: dict) -> str:
    """The dtype a saved run wrote and scored its models in (runs saved before it was
    recorded were all bf16)."""
    return saved.get("dtype", "bfloat16")


def metrics(names) -> dict[str, str]:
    """The metric of each task file: exact match for the generated tasks, else choice."""
    return {name: "exact" for name in chat_tasks.GENERATED if name in names} | {"*": "choice"}


class Scorer:
    """Test predictions of models: per task the answers, and 0/1 against the reference."""

    def __init__(self, tokenizer, directory: str, names):
        self.tasks = {t.name: t for t in read_tasks(directory, metrics(names))}
        self.evaluator = Evaluator(tokenizer, batch_size=16)
        self.sampler = Evaluator(tokenizer, batch_size=16, max_new_tokens=SAMPLE_TOKENS)

    def answers(self, model, only=None, free: bool = False) -> dict[str, list[str]]:
        """Per task, the model's answers; ``free``: greedy generation for every task."""
        model.eval()
        result = {}
        for name, task in self.tasks.items():
            if only is None or name == only:
                task = dataclasses.replace(task, metric="exact") if free else task
                result[name] = self.evaluator.predictions(model, task)
        return result

    def hits(self, answers: dict[str, list[str]], free: bool = False) -> dict[str, str]:
        """Per task, one character per test example: 1 right, 0 wrong."""
        out = {}
        for name, predicted in answers.items():
            task = self.tasks[name]
            task = dataclasses.replace(task, metric="exact") if free else task
            out[name] = "".join(map(str, Evaluator.hits(task, predicted)))
        return out

    def samples(self, model, only=None) -> dict[str, str]:
        """The answer to each task's first test example, generated freely."""
        model.eval()
        out = {}
        for name, task in self.tasks.items():
            if only is None or name == only:
                prompt = self.sampler.prompt_ids(task.examples[0])
                with torch.inference_mode():
                    out[name] = self.sampler.generate(model, [prompt])[0]
        return out


def agreement(first: dict[str, list[str]], second: dict[str, list[str]]) -> tuple[int, int]:
    """Test examples on which two models give the same answer, and all examples."""
    same = total = 0
    for name, answers in first.items():
        for a, b in zip(answers, second[name], strict=True):
            same += normalise(a) == normalise(b)
            total += 1
    return same, total


def load(path: str, adapter: str | None = None, *, dtype: str = DTYPE):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    if adapter is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter).merge_and_unload()
