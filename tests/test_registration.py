"""`core_space` is known to stock mergekit after install, without slowing Python start-up."""

import json
import os
import subprocess
import sys
import sysconfig
import venv
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from helpers import BIN, assert_merge_matches, expected_ta, load_model_tensors, peft_deltas

from mergekit_corespace import toy

REPO = Path(__file__).resolve().parents[1]
WITHOUT_PTH_HOOK = (
    "import sys; sys.meta_path[:] = [f for f in sys.meta_path "
    "if type(f).__name__ != '_PostImportFinder']; "
)


def python(code: str, executable: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run([executable, "-c", code], capture_output=True, text=True, timeout=300)


def concurrently(*commands: list[str]) -> list[subprocess.CompletedProcess]:
    """Run new interpreters side by side: each spends seconds importing, on one core.
    One torch thread each, or OpenMP workers of several processes fight over the cores."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(
            pool.map(
                lambda command: subprocess.run(
                    command, env=env, capture_output=True, text=True, timeout=300
                ),
                commands,
            )
        )


def test_registry_knows_core_space_in_a_fresh_interpreter():
    done = python(
        "import sys, mergekit.merge_methods.registry as r; m = r.get('core_space'); "
        "print(m.spec.name, 'mergekit_corespace' in sys.modules)"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["core_space", "True"]


def test_interpreter_start_imports_neither_torch_nor_mergekit():
    done = python(
        "import sys, json; print(json.dumps(["
        "'torch' in sys.modules, 'mergekit' in sys.modules, 'mergekit_corespace' in sys.modules,"
        "[type(f).__name__ for f in sys.meta_path]]))"
    )
    torch_loaded, mergekit_loaded, hook_loaded, finders = json.loads(done.stdout)
    assert (torch_loaded, mergekit_loaded, hook_loaded) == (False, False, True)
    assert finders[0] == "_PostImportFinder"


# One new interpreter per entry module, forked from a parent that has imported only what
# mergekit depends on (torch, transformers, peft: most of a start-up's seconds) and no
# mergekit module, so each child still meets mergekit and the hook for the first time.
FORKED_IMPORTS = """
import json, os, sys, traceback, warnings
import torch, transformers, peft
assert not [m for m in sys.modules if m.split(".")[0] == "mergekit" or ".glue" in m]
failures = {}
for first in sys.argv[1:]:
    read, write = os.pipe()
    if os.fork() == 0:
        os.close(read)
        try:
            warnings.simplefilter("error", RuntimeWarning)
            __import__(first)
            import mergekit.merge as m
            from mergekit.merge_methods import get
            get("core_space")
            assert m.run_merge.__corespace__
            message = ""
        except BaseException:
            message = traceback.format_exc()
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode()
    os.wait()
    if message:
        failures[first] = message
print(json.dumps(failures))
"""


def test_every_mergekit_entry_module_attaches_the_plugin():
    """Whatever mergekit module a program imports first, the hooks attach without warnings."""
    firsts = (
        "mergekit.merge",
        "mergekit.plan",
        "mergekit.scripts.run_yaml",
        "mergekit.merge_methods.registry",
        "mergekit.io.tasks",
        "mergekit_corespace.glue.internals",
        "mergekit_corespace.glue.registration",
        "mergekit_corespace.glue.run",
        "mergekit_corespace.api",
    )
    done = subprocess.run(
        [sys.executable, "-c", FORKED_IMPORTS, *firsts],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == {}


def test_console_script_registers_where_pth_files_are_skipped(tmp_path):
    base = toy.save_tiny_model(str(tmp_path / "base"))
    adapter = toy.save_lora_adapter(base, str(tmp_path / "a"), r=4, seed=1)
    config = tmp_path / "merge.yml"
    config.write_text(
        f"merge_method: core_space\nbase_model: {base}\nmodels:\n  - model: {base}+{adapter}\n"
    )
    args = [str(config), str(tmp_path / "out"), "--no-copy-tokenizer", "--no-write-model-card"]
    stock, ours, help_text = concurrently(
        [
            sys.executable,
            "-c",
            WITHOUT_PTH_HOOK + "import mergekit.merge_methods as m; m.get('core_space')",
        ],
        [
            sys.executable,
            "-c",
            WITHOUT_PTH_HOOK + f"sys.argv = ['mergekit-corespace', *{args!r}]; "
            "from mergekit_corespace.cli import main; main()",
        ],
        [str(BIN / "mergekit-corespace"), "--help"],
    )
    assert "Unimplemented merge method core_space" in stock.stderr
    assert ours.returncode == 0, ours.stderr[-2000:]
    _assert_is_the_peft_merge(tmp_path / "out", base, adapter)
    assert "--lora-merge-cache" in help_text.stdout


def test_wheel_carries_the_hook_into_a_fresh_venv(tmp_path):
    """Build the wheel, install it into a new venv, run plain `mergekit-yaml` there."""
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("mergekit_corespace-*.whl"))

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    env_python = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(env_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    # Dependencies come from this environment's site-packages as a plain path entry, so
    # that no .pth file of this environment (editable install included) is processed.
    Path(site, "_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run(
        [str(env_python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    assert (Path(site) / "mergekit_corespace.pth").is_file()
    # mergekit's `mergekit-yaml` entry point, as pip writes it (mergekit comes via the path)
    (env_dir / "bin" / "mergekit-yaml").write_text(
        f"#!{env_python}\nimport sys\n"
        "from mergekit.scripts.run_yaml import main\nsys.exit(main())\n"
    )
    os.chmod(env_dir / "bin" / "mergekit-yaml", 0o755)

    where = python("import mergekit_corespace; print(mergekit_corespace.__file__)", str(env_python))
    assert where.stdout.strip().startswith(site), where.stdout + where.stderr

    base = toy.save_tiny_model(str(tmp_path / "base"))
    adapter = toy.save_lora_adapter(base, str(tmp_path / "a"), r=4, seed=1)
    config = tmp_path / "merge.yml"
    config.write_text(
        f"merge_method: core_space\nbase_model: {base}\nmodels:\n  - model: {base}+{adapter}\n"
    )
    done = subprocess.run(
        [
            str(env_dir / "bin" / "mergekit-yaml"),
            str(config),
            str(tmp_path / "out"),
            "--no-copy-tokenizer",
            "--no-write-model-card",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_is_the_peft_merge(tmp_path / "out", base, adapter)


def _assert_is_the_peft_merge(out, base, adapter):
    """One adapter at weight 1: the base plus PEFT's own merge_and_unload delta."""
    changed = set(peft_deltas(base, adapter))
    assert changed
    assert_merge_matches(
        load_model_tensors(out), base, expected_ta(base, [(adapter, 1.0)]), changed, rtol=1e-5
    )
