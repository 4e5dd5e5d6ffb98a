"""Atomic writes: files and folders appear complete or not at all.

Checkpoints, centroids, label caches and results are written under a temporary name in the
destination folder and renamed into place (``os.replace``, atomic on POSIX), so a crash or a
SIGKILL mid-write leaves the previous version, never half a file. This is the one place the
project does it; every writer goes through these helpers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any, Union

PathLike = Union[str, os.PathLike]
TMP_PREFIX = ".tmp-"

__all__ = [
    "TMP_PREFIX",
    "atomic_save_dataset",
    "atomic_save_safetensors",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_tree",
    "replace_dir",
]


def _fsync_file(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write(path: PathLike, write: Callable[[str], Any], fsync: bool = True) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it to ``path``.

    The temporary file gets the permissions a plain ``open()`` would give (``mkstemp`` makes 0600
    files) and is removed if ``write`` fails.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX, suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        if fsync:
            _fsync_file(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: PathLike, text: str, newline: str | None = None) -> None:
    """Write ``text`` (UTF-8) atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline=newline) as handle:
            handle.write(text)

    atomic_write(path, write)


def atomic_write_json(path: PathLike, value: Any, indent: int | None = 2, sort_keys: bool = True) -> None:
    """Write ``value`` as JSON atomically (objects JSON does not know are written with ``str``)."""
    atomic_write_text(path, json.dumps(value, indent=indent, sort_keys=sort_keys, default=str) + "\n")


def atomic_save_safetensors(tensors: dict, path: PathLike, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` atomically."""
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def fsync_tree(path: PathLike) -> None:
    """Flush every file under ``path`` to disk (before a folder is renamed into place)."""
    for root, _, files in os.walk(path):
        for name in files:
            _fsync_file(os.path.join(root, name))


def replace_dir(tmp: PathLike, final: PathLike) -> None:
    """Move the complete folder ``tmp`` to ``final``, replacing an existing ``final``.

    The old folder is renamed aside first and deleted after the swap, so at every moment ``final``
    is either the old or the new complete folder (a crash in between leaves a ``.tmp-old-`` folder
    beside it, never a half-written ``final``).
    """
    tmp, final = os.fspath(tmp), os.fspath(final)
    old = None
    if os.path.exists(final):
        parent = os.path.dirname(os.path.abspath(final))
        old = tempfile.mkdtemp(dir=parent, prefix=f"{TMP_PREFIX}old-{os.path.basename(final)}-")
        os.replace(final, os.path.join(old, "data"))
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_save_dataset(dataset: Any, path: PathLike) -> None:
    """``dataset.save_to_disk`` into a temporary folder beside ``path``, then swap it into place."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f"{TMP_PREFIX}{os.path.basename(path)}-")
    try:
        dataset.save_to_disk(tmp)
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
