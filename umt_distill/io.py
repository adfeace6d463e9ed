"""Atomic file writes: a reader sees the whole old file or the whole new one, never a part.

Every write goes to a temporary name in the same folder, is fsynced and renamed over the final name;
folders are fsynced after renames so the rename itself survives a power cut.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file, fsync and rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> None:
    """``data`` as indented JSON, written atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def fsync_dir(path: str | Path) -> None:
    """fsync a folder, so the renames and creations inside it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> int:
    """fsync every file and folder under ``path`` (deepest first); return the total file bytes."""
    total = 0
    for dirpath, _, files in os.walk(path, topdown=False):
        for f in files:
            fp = os.path.join(dirpath, f)
            total += os.path.getsize(fp)
            fd = os.open(fp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)
    return total


class NotWritableError(PermissionError):
    """A folder the command must write cannot be created or written."""


def check_writable(folder: str | Path, key: str) -> None:
    """Fail now, naming ``key`` (the recipe key or option that chose ``folder``) and the reason, if
    ``folder`` cannot be created or written: at the start of a run, not when its first checkpoint is due."""
    folder = Path(folder)
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise NotWritableError(f"{key}={folder} is not writable ({e.strerror or e}); choose another {key}") from None
