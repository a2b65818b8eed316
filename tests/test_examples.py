"""The examples run as written."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script, *args):
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_demo_merges_with_mergekit_yaml_and_matches_peft(tmp_path):
    out = _run("demo.py", str(tmp_path / "demo"))
    deviation = float(out.split("max |merged - PEFT merge| = ")[1].split()[0])
    assert deviation < 1e-5
    assert "--lora-merge-cache written: False" in out


def test_merge_into_lora_notebook(tmp_path):
    out = _run("merge_into_lora.py")
    deviation = float(out.split("logits(merged model)| = ")[1].split()[0])
    assert deviation < 1e-4
