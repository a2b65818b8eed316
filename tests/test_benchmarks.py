"""The benchmarks run (smoke-sized, no timing assertions) and the task data are sound."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench" / "accuracy"))


def _run(*args, timeout=1200):
    done = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_perf_e2e_bench_small(tmp_path):
    options = ("--small", "--repeat", "1", "--settle", "0")  # nothing is timed here
    out = _run("bench/perf/e2e_bench.py", *options, "--work", str(tmp_path))
    for row in (
        "passthrough of the base (I/O floor)",
        "core_space, ties",
        "stock ties on base+adapter",
        "Output shards of 100M bytes: small model",
        "Output shards of 100M bytes: half depth",
    ):
        assert row in out


def test_perf_module_bench_small():
    out = _run("bench/perf/module_bench.py", "--shape", "96x80", "--methods", "ta,ties,tsv")
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:] if line.strip()}
    assert set(rows) == {"ta", "ties", "tsv"}
    for method, cells in rows.items():  # core, knots, full: seconds and memory, then ratios
        seconds = [float(cells[i].removesuffix("s")) for i in (0, 2, 4)]
        assert all(t > 0 for t in seconds) and cells[1].endswith("MiB"), (method, cells)
        for printed, other in zip(cells[6:8], seconds[1:]):  # knots/core, full/core
            ratio = float(printed.removesuffix("x"))
            low = (other - 5e-4) / (seconds[0] + 5e-4)  # the times are rounded to 1 ms
            high = (other + 5e-4) / max(seconds[0] - 5e-4, 1e-9)
            assert low - 0.05 <= ratio <= high + 0.05, (method, printed, seconds)


def test_perf_precision_bench_small(tmp_path):
    """float32 against float64 on real PEFT adapters' modules and on one random module:
    every space × method reported; a linear merge loses no more than float32 rounding."""
    from mergekit_corespace import toy

    base = toy.save_tiny_model(str(tmp_path / "base"), "llama")
    for r in (4, 8):
        toy.save_lora_adapter(base, str(tmp_path / "adapters" / f"r{r}"), r=r, seed=r)
    methods = ("ta", "ties", "tsv")
    options = ("--every", "1", "--shape", "96x80", "--methods", ",".join(methods))
    out = _run("bench/perf/precision_bench.py", "--adapters", str(tmp_path / "adapters"), *options)
    rows = [
        line.split(" | ") for line in out.splitlines() if line.startswith("| ") and "e-" in line
    ]
    assert len(rows) == 2 * 3 * len(methods)  # real adapters and the random module
    assert {(row[0][2:], row[1]) for row in rows} == {
        (space, method) for space in ("core", "knots", "full") for method in methods
    }
    assert all(float(row[2]) < 1e-5 for row in rows if row[1] == "ta")


def test_accuracy_bench_smoke(tmp_path, monkeypatch):
    results = tmp_path / "results.md"
    out = _run("bench/accuracy/run.py", "--smoke", "--results", str(results))
    table = results.read_text()
    for row in ("zero-shot base", "individual adapters", "ties · core", "ties · knots"):
        assert row in table and row in out
    assert "95 % percentile bootstrap" in table and "core vs" in table
    # the page is rebuilt from the saved per-example predictions, identically (in process:
    # --render reads the JSON and writes markdown, nothing else)
    import run

    assert (tmp_path / "predictions.json").exists()
    results.rename(tmp_path / "first.md")
    monkeypatch.setattr(sys, "argv", ["run.py", "--smoke", "--render", "--results", str(results)])
    run.main()
    assert results.read_text() == (tmp_path / "first.md").read_text()


def test_accuracy_bench_smoke_headroom_setting(tmp_path):
    results = tmp_path / "results.md"
    _run("bench/accuracy/run.py", "--smoke", "--setting", "headroom", "--results", str(results))
    table = results.read_text()
    assert "(headroom setting)" in table and "`intermediate.dense`" in table
    for row in ("zero-shot base", "individual adapters", "ties · core", "ties · full"):
        assert row in table
    assert "| ties | full space |" in table


def test_task_splits_are_disjoint_deterministic_and_labelled():
    from tasks import TASK_NAMES, load_task

    for name in TASK_NAMES:
        task = load_task(name, train_size=200, validation_size=50, test_size=50, seed=3)
        splits = [
            {text.casefold() for text, _ in getattr(task, s)}
            for s in ("train", "validation", "test")
        ]
        assert len(splits[0]) == 200 and len(splits[1]) == len(splits[2]) == 50
        assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
        assert {label for _, label in task.test} <= set(range(len(task.labels)))
        again = load_task.__wrapped__(
            name, train_size=200, validation_size=50, test_size=50, seed=3
        )
        assert again == task


def test_llm_bench_smoke(tmp_path):
    """The LLM benchmark end to end on a tiny random Llama: adapters trained, λ / density
    tuned, each choice written by mergekit-yaml and by mergekit-corespace-lora, the page;
    then bench/llm/precision.py on its choices."""
    import json

    out = _run("bench/llm/run.py", "--smoke", "--out", str(tmp_path))
    page = (tmp_path / "results.md").read_text()
    for row in ("zero-shot base", "individual adapters (own task)", "ties · core", "ties · knots"):
        assert f"| {row} |" in page or f"| **{row}** |" in page, row
        assert row in out
    assert "adapter agreement" in page and "## Free generation" in page
    assert "## The models answering" in page and "expected `" in page
    saved = json.loads((tmp_path / "predictions.json").read_text())
    assert saved["sizes"] == {"sentiment": 8, "spam": 8}
    # written and scored in bf16 only where the CPU has bf16 instructions (else float32)
    import torch

    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert saved["dtype"] == ("bfloat16" if native else "float32")
    assert f"`mergekit-yaml` ({'bf16' if native else 'float32'})" in page
    for label in ("ties · core", "ties · knots"):
        row = saved["rows"][label]
        assert row["chosen"] == {"lambda": 1.0, "density": 0.7}
        same, total = row["adapter_agreement"]
        # the same merge as a model and as an adapter PEFT applies: rounding apart,
        # (almost) the same answers
        assert total == 16 and same >= 12, row["adapter_agreement"]
        assert all(
            len(hits) == 8 and set(hits) <= {"0", "1"} for hits in row["predictions"].values()
        )
    # every space's best merge answered freely, next to the base and the own adapters
    assert len(saved["free_generation"]) == 4 and len(saved["samples"]) == 4
    first = page
    _run("bench/llm/run.py", "--render", "--out", str(tmp_path))
    assert (tmp_path / "results.md").read_text() == first
    # the same choices rewritten in float64 and float32: float64 gives the saved answers
    predictions = str(tmp_path / "predictions.json")
    out = _run("bench/llm/precision.py", "--smoke", "--predictions", predictions)
    for label in ("ties · core", "ties · knots"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {label} |"))
        assert row.endswith("| yes |"), row


def test_llm_search_bench_smoke(tmp_path):
    """bench/llm/search.py end to end on a tiny random Llama: a grid and a TPE search of
    the same size, KnOTS scaled and unscaled, their choices scored on test and compared in
    pairs; what TIES keeps of each task, with task arithmetic alike in both spaces; and the
    first task scored in weighted sums of the adapters."""
    import json

    _run("bench/llm/search.py", "--smoke", "--out", str(tmp_path))
    saved = json.loads((tmp_path / "search.json").read_text())
    rows = saved["rows"]
    grid, search = rows["ties · core · grid"], rows["ties · core · search"]
    assert grid["evaluations"] == search["evaluations"] == 2
    assert grid["chosen"]["lambda"] in (0.5, 1.0) and grid["chosen"]["density"] == 0.5
    weights = {k: v for k, v in search["chosen"].items() if k.startswith("weight[")}
    assert set(weights) == {"weight[spam]", "weight[sentiment]"}
    assert all(0.25 <= v <= 2 for v in weights.values()) and 0.5 <= search["chosen"]["lambda"] <= 1
    assert rows["ties · knots (S·Vₜ) · grid"]["grid"].endswith("knots_scale_tasks=true")
    for row in rows.values():
        assert all(len(h) == 8 and set(h) <= {"0", "1"} for h in row["predictions"].values())
    page = (tmp_path / "search.md").read_text()
    assert "| ties · core · search | ties · core · grid |" in page
    # the same search racing the best trial, set beside it and the grid
    raced = rows["ties · core · search (raced)"]
    assert raced["prune"] == "wilcoxon" and raced["grid"] == search["grid"]
    counts = raced["search_counts"]
    assert counts["complete"] + counts["pruned"] == 2 and counts["complete"] >= 1
    raced_row, searched_row = "ties · core · search (raced)", "ties · core · search"
    assert (  # either first: the one chosen on validation leads its pairs
        f"| {raced_row} | {searched_row} |" in page or f"| {searched_row} | {raced_row} |" in page
    )
    assert "| ties · core · search (raced) | ties · core · grid |" in page
    assert "| ties · knots (S·Vₜ) · grid | ties · knots (Vₜ) · grid |" in page
    spaces = saved["trim"]["spaces"]
    for task in ("spam", "sentiment"):  # the core matrices stand for the deltas exactly
        core, full = spaces["core"]["ta"]["retained"][task], spaces["full"]["ta"]["retained"][task]
        assert abs(core - full) < 1e-4 * abs(full)
        for space in ("core", "full"):
            kept = [spaces[space][d]["kept"][task] for d in ("0.3", "0.5", "0.7")]
            assert 0 < kept[0] < kept[1] < kept[2] <= 1 + 1e-6, kept
    measured = saved["interference"]
    task = measured["task"]
    second = ({"spam", "sentiment"} - {task}).pop()
    assert [row["weights"] for row in measured["rows"]] == [
        {task: 0.25}, {task: 0.5}, {task: 1.0},  # alone; 1 is its own adapter
        {task: 1.0, second: 1.0},  # with the other one (here: all of them)
        {task: 1.0, second: 0.5}, {task: 1.0, second: 0.25},  # the others held lower
        {task: 0.25, second: 0.25},  # run.py's task arithmetic at λ 0.25
    ]  # fmt: skip
    assert all(0 <= row["score"] <= 1 for row in measured["rows"])
    assert f"| {task} alone at 1 |" in page and f"| all 2: {task} at 1, the others at 0.5 |" in page
    # the search's trials kept with their validation scores, binned by the task's weight ratio
    trials = search["trials"]
    assert 1 <= len(trials) <= 2 and all(set(t["scores"]) == {"spam", "sentiment"} for t in trials)
    assert any(t["point"] == search["chosen"] for t in trials)
    binned = page.split(f"## How {task} answers its own weight")[1]
    counts = re.findall(r"\((\d+)\)", binned.split("| ties · core · search |")[1].split("\n")[0])
    assert sum(map(int, counts)) == len(trials)
    _run("bench/llm/search.py", "--render", "--out", str(tmp_path))
    assert (tmp_path / "search.md").read_text() == page

    # a new machine resumes from the saved search.json: every arm kept, none rerun ...
    again = _run("bench/llm/search.py", "--smoke", "--out", str(tmp_path))
    assert again.count(": kept from ") == len(saved["arms"]), again[-2000:]
    assert f"}}: {task} " not in again  # nor the merges of the task it loses
    kept = json.loads((tmp_path / "search.json").read_text())
    assert kept["rows"] == rows and kept["interference"] == measured
    # ... unless those arms came from other adapters (their own test answers differ)
    own = rows["individual adapters (own task)"]["predictions"]
    own["spam"] = "".join("1" if c == "0" else "0" for c in own["spam"])
    (tmp_path / "search.json").write_text(json.dumps(saved))
    other = _run("bench/llm/search.py", "--smoke", "--out", str(tmp_path))
    assert "kept from" not in other and "came from other adapters" in other
    assert f"}}: {task} " in other


def test_llm_search_page_pairs_the_search_chosen_on_validation_with_every_other():
    sys.path.insert(0, str(REPO / "bench" / "llm"))
    from search_page import pairs

    rows = {
        "individual adapters (own task)": {},
        "ta · core · search": {"validation_normalized": 0.80},
        "ta · core · grid": {"validation_normalized": 0.90},  # a grid is never the winner
        "tsv · core · search": {"validation_normalized": 0.85},
        "ties · core · search": {"validation_normalized": 0.79},
        "ties · full · search": {"validation_normalized": 0.84},
        "ties · knots (S·Vₜ) · grid": {"validation_normalized": 0.76},
        "ties · knots (Vₜ) · grid": {"validation_normalized": 0.75},
    }
    assert pairs(rows) == [
        ("tsv · core · search", "ta · core · search"),
        ("tsv · core · search", "ties · core · search"),
        ("tsv · core · search", "ties · full · search"),
        ("tsv · core · search", "ties · knots (S·Vₜ) · grid"),
        ("tsv · core · search", "ties · knots (Vₜ) · grid"),
        ("ta · core · search", "ta · core · grid"),
        ("ties · core · search", "ties · full · search"),
        ("ties · knots (S·Vₜ) · grid", "ties · knots (Vₜ) · grid"),
    ]
    grids = {label: row for label, row in rows.items() if not label.endswith("· search")}
    assert pairs(grids) == [("ties · knots (S·Vₜ) · grid", "ties · knots (Vₜ) · grid")]
    # a raced search meets its twin search and the grid, once each, whichever wins
    raced = dict(rows, **{"ta · core · search (raced)": {"validation_normalized": 0.81}})
    before = pairs(rows)
    expected = [
        *before[:5],
        ("tsv · core · search", "ta · core · search (raced)"),  # the chosen: every search
        *before[5:7],
        ("ta · core · search (raced)", "ta · core · search"),
        ("ta · core · search (raced)", "ta · core · grid"),
        *before[7:],
    ]
    assert pairs(raced) == expected
    raced["ta · core · search (raced)"]["validation_normalized"] = 0.9  # now the chosen one
    assert pairs(raced).count(("ta · core · search (raced)", "ta · core · search")) == 1
    assert ("ta · core · search", "ta · core · search (raced)") not in pairs(raced)
    # chosen core TIES meets its full-space twin once, not twice
    rows["ties · core · search"]["validation_normalized"] = 0.86
    chosen = [pair for pair in pairs(rows) if pair[0] == "ties · core · search"]
    assert chosen.count(("ties · core · search", "ties · full · search")) == 1


def test_llm_chat_tasks_are_disjoint_deterministic_and_answerable():
    sys.path.insert(0, str(REPO / "bench" / "llm"))
    import chat_tasks

    tasks = chat_tasks.load_chat_tasks(train=50, validation=20, test=30, seed=3)
    again = chat_tasks.load_chat_tasks(train=50, validation=20, test=30, seed=3)
    assert tasks == again and [t.name for t in tasks] == list(chat_tasks.TASK_NAMES)
    for task in tasks:
        splits = [task.train, task.validation, task.test]
        assert [len(s) for s in splits] == [50, 20, 30]
        questions = [{q for q, _ in split} for split in splits]
        assert not (questions[0] & questions[1] or questions[0] & questions[2])
        assert not questions[1] & questions[2]
        for question, answer in task.test:
            if task.choices:
                assert answer in task.choices
            elif task.name == "addition":
                a, b = (int(x) for x in question.split("?")[0].split()[-3::2])
                assert answer == str(a + b)
            else:
                assert question.split()[-1] == answer


def test_llm_training_autocasts_to_bf16_only_where_the_cpu_has_bf16(tmp_path, monkeypatch):
    """Emulated bf16 trains 26× slower than float32 (bench/llm/train.py): a CPU without bf16
    instructions trains in float32, under another cache key; the autocast key is unchanged."""
    sys.path.insert(0, str(REPO / "bench" / "llm"))
    import torch
    import train

    from mergekit_corespace import toy

    native = train.bf16_autocast()
    assert native == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    keys = {}
    for has_bf16 in (True, False):
        monkeypatch.setattr(train, "bf16_autocast", lambda has_bf16=has_bf16: has_bf16)
        keys[has_bf16] = train.cache_key("base", [([], "a")], 0)
    assert keys[True] != keys[False]
    autocasts = []
    real = torch.autocast
    monkeypatch.setattr(
        torch, "autocast", lambda *a, **k: autocasts.append(k["enabled"]) or real(*a, **k)
    )
    base = toy.save_tiny_tokenizer(toy.save_tiny_model(str(tmp_path / "base")))
    chats = [([{"role": "user", "content": "1 + 1?"}], "2")]
    train.train_lora(base, chats, str(tmp_path / "lora"), seed=0, steps=2)
    assert autocasts == [False, False]  # bf16_autocast is patched to False above
