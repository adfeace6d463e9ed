"""The PyAV backend: the frame-exact reference every other backend is tested against."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np

from umt_distill.data.video_base import ReaderBase, VideoDecodeError, normalize_indices
from umt_distill.data.video_probe import StreamIndex, av_reason, open_container, probe_video
from umt_distill.registry import VIDEO_BACKENDS

# PyAV 17 made swscale multithreaded by default (``threads=0``: a pool sized to the CPUs). Its threads do
# not survive a fork, so a DataLoader worker forked after the parent converted a frame waits forever on
# them (``avpriv_slicethread_execute``). One thread keeps the conversion fork-safe; the few frames a clip
# needs gain little from slices. Older PyAV has no ``threads`` argument and scales on the calling thread.
RGB_OPTIONS: dict[str, Any] = {"threads": 1} if int(av.__version__.split(".")[0]) >= 17 else {}


@VIDEO_BACKENDS.register("pyav")
class PyAVVideoReader(ReaderBase):
    """Frame-exact decoding with PyAV (the reference backend).

    Requested frames are visited in ascending order; the reader decodes forward and seeks to the
    keyframe before a frame only when that skips work. Every decoded frame is named by its pts, frames
    shown before the keyframe sought to are ignored (open-GOP leading frames may be broken), and a seek
    that lands past its target (containers without a seek index, e.g. MPEG-TS) is redone from the start.
    """

    decoder = "pyav"

    def __init__(self, path: str | Path, threads: int = 1, index: StreamIndex | None = None) -> None:
        self.path = str(path)
        self._threads = threads
        self._container: Any = None
        self._open()
        try:
            self._index = index or probe_video(self._container, self.path)
        except BaseException:
            self.close()
            raise
        self.info = self._index.info
        pts = self._index.pts
        self._pts_to_pos = {} if pts is None else {int(p): i for i, p in enumerate(pts)}
        self._reset_position()

    def _open(self) -> None:
        self._container = open_container(self.path)
        if self._container.streams.video:
            self._stream = self._container.streams.video[0]
            ctx = self._stream.codec_context
            ctx.thread_count = max(1, self._threads)
            # Slice threads only: "AUTO"/frame threading has hung in forked DataLoader workers and delays
            # output; UMT reads few frames per clip, so slices are enough.
            ctx.thread_type = "SLICE" if self._threads > 1 else "NONE"

    def _reset_position(self) -> None:
        self._frames_iter: Iterator[Any] | None = None  # decoder output, presentation order
        self._position = -1  # index of the last frame the decoder handed out
        self._floor_pts: int | None = None  # frames shown before the keyframe sought to may be broken

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def get_frames(self, indices: Sequence[int]) -> np.ndarray:
        idx = normalize_indices(indices, self.info.num_frames, self.path)
        if idx.size == 0:
            return self._empty()
        if self._container is None:
            raise VideoDecodeError(self.path, "reader is closed")
        wanted = np.unique(idx)
        try:
            found = self._collect_sequential(wanted) if self._index.pts is None else self._collect(wanted)
        except (av.FFmpegError, OSError) as err:
            self._reset_position()
            raise VideoDecodeError(self.path, f"decoding failed: {av_reason(err)}") from None
        except BaseException:
            self._reset_position()  # the decoder's position is unknown now; the next call starts afresh
            raise
        return np.stack([found[i] for i in idx.tolist()])  # [n, H, W, 3]

    def _collect(self, wanted: np.ndarray) -> dict[int, np.ndarray]:
        found: dict[int, np.ndarray] = {}
        for target in wanted.tolist():
            try:
                self._decode_until(target, wanted, found)
            except _Overshoot:
                self._restart()
                self._decode_until(target, wanted, found, retrying=True)
        return found

    def _decode_until(
        self, target: int, wanted: np.ndarray, found: dict[int, np.ndarray], retrying: bool = False
    ) -> None:
        """Decode forward to ``target``, keeping every wanted frame passed on the way."""
        if target in found:
            return
        keyframes = self._index.keyframes
        k = int(np.searchsorted(keyframes, target, side="right")) - 1
        key = int(keyframes[k]) if k >= 0 else 0
        # Backwards needs a seek; forwards, seek only if it skips decoding work.
        if self._frames_iter is None or target <= self._position or (not retrying and key > self._position + 1):
            self._seek(key)
        assert self._frames_iter is not None
        for frame in self._frames_iter:
            pos = self._identify(frame)
            if pos is None:
                continue
            if pos > target:  # passed the target unseen: a seek landed too late, or the decoder dropped it
                if not retrying:
                    raise _Overshoot
                raise VideoDecodeError(self.path, f"the decoder did not produce frame {target}")
            if pos <= self._position:
                raise VideoDecodeError(self.path, "decoded frames are out of pts order (unreliable timestamps)")
            self._position = pos
            if pos not in found and _contains(wanted, pos):
                found[pos] = self._to_rgb(frame, pos)
            if pos == target:
                return
        if not retrying:
            raise _Overshoot  # a seek past the last keyframe ends the stream at once (seen in MPEG-TS)
        raise VideoDecodeError(self.path, f"the stream ended before frame {target} was decoded")

    def _identify(self, frame: Any) -> int | None:
        """Index of a decoded frame from its pts; None for frames to skip."""
        if frame.pts is None:
            raise VideoDecodeError(self.path, "decoded frame without pts; cannot verify its index")
        if self._floor_pts is not None and frame.pts < self._floor_pts:
            return None
        pos = self._pts_to_pos.get(int(frame.pts))
        if pos is None and frame.pts < self._index.pts[0]:
            return None  # shown before the stream's start (MP4 edit list) yet output by the decoder
        if pos is None:
            raise VideoDecodeError(self.path, f"decoded a frame with pts {frame.pts} that the stream lacks")
        return pos

    def _seek(self, key: int) -> None:
        key_pts = int(self._index.pts[key])
        if key == 0:
            self._restart()  # reading from the very start needs no seek table
        else:
            self._container.seek(key_pts, stream=self._stream, backward=True, any_frame=False)  # flushes
            self._frames_iter = self._container.decode(self._stream)
            self._position = -1
        self._floor_pts = key_pts

    def _restart(self) -> None:
        self.close()
        self._open()
        self._reset_position()
        self._frames_iter = self._container.decode(self._stream)

    def _collect_sequential(self, wanted: np.ndarray) -> dict[int, np.ndarray]:
        """No usable pts: decode from the start and count frames (slow but exact)."""
        self._restart()
        found: dict[int, np.ndarray] = {}
        assert self._frames_iter is not None
        for pos, frame in enumerate(self._frames_iter):
            if _contains(wanted, pos):
                found[pos] = self._to_rgb(frame, pos)
            if pos >= wanted[-1]:
                break
        self._reset_position()
        missing = [i for i in wanted.tolist() if i not in found]
        if missing:
            raise VideoDecodeError(self.path, f"the decoder did not produce frame {missing[0]}")
        return found

    def _to_rgb(self, frame: Any, pos: int) -> np.ndarray:
        if frame.is_corrupt:
            raise VideoDecodeError(self.path, f"frame {pos} decoded with errors (corrupt data)")
        rgb = frame.to_ndarray(format="rgb24", **RGB_OPTIONS)  # [H, W, 3]
        if rgb.shape != (self.info.height, self.info.width, 3):
            raise VideoDecodeError(self.path, f"frame {pos} is {rgb.shape[1]}x{rgb.shape[0]}, the stream "
                                   f"{self.info.width}x{self.info.height}")
        return rgb


class _Overshoot(Exception):
    """Decoding after a seek passed the target without producing it."""


def _contains(sorted_values: np.ndarray, value: int) -> bool:
    i = int(np.searchsorted(sorted_values, value))
    return i < sorted_values.size and int(sorted_values[i]) == value
