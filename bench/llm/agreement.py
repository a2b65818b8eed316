"""The evaluation against lm-evaluation-harness on this benchmark's own validation data:
SmolLM2-135M-Instruct in bfloat16, the six chat tasks (four classifications scored by
``choice``, two generated tasks by ``exact``), every example compared.

    python bench/llm/agreement.py [--examples 40] [--batch-size 1]

Per task: the choices' summed log-likelihoods from lm-eval's ``HFLM.loglikelihood`` and
from the evaluator (the largest difference, and the examples whose argmax agrees), the
answers' log-likelihoods (the ``loglik`` metric), and for ``exact`` the greedy answers of
``HFLM.generate_until`` (``until: ["\\n\\n"]``, 256 tokens) against the evaluator's, and the
hits. ``tests/test_lm_eval_agreement.py`` checks the same on small inputs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "tune")]

from answers import metrics  # noqa: E402
from chat_tasks import TASK_NAMES, load_chat_tasks, write_task_files  # noqa: E402
from cost import CACHE, smollm2  # noqa: E402

from mergekit_corespace.evaluate import normalise  # noqa: E402

MAX_NEW_TOKENS = 256  # lm-eval's max_gen_toks


def harness_loglikelihoods(harness, pairs) -> list[float]:
    """lm-eval's summed log-likelihood of each (context, continuation) pair."""
    from lm_eval.api.instance import Instance

    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    return [value for value, _ in harness.loglikelihood(requests, disable_tqdm=True)]


def harness_generations(harness, contexts, stop, max_new_tokens=MAX_NEW_TOKENS) -> list[str]:
    """lm-eval's greedy ``generate_until`` answer to each context."""
    from lm_eval.api.instance import Instance

    settings = {"until": list(stop), "max_gen_toks": max_new_tokens, "do_sample": False}
    requests = [
        Instance("generate_until", {}, (context, dict(settings)), i)
        for i, context in enumerate(contexts)
    ]
    return harness.generate_until(requests, disable_tqdm=True)


def compare(task, model, evaluator, harness) -> dict:
    """One task's agreement figures."""
    contexts = [evaluator.context_text(example) for example in task.examples]
    row = {"task": task.name, "metric": task.metric, "examples": len(task.examples)}
    answers = [(c, e.answer) for c, e in zip(contexts, task.examples)]
    theirs = harness_loglikelihoods(harness, answers)
    answer_task = type(task)(task.name, task.path, task.examples, "loglik")
    ours = [values[0] for values in evaluator.loglikelihoods(model, answer_task)]
    row["answer loglik max |Δ|"] = max(abs(a - b) for a, b in zip(ours, theirs))
    if task.metric == "choice":
        pairs = [(c, choice) for c, e in zip(contexts, task.examples) for choice in e.choices]
        flat = iter(harness_loglikelihoods(harness, pairs))
        theirs = [[next(flat) for _ in e.choices] for e in task.examples]
        ours = evaluator.loglikelihoods(model, task)
        row["choice loglik max |Δ|"] = max(
            abs(a - b) for x, y in zip(ours, theirs) for a, b in zip(x, y)
        )
        argmax = [max(range(len(v)), key=lambda k: (v[k], -k)) for v in theirs]
        predicted = evaluator.predictions(model, task)
        row["same answer"] = sum(
            p == e.choices[k] for p, e, k in zip(predicted, task.examples, argmax)
        )
    else:
        generated = harness_generations(harness, contexts, evaluator.stop)
        free = evaluator.generate(model, [evaluator.prompt_ids(e) for e in task.examples])
        row["same answer"] = sum(a == b for a, b in zip(free, generated))
        hits = [int(normalise(e.answer) == normalise(g)) for e, g in zip(task.examples, generated)]
        row["same hit"] = sum(
            a == b for a, b in zip(evaluator.hits(task, evaluator.predictions(model, task)), hits)
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=40, help="validation examples per task")
    parser.add_argument("--batch-size", type=int, default=1, help="both sides' batch size")
    args = parser.parse_args()
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_corespace.evaluate import Evaluator, read_tasks

    base = smollm2(os.path.join(CACHE, "SmolLM2-135M-Instruct"))
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    evaluator = Evaluator(tokenizer, batch_size=args.batch_size)
    directory = tempfile.mkdtemp(prefix="agreement-")
    write_task_files(load_chat_tasks(validation=args.examples), "validation", directory)
    started = time.perf_counter()
    rows = [
        compare(t, model, evaluator, harness) for t in read_tasks(directory, metrics(TASK_NAMES))
    ]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        cells = [
            f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, ""))
            for c in columns
        ]
        print("| " + " | ".join(cells) + " |")
    print(f"\nbatch size {args.batch_size}, {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
