"""Output written in full, or not at all.

A merge writes into a staging directory next to ``out/`` and the finished directory
replaces ``out/`` in one rename. Plain filesystem work; no mergekit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from mergekit_corespace.errors import CoreSpaceError


@contextlib.contextmanager
def staged_output(out_path: str) -> Iterator[str]:
    """Yield a staging directory next to ``out_path``; move it into place only on success.

    On any exception (KeyboardInterrupt included) the staging directory is removed and an
    existing ``out_path`` is left untouched. On success an existing ``out_path`` is
    replaced — but only if it is empty or holds a model or adapter, never another folder.
    """
    out_path = os.path.abspath(out_path)
    if os.path.isdir(out_path) and os.listdir(out_path):
        if not any(
            os.path.exists(os.path.join(out_path, marker))
            for marker in ("config.json", "adapter_config.json")
        ):
            raise CoreSpaceError(
                f"{out_path}: exists, is not empty and holds no model; refusing to replace it"
            )
    elif os.path.exists(out_path) and not os.path.isdir(out_path):
        raise CoreSpaceError(f"{out_path}: exists and is not a directory")
    parent = os.path.dirname(out_path)
    os.makedirs(parent, exist_ok=True)
    holder = tempfile.mkdtemp(prefix=f".{os.path.basename(out_path)}.partial-", dir=parent)
    staging = os.path.join(holder, os.path.basename(out_path))
    try:
        yield staging
        if not os.path.isdir(staging):
            raise CoreSpaceError(f"{out_path}: the merge wrote nothing")
        if os.path.exists(out_path):
            previous = os.path.join(holder, "previous")
            os.rename(out_path, previous)
        os.rename(staging, out_path)
    finally:
        shutil.rmtree(holder, ignore_errors=True)
