"""Killed runs, full disks and concurrent runs: nothing lost, nothing left behind.

The merges that are killed, blocked or made to fail run as real processes of
`mergekit-yaml` and `mergekit-corespace-lora` with safetensors' writer made faulty
(tests/faulty_disk.py); the runs beside them (reruns, rivals, references, small tmpfs
disks) run the same commands in process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import invoke_cli, merge_yaml, run_in_process

from mergekit_corespace.errors import CoreSpaceError

SCRIPTS = ["mergekit-yaml", "mergekit-corespace-lora"]
FAULTY = str(Path(__file__).with_name("faulty_disk.py"))


def _config(tmp_path, base, adapters, weights=(1.0, 0.5, 0.8)) -> Path:
    path = tmp_path / f"merge-{'-'.join(map(str, weights))}.yml"
    path.write_text(merge_yaml(base, adapters, weights, "{merge: ties, density: 0.6}"))
    return path


def _args(config, out, script, *extra):
    args = [str(config), str(out), *extra]
    if script == "mergekit-yaml":
        args += ["--no-copy-tokenizer", "--no-write-model-card"]
    return args


def _start_faulty(config, out, script, fault, tmp_path, **env):
    return subprocess.Popen(
        [sys.executable, FAULTY, script, *_args(config, out, script)],
        env={**os.environ, "FAULT": fault, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _contents(folder: Path):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _output_files(folder: Path):
    """What a merge wrote, but mergekit's copy of the YAML (it names the config file)."""
    return {name: data for name, data in _contents(folder).items() if name.suffix != ".yml"}


def _leftovers(folder: Path):
    return sorted(
        p.name for p in folder.iterdir() if ".partial-" in p.name or p.name.endswith(".lock")
    )


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_sigkill_while_writing_then_a_rerun_removes_the_stale_staging(llama32, tmp_path, script):
    root, base, adapters = llama32
    config, out = _config(tmp_path, base, adapters), tmp_path / "out"
    ready, go = tmp_path / "ready", tmp_path / "go"
    killed = _start_faulty(
        config, out, script, "block", tmp_path, FAULT_READY=str(ready), FAULT_GO=str(go)
    )
    _wait_for(ready, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    stale = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert (
        len(stale) == 1 and json.loads((stale[0] / "owner.json").read_text())["pid"] == killed.pid
    )
    assert not out.exists()

    rerun = invoke_cli(_args(config, out, script), script=script)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "removed 1 staging directory left by merges that are no longer running" in rerun.stderr
    assert f"pid {killed.pid}" in rerun.stderr
    assert _leftovers(tmp_path) == []
    reference = invoke_cli(_args(config, tmp_path / "reference", script), script=script)
    assert reference.returncode == 0
    assert _output_files(out) == _output_files(tmp_path / "reference")


def test_staging_is_removed_only_when_its_owner_is_gone(llama32, tmp_path):
    root, base, adapters = llama32
    config, out = _config(tmp_path, base, adapters), tmp_path / "out"
    from mergekit_corespace.glue.staging import owner_record

    alive = subprocess.Popen(["sleep", "600"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    me = owner_record()
    owners = {
        "alive": {**me, "pid": alive.pid, "process_start": _process_start(alive.pid)},
        "gone": {**me, "pid": gone.pid, "process_start": 1},
        "reused-pid": {**me, "pid": alive.pid, "process_start": -1},  # alive pid, other process
        "other-host": {**me, "pid": gone.pid, "host": "another-host"},
    }
    for name, record in owners.items():
        holder = tmp_path / f".out.partial-{name}"
        (holder / "out").mkdir(parents=True)
        (holder / "owner.json").write_text(json.dumps(record))
    try:
        done = invoke_cli(_args(config, out, "mergekit-yaml"))
    finally:
        alive.kill()
    assert done.returncode == 0, done.stderr[-3000:]
    left = sorted(p.name for p in tmp_path.iterdir() if ".partial-" in p.name)
    assert left == [".out.partial-alive", ".out.partial-other-host"]
    assert "removed 2 staging directories" in done.stderr
    assert "left alone 2 staging directories" in done.stderr


def _process_start(pid):
    from mergekit_corespace.glue.staging import _process_start

    return _process_start(pid)


@pytest.mark.parametrize("second", SCRIPTS)
def test_a_second_run_on_the_same_output_stops_at_once(llama32, tmp_path, second, monkeypatch):
    from mergekit_corespace.glue import adapter_output, internals

    root, base, adapters = llama32
    validated = []  # "at once": before its config or any adapter is even read
    for module in (adapter_output, internals):
        real = module.validate_run
        monkeypatch.setattr(module, "validate_run", lambda *a, r=real: validated.append(a) or r(*a))
    first_config = _config(tmp_path, base, adapters)
    second_config = _config(tmp_path, base, adapters, weights=(0.2, 0.2, 0.2))
    out, ready, go = tmp_path / "out", tmp_path / "ready", tmp_path / "go"
    first = _start_faulty(
        first_config,
        out,
        "mergekit-yaml",
        "block",
        tmp_path,
        FAULT_READY=str(ready),
        FAULT_GO=str(go),
    )
    _wait_for(ready, first)
    started = time.monotonic()
    rival = invoke_cli(_args(second_config, out, second), script=second)
    assert rival.returncode != 0
    line = _one_error_line(rival.stderr)
    assert f"{out}: another merge is writing it (pid {first.pid} on " in line, line
    assert time.monotonic() - started < 60 and not validated
    go.touch()
    assert first.wait(timeout=600) == 0, first.communicate()[1][-3000:]
    assert _leftovers(tmp_path) == []
    reference = invoke_cli(_args(first_config, tmp_path / "reference", "mergekit-yaml"))
    assert reference.returncode == 0 and validated  # the spy sees a run that gets that far
    assert _output_files(out) == _output_files(tmp_path / "reference")


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_space_while_writing_is_one_line_and_the_old_output_stays(llama32, tmp_path, script):
    root, base, adapters = llama32
    config, out = _config(tmp_path, base, adapters), tmp_path / "out"
    previous = invoke_cli(_args(_config(tmp_path, base, adapters[:1]), out, script), script=script)
    assert previous.returncode == 0
    before = _contents(out)
    failed = _start_faulty(config, out, script, "enospc", tmp_path)
    _, stderr = failed.communicate(timeout=600)
    assert failed.returncode != 0
    line = _one_error_line(stderr)
    assert f"Error: {out}: no space left on device while writing the merge (" in line, line
    assert "the partial output was removed and out is unchanged" in line
    assert _contents(out) == before
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_safetensors_own_no_space_error_is_one_line(llama32, tmp_path, monkeypatch, script):
    """The error safetensors raises when the kernel says ENOSPC (a SafetensorError whose
    text ends in Rust's ``(os error 28)``), without a disk to fill: the real-disk test
    below needs root to mount one."""
    import safetensors.torch
    from safetensors import SafetensorError

    from mergekit_corespace import lora_export

    def full_disk(*args, **kwargs):
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    monkeypatch.setattr(lora_export, "save_file", full_disk)
    root, base, adapters = llama32
    out = tmp_path / "out"
    done = invoke_cli(_args(_config(tmp_path, base, adapters), out, script), script=script)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    line = _one_error_line(done.stderr)
    assert f"Error: {out}: no space left on device while writing the merge (" in line, line
    assert "os error 28" in line and "out was not created" in line
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.fixture()
def small_disk(tmp_path):
    """Mount point factory for a small tmpfs; unmounted afterwards."""
    mounted = []

    def mount(size: str, inodes: int | None = None) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            pytest.skip(
                f"cannot mount a tmpfs here ({done.stderr.strip()}); the patched-writer "
                "tests cover the same paths"
            )
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def test_a_really_full_disk_while_writing_is_one_line(llama32, tmp_path, small_disk):
    """A tmpfs that runs out of inodes half-way through the shards: the kernel's ENOSPC,
    through safetensors' own error, becomes one line and the disk is left empty."""
    root, base, adapters = llama32
    disk = small_disk("64m", inodes=12)
    out = disk / "out"
    config = _config(tmp_path, base, adapters)
    done = invoke_cli(_args(config, out, "mergekit-yaml", "--out-shard-size", "20K"))
    assert done.returncode != 0
    line = _one_error_line(done.stderr)
    assert f"Error: {out}: no space left on device while writing the merge (" in line, line
    assert "os error 28" in line and "out was not created" in line
    assert list(disk.iterdir()) == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_free_space_is_checked_before_anything_is_written(llama32, tmp_path, small_disk, script):
    root, base, adapters = llama32
    disk = small_disk("64k")
    out = disk / "out"
    done = invoke_cli(_args(_config(tmp_path, base, adapters), out, script), script=script)
    assert done.returncode != 0
    line = _one_error_line(done.stderr)
    assert f"Error: {out}: the merge needs about " in line and f"but {disk} has " in line, line
    assert list(disk.iterdir()) == []


@pytest.mark.parametrize("as_adapter", [False, True])
def test_free_space_check_refuses_with_both_figures(llama32, tmp_path, monkeypatch, as_adapter):
    """The same check on any machine: the free space the check sees is patched."""
    import shutil
    from collections import namedtuple

    from mergekit_corespace import merge_adapters

    root, base, adapters = llama32
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    out = tmp_path / "out"
    with pytest.raises(
        CoreSpaceError, match=r"the merge needs about .* but .* has 1000 bytes free"
    ):
        merge_adapters(base, adapters, out=str(out), as_adapter=as_adapter)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_estimated_model_size_is_close_to_what_is_written(llama32, tmp_path):
    """The preflight's estimate is the output's real size to within config/card files."""
    import torch
    from mergekit.common import ModelReference
    from mergekit.options import MergeOptions

    from mergekit_corespace.glue.run import BaseCheckpoint

    root, base, adapters = llama32
    config = _config(tmp_path, base, adapters)
    for dtype in ("bfloat16", "float32"):
        text = config.read_text() + f"dtype: {dtype}\n"
        run_in_process(text, tmp_path / dtype)
        written = sum(p.stat().st_size for p in (tmp_path / dtype).glob("*.safetensors"))
        checkpoint = BaseCheckpoint.read(ModelReference.parse(base), MergeOptions())
        estimate = checkpoint.model_output_bytes(getattr(torch, dtype))
        assert written <= estimate <= written * 1.05 + 16384, (dtype, written, estimate)


def test_interrupted_first_run_leaves_no_folders_it_created(llama32, tmp_path):
    root, base, adapters = llama32
    out = tmp_path / "new" / "deeper" / "out"
    missing = tmp_path / "missing-adapter"
    text = _config(tmp_path, base, [adapters[0], missing]).read_text()
    with pytest.raises(CoreSpaceError, match="adapter directory does not exist"):
        run_in_process(text, out)
    assert not (tmp_path / "new").exists()
