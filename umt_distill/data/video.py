"""Exact frame access to videos and images behind one small interface.

``open_video(path, backend)`` returns a :class:`VideoReader` with ``info`` (frame count, fps, size) and
``get_frames(indices)``: exactly the requested frames, uint8 RGB ``[n, H, W, 3]``. Frame ``i`` is the
``i``-th frame in presentation order, from 0. Images open as 1-frame videos (PIL).

Both video backends share one probe (:func:`probe_video`): a PyAV demux of every packet, no decoding.
It counts the frames exactly (one per packet, counted rather than read from the header), lists every
frame's pts in presentation order, and rejects truncated files (fewer packets than the MP4 header
declares, or packets ending well before the declared duration). Streams without usable pts (raw
elementary streams, H.264 with B-frames in AVI) are counted by a full decode and read sequentially.

- ``"pyav"`` — the reference: decodes forward from the keyframe before each requested frame and names
  every decoded frame by its pts, so a returned frame provably is the requested one.
- ``"decord"`` (default) — decord's ``get_batch`` where decord is known to be exact, else the PyAV path
  (see :class:`DecordVideoReader`).

Every failure (missing, unreadable, empty, truncated, not a video, decoder error, index out of range)
raises :class:`VideoDecodeError` naming the file and the reason; no reader returns substitute frames.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import av
import numpy as np
from PIL import Image

from umt_distill.registry import VIDEO_BACKENDS

_log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})


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


def open_video(path: str | Path, backend: str = "decord", threads: int = 1) -> VideoReader:
    """Open a video (or an image as a 1-frame video) for exact frame access.

    Args:
        path: Video or image file; images are recognised by suffix (.jpg, .jpeg, .png, .bmp, .webp).
        backend: ``"decord"`` or ``"pyav"`` (names in ``VIDEO_BACKENDS``); images always use PIL.
        threads: Decoder threads; keep 1 inside DataLoader workers.

    Returns:
        An open :class:`VideoReader`.

    Raises:
        VideoDecodeError: The file is missing, unreadable, empty, truncated or not decodable.
        RegistryError: ``backend`` is not registered.
    """
    factory = VIDEO_BACKENDS.get(backend)  # a bad name is a configuration error: raise it before any I/O
    path = Path(path)
    _check_readable(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return ImageReader(path)
    return factory(path, threads=threads)


def _check_readable(path: Path) -> None:
    """Turn the common cheap failures into clear reasons before a decoder sees the file."""
    try:
        with open(path, "rb") as handle:
            empty = handle.read(1) == b""
    except FileNotFoundError:
        raise VideoDecodeError(path, "file not found") from None
    except PermissionError:
        raise VideoDecodeError(path, "permission denied") from None
    except IsADirectoryError:
        raise VideoDecodeError(path, "is a directory, not a file") from None
    except OSError as err:
        raise VideoDecodeError(path, f"cannot read file: {err.strerror or err}") from None
    if empty:
        raise VideoDecodeError(path, "empty file (0 bytes)")


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


class _ReaderBase:
    path: str
    info: VideoInfo
    decoder: str  # what actually decodes this file: "pyav", "decord" or "pil"

    def __enter__(self) -> _ReaderBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass

    def _empty(self) -> np.ndarray:
        return np.empty((0, self.info.height, self.info.width, 3), dtype=np.uint8)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, {self.info}, decoder={self.decoder!r})"


class ImageReader(_ReaderBase):
    """An image as a 1-frame video. Palette, grey and alpha images become RGB (alpha dropped); EXIF
    orientation is not applied, as video rotation metadata is not: pixels come as stored."""

    decoder = "pil"

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        try:
            with Image.open(path) as image:
                image.load()  # truncated or corrupt data fails here, not later
                rgb = np.ascontiguousarray(image.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise VideoDecodeError(path, f"not a readable image: {err}") from None
        self._pixels = rgb
        self.info = VideoInfo(num_frames=1, fps=1.0, width=rgb.shape[1], height=rgb.shape[0])

    def get_frames(self, indices: Sequence[int]) -> np.ndarray:
        idx = normalize_indices(indices, 1, self.path)
        return np.repeat(self._pixels[None], len(idx), axis=0)  # [n, H, W, 3]


# ----------------------------------------------------------------------------------------------------
# Probe: exact frame count and the presentation-order pts table (shared by both backends)


@dataclass(frozen=True)
class StreamIndex:
    """The demuxed layout of a video stream.

    Attributes:
        info: Frame count, fps and size.
        pts: int64 [num_frames], pts of frame ``i`` in ``time_base`` units (ascending), or None when the
            stream has no usable pts (frames are then identified by counting from the start).
        keyframes: int64 [k], ascending indices of keyframes (seek points); empty without pts.
        time_base: Unit of ``pts``.
        leading_frames: Some frame decoded after a keyframe is shown before it (open GOP, MPEG-4 part 2
            B-frames), so counting decoded frames from a keyframe gives wrong indices.
        container_format: FFmpeg demuxer name, e.g. ``"mov,mp4,m4a,3gp,3g2,mj2"``.
    """

    info: VideoInfo
    pts: np.ndarray | None
    keyframes: np.ndarray
    time_base: Fraction
    leading_frames: bool = False
    container_format: str = ""


def probe_video(container: Any, path: str) -> StreamIndex:
    """Demux every packet of the first video stream (no decoding) into a :class:`StreamIndex`.

    Raises:
        VideoDecodeError: No video stream, no frames, unreadable packets, or a truncated file.
    """
    if not container.streams.video:
        raise VideoDecodeError(path, "no video stream")
    stream = container.streams.video[0]
    time_base = stream.time_base or Fraction(1, av.time_base)
    pts_list: list[int | None] = []
    key_list: list[bool] = []
    last_duration = num_packets = 0
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's end-of-stream marker
                continue
            num_packets += 1
            if packet.is_discard:  # e.g. before an MP4 edit list's start: decoded, never shown
                continue
            pts_list.append(packet.pts)
            key_list.append(bool(packet.is_keyframe))
            last_duration = packet.duration or 0
    except av.FFmpegError as err:
        raise VideoDecodeError(path, f"demuxing failed after {num_packets} packets: {_av_reason(err)}") from None
    if not pts_list:
        raise VideoDecodeError(path, "video stream has no frames")
    declared = stream.frames  # MP4/MOV sample count from the header; 0 when the container has none
    if declared and declared != num_packets:
        raise VideoDecodeError(path, f"header declares {declared} frames but {num_packets} could be read (truncated)")
    width, height = stream.codec_context.width, stream.codec_context.height
    if width <= 0 or height <= 0:
        raise VideoDecodeError(path, f"video stream reports an invalid size {width}x{height}")
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0

    usable = all(p is not None for p in pts_list) and len(set(pts_list)) == len(pts_list)
    if usable and stream.codec_context.has_b_frames:
        # A codec that reorders frames but whose pts never reorder has pts made up from decode order
        # (AVI stores none); they cannot name frames.
        usable = bool(np.any(np.diff(np.asarray(pts_list, dtype=np.int64)) < 0))
    if not usable:
        pts, keyframes, leading = None, np.empty(0, dtype=np.int64), False
        num_frames = _count_by_decoding(path)
    else:
        pts_decode = np.asarray(pts_list, dtype=np.int64)  # [N] decode order
        is_key = np.asarray(key_list)
        order = np.argsort(pts_decode, kind="stable")
        pts, keyframes, num_frames = pts_decode[order], np.flatnonzero(is_key[order]), len(pts_list)
        # Smallest pts decoded after each packet; below a keyframe's own pts = that keyframe leads frames.
        later_min = np.append(np.minimum.accumulate(pts_decode[::-1])[::-1][1:], np.iinfo(np.int64).max)
        leading = bool(np.any(is_key & (later_min < pts_decode)))
        _check_duration(container, stream, pts, last_duration, time_base, fps, path)
        if fps <= 0 and num_frames > 1:
            fps = float((num_frames - 1) / ((pts[-1] - pts[0]) * time_base))
    info = VideoInfo(num_frames=num_frames, fps=fps, width=width, height=height)
    return StreamIndex(info, pts, keyframes, time_base, leading, container.format.name)


def _declared_duration(container: Any, stream: Any, time_base: Fraction) -> float | None:
    """The video stream's duration in seconds as the file header states it, if it does."""
    if stream.duration:
        return float(stream.duration * time_base)
    tag = (stream.metadata or {}).get("DURATION")  # Matroska writes per-stream durations as tags
    match = re.fullmatch(r"(\d+):(\d+):(\d+(?:\.\d+)?)", tag or "")
    if match:
        hours, minutes, seconds = match.groups()
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    # The container duration spans all streams (audio may run longer); trust it only for a lone stream.
    if container.duration and len(container.streams) == 1:
        return container.duration / av.time_base
    return None


def _check_duration(
    container: Any, stream: Any, pts: np.ndarray, last_duration: int, time_base: Fraction, fps: float, path: str
) -> None:
    """Raise if the packets stop well before the duration the header declares (a cut-off file)."""
    declared = _declared_duration(container, stream, time_base)
    if not declared:
        return
    frame_time = 1 / fps if fps > 0 else 0.0
    covered = float((pts[-1] - pts[0]) * time_base) + (float(last_duration * time_base) or frame_time)
    # Generous slack: muxers round and real files disagree by a frame or two; a cut file misses far more.
    if covered < declared - max(2 * frame_time, 0.05 * declared):
        raise VideoDecodeError(path, f"packets cover {covered:.3f}s of the declared {declared:.3f}s (truncated)")


def _count_by_decoding(path: str) -> int:
    """Frame count of a stream without usable pts: decode it all (slow, exact, rare)."""
    count = 0
    try:
        with av.open(path) as container:
            for _ in container.decode(video=0):
                count += 1
    except av.FFmpegError as err:
        raise VideoDecodeError(path, f"decoding failed after {count} frames: {_av_reason(err)}") from None
    if count == 0:
        raise VideoDecodeError(path, "video stream has no decodable frames")
    return count


def _open_container(path: str) -> Any:
    try:
        return av.open(path, metadata_errors="ignore")
    except (av.FFmpegError, OSError) as err:
        raise VideoDecodeError(path, f"not a readable video: {_av_reason(err)}") from None


def _av_reason(err: Exception) -> str:
    """FFmpeg's message without the errno and file name that VideoDecodeError already carries."""
    return getattr(err, "strerror", None) or str(err)


# ----------------------------------------------------------------------------------------------------
# PyAV backend: the exact reference


@VIDEO_BACKENDS.register("pyav")
class PyAVVideoReader(_ReaderBase):
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
        self._container = _open_container(self.path)
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
            raise VideoDecodeError(self.path, f"decoding failed: {_av_reason(err)}") from None
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
        rgb = frame.to_ndarray(format="rgb24")  # [H, W, 3]
        if rgb.shape != (self.info.height, self.info.width, 3):
            raise VideoDecodeError(self.path, f"frame {pos} is {rgb.shape[1]}x{rgb.shape[0]}, the stream "
                                   f"{self.info.width}x{self.info.height}")
        return rgb


class _Overshoot(Exception):
    """Decoding after a seek passed the target without producing it."""


def _contains(sorted_values: np.ndarray, value: int) -> bool:
    i = int(np.searchsorted(sorted_values, value))
    return i < sorted_values.size and int(sorted_values[i]) == value


# ----------------------------------------------------------------------------------------------------
# decord backend


def _import_decord() -> Any:
    try:
        import decord
    except ImportError as err:
        raise ImportError(
            "video backend 'decord' needs the decord package: `pip install decord` (wheels for Linux "
            "x86_64 and Windows), or set the video backend to 'pyav'."
        ) from err
    return decord


# Containers with a real seek index, where decord's random access was verified exact (tests/test_video.py).
# Elsewhere it was seen to return wrong frames silently: MPEG-TS (even from frame 0), H.264 in AVI.
_DECORD_CONTAINERS = frozenset({"mp4", "matroska"})


@VIDEO_BACKENDS.register("decord")
class DecordVideoReader(_ReaderBase):
    """Frames via decord's ``get_batch`` where decord is known to be exact, else via the PyAV reader.

    decord 0.6.0 finds a frame by seeking to a keyframe and *counting* decoded frames from there. That
    is wrong when frames decoded after a keyframe are shown before it (open GOP, MPEG-4 part 2) or when
    its seeks are inexact (MPEG-TS, H.264 in AVI): it silently returns other frames. So the probe decides:
    containers other than MP4/MOV and Matroska/WebM, streams with leading frames or without usable pts,
    files decord cannot open, and files whose decord frame count or timestamps disagree with the probe are
    decoded by :class:`PyAVVideoReader`. ``decoder`` says which one serves the file, ``fallback_reason`` why.
    """

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        decord = _import_decord()
        self.path = str(path)
        with _open_container(self.path) as container:  # probing first also keeps damaged files from decord
            self._index = probe_video(container, self.path)
        self.info = self._index.info
        self._reader: Any = None
        self._fallback: PyAVVideoReader | None = None
        self.fallback_reason = self._distrust(decord, threads)
        if self.fallback_reason is not None:
            self._reader = None
            _log.debug("%s: decoding with PyAV, not decord: %s", self.path, self.fallback_reason)
            self._fallback = PyAVVideoReader(self.path, threads=threads, index=self._index)
        self.decoder = "decord" if self._fallback is None else "pyav"

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
            raise VideoDecodeError(self.path, f"decord failed to decode frames: {_first_line(err)}") from None
        expected = (wanted.size, self.info.height, self.info.width, 3)
        if batch.shape != expected or batch.dtype != np.uint8:
            raise VideoDecodeError(self.path, f"decord returned {batch.dtype} {batch.shape}, expected uint8 {expected}")
        return np.ascontiguousarray(batch[inverse])  # [n, H, W, 3]


def _first_line(err: BaseException) -> str:
    """decord's message without its log prefixes ("[12:00:00] /src/video_reader.cc:83: ")."""
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", str(err)).strip() or type(err).__name__
    return text.splitlines()[0][:300]
