"""``--tasks``: the tuner scores lm-evaluation-harness tasks with lm-eval itself, on the
model in memory; the oracle is lm-eval's own ``simple_evaluate`` of the written merge. The
tasks are local YAML files over JSON data, loaded offline."""

from __future__ import annotations

import json
import random

import pytest
from helpers import two_adapter_recipe

from mergekit_corespace.errors import CoreSpaceError
from mergekit_corespace.tune import tune

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{text}}}}:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    base, recipe = two_adapter_recipe(root)
    tasks = root / "tasks"
    tasks.mkdir()
    rng = random.Random(0)
    for name in ("a", "b"):
        data = root / f"{name}.jsonl"
        rows = [
            {
                "text": "".join(rng.choices("abcdefgh", k=6)),
                "choices": ["".join(rng.choices("ijklmnop", k=2)) for _ in range(3)],
                "label": rng.randint(0, 2),
            }
            for _ in range(24)
        ]
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        (tasks / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data))
    return root, base, str(tasks), recipe


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_lm_eval_tasks_score_as_lm_eval_scores_the_written_merge(setup):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    root, base, tasks, recipe = setup
    result = tune(
        recipe, tasks="a,b", include_path=tasks, grid=["lambda=0.5,16"], out=root / "out",
        merge="model", batch_size=4, progress=False,
    )  # fmt: skip
    assert result.metrics == {"a": "acc", "b": "acc"}
    assert set(result.references) <= {"a", "b"}
    expected = simple_evaluate(
        model="hf",
        model_args=f"pretrained={result.merged},dtype=float32",
        tasks=["a", "b"],
        task_manager=TaskManager(include_path=tasks, include_defaults=False),
        batch_size=4,
        device="cpu",
        bootstrap_iters=1000,  # accuracy's standard error: lm-eval's closed form
    )["results"]
    assert result.best.scores == {name: expected[name]["acc,none"] for name in ("a", "b")}
    assert result.best.stderr == {name: expected[name]["acc_stderr,none"] for name in ("a", "b")}
    scores = {tuple(row.scores.values()) for row in result.rows}
    assert len(scores) == 2  # λ changes the answers: the comparison can fail


def test_limit_scores_the_first_examples_only(setup):
    root, _, tasks, recipe = setup
    result = tune(
        recipe, tasks=["a"], include_path=tasks, grid=["lambda=1"], out=root / "limited",
        limit=5, normalise=False, progress=False,
    )  # fmt: skip
    assert all(score * 5 == round(score * 5) for score in result.best.scores.values())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(tasks="a,nope"), r"^--tasks a,nope: lm-eval knows no task 'nope' \(nor under "),
        (dict(include_path="TASKS"), r"^--include-path .*: give --tasks to use its tasks$"),
        (dict(), r"^nothing to score on: give --data DIR \(task files\) or --tasks NAME$"),
    ],
)
def test_bad_harness_options_are_one_line_before_any_work(setup, options, message):
    root, _, tasks, recipe = setup
    options = {k: tasks if v == "TASKS" else v for k, v in options.items()}
    options.setdefault("include_path", tasks) if "tasks" in options else None
    with pytest.raises(CoreSpaceError, match=message):
        tune(recipe, grid=["lambda=1"], out=root / "bad", progress=False, **options)
    assert not (root / "bad").exists()
