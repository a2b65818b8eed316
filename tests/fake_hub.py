"""Stand-ins for the Hugging Face Hub, so that Hub ids are tested without network.

- :func:`cache_repo` writes a repository snapshot into a local HF cache, as
  ``huggingface_hub`` lays it out (``models--org--name/refs/<revision>`` and
  ``snapshots/<commit>/``), for runs with ``HF_HUB_OFFLINE=1``.
- :class:`FakeHub` answers the Hub's download API on loopback (``HF_ENDPOINT``): repo info,
  file tree, file downloads, and the error answers of unknown or gated repositories and
  unknown revisions.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import shutil
import threading
from pathlib import Path


def commit_of(repo_id: str, revision: str) -> str:
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


def cache_repo(cache: Path, repo_id: str, files: Path, revision: str = "main") -> Path:
    """Put the files of directory ``files`` into ``cache`` (an ``HF_HUB_CACHE``) as the
    snapshot of ``repo_id`` at ``revision``; returns the snapshot directory."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = commit_of(repo_id, revision)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(files, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


_ROUTES = (
    ("tree", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/?]+)")),
    ("info", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/?]+)")),
    ("file", re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>[^?]+)")),
)


class FakeHub:
    """``repos``: repo id -> revision -> {file name: bytes}; ``gated`` repos answer only
    requests that carry ``token``."""

    def __init__(self, repos: dict, gated=(), token: str = "hf_test_token"):
        self.repos, self.gated, self.token = repos, set(gated), token
        self.requests: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def _answer(self, body: bool):
                hub.requests.append(self.path)
                status, headers, payload = hub.respond(self.path, self.headers.get("authorization"))
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(payload))}.items():
                    self.send_header(key, value)
                self.end_headers()
                if body:
                    self.wfile.write(payload)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @classmethod
    def serving(cls, directories: dict, **kwargs) -> FakeHub:
        """A hub whose repo id -> revision -> local directory, files read now."""
        repos = {
            repo: {
                revision: {p.name: p.read_bytes() for p in Path(path).iterdir() if p.is_file()}
                for revision, path in revisions.items()
            }
            for repo, revisions in directories.items()
        }
        return cls(repos, **kwargs)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def respond(self, path: str, authorization: str | None) -> tuple[int, dict, bytes]:
        routed = [(kind, pattern.match(path)) for kind, pattern in _ROUTES]
        kind, match = next(((k, m) for k, m in routed if m), (None, None))
        if match is None:
            return 404, {}, b""
        repo = match["repo"]
        if repo not in self.repos:
            return _error(404, "RepoNotFound", "Repository not found")
        if repo in self.gated and authorization != f"Bearer {self.token}":
            return _error(401, "GatedRepo", f"Access to model {repo} is restricted.")
        found = [
            (name, files)
            for name, files in self.repos[repo].items()
            if match["rev"] in (name, commit_of(repo, name))
        ]
        if not found:
            return _error(404, "RevisionNotFound", "Invalid rev id")
        revision, files = found[0]
        commit = commit_of(repo, revision)
        if kind == "info":
            siblings = [{"rfilename": name} for name in files]
            return _json({"id": repo, "sha": commit, "siblings": siblings})
        if kind == "tree":
            return _json(
                [
                    {"type": "file", "path": name, "size": len(data), "oid": _sha1(data)}
                    for name, data in files.items()
                ]
            )
        data = files.get(match["file"])
        if data is None:
            return _error(404, "EntryNotFound", "Entry not found")
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        return 200, {"X-Repo-Commit": commit, "ETag": etag}, data


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _json(value) -> tuple[int, dict, bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(value).encode()


def _error(status: int, code: str, message: str) -> tuple[int, dict, bytes]:
    return status, {"X-Error-Code": code, "X-Error-Message": message}, b""
