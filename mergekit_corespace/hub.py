"""Adapters named by Hugging Face Hub id, found the way mergekit finds models.

mergekit reads a model reference as a local path when it exists and as a Hub repository
id otherwise (``org/name``, ``org/name@revision``), fetched with
``huggingface_hub.snapshot_download``. Adapters get the same rule here, fetching only the
adapter's own files; huggingface_hub then honours ``HF_HOME`` / ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE`` (cache only) and ``HF_TOKEN``, and ``cache_dir`` is mergekit's
``--transformers-cache``. Each failure is one line that names the reference. No mergekit.
"""

from __future__ import annotations

import os

from mergekit_corespace.adapters import (
    CONFIG_FILE,
    PICKLE_WEIGHTS_FILE,
    WEIGHTS_FILE,
    AdapterError,
)
from mergekit_corespace.errors import first_line

ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, PICKLE_WEIGHTS_FILE)


def adapter_directory(path: str, revision: str | None = None, cache_dir: str | None = None) -> str:
    """The local directory of the adapter ``path`` refers to: ``path`` itself when it
    exists, else a snapshot of the Hub repository ``path`` at ``revision`` (only its
    adapter files), downloaded or found in the Hugging Face cache."""
    if os.path.exists(path):
        return path
    import huggingface_hub
    from huggingface_hub import constants, errors
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(path)
    except errors.HFValidationError:
        raise AdapterError(f"{path}: adapter directory does not exist") from None
    reference = f"{path}@{revision}" if revision else path
    cache = cache_dir or constants.HF_HUB_CACHE
    try:
        snapshot = huggingface_hub.snapshot_download(
            path, revision=revision, cache_dir=cache_dir, allow_patterns=list(ADAPTER_FILES)
        )
    except errors.LocalEntryNotFoundError as error:
        if constants.HF_HUB_OFFLINE:
            raise AdapterError(
                f"{reference}: no such local directory, nor in the Hugging Face cache "
                f"({cache}), and HF_HUB_OFFLINE is set; fetch it once online or give a "
                "local path"
            ) from None
        raise AdapterError(
            f"{reference}: no such local directory, not in the Hugging Face cache ({cache}), "
            f"and the Hub cannot be reached ({first_line(error)})"
        ) from None
    except errors.GatedRepoError:
        raise AdapterError(
            f"{reference}: a gated repository on the Hugging Face Hub; accept its terms on "
            "its page and set HF_TOKEN (or run: hf auth login)"
        ) from None
    except errors.RepositoryNotFoundError:
        raise AdapterError(
            f"{reference}: no such local directory, nor a repository on the Hugging Face "
            "Hub (a private one needs HF_TOKEN)"
        ) from None
    except errors.RevisionNotFoundError:
        raise AdapterError(
            f"{reference}: the Hugging Face Hub repository {path} has no revision {revision!r}"
        ) from None
    except errors.HfHubHTTPError as error:
        raise AdapterError(
            f"{reference}: the Hugging Face Hub refused ({first_line(error)})"
        ) from None
    except FileNotFoundError:  # the repository holds none of ADAPTER_FILES
        snapshot = None
    if snapshot is None or not os.path.isfile(os.path.join(snapshot, CONFIG_FILE)):
        raise AdapterError(
            f"{reference}: the Hugging Face Hub repository holds no PEFT adapter (no {CONFIG_FILE})"
        )
    return snapshot


def base_model_error(
    path: str, revision: str | None, cache_dir: str | None, error: Exception
) -> str:
    """One line on why mergekit cannot open base model ``path``. Offline, mergekit cannot
    open a Hub-named base at all — it lists the repository's files on the Hub even when
    they are cached — so the line names the cached snapshot to write instead."""
    from huggingface_hub import errors, snapshot_download

    reference = f"{path}@{revision}" if revision else path
    if not isinstance(error, errors.OfflineModeIsEnabled):
        return f"base_model: {reference}: {first_line(error)}"
    try:
        snapshot = snapshot_download(
            path, revision=revision, cache_dir=cache_dir, local_files_only=True
        )
        instead = f"write its cached snapshot {snapshot} as base_model and in every base+adapter"
    except (errors.LocalEntryNotFoundError, errors.HFValidationError):
        instead = "it is not cached either; download it once online and name it by its local path"
    return (
        f"base_model: {reference}: mergekit lists the files of a Hub-named model on the Hub "
        f"even when they are cached, and HF_HUB_OFFLINE is set; {instead}"
    )
