"""The scores of a causal LM on task files (:mod:`~mergekit_corespace.task_files`): the one
evaluation the tuner and the benchmarks share.

Metrics (each a mean over the task's examples, higher is better):

- ``choice``: accuracy of the choice with the highest log-likelihood (sum over its tokens);
- ``exact``: plain greedy generation (stopped at the end-of-sequence token, at most as many
  tokens as the task's longest answer; the model's own generation config does not apply)
  equals the answer, case and whitespace normalised;
- ``loglik``: mean log-likelihood per token of the reference answer (no generation).

``auto`` picks ``choice`` for a task whose examples all give choices, else ``loglik``.
Batches are formed in a fixed order (longest first), so a score depends only on the model,
the task and the batch size.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from mergekit_corespace.errors import CoreSpaceError
from mergekit_corespace.task_files import (
    METRICS,
    TASK_SUFFIX,
    Example,
    Metric,
    Task,
    check_tokenizer,
    read_task,
    read_tasks,
)

__all__ = [  # the task files' names too: one module to import for an evaluation
    "METRICS",
    "TASK_SUFFIX",
    "Evaluator",
    "Example",
    "Metric",
    "Task",
    "check_tokenizer",
    "normalise",
    "normalised_score",
    "read_task",
    "read_tasks",
]


def normalise(text: str) -> str:
    """Case and whitespace normalised text, as ``exact`` compares answers."""
    return " ".join(text.split()).casefold()


@dataclass(frozen=True)
class _Encoded:
    """A task's examples as token ids: context and, per candidate answer, its ids."""

    contexts: tuple[tuple[int, ...], ...]
    candidates: tuple[tuple[tuple[int, ...], ...], ...]  # per example: the answer or choices
    answers: tuple[int, ...]  # per example: the index of the answer among its candidates
    longest_answer: int  # tokens


class Evaluator:
    """Scores models on tasks with one tokenizer; token ids are computed once per task."""

    def __init__(self, tokenizer, batch_size: int = 8, max_new_tokens: int | None = None):
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:  # any id: padded positions are masked and never scored
            self.pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self._encoded: dict[tuple[str, str], _Encoded] = {}

    def score(self, model, task: Task) -> float:
        """``model``'s score on ``task`` with the task's metric."""
        if task.metric == "loglik":
            with torch.inference_mode():
                return self._loglik(model, self._encode(task))
        hits = self.hits(task, self.predictions(model, task))
        return sum(hits) / len(hits)

    def predictions(self, model, task: Task) -> list[str]:
        """Per example, ``model``'s answer: the choice it rates most likely (``choice``) or
        its greedy generation (``exact``)."""
        if task.metric == "loglik":
            raise CoreSpaceError(f"{task.path}: metric loglik scores answers, it predicts none")
        encoded = self._encode(task)
        with torch.inference_mode():
            if task.metric == "exact":
                return self.generate(model, encoded.contexts, encoded.longest_answer)
            return self._choices(model, task, encoded)

    @staticmethod
    def hits(task: Task, predictions: Sequence[str]) -> list[int]:
        """Per example, 1 where the prediction is the answer (``exact``: case and whitespace
        normalised), else 0."""
        if task.metric == "choice":
            return [int(p == e.answer) for p, e in zip(predictions, task.examples, strict=True)]
        return [
            int(normalise(p) == normalise(e.answer))
            for p, e in zip(predictions, task.examples, strict=True)
        ]

    def check_fits(self, tasks: Sequence[Task], positions: int | None, model_path: str) -> None:
        """Before any work: every prompt is at least one token (the answer's first token is
        scored from the position before it), and every scored sequence fits ``positions``
        (the model's ``max_position_embeddings``; None: no limit)."""
        for task in tasks:
            encoded = self._encode(task)
            budget = self.max_new_tokens or encoded.longest_answer
            for example, context, candidates in zip(
                task.examples, encoded.contexts, encoded.candidates, strict=True
            ):
                where = f"{task.path}:{example.line}"
                if not context:
                    raise CoreSpaceError(
                        f"{where}: the prompt is no tokens and the tokenizer of {model_path} adds "
                        "none before it: the answer would follow nothing; write a prompt"
                    )
                # generating k tokens runs the model over the context and k - 1 of them; a
                # one-token choice is read off the context's pass (as _choices scores them)
                if task.metric == "exact":
                    extra = budget - 1
                elif task.metric == "choice":
                    extra = max(0 if len(c) == 1 else len(c) for c in candidates)
                else:
                    extra = max(map(len, candidates))
                if positions is not None and len(context) + extra > positions:
                    raise CoreSpaceError(
                        f"{where}: the prompt and answer take {len(context) + extra} positions, "
                        f"more than the {positions} of {model_path} (max_position_embeddings)"
                    )

    def _encode(self, task: Task) -> _Encoded:
        key = (task.path, task.metric)  # choice encodes every choice, the others the answer
        if key not in self._encoded:
            contexts, candidates, answers = [], [], []
            for example in task.examples:
                contexts.append(self.context_ids(example))
                options = example.choices if task.metric == "choice" else (example.answer,)
                candidates.append(tuple(self.answer_ids(option) for option in options))
                answers.append(options.index(example.answer))
            self._encoded[key] = _Encoded(
                contexts=tuple(contexts),
                candidates=tuple(candidates),
                answers=tuple(answers),
                longest_answer=max(
                    len(self.answer_ids(example.answer)) for example in task.examples
                ),
            )
        return self._encoded[key]

    def context_ids(self, example: Example) -> tuple[int, ...]:
        """The token ids the answer follows: the prompt with the tokenizer's special tokens,
        or the chat so far rendered by the chat template with the assistant's turn opened."""
        if example.messages is not None:
            text = self.tokenizer.apply_chat_template(
                list(example.messages), tokenize=False, add_generation_prompt=True
            )
            return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return tuple(self.tokenizer(example.prompt)["input_ids"])

    def answer_ids(self, answer: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(answer, add_special_tokens=False)["input_ids"])

    def _sequence_logliks(self, model, pairs: list[tuple[tuple[int, ...], tuple[int, ...]]]):
        """Per (context, continuation): the continuation's token log-likelihoods summed, and
        its length. Right-padded batches, longest first, so no position depends on padding."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        sums, lengths = [0.0] * len(pairs), [len(c) for _, c in pairs]
        for batch in _chunks(order, self.batch_size):
            # position p predicts token p + 1
            scored_at = [
                range(len(pairs[i][0]) - 1, len(pairs[i][0]) - 1 + len(pairs[i][1])) for i in batch
            ]
            logits, column = self._logits(
                model, [pairs[i][0] + pairs[i][1] for i in batch], scored_at
            )
            for row, i in enumerate(batch):
                scored = logits[row, [column[p] for p in scored_at[row]]].float()
                targets = torch.tensor(pairs[i][1], device=scored.device)
                logprobs = torch.log_softmax(scored, dim=-1)
                sums[i] = float(logprobs.gather(1, targets[:, None]).sum())
        return sums, lengths

    def _pairs(self, encoded: _Encoded):
        return [
            (context, candidate)
            for context, candidates in zip(encoded.contexts, encoded.candidates)
            for candidate in candidates
        ]

    def _loglik(self, model, encoded: _Encoded) -> float:
        sums, lengths = self._sequence_logliks(model, self._pairs(encoded))
        return sum(s / n for s, n in zip(sums, lengths)) / len(sums)

    def _choices(self, model, task: Task, encoded: _Encoded) -> list[str]:
        """The most likely choice per example (ties: the first). A one-token choice is
        scored from a pass over the context alone (its log-likelihood is the next-token
        log-probability there); longer ones each from a pass over context + choice."""
        single = [
            [candidate[0] for candidate in candidates if len(candidate) == 1]
            for candidates in encoded.candidates
        ]
        needed = [i for i, tokens in enumerate(single) if tokens]
        next_token = self._next_token_logprobs(
            model, [encoded.contexts[i] for i in needed], [single[i] for i in needed]
        )
        next_token = dict(zip(needed, next_token))
        longer = [
            (i, k)
            for i, candidates in enumerate(encoded.candidates)
            for k, candidate in enumerate(candidates)
            if len(candidate) != 1
        ]
        sums, _ = self._sequence_logliks(
            model, [(encoded.contexts[i], encoded.candidates[i][k]) for i, k in longer]
        )
        longer = dict(zip(longer, sums))
        predictions = []
        for i, (example, candidates) in enumerate(zip(task.examples, encoded.candidates)):
            logprobs = iter(next_token.get(i, ()))
            scores = [
                next(logprobs) if len(candidate) == 1 else longer[(i, k)]
                for k, candidate in enumerate(candidates)
            ]
            best = max(range(len(scores)), key=lambda k: (scores[k], -k))
            predictions.append(example.choices[best])
        return predictions

    def _next_token_logprobs(self, model, contexts, tokens) -> list[list[float]]:
        """Per context, the log-probabilities of the given next tokens."""
        order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
        results: list[list[float]] = [[] for _ in contexts]
        for batch in _chunks(order, self.batch_size):
            last = [len(contexts[i]) - 1 for i in batch]
            logits, column = self._logits(model, [contexts[i] for i in batch], [[p] for p in last])
            for row, i in enumerate(batch):
                logprobs = torch.log_softmax(logits[row, column[last[row]]].float(), dim=-1)
                results[i] = logprobs[torch.tensor(tokens[i], device=logprobs.device)].tolist()
        return results

    def _logits(self, model, sequences, positions) -> tuple[torch.Tensor, dict[int, int]]:
        """One right-padded pass over ``sequences``; the logits at the union of ``positions``
        (one collection per sequence) and each position's column in them. Only those positions
        go through the output layer: at a 49 k vocabulary it is a fifth of a small LLM's work."""
        ids, mask = self._right_padded(sequences)
        device = _device_of(model)
        kept = sorted({p for row in positions for p in row})
        if _keeps_logits(model):
            keep = {"logits_to_keep": torch.tensor(kept, device=device)}
        else:
            kept, keep = list(range(ids.shape[1])), {}
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **keep).logits
        return logits, {p: k for k, p in enumerate(kept)}

    def _right_padded(self, sequences) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(sequence) for sequence in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long, device="cpu")
        mask = torch.zeros((len(sequences), width), dtype=torch.long, device="cpu")
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = torch.tensor(sequence, device="cpu")
            mask[row, : len(sequence)] = 1
        return ids, mask

    def generate(self, model, contexts: Sequence[Sequence[int]], budget: int) -> list[str]:
        """Greedy continuations of ``contexts`` (left-padded batches, longest first), at
        most ``max_new_tokens`` (default ``budget``) tokens, cut at end-of-sequence."""
        from transformers import GenerationConfig

        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=self.max_new_tokens or budget,
            eos_token_id=sorted(eos) or None,
            pad_token_id=self.pad_id,
        )
        device = _device_of(model)
        order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
        outputs: list[str] = [""] * len(contexts)
        with _plain_greedy(model):  # the model's generation_config.json does not apply
            for batch in _chunks(order, self.batch_size):
                width = max(len(contexts[i]) for i in batch)
                ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long, device="cpu")
                mask = torch.zeros((len(batch), width), dtype=torch.long, device="cpu")
                for row, i in enumerate(batch):
                    ids[row, width - len(contexts[i]) :] = torch.tensor(contexts[i], device="cpu")
                    mask[row, width - len(contexts[i]) :] = 1
                generated = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    generation_config=config,
                )
                for row, i in enumerate(batch):
                    tokens = generated[row, width:].tolist()
                    cut = next((k for k, t in enumerate(tokens) if t in eos), len(tokens))
                    outputs[i] = self.tokenizer.decode(tokens[:cut], skip_special_tokens=True)
        return outputs


def normalised_score(metric: str, score: float, reference: float) -> float:
    """A score relative to a reference score (1 = as good as the reference): the ratio of
    accuracies, or for ``loglik`` the ratio of per-token likelihoods, exp(score − reference)."""
    if metric == "loglik":
        return math.exp(score - reference)
    return score / reference if reference else math.nan


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _keeps_logits(model) -> bool:
    """Whether the model (or the model under a PEFT wrapper) takes ``logits_to_keep``."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


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


def _device_of(model) -> torch.device:
    return next(model.parameters()).device
