"""The video-reader interface every backend implements: errors, stream info, the reader protocol.

Kept apart from :mod:`umt_distill.data.video` (which opens files and holds the registry of backends) so
that the backend modules can import it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


class VideoDecodeError(Exception):
    """A video or image could not be read exactly. ``path`` is the file, ``reason`` what went wrong."""

    def __init__(self, path: str | Path, reason: str | None = None) -> None:
        # One argument: an already formatted message (how DataLoader re-raises a worker's error).
        self.path = str(path)
        self.reason = reason if reason is not None else self.path
        super().__init__(self.path if reason is None else f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Errors cross DataLoader worker boundaries by pickle; keep both fields.
        return (type(self), (self.path, self.reason))


class BackendUnavailableError(ImportError):
    """A video backend cannot run on this machine (a package or system library is missing); says the fix."""


@dataclass(frozen=True)
class VideoInfo:
    """What a reader knows about its stream before decoding anything."""

    num_frames: int
    fps: float  # average frame rate; images report 1.0
    width: int
    height: int


@runtime_checkable
class VideoReader(Protocol):
    """An open video: exact frames by index. Use as a context manager or call :meth:`close`."""

    path: str
    info: VideoInfo

    def get_frames(self, indices: Sequence[int]) -> np.ndarray:
        """Frames at ``indices`` (any order, repeats allowed) as uint8 RGB [len(indices), H, W, 3]."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> VideoReader: ...

    def __exit__(self, *exc: object) -> None: ...


def normalize_indices(indices: Sequence[int], num_frames: int, path: str) -> np.ndarray:
    """Validate frame indices; returns int64 [n]. Out of range raises :class:`VideoDecodeError`."""
    idx = np.asarray(indices)
    if idx.ndim != 1:
        raise ValueError(f"frame indices must be a 1-D sequence, got shape {idx.shape}")
    if idx.size == 0:
        return idx.astype(np.int64)
    if not np.issubdtype(idx.dtype, np.integer):  # floats would silently truncate; bools are not indices
        raise TypeError(f"frame indices must be integers, got dtype {idx.dtype}")
    idx = idx.astype(np.int64)
    bad = idx[(idx < 0) | (idx >= num_frames)]
    if bad.size:
        raise VideoDecodeError(path, f"frame index {int(bad[0])} out of range [0, {num_frames})")
    return idx


class ReaderBase:
    """Shared plumbing of the readers: context manager, empty result, repr."""

    path: str
    info: VideoInfo
    decoder: str  # what actually decodes this file: "pyav", "decord", "torchcodec" or "pil"

    def __enter__(self) -> ReaderBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass

    def _empty(self) -> np.ndarray:
        return np.empty((0, self.info.height, self.info.width, 3), dtype=np.uint8)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, {self.info}, decoder={self.decoder!r})"
