"""Adapters named by Hugging Face Hub id resolve as mergekit resolves models — and never
reach the real Hub here: a temporary HF cache with HF_HUB_OFFLINE=1, or a loopback stand-in
for the Hub's download API (tests/fake_hub.py).

huggingface_hub reads HF_* variables when it is imported, so each test's merges run in one
new interpreter with that test's environment (``run_cli_batch``); the error cases of one
environment share an interpreter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import FakeHub, cache_repo, commit_of
from helpers import merge_yaml, run_cli_batch

NO_TRACEBACK = "Traceback"


def _yaml(base, references, parameters="{merge: ta}", base_model=None):
    return merge_yaml(base, references, parameters=parameters, base_model=base_model)


def _run(tmp_path, name, text, script="mergekit-yaml", extra=()):
    """One merge of ``text`` into ``tmp_path / name``: its ``(script, args)`` and output."""
    config = tmp_path / f"{name}.yml"
    config.write_text(text)
    out = tmp_path / name
    args = [str(config), str(out), "--random-seed", "1", *extra]
    if script == "mergekit-yaml":
        args += ["--no-copy-tokenizer", "--no-write-model-card"]
    return (script, args), out


def _merge_all(env, *runs):
    """Run ``_run`` results one after another in a new interpreter with ``env``:
    ``[(CompletedProcess, out), ...]``."""
    done = run_cli_batch([run for run, _ in runs], env=env)
    return [(result, out) for result, (_, out) in zip(done, runs)]


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


def _offline_cache(tmp_path, adapters) -> dict[str, str]:
    """A HF cache holding the three adapters as someorg/lora-{a,b,c}, lora-a also at
    revision v2 (holding lora-b's files), and a repository with no adapter files; the
    environment that reads it offline."""
    cache = tmp_path / "hf" / "hub"
    for letter, adapter in zip("abc", adapters):
        cache_repo(cache, f"someorg/lora-{letter}", adapter)
    cache_repo(cache, "someorg/lora-a", adapters[1], revision="v2")
    readme = tmp_path / "readme-only"
    readme.mkdir()
    (readme / "README.md").write_text("no adapter here")
    cache_repo(cache, "someorg/readme-only", readme)
    return {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


@pytest.fixture()
def offline(tmp_path, llama32):
    root, base, adapters = llama32
    return base, adapters, _offline_cache(tmp_path, adapters)


HUB_IDS = ["someorg/lora-a", "someorg/lora-b", "someorg/lora-c"]


@pytest.mark.parametrize("parameters", ["{merge: ta}", "{merge: ties, density: 0.5}"])
def test_hub_named_adapters_merge_to_the_same_bytes_as_local_paths(offline, tmp_path, parameters):
    base, adapters, env = offline
    (local, local_out), (hub, hub_out) = _merge_all(
        env,
        _run(tmp_path, "local", _yaml(base, adapters, parameters)),
        _run(tmp_path, "hub", _yaml(base, HUB_IDS, parameters)),
    )
    assert local.returncode == 0 and hub.returncode == 0, hub.stderr[-3000:]
    assert _weights(hub_out) == _weights(local_out)


def test_hub_named_adapters_give_the_same_merged_adapter(offline, tmp_path):
    base, adapters, env = offline
    parameters = "{merge: ties, density: 0.5}"
    runs = _merge_all(
        env,
        *(
            _run(tmp_path, name, _yaml(base, refs, parameters), "mergekit-corespace-lora")
            for name, refs in (("local", adapters), ("hub", HUB_IDS))
        ),
    )
    assert all(done.returncode == 0 for done, _ in runs), runs[1][0].stderr[-3000:]
    assert _weights(runs[1][1]) == _weights(runs[0][1])


def test_revision_picks_that_snapshot(offline, tmp_path):
    base, adapters, env = offline
    main_commit = commit_of("someorg/lora-a", "main")
    cases = {
        "tag": (["someorg/lora-a@v2", adapters[2]], [adapters[1], adapters[2]]),
        "commit": ([f"someorg/lora-a@{main_commit}", adapters[2]], [adapters[0], adapters[2]]),
    }
    runs = []
    for name, (references, same_as) in cases.items():
        runs += [
            _run(tmp_path, name, _yaml(base, references)),
            _run(tmp_path, f"{name}-local", _yaml(base, same_as)),
        ]
    done = _merge_all(env, *runs)
    for name, (hub, hub_out), (local, local_out) in zip(cases, done[::2], done[1::2]):
        assert hub.returncode == 0 and local.returncode == 0, hub.stderr[-3000:]
        assert _weights(hub_out) == _weights(local_out), name


def test_transformers_cache_option_is_the_cache_searched(offline, tmp_path):
    base, adapters, env = offline
    elsewhere = tmp_path / "transformers-cache"
    cache_repo(elsewhere, "otherorg/lora", adapters[0])
    env = {**env, "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    text = _yaml(base, ["otherorg/lora"])
    (without, without_out), (done, out), (local, local_out) = _merge_all(
        env,
        _run(tmp_path, "default-cache", text),
        _run(tmp_path, "given-cache", text, extra=("--transformers-cache", str(elsewhere))),
        _run(tmp_path, "local", _yaml(base, adapters[:1])),
    )
    _assert_one_line_error(without, without_out, tmp_path, "otherorg/lora", "HF_HUB_OFFLINE is set")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _weights(out) == _weights(local_out)


def test_merge_adapters_takes_hub_ids(offline, tmp_path):
    base, adapters, env = offline
    code = (
        "import sys; from mergekit_corespace import merge_adapters\n"
        "for adapters, out in zip(sys.argv[2::2], sys.argv[3::2]):\n"
        "    merge_adapters(sys.argv[1], adapters.split(','), method='ties', out=out,"
        " density=0.5, options={'random_seed': 1})\n"
    )
    args = [base]
    for name, references in (("api-local", adapters), ("api-hub", HUB_IDS)):
        args += [",".join(references), str(tmp_path / name)]
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _weights(tmp_path / "api-hub") == _weights(tmp_path / "api-local")


OFFLINE_ERRORS = [
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
]
SCRIPTS = ["mergekit-yaml", "mergekit-corespace-lora"]


@pytest.mark.parametrize("reference, fragments", OFFLINE_ERRORS)
@pytest.mark.parametrize("script", SCRIPTS)
def test_unresolvable_adapter_offline_is_one_line_and_no_output(
    offline_errors, reference, fragments, script
):
    done, out, folder = offline_errors[reference, script]
    _assert_one_line_error(done, out, folder, *fragments)


def _error_runs(tmp_path, base, adapter, env, references, scripts):
    """Each reference beside ``adapter``, merged by each script in a folder of its own, all
    in one interpreter: ``{(reference, script): (CompletedProcess, out, folder)}``."""
    runs, folders = [], []
    for i, (reference, script) in enumerate(
        (reference, script) for reference in references for script in scripts
    ):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        runs.append(_run(folder, "out", _yaml(base, [adapter, reference]), script))
        folders.append(((reference, script), folder))
    return {
        case: (done, out, folder)
        for (case, folder), (done, out) in zip(folders, _merge_all(env, *runs))
    }


@pytest.fixture(scope="module")
def offline_errors(tmp_path_factory, llama32):
    root, base, adapters = llama32
    tmp_path = tmp_path_factory.mktemp("offline-errors")
    env = _offline_cache(tmp_path, adapters)
    references = [reference for reference, _ in OFFLINE_ERRORS]
    return _error_runs(tmp_path, base, adapters[0], env, references, SCRIPTS)


def _serve_hub(tmp_path, base, adapters):
    """The Hub's download API on loopback: lora-a (main, and v2 holding lora-b), a gated
    lora-c, a repository without adapter files, and the base model; the server and the
    environment that reaches it."""
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
    return server, env


@pytest.fixture()
def hub(tmp_path, llama32):
    root, base, adapters = llama32
    server, env = _serve_hub(tmp_path, base, adapters)
    yield base, adapters, env, server
    server.close()


def test_adapters_downloaded_from_the_hub_merge_like_local_paths(hub, tmp_path):
    base, adapters, env, server = hub
    references = ["someorg/lora-a", "someorg/lora-b@main", "someorg/gated-lora"]
    (done, out), (local, local_out) = _merge_all(
        {**env, "HF_TOKEN": server.token},
        _run(tmp_path, "hub", _yaml(base, references)),
        _run(tmp_path, "local", _yaml(base, adapters)),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _weights(out) == _weights(local_out)
    downloaded = [path for path in server.requests if "/resolve/" in path]
    assert downloaded and all(path.rsplit("/", 1)[1].startswith("adapter_") for path in downloaded)


ONLINE_ERRORS = [
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
]


@pytest.fixture(scope="module")
def online_errors(tmp_path_factory, llama32):
    root, base, adapters = llama32
    tmp_path = tmp_path_factory.mktemp("online-errors")
    server, env = _serve_hub(tmp_path, base, adapters)
    try:
        references = [reference for reference, _ in ONLINE_ERRORS]
        yield _error_runs(tmp_path, base, adapters[0], env, references, ["mergekit-yaml"])
    finally:
        server.close()


@pytest.mark.parametrize("reference, fragments", ONLINE_ERRORS)
def test_unresolvable_adapter_online_is_one_line_and_no_output(online_errors, reference, fragments):
    done, out, folder = online_errors[reference, "mergekit-yaml"]
    _assert_one_line_error(done, out, folder, *fragments)


def test_hub_named_base_model_keeps_mergekits_behaviour(hub, tmp_path):
    """Online, a Hub-named base resolves through mergekit itself; the merge equals the
    one with a local base."""
    base, adapters, env, _ = hub
    pinned = _yaml("someorg/base@main", ["someorg/lora-a"], base_model="someorg/base@main")
    (done, out), (local, local_out), (as_adapter, adapter_out) = _merge_all(
        env,
        _run(tmp_path, "hub-base", _yaml("someorg/base", ["someorg/lora-a", "someorg/lora-b"])),
        _run(tmp_path, "local", _yaml(base, adapters[:2])),
        _run(tmp_path, "lora", pinned, "mergekit-corespace-lora"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _weights(out)["model.safetensors"] == _weights(local_out)["model.safetensors"]
    assert as_adapter.returncode == 0, as_adapter.stderr[-3000:]
    written = json.loads((adapter_out / "adapter_config.json").read_text())
    assert (written["base_model_name_or_path"], written["revision"]) == ("someorg/base", "main")


def test_hub_named_base_offline_names_the_snapshot_to_write_instead(offline, tmp_path):
    """mergekit itself lists a Hub-named base's files online even when cached, so offline
    such a run cannot work (stock mergekit fails with a traceback after writing its LoRA
    cache); ours stops first with one line naming the cached snapshot, which then works."""
    base, adapters, env = offline
    snapshot = cache_repo(tmp_path / "hf" / "hub", "someorg/base", Path(base))
    text = _yaml("someorg/base", HUB_IDS[:1], base_model="someorg/base")
    (refused, refused_out), (done, out), (local, local_out) = _merge_all(
        env,
        _run(tmp_path, "out", text),
        _run(tmp_path, "snapshot", _yaml(snapshot, HUB_IDS[:1])),
        _run(tmp_path, "local", _yaml(base, adapters[:1])),
    )
    _assert_one_line_error(
        refused, refused_out, tmp_path, "base_model: someorg/base:", str(snapshot)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _weights(out) == _weights(local_out)


def test_an_unreachable_hub_is_one_line_naming_the_cache(tmp_path, llama32):
    """Online, an adapter id in no cache and a Hub that refuses connections (a closed
    local port): one line that says the Hub cannot be reached, for both scripts."""
    import socket

    root, base, adapters = llama32
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        "HF_ENDPOINT": f"http://127.0.0.1:{port}",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
        "HF_HUB_OFFLINE": "0",
        "HF_TOKEN": "",
        "HF_HUB_ETAG_TIMEOUT": "2",
        "HF_HUB_DOWNLOAD_TIMEOUT": "2",
    }
    runs = _error_runs(tmp_path, base, adapters[0], env, ["someorg/lora-z"], SCRIPTS)
    for script in SCRIPTS:
        done, out, folder = runs["someorg/lora-z", script]
        _assert_one_line_error(
            done,
            out,
            folder,
            "someorg/lora-z: no such local directory, not in the Hugging Face cache (",
            "and the Hub cannot be reached (",
        )
