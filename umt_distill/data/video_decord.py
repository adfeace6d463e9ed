"""The decord backend: decord's ``get_batch`` where decord is known to be exact, else PyAV."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from umt_distill.data.video_base import BackendUnavailableError, ReaderBase, VideoDecodeError, normalize_indices
from umt_distill.data.video_probe import open_container, probe_video
from umt_distill.data.video_pyav import PyAVVideoReader
from umt_distill.registry import VIDEO_BACKENDS

_log = logging.getLogger(__name__)


def _import_decord() -> Any:
    try:
        import decord
    except ImportError as err:
        raise BackendUnavailableError(
            "video backend 'decord' needs the decord package: `pip install decord` (wheels for Linux "
            "x86_64 and Windows), or set the video backend to 'pyav'."
        ) from err
    return decord

# Containers with a real seek index, where decord's random access was verified exact (tests/unit/data/test_video.py).
# Elsewhere it was seen to return wrong frames silently: MPEG-TS (even from frame 0), H.264 in AVI.
_DECORD_CONTAINERS = frozenset({"mp4", "matroska"})


@VIDEO_BACKENDS.register("decord")
class DecordVideoReader(ReaderBase):
    """Frames via decord's ``get_batch`` where decord is known to be exact, else via the PyAV reader.

    decord 0.6.0 finds a frame by seeking to a keyframe and *counting* decoded frames from there. That
    is wrong when frames decoded after a keyframe are shown before it (open GOP, MPEG-4 part 2) or when
    its seeks are inexact (MPEG-TS, H.264 in AVI): it silently returns other frames. So the probe decides:
    containers other than MP4/MOV and Matroska/WebM, streams with leading frames or without usable pts,
    files decord cannot open, files whose decord frame count or timestamps disagree with the probe, and
    files decord fails to decode once opened are decoded by :class:`PyAVVideoReader`. ``decoder`` says which one serves the file, ``fallback_reason`` why.
    """

    @staticmethod
    def preload() -> None:
        """Import decord; see ``preload_video_backend``."""
        _import_decord()

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        decord = _import_decord()
        self.path = str(path)
        with open_container(self.path) as container:  # probing first also keeps damaged files from decord
            self._index = probe_video(container, self.path)
        self.info = self._index.info
        self._reader: Any = None
        self._fallback: PyAVVideoReader | None = None
        self.fallback_reason = self._distrust(decord, threads)
        self._threads = threads
        self.decoder = "decord"
        if self.fallback_reason is not None:
            self._use_pyav(self.fallback_reason)

    def _use_pyav(self, reason: str) -> None:
        """Serve this file with the PyAV reader from now on."""
        _log.debug("%s: decoding with PyAV, not decord: %s", self.path, reason)
        self._reader = None
        self.fallback_reason = reason
        self._fallback = PyAVVideoReader(self.path, threads=self._threads, index=self._index)
        self.decoder = "pyav"

    def _distrust(self, decord: Any, threads: int) -> str | None:
        """Why decord cannot be trusted with this file, or None if it can (then ``_reader`` is open)."""
        index = self._index
        if not set(index.container_format.split(",")) & _DECORD_CONTAINERS:
            return f"decord is trusted with MP4/MOV and Matroska/WebM only, not {index.container_format!r}"
        if index.pts is None:
            return "the stream has no usable pts"
        if index.leading_frames:
            return "frames decoded after a keyframe are shown before it (open GOP)"
        try:
            self._reader = decord.VideoReader(self.path, ctx=decord.cpu(0), num_threads=max(1, threads))
            count = len(self._reader)
            times = np.asarray(self._reader.get_frame_timestamp(list(range(count))), dtype=np.float64)  # [N, 2]
        except Exception as err:  # decord raises RuntimeError, DECORDError, IndexError ...
            return f"decord could not open it: {_first_line(err)}"
        if count != self.info.num_frames:
            return f"decord indexes {count} frames, the stream has {self.info.num_frames}"
        got = times[:, 0] - times[0, 0]  # [N] seconds after the first frame
        expected = (index.pts - index.pts[0]).astype(np.float64) * float(index.time_base)  # [N]
        tolerance = 0.5 / self.info.fps if self.info.fps > 0 else 1e-3
        bad = np.flatnonzero(np.abs(got - expected) > tolerance)
        if bad.size:
            i = int(bad[0])
            return f"decord places frame {i} at {got[i]:.4f}s, the stream at {expected[i]:.4f}s"
        return None

    def close(self) -> None:
        self._reader = None  # decord has no close(); dropping the reader frees demuxer and decoder
        if self._fallback is not None:
            self._fallback.close()

    def get_frames(self, indices: Sequence[int]) -> np.ndarray:
        if self._fallback is not None:
            return self._fallback.get_frames(indices)
        idx = normalize_indices(indices, self.info.num_frames, self.path)
        if idx.size == 0:
            return self._empty()
        if self._reader is None:
            raise VideoDecodeError(self.path, "reader is closed")
        wanted, inverse = np.unique(idx, return_inverse=True)  # sorted: decord passes through them once
        try:
            batch = self._reader.get_batch(wanted.tolist()).asnumpy()  # [u, H, W, 3]
        except Exception as err:
            # decord's threaded decoder reads ahead: a damaged packet past the wanted frames can fail a
            # request at random (seen on a file cut inside its last packet). PyAV decodes exactly the
            # frames asked for, and raises VideoDecodeError itself if they really are undecodable.
            self._use_pyav(f"decord failed to decode frames: {_first_line(err)}")
            assert self._fallback is not None
            return self._fallback.get_frames(idx)
        expected = (wanted.size, self.info.height, self.info.width, 3)
        if batch.shape != expected or batch.dtype != np.uint8:
            raise VideoDecodeError(self.path, f"decord returned {batch.dtype} {batch.shape}, expected uint8 {expected}")
        return np.ascontiguousarray(batch[inverse])  # [n, H, W, 3]


def _first_line(err: BaseException) -> str:
    """decord's message without its log prefixes ("[12:00:00] /src/video_reader.cc:83: ")."""
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", str(err)).strip() or type(err).__name__
    return text.splitlines()[0][:300]
