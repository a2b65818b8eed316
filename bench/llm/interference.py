"""What takes one task to 0 in the merges of all the adapters (addition on bench/llm): its
own adapter's strength, one other adapter, or the others together.

Every point is a task-arithmetic merge in core space at λ 1 — the exact weighted sum of the
chosen adapters' deltas — scored by ``mergekit_corespace.tune.tune`` (the tuner's own
evaluation) on the task's validation examples: the task's adapter alone at weights 0.25 to
1 (1 is the adapter itself), with each other adapter, all the adapters but one, and all of
them with the others at weight 1, 0.5 and 0.25; then every adapter at 0.25 (run.py's
task-arithmetic choice, λ 0.25).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping

import yaml

from mergekit_corespace import toy
from mergekit_corespace.tune import tune
from mergekit_corespace.tune.grid import adapter_names, point_recipe, weight_key

ALONE = (0.25, 0.5, 1.0)
OTHERS = (1.0, 0.5, 0.25)


def points(names: list[str], task: str) -> list[dict[str, float]]:
    """The weights of each merge, in the order above (an adapter left out has none)."""
    others = [name for name in names if name != task]
    out = [{task: weight} for weight in ALONE]
    out += [{task: 1.0, other: 1.0} for other in others]
    out += [{name: 1.0 for name in names if name != left} for left in others]
    out += [{name: 1.0 if name == task else weight for name in names} for weight in OTHERS]
    out.append({name: 0.25 for name in names})
    return [dict(p) for p in {tuple(sorted(p.items())): p for p in out}.values()]


def interference(recipe: Mapping, validation: str, task: str, metric: str, work: str) -> list[dict]:
    """``[{"weights": {adapter: weight}, "score": the task's validation accuracy}]``;
    ``recipe``: the benchmark's recipe of all adapters (each named by its task), parsed;
    ``validation``: the folder of task files; ``metric``: the task's."""
    names = adapter_names(recipe)
    data = os.path.join(work, "interference", "data")
    os.makedirs(data, exist_ok=True)
    shutil.copy(os.path.join(validation, f"{task}.jsonl"), data)
    rows = []
    for number, weights in enumerate(points(names, task)):
        # the tuner's own recipe of a point with per-adapter weights, less the adapters left out
        point = {"merge": "ta"} | {weight_key(name): weight for name, weight in weights.items()}
        merged = point_recipe(recipe, point)
        merged["models"] = [
            entry for entry, name in zip(merged["models"], names, strict=True) if name in weights
        ]
        path = os.path.join(work, "interference", f"{number}.yml")
        result = tune(
            toy.write_yaml(path, yaml.safe_dump(merged, sort_keys=False)), data,
            {"merge_method": ["core_space"], "lambda": [1.0]}, metric={task: metric},
            out=os.path.join(work, "interference", str(number)), normalise=False,
            batch_size=16, progress=False,
        )  # fmt: skip
        rows.append({"weights": weights, "score": result.rows[0].scores[task]})
        print(f"{weights}: {task} {rows[-1]['score']:.3f}")
    return rows
