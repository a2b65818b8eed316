"""Adapters named by Hugging Face Hub id resolve as mergekit resolves models — and never
reach the real Hub here: a temporary HF cache with HF_HUB_OFFLINE=1, or a loopback stand-in
for the Hub's download API (tests/fake_hub.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import FakeHub, cache_repo, commit_of
from helpers import merge_yaml, run_cli

NO_TRACEBACK = "Traceback"


def _yaml(base, references, parameters="{merge: ta}", base_model=None):
    return merge_yaml(base, references, parameters=parameters, base_model=base_model)


def _merge(tmp_path, name, text, env, script="mergekit-yaml", extra=()):
    config = tmp_path / f"{name}.yml"
    config.write_text(text)
    out = tmp_path / name
    args = [str(config), str(out), "--random-seed", "1", *extra]
    if script == "mergekit-yaml":
        args += ["--no-copy-tokenizer", "--no-write-model-card"]
    return run_cli(args, env=env, script=script), out


def _weights(out):
    """What a merge wrote, but mergekit's copy of the YAML (it names the references)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix != ".yml"}


def _assert_one_line_error(done, out, tmp_path, *fragments):
    assert done.returncode != 0
    assert NO_TRACEBACK not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, done.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert not out.exists()
    assert not list(tmp_path.glob(".*partial*"))


@pytest.fixture()
def offline(tmp_path, llama32):
    """A HF cache holding the three adapters as someorg/lora-{a,b,c}, lora-a also at
    revision v2 (holding lora-b's files), and a repository with no adapter files."""
    root, base, adapters = llama32
    cache = tmp_path / "hf" / "hub"
    for letter, adapter in zip("abc", adapters):
        cache_repo(cache, f"someorg/lora-{letter}", adapter)
    cache_repo(cache, "someorg/lora-a", adapters[1], revision="v2")
    readme = tmp_path / "readme-only"
    readme.mkdir()
    (readme / "README.md").write_text("no adapter here")
    cache_repo(cache, "someorg/readme-only", readme)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return base, adapters, env


HUB_IDS = ["someorg/lora-a", "someorg/lora-b", "someorg/lora-c"]


@pytest.mark.parametrize("parameters", ["{merge: ta}", "{merge: ties, density: 0.5}"])
def test_hub_named_adapters_merge_to_the_same_bytes_as_local_paths(offline, tmp_path, parameters):
    base, adapters, env = offline
    local, local_out = _merge(tmp_path, "local", _yaml(base, adapters, parameters), env)
    hub, hub_out = _merge(tmp_path, "hub", _yaml(base, HUB_IDS, parameters), env)
    assert local.returncode == 0 and hub.returncode == 0, hub.stderr[-3000:]
    assert _weights(hub_out) == _weights(local_out)


def test_hub_named_adapters_give_the_same_merged_adapter(offline, tmp_path):
    base, adapters, env = offline
    parameters = "{merge: ties, density: 0.5}"
    runs = [
        _merge(tmp_path, name, _yaml(base, refs, parameters), env, "mergekit-corespace-lora")
        for name, refs in (("local", adapters), ("hub", HUB_IDS))
    ]
    assert all(done.returncode == 0 for done, _ in runs), runs[1][0].stderr[-3000:]
    assert _weights(runs[1][1]) == _weights(runs[0][1])


def test_revision_picks_that_snapshot(offline, tmp_path):
    base, adapters, env = offline
    main_commit = commit_of("someorg/lora-a", "main")
    cases = {
        "tag": (["someorg/lora-a@v2", adapters[2]], [adapters[1], adapters[2]]),
        "commit": ([f"someorg/lora-a@{main_commit}", adapters[2]], [adapters[0], adapters[2]]),
    }
    for name, (references, same_as) in cases.items():
        hub, hub_out = _merge(tmp_path, name, _yaml(base, references), env)
        local, local_out = _merge(tmp_path, f"{name}-local", _yaml(base, same_as), env)
        assert hub.returncode == 0 and local.returncode == 0, hub.stderr[-3000:]
        assert _weights(hub_out) == _weights(local_out), name


def test_transformers_cache_option_is_the_cache_searched(offline, tmp_path):
    base, adapters, env = offline
    elsewhere = tmp_path / "transformers-cache"
    cache_repo(elsewhere, "otherorg/lora", adapters[0])
    env = {**env, "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    text = _yaml(base, ["otherorg/lora"])
    without, out = _merge(tmp_path, "default-cache", text, env)
    _assert_one_line_error(without, out, tmp_path, "otherorg/lora", "HF_HUB_OFFLINE is set")
    done, out = _merge(
        tmp_path, "given-cache", text, env, extra=("--transformers-cache", str(elsewhere))
    )
    local, local_out = _merge(tmp_path, "local", _yaml(base, adapters[:1]), env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _weights(out) == _weights(local_out)


def test_merge_adapters_takes_hub_ids(offline, tmp_path):
    base, adapters, env = offline
    code = (
        "import sys; from mergekit_corespace import merge_adapters\n"
        "adapters, out = sys.argv[2].split(','), sys.argv[3]\n"
        "merge_adapters(sys.argv[1], adapters, method='ties', out=out, density=0.5,"
        " options={'random_seed': 1})\n"
    )
    for name, references in (("api-local", adapters), ("api-hub", HUB_IDS)):
        done = subprocess.run(
            [sys.executable, "-c", code, base, ",".join(references), str(tmp_path / name)],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    assert _weights(tmp_path / "api-hub") == _weights(tmp_path / "api-local")


@pytest.mark.parametrize(
    "reference, fragments",
    [
        (
            "someorg/not-cached",
            [
                "someorg/not-cached: no such local directory, nor in the Hugging Face cache",
                "HF_HUB_OFFLINE is set",
            ],
        ),
        (
            "someorg/lora-a@v9",
            ["someorg/lora-a@v9: no such local directory", "HF_HUB_OFFLINE is set"],
        ),
        (
            "someorg/readme-only",
            ["someorg/readme-only: the Hugging Face Hub repository holds no PEFT adapter"],
        ),
        ("/adapters/not-here", ["/adapters/not-here: adapter directory does not exist"]),
    ],
)
@pytest.mark.parametrize("script", ["mergekit-yaml", "mergekit-corespace-lora"])
def test_unresolvable_adapter_offline_is_one_line_and_no_output(
    offline, tmp_path, reference, fragments, script
):
    base, adapters, env = offline
    done, out = _merge(tmp_path, "out", _yaml(base, [adapters[0], reference]), env, script)
    _assert_one_line_error(done, out, tmp_path, *fragments)


@pytest.fixture()
def hub(tmp_path, llama32):
    """The Hub's download API on loopback: lora-a (main, and v2 holding lora-b), a gated
    lora-c, a repository without adapter files, and the base model."""
    root, base, adapters = llama32
    readme = tmp_path / "readme-only"
    readme.mkdir()
    (readme / "README.md").write_text("no adapter here")
    server = FakeHub.serving(
        {
            "someorg/lora-a": {"main": adapters[0], "v2": adapters[1]},
            "someorg/lora-b": {"main": adapters[1]},
            "someorg/gated-lora": {"main": adapters[2]},
            "someorg/readme-only": {"main": readme},
            "someorg/base": {"main": base},
        },
        gated=["someorg/gated-lora"],
    )
    env = {
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
        "HF_HUB_OFFLINE": "0",
        "HF_TOKEN": "",
    }
    yield base, adapters, env, server
    server.close()


def test_adapters_downloaded_from_the_hub_merge_like_local_paths(hub, tmp_path):
    base, adapters, env, server = hub
    references = ["someorg/lora-a", "someorg/lora-b@main", "someorg/gated-lora"]
    with_token = {**env, "HF_TOKEN": server.token}
    done, out = _merge(tmp_path, "hub", _yaml(base, references), with_token)
    local, local_out = _merge(tmp_path, "local", _yaml(base, adapters), env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _weights(out) == _weights(local_out)
    downloaded = [path for path in server.requests if "/resolve/" in path]
    assert downloaded and all(path.rsplit("/", 1)[1].startswith("adapter_") for path in downloaded)


@pytest.mark.parametrize(
    "reference, fragments",
    [
        (
            "someorg/unknown",
            ["someorg/unknown: no such local directory, nor a repository on the Hugging Face Hub"],
        ),
        ("someorg/gated-lora", ["someorg/gated-lora: a gated repository", "HF_TOKEN"]),
        (
            "someorg/readme-only",
            ["someorg/readme-only: the Hugging Face Hub repository holds no PEFT adapter"],
        ),
        (
            "someorg/lora-a@nope",
            [
                "someorg/lora-a@nope: the Hugging Face Hub repository someorg/lora-a has no "
                "revision 'nope'"
            ],
        ),
    ],
)
def test_unresolvable_adapter_online_is_one_line_and_no_output(hub, tmp_path, reference, fragments):
    base, adapters, env, _ = hub
    done, out = _merge(tmp_path, "out", _yaml(base, [adapters[0], reference]), env)
    _assert_one_line_error(done, out, tmp_path, *fragments)


def test_hub_named_base_model_keeps_mergekits_behaviour(hub, tmp_path):
    """Online, a Hub-named base resolves through mergekit itself; the merge equals the
    one with a local base."""
    base, adapters, env, _ = hub
    text = _yaml("someorg/base", ["someorg/lora-a", "someorg/lora-b"])
    done, out = _merge(tmp_path, "hub-base", text, env)
    local, local_out = _merge(tmp_path, "local", _yaml(base, adapters[:2]), env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _weights(out)["model.safetensors"] == _weights(local_out)["model.safetensors"]

    text = _yaml("someorg/base@main", ["someorg/lora-a"], base_model="someorg/base@main")
    done, out = _merge(tmp_path, "lora", text, env, "mergekit-corespace-lora")
    assert done.returncode == 0, done.stderr[-3000:]
    written = json.loads((out / "adapter_config.json").read_text())
    assert (written["base_model_name_or_path"], written["revision"]) == ("someorg/base", "main")


def test_hub_named_base_offline_names_the_snapshot_to_write_instead(offline, tmp_path):
    """mergekit itself lists a Hub-named base's files online even when cached, so offline
    such a run cannot work (stock mergekit fails with a traceback after writing its LoRA
    cache); ours stops first with one line naming the cached snapshot, which then works."""
    base, adapters, env = offline
    snapshot = cache_repo(tmp_path / "hf" / "hub", "someorg/base", Path(base))
    text = _yaml("someorg/base", HUB_IDS[:1], base_model="someorg/base")
    done, out = _merge(tmp_path, "out", text, env)
    _assert_one_line_error(done, out, tmp_path, "base_model: someorg/base:", str(snapshot))
    done, out = _merge(tmp_path, "snapshot", _yaml(snapshot, HUB_IDS[:1]), env)
    local, local_out = _merge(tmp_path, "local", _yaml(base, adapters[:1]), env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _weights(out) == _weights(local_out)
