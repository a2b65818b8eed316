"""The benchmarks run (smoke-sized, no timing assertions) and the task data are sound."""

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
    assert all(f"\n{m} " in out for m in ("ta", "ties", "tsv"))


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
