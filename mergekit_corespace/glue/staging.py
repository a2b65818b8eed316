"""Output written in full, or not at all — also when runs are killed, disks fill up, or two
runs aim at the same directory.

For an output directory ``out/`` a run

1. takes an exclusive lock on ``.out.lock`` next to it (``fcntl.flock``, released by the
   kernel whatever way the process ends). A second run on the same ``out/`` stops at once,
   naming the first run from the owner record the lock file holds;
2. removes the staging directories earlier runs on ``out/`` left behind when killed: each
   carries an owner record (pid, host, start time), and one whose owner is no longer
   running is removed, with one line saying so; others are left alone;
3. compares the expected output size with the free space before writing anything;
4. writes into a new staging directory ``.out.partial-*/out`` and moves it into place with
   one rename when complete. Any error removes it and leaves an existing ``out/`` as it
   was; an ``OSError`` while writing (a full disk) becomes one line.

Plain filesystem work; no mergekit.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from mergekit_corespace.errors import CoreSpaceError, first_line

LOG = logging.getLogger(__name__)

OWNER_FILE = "owner.json"
MODEL_MARKERS = ("config.json", "adapter_config.json")


def owner_record() -> dict:
    """Who this process is: enough to tell later whether it is still running."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "process_start": _process_start(os.getpid()),
    }


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused
    pid from the process that wrote a record."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def owner_is_running(record: dict) -> bool | None:
    """True or False for a record written on this host; None when it cannot be told (a
    record from another host)."""
    if record.get("host") != socket.gethostname():
        return None
    pid = record.get("pid")
    if not isinstance(pid, int):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # running, as another user
    recorded = record.get("process_start")
    return recorded is None or recorded == _process_start(pid)


def _describe(record: dict) -> str:
    return f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}"


@dataclass
class ClaimedOutput:
    """An output directory this run holds the lock of (see :func:`claimed_output`)."""

    path: str

    @property
    def parent(self) -> str:
        return os.path.dirname(self.path)

    @property
    def _staging_prefix(self) -> str:
        return f".{os.path.basename(self.path)}.partial-"

    def check_free_space(self, needed_bytes: int) -> None:
        """Refuse, before anything is written, when the output cannot fit."""
        free = shutil.disk_usage(self.parent).free
        if needed_bytes > free:
            raise CoreSpaceError(
                f"{self.path}: the merge needs about {_size(needed_bytes)} but "
                f"{self.parent} has {_size(free)} free"
            )

    @contextlib.contextmanager
    def staging(self) -> Iterator[str]:
        """Yield a staging directory; move it into place only on success.

        On any exception (KeyboardInterrupt included) the staging directory is removed and
        an existing output is left untouched; an ``OSError`` while writing becomes one line.
        """
        holder = tempfile.mkdtemp(prefix=self._staging_prefix, dir=self.parent)
        staging = os.path.join(holder, os.path.basename(self.path))
        try:
            with open(os.path.join(holder, OWNER_FILE), "w", encoding="utf-8") as handle:
                json.dump(owner_record(), handle)
            try:
                yield staging
            except Exception as error:
                code = _os_error_code(error)
                if code is None:
                    raise
                raise CoreSpaceError(self._write_failure(code, error)) from None
            if not os.path.isdir(staging):
                raise CoreSpaceError(f"{self.path}: the merge wrote nothing")
            if os.path.exists(self.path):
                os.rename(self.path, os.path.join(holder, "previous"))
            os.rename(staging, self.path)
        finally:
            shutil.rmtree(holder, ignore_errors=True)

    def _write_failure(self, code: int, error: Exception) -> str:
        what = "no space left on device" if code == errno.ENOSPC else os.strerror(code)
        free = shutil.disk_usage(self.parent).free
        unchanged = "is unchanged" if os.path.exists(self.path) else "was not created"
        return (
            f"{self.path}: {what} while writing the merge ({_size(free)} free in "
            f"{self.parent}; {first_line(error)}); the partial output was removed and "
            f"{os.path.basename(self.path)} {unchanged}"
        )

    def remove_stale_staging(self) -> None:
        """Remove staging directories of this output whose owner is no longer running."""
        removed, kept = [], []
        for name in sorted(os.listdir(self.parent)):
            holder = os.path.join(self.parent, name)
            if not name.startswith(self._staging_prefix) or not os.path.isdir(holder):
                continue
            try:
                with open(os.path.join(holder, OWNER_FILE), encoding="utf-8") as handle:
                    record = json.load(handle)
                running = owner_is_running(record) if isinstance(record, dict) else None
            except (OSError, ValueError):
                record, running = {}, None
            if running is False:
                shutil.rmtree(holder, ignore_errors=True)
                removed.append(f"{holder} ({_describe(record)})")
            else:
                kept.append(holder)
        if removed:
            LOG.warning(
                "removed %d staging director%s left by merges that are no longer running: %s",
                len(removed),
                "y" if len(removed) == 1 else "ies",
                "; ".join(removed),
            )
        if kept:
            LOG.warning(
                "left alone %d staging director%s of %s whose owner may still be running "
                "(another host, or no owner record); remove by hand if not: %s",
                len(kept),
                "y" if len(kept) == 1 else "ies",
                self.path,
                "; ".join(kept),
            )


@contextlib.contextmanager
def claimed_output(out_path: str) -> Iterator[ClaimedOutput]:
    """Hold ``out_path`` for one run: lock it, clean up after killed runs, and check that
    an existing ``out_path`` may be replaced (only an empty folder, a model or an adapter).

    Raises at once when another run holds it."""
    path = os.path.abspath(out_path)
    if os.path.isdir(path) and os.listdir(path):
        if not any(os.path.exists(os.path.join(path, marker)) for marker in MODEL_MARKERS):
            raise CoreSpaceError(
                f"{path}: exists, is not empty and holds no model; refusing to replace it"
            )
    elif os.path.exists(path) and not os.path.isdir(path):
        raise CoreSpaceError(f"{path}: exists and is not a directory")
    created = _make_parents(os.path.dirname(path))
    try:
        with exclusive_lock(path):
            output = ClaimedOutput(path)
            output.remove_stale_staging()
            yield output
    finally:
        for folder in reversed(created):  # a failed first run leaves no empty folders
            with contextlib.suppress(OSError):
                os.rmdir(folder)


@contextlib.contextmanager
def exclusive_lock(out_path: str, holder: str = "merge") -> Iterator[None]:
    """``flock`` on ``.out.lock`` next to ``out_path``, holding this run's owner record;
    the file is removed on release. A lock taken on a file another run just removed is
    retried, so two runs can never both hold one. A second run stops at once, naming the
    first as ``holder`` (``merge``, ``tuning run``)."""
    lock_path = os.path.join(os.path.dirname(out_path), f".{os.path.basename(out_path)}.lock")
    while True:
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise CoreSpaceError(_busy(out_path, lock_path, holder)) from None
        try:
            if os.fstat(descriptor).st_ino == os.stat(lock_path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(descriptor)
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, json.dumps(owner_record()).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(descriptor)


def _busy(out_path: str, lock_path: str, holder: str) -> str:
    try:
        with open(lock_path, encoding="utf-8") as handle:
            owner = _describe(json.load(handle))
    except (OSError, ValueError):
        owner = "its owner record is unreadable"
    return (
        f"{out_path}: another {holder} is writing it ({owner}); wait for it to finish or "
        "choose another output directory"
    )


def _make_parents(folder: str) -> list[str]:
    """Create ``folder`` and its missing parents; returns those created, outermost first."""
    missing = []
    while not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for created in reversed(missing):
        os.makedirs(created, exist_ok=True)
    return missing[::-1]


def _os_error_code(error: BaseException) -> int | None:
    """The errno of an ``OSError``, or of an I/O error safetensors reports as text
    (``… (os error 28)``)."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno
    match = re.search(r"\(os error (\d+)\)", str(error))
    return int(match[1]) if match and type(error).__name__ == "SafetensorError" else None


def _size(count: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"
