"""The scores of a causal LM on task files (:mod:`~mergekit_corespace.task_files`): the one
evaluation the tuner and the benchmarks share.

Metrics (each a mean over the task's examples, higher is better):

- ``choice``: accuracy of the choice with the highest log-likelihood (sum over its tokens);
- ``exact``: plain greedy generation (the model's own generation config does not apply),
  stopped at end-of-sequence or a stop string and cut before it, equals the answer, case
  and whitespace normalised;
- ``loglik``: mean log-likelihood per token of the reference answer (no generation).

``auto`` picks ``choice`` for a task whose examples all give choices, else ``loglik``.

Tokens are counted as lm-evaluation-harness's ``HFLM`` counts them, so a score is the one
lm-eval gives for the same context and continuation: the context's trailing spaces move to
the continuation, context + continuation are encoded together and split after the
context's own tokens (a SentencePiece answer is tokenized as the model reads it after the
prompt, not alone), special tokens are added unless the text starts with the BOS token, an
empty context is the BOS (else EOS) token, log-probabilities are taken in the logits' dtype,
and generation stops at ``\n\n`` (lm-eval's default for ``generate_until``) and
end-of-sequence after at most 256 new tokens. Batches are formed in a fixed order (longest
first), so a score depends only on the model, the task and the batch size.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergekit_corespace.errors import CoreSpaceError
from mergekit_corespace.generation import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_STOP,
    chunks,
    device_of,
    generate,
    normalise,
)
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

# Raised whenever a change here changes scores: a tuner's points log from before is refused
CONVENTIONS = 2  # 2: lm-eval's encoding, stop strings, log-softmax in the logits' dtype

__all__ = [  # the task files' names too: one module to import for an evaluation
    "CONVENTIONS",
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_STOP",
    "METRICS",
    "Evaluation",
    "TASK_SUFFIX",
    "Evaluator",
    "Example",
    "Metric",
    "Task",
    "check_tokenizer",
    "joined",
    "mean_stderr",
    "normalise",
    "normalised_score",
    "read_task",
    "read_tasks",
]


@dataclass(frozen=True)
class Evaluation:
    """A score, its standard error (None for one example) and, per example, what was
    scored (JSON-ready dicts, the task file's line among them)."""

    score: float
    stderr: float | None
    examples: list[dict]


def joined(parts: Sequence[Evaluation]) -> Evaluation:
    """One evaluation of a task scored in parts (its examples in order): the mean and
    standard error over all of their examples."""
    examples = [example for part in parts for example in part.examples]
    values = [float(e["hit"]) if "hit" in e else e["loglik"] for e in examples]
    return Evaluation(sum(values) / len(values), mean_stderr(values), examples)


def mean_stderr(values: Sequence[float]) -> float | None:
    """The standard error of a mean: the sample standard deviation over √n (lm-eval's
    ``mean_stderr``)."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


@dataclass(frozen=True)
class _Encoded:
    """A task's examples as token ids: the context scored answers follow and, per
    candidate answer, its ids; the prompt generation starts from."""

    contexts: tuple[tuple[int, ...], ...]
    candidates: tuple[tuple[tuple[int, ...], ...], ...]  # per example: the answer or choices
    answers: tuple[int, ...]  # per example: the index of the answer among its candidates
    prompts: tuple[tuple[int, ...], ...]  # per example: what ``exact`` generates after


class Evaluator:
    """Scores models on tasks with one tokenizer; token ids are computed once per task."""

    def __init__(
        self,
        tokenizer,
        batch_size: int = 8,
        max_new_tokens: int | None = None,
        stop: Sequence[str] = DEFAULT_STOP,
    ):
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        self.stop = tuple(stop)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise CoreSpaceError(f"--stop: every stop string must be non-empty (got {stop!r})")
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:  # any id: padded positions are masked and never scored
            self.pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        # an empty context is this one token (lm-eval's prefix_token_id)
        self.prefix_id = (
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        )
        self._encoded: dict[tuple[str, str], _Encoded] = {}

    def score(self, model, task: Task) -> float:
        """``model``'s score on ``task`` with the task's metric."""
        return self.evaluate(model, task).score

    def evaluate(self, model, task: Task) -> Evaluation:
        """``model``'s score on ``task``, its standard error and, per example, what was
        scored: the prediction and whether it is the answer, or the answer's mean
        log-likelihood per token."""
        if task.metric == "loglik":
            encoded = self._encode(task)
            pairs = [(c, cands[0]) for c, cands in zip(encoded.contexts, encoded.candidates)]
            with torch.inference_mode():
                sums, lengths = self._sequence_logliks(model, pairs)
            values = [s / n for s, n in zip(sums, lengths)]
            examples = [
                {"line": e.line, "answer": e.answer, "loglik": v, "tokens": n}
                for e, v, n in zip(task.examples, values, lengths)
            ]
        else:
            predictions = self.predictions(model, task)
            values = self.hits(task, predictions)
            examples = [
                {"line": e.line, "answer": e.answer, "prediction": p, "hit": bool(h)}
                for e, p, h in zip(task.examples, predictions, values)
            ]
        return Evaluation(sum(values) / len(values), mean_stderr(values), examples)

    def predictions(self, model, task: Task) -> list[str]:
        """Per example, ``model``'s answer: the choice it rates most likely (``choice``) or
        its greedy generation (``exact``; a generation that can no longer equal the answer
        is stopped early, so a wrong one may be cut short)."""
        if task.metric == "loglik":
            raise CoreSpaceError(f"{task.path}: metric loglik scores answers, it predicts none")
        encoded = self._encode(task)
        with torch.inference_mode():
            if task.metric == "exact":
                answers = [example.answer for example in task.examples]
                return self.generate(model, encoded.prompts, answers)
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
        """Before any work: every scored sequence fits ``positions`` (the model's
        ``max_position_embeddings``; None: no limit), and ``exact`` has room to generate
        the answer."""
        if positions is None:
            return
        for task in tasks:
            encoded = self._encode(task)
            rows = zip(task.examples, encoded.contexts, encoded.candidates, encoded.prompts)
            for example, context, candidates, prompt in rows:
                # scoring k tokens runs the model over the context and k - 1 of them;
                # generating k tokens, over the prompt and k - 1 of them
                if task.metric == "exact":
                    needed = len(prompt) + len(candidates[0]) - 1
                else:
                    needed = len(context) + max(len(c) for c in candidates) - 1
                if needed > positions:
                    raise CoreSpaceError(
                        f"{task.path}:{example.line}: the prompt and answer take {needed} "
                        f"positions, more than the {positions} of {model_path} "
                        "(max_position_embeddings)"
                    )

    def _encode(self, task: Task) -> _Encoded:
        # choice encodes every choice, the others the answer; a part of a task is its own
        key = (task.path, task.metric, tuple(example.line for example in task.examples))
        if key not in self._encoded:
            contexts, candidates, answers, prompts = [], [], [], []
            for example in task.examples:
                text = self.context_text(example)
                options = example.choices if task.metric == "choice" else (example.answer,)
                pairs = [self.encode_pair(text, option) for option in options]
                contexts.append(pairs[0][0])  # the same for every option
                candidates.append(tuple(continuation for _, continuation in pairs))
                answers.append(options.index(example.answer))
                prompts.append(self.prompt_ids(example))
                for option, (_, continuation) in zip(options, pairs):
                    if not continuation:
                        raise CoreSpaceError(
                            f"{task.path}:{example.line}: the answer {option!r} adds no "
                            "tokens after the prompt's"
                        )
            self._encoded[key] = _Encoded(
                contexts=tuple(contexts),
                candidates=tuple(candidates),
                answers=tuple(answers),
                prompts=tuple(prompts),
            )
        return self._encoded[key]

    def context_text(self, example: Example) -> str:
        """The text the answer follows: the prompt, or the chat so far rendered by the
        tokenizer's chat template with the assistant's turn opened."""
        if example.messages is not None:
            return self.tokenizer.apply_chat_template(
                list(example.messages), tokenize=False, add_generation_prompt=True
            )
        return example.prompt

    def prompt_ids(self, example: Example) -> tuple[int, ...]:
        """The token ids ``exact`` generates after: the context text as it is."""
        text = self.context_text(example)
        return self.encode(text) if text else (self.prefix_id,)

    def encode(self, text: str, special: bool | None = None) -> tuple[int, ...]:
        """``text``'s token ids with the tokenizer's special tokens, unless ``text`` already
        starts with the BOS token (a rendered chat template; lm-eval's ``tok_encode``)."""
        if special is None:
            bos = self.tokenizer.decode(self.prefix_id) if self.prefix_id is not None else None
            special = not (bos and text.startswith(bos))
        return tuple(self.tokenizer.encode(text, add_special_tokens=special))

    def encode_pair(self, context: str, continuation: str):
        """``(context ids, continuation ids)`` as lm-eval's ``_encode_pair``: trailing
        spaces move to the continuation, and the continuation's ids are those that follow
        the context's in the ids of the whole text."""
        if not context:
            ids = self.encode(continuation, special=False)
            if ids and ids[0] == self.prefix_id:
                return ids[:1], ids[1:]
            return (self.prefix_id,), ids
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, context_ids = self.encode(context + continuation), self.encode(context)
        return context_ids, whole[len(context_ids) :]

    def _sequence_logliks(self, model, pairs: list[tuple[tuple[int, ...], tuple[int, ...]]]):
        """Per (context, continuation): the continuation's token log-likelihoods summed, and
        its length. Right-padded batches, longest first, so no position depends on padding."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        sums, lengths = [0.0] * len(pairs), [len(c) for _, c in pairs]
        for batch in chunks(order, self.batch_size):
            # position p predicts token p + 1
            scored_at = [
                range(len(pairs[i][0]) - 1, len(pairs[i][0]) - 1 + len(pairs[i][1])) for i in batch
            ]
            # the last token is only scored, never read: lm-eval's input, to the token
            logits, column = self._logits(
                model, [pairs[i][0] + pairs[i][1][:-1] for i in batch], scored_at
            )
            for row, i in enumerate(batch):
                # in the logits' dtype, as lm-eval (softmax_dtype None) takes them
                scored = logits[row, [column[p] for p in scored_at[row]]]
                targets = torch.tensor(pairs[i][1], device=scored.device)
                logprobs = torch.log_softmax(scored, dim=-1)
                sums[i] = float(logprobs.gather(1, targets[:, None]).sum())
        return sums, lengths

    def loglikelihoods(self, model, task: Task) -> list[list[float]]:
        """Per example, per candidate (the choices, else the answer): the summed
        log-likelihood of its tokens after the context (lm-eval's ``loglikelihood``)."""
        encoded = self._encode(task)
        pairs = [(c, a) for c, cands in zip(encoded.contexts, encoded.candidates) for a in cands]
        with torch.inference_mode():
            sums = iter(self._sequence_logliks(model, pairs)[0])
        return [[next(sums) for _ in candidates] for candidates in encoded.candidates]

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
        for batch in chunks(order, self.batch_size):
            last = [len(contexts[i]) - 1 for i in batch]
            logits, column = self._logits(model, [contexts[i] for i in batch], [[p] for p in last])
            for row, i in enumerate(batch):
                logprobs = torch.log_softmax(logits[row, column[last[row]]], dim=-1)
                results[i] = logprobs[torch.tensor(tokens[i], device=logprobs.device)].tolist()
        return results

    def _logits(self, model, sequences, positions) -> tuple[torch.Tensor, dict[int, int]]:
        """One right-padded pass over ``sequences``; the logits at the union of ``positions``
        (one collection per sequence) and each position's column in them. Only those positions
        go through the output layer: at a 49 k vocabulary it is a fifth of a small LLM's work."""
        ids, mask = self._right_padded(sequences)
        device = device_of(model)
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

    def generate(
        self, model, prompts: Sequence[Sequence[int]], answers: Sequence[str] | None = None
    ) -> list[str]:
        """Greedy continuations of ``prompts`` (:func:`~mergekit_corespace.generation.generate`)
        with this evaluator's tokenizer, batch size, token budget and stop strings."""
        return generate(
            model,
            prompts,
            self.tokenizer,
            pad_id=self.pad_id,
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
            stop=self.stop,
            answers=answers,
        )


def normalised_score(metric: str, score: float, reference: float) -> float:
    """A score relative to a reference score (1 = as good as the reference): the ratio of
    accuracies, or for ``loglik`` the ratio of per-token likelihoods, exp(score − reference)."""
    if metric == "loglik":
        return math.exp(score - reference)
    return score / reference if reference else math.nan


def _keeps_logits(model) -> bool:
    """Whether the model (or the model under a PEFT wrapper) takes ``logits_to_keep``."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters
