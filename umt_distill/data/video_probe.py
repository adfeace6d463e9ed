"""The probe every video backend shares: exact frame count and the presentation-order pts table.

:func:`probe_video` is a PyAV demux of every packet, no decoding. It counts the frames exactly (one per
packet, counted rather than read from the header), lists every frame's pts in presentation order, and
rejects truncated files (fewer packets than the MP4 header declares, or packets ending well before the
declared duration). Streams without usable pts (raw elementary streams, H.264 with B-frames in AVI)
are counted by a full decode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np

from umt_distill.data.video_base import VideoDecodeError, VideoInfo


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
        raise VideoDecodeError(path, f"demuxing failed after {num_packets} packets: {av_reason(err)}") from None
    if not pts_list:
        raise VideoDecodeError(path, "video stream has no frames")
    declared = stream.frames  # MP4/MOV sample count from the header; 0 when the container has none
    if declared and declared != num_packets:
        raise VideoDecodeError(path, f"header declares {declared} frames but {num_packets} could be read (truncated)")
    width, height = stream.codec_context.width, stream.codec_context.height
    if width <= 0 or height <= 0:
        raise VideoDecodeError(path, f"video stream reports an invalid size {width}x{height}")
    _check_square_pixels(stream, path)
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


def _check_square_pixels(stream: Any, path: str) -> None:
    """Refuse anamorphic video (non-square pixels), whose frames are meant to be shown stretched.

    Views crop and resize decoded frames in stored pixels; honouring a sample aspect ratio would mean
    resampling every frame before the view, for the teacher and the student alike. Such files are rare
    in training corpora and easy to fix once, so they are refused by name instead of silently squeezed.
    """
    for sar in (stream.sample_aspect_ratio, stream.codec_context.sample_aspect_ratio):
        if sar is not None and sar.numerator > 0 and sar != 1:  # 0/1 or None: unknown, taken as square
            raise VideoDecodeError(path, f"non-square pixels (sample aspect ratio {sar.numerator}:{sar.denominator}) "
                                   "are not supported; re-encode with square pixels, e.g. ffmpeg -i IN -vf "
                                   "scale=iw*sar:ih,setsar=1 OUT")


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
        raise VideoDecodeError(path, f"decoding failed after {count} frames: {av_reason(err)}") from None
    if count == 0:
        raise VideoDecodeError(path, "video stream has no decodable frames")
    return count


def open_container(path: str) -> Any:
    try:
        return av.open(path, metadata_errors="ignore")
    except (av.FFmpegError, OSError) as err:
        raise VideoDecodeError(path, f"not a readable video: {av_reason(err)}") from None


def av_reason(err: Exception) -> str:
    """FFmpeg's message without the errno and file name that VideoDecodeError already carries."""
    return getattr(err, "strerror", None) or str(err)
