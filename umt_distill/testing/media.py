"""Synthetic media for tests, benchmarks and the quickstart: real files encoded with PyAV.

Two kinds of content:

- :func:`index_frames` — frames that carry their own index as a binary code of large black/white cells,
  so a test can check that a decoder returned *exactly* the requested frames. The code survives lossy
  H.264 at ordinary quality (it is read differentially, each bit against its complement) and round-trips
  bit-exactly through lossless codecs, where the whole frame (code + colour cells) can be compared.
- :func:`moving_shapes_video` — a coloured disc gliding over a smooth gradient: cheap, deterministic
  content that looks like video to a model (temporal correlation, edges, colour).
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

from umt_distill.data.video_pyav import RGB_OPTIONS

# Side of one code cell in pixels. 8 px aligns with H.264's transform blocks, so a cell is either wholly
# black or wholly white inside a block and survives quantisation far better than finer patterns.
CELL = 8
# At most this many index bits (65536 frames); each bit uses two cells (value, complement).
MAX_INDEX_BITS = 16

# Pixel format each encoder gets when the caller does not choose one. The lossless pair keeps RGB as
# is (no YUV conversion, hence bit-exact RGB round trips); libx264 gets the usual 4:2:0.
_DEFAULT_PIX_FMT = {"libx264": "yuv420p", "libx264rgb": "rgb24", "ffv1": "bgr0", "mpeg4": "yuv420p"}


class IndexCodeError(ValueError):
    """A frame does not carry a readable index code (wrong frame size, garbage, or a blank frame)."""


def _code_layout(height: int, width: int) -> tuple[int, int, int]:
    """Return (rows, cols, bits) of the index code for frames of this size."""
    rows, cols = height // CELL, width // CELL
    bits = min(MAX_INDEX_BITS, (rows * cols) // 2)
    if bits < 1:
        raise ValueError(f"frames of {height}x{width} are too small for an index code (need >= {CELL}x{2 * CELL})")
    return rows, cols, bits


def index_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """Frames whose pixels encode their own index.

    The frame is tiled with ``CELL``-pixel cells in row-major order. Cells ``2b`` and ``2b + 1`` hold bit
    ``b`` of the index (white/black for 1, black/white for 0, least significant bit first). The other cells
    get a colour that depends on the index and the cell position, so lossless round trips are checked on
    all three channels, not only on grey levels. Pixels outside the cell grid are mid grey.

    Args:
        num_frames: Number of frames T.
        height: Frame height H (at least 8).
        width: Frame width W (at least 16).

    Returns:
        uint8 array [T, H, W, 3].
    """
    rows, cols, bits = _code_layout(height, width)
    if num_frames > 2**bits:
        raise ValueError(f"{num_frames} frames need more than the {bits} index bits a {height}x{width} frame holds")
    frames = np.full((num_frames, height, width, 3), 128, dtype=np.uint8)  # [T, H, W, 3]
    cell_ids = np.arange(rows * cols)
    for t in range(num_frames):
        values = np.empty((rows * cols, 3), dtype=np.uint8)  # one RGB colour per cell
        for b in range(bits):
            bit = (t >> b) & 1
            values[2 * b] = 255 * bit
            values[2 * b + 1] = 255 * (1 - bit)
        rest = cell_ids[2 * bits :]
        # Any deterministic colour pattern that differs between neighbouring frames and cells will do.
        values[2 * bits :, 0] = (37 * t + 11 * rest) % 256
        values[2 * bits :, 1] = (91 * t + 53 * rest + 17) % 256
        values[2 * bits :, 2] = (13 * t + 29 * rest + 101) % 256
        grid = values.reshape(rows, cols, 3).repeat(CELL, axis=0).repeat(CELL, axis=1)  # [rows*CELL, cols*CELL, 3]
        frames[t, : rows * CELL, : cols * CELL] = grid
    return frames


def decode_index(frame: np.ndarray) -> int:
    """Read back the index written by :func:`index_frames`.

    Each bit is decided by comparing the mean brightness of the centres of its two cells, which tolerates
    the blur, ringing and brightness shifts of lossy coding.

    Args:
        frame: uint8 array [H, W, 3] (RGB) of the same size the frames were generated at.

    Returns:
        The frame index.

    Raises:
        IndexCodeError: If some bit is ambiguous (the two cells are not clearly black vs white).
    """
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise IndexCodeError(f"expected a [H, W, 3] frame, got shape {tuple(frame.shape)}")
    height, width = frame.shape[:2]
    rows, cols, bits = _code_layout(height, width)
    lo, hi = CELL // 4, CELL - CELL // 4  # centre of a cell, away from edges where coding bleeds
    luma = frame.astype(np.float32).mean(axis=2)  # [H, W]
    index = 0
    for b in range(bits):
        means = []
        for cell in (2 * b, 2 * b + 1):
            r, c = divmod(cell, cols)
            means.append(luma[r * CELL + lo : r * CELL + hi, c * CELL + lo : c * CELL + hi].mean())
        diff = means[0] - means[1]
        if abs(diff) < 96:
            raise IndexCodeError(f"bit {b} is unreadable (cell brightness {means[0]:.0f} vs {means[1]:.0f})")
        index |= int(diff > 0) << b
    return index


def moving_shapes_video(
    num_frames: int, height: int, width: int, seed: int = 0, radius: float | None = None
) -> np.ndarray:
    """A coloured disc moving smoothly over a slowly shifting colour gradient.

    Args:
        num_frames: Number of frames T.
        height: Frame height H.
        width: Frame width W.
        seed: Chooses the colours, start position and velocity (same seed, same frames).
        radius: Disc radius in pixels (default: a fifth of the shorter side).

    Returns:
        uint8 array [T, H, W, 3].
    """
    rng = np.random.default_rng(seed)  # local generator: no global RNG state is touched
    radius = radius if radius is not None else max(2.0, min(height, width) / 5)
    colour = rng.integers(64, 256, size=3).astype(np.float32)
    bg_a, bg_b = rng.integers(0, 160, size=(2, 3)).astype(np.float32)
    start = rng.uniform([radius, radius], [max(radius, width - radius), max(radius, height - radius)])
    angle = rng.uniform(0, 2 * math.pi)
    speed = rng.uniform(0.5, 2.0)  # pixels per frame
    velocity = speed * np.array([math.cos(angle), math.sin(angle)])

    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)  # [H, W] each
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)  # [T, H, W, 3]
    span_x = max(width - 2 * radius, 1e-6)
    span_y = max(height - 2 * radius, 1e-6)
    for t in range(num_frames):
        # Bounce inside the frame: reflect the unconstrained path into [radius, size - radius].
        x, y = start + velocity * t
        x = radius + _reflect(x - radius, span_x)
        y = radius + _reflect(y - radius, span_y)
        phase = (xs / max(width, 1) + ys / max(height, 1) + 0.02 * t) % 2.0
        mix = np.abs(phase - 1.0)[..., None]  # [H, W, 1] triangle wave in [0, 1]
        image = bg_a * mix + bg_b * (1 - mix)  # [H, W, 3]
        inside = ((xs - x) ** 2 + (ys - y) ** 2) <= radius**2
        image[inside] = colour
        frames[t] = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    return frames


def _reflect(value: float, span: float) -> float:
    """Fold ``value`` into [0, span] as a ball bouncing between two walls would be."""
    period = 2 * span
    value = value % period
    return value if value <= span else period - value


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: int = 25,
    codec: str = "libx264",
    options: dict[str, str] | None = None,
    pix_fmt: str | None = None,
    container_options: dict[str, str] | None = None,
    sample_aspect_ratio: Fraction | None = None,
) -> Path:
    """Encode frames into a video file with PyAV; the container follows the suffix (.mp4, .mkv, .avi ...).

    Args:
        path: Output file.
        frames: uint8 array [T, H, W, 3], RGB.
        fps: Constant frame rate; frame ``t`` gets pts ``t`` in a ``1/fps`` time base.
        codec: Encoder name: ``libx264`` (lossy), ``libx264rgb`` with ``{"crf": "0"}`` or ``ffv1`` (lossless),
            or anything else PyAV can encode.
        options: Encoder options, e.g. ``{"crf": "23", "bf": "2", "g": "12", "preset": "veryfast"}``.
            ``bf`` (max B-frames) and ``g`` (GOP size) are generic FFmpeg codec options; ``x264-params``
            passes x264 settings through.
        pix_fmt: Encoder pixel format; by default ``yuv420p`` for libx264, ``rgb24`` for libx264rgb and
            ``bgr0`` for ffv1 (the RGB formats make lossless codecs bit-exact in RGB).
        container_options: Muxer options, e.g. ``{"movflags": "faststart"}`` to put the MP4 index first.
        sample_aspect_ratio: Pixel aspect ratio to declare (anamorphic video, e.g. ``Fraction(4, 3)``);
            None leaves it unset (square pixels).

    Returns:
        The path written.
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 [T>0, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    num_frames, height, width, _ = frames.shape
    pix_fmt = pix_fmt or _DEFAULT_PIX_FMT.get(codec, "yuv420p")
    if pix_fmt == "yuv420p" and (height % 2 or width % 2):
        raise ValueError(f"yuv420p needs even frame sizes, got {height}x{width}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", options=dict(container_options or {})) as container:
        stream: Any = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.codec_context.time_base = Fraction(1, fps)
        if options:
            stream.options = dict(options)
        if sample_aspect_ratio is not None:
            stream.codec_context.sample_aspect_ratio = sample_aspect_ratio
        for t in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[t]), format="rgb24")
            # Converted here on one thread (the encoder's own conversion is multithreaded on PyAV >= 17,
            # and its threads would not survive a later fork; see video_pyav.RGB_OPTIONS).
            frame = frame.reformat(format=pix_fmt, **RGB_OPTIONS)
            frame.pts = t
            frame.time_base = stream.codec_context.time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):  # flush the encoder's delayed frames (B-frames, lookahead)
            container.mux(packet)
    return path


def write_image(path: str | Path, array: np.ndarray, quality: int = 95) -> Path:
    """Save an RGB uint8 image [H, W, 3] with PIL; the format follows the suffix.

    Args:
        path: Output file (.png, .jpg, .bmp, .webp ...).
        array: uint8 array [H, W, 3].
        quality: JPEG/WebP quality (ignored by lossless formats).

    Returns:
        The path written.
    """
    path = Path(path)
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {array.dtype} {tuple(array.shape)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if path.suffix.lower() in (".jpg", ".jpeg", ".webp"):
        image.save(path, quality=quality)
    else:
        image.save(path)
    return path
