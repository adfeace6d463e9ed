"""Exact frame access to videos and images behind one small interface.

``open_video(path, backend)`` returns a :class:`VideoReader` with ``info`` (frame count, fps, size) and
``get_frames(indices)``: exactly the requested frames, uint8 RGB ``[n, H, W, 3]``. Frame ``i`` is the
``i``-th frame in presentation order, from 0. Images open as 1-frame videos (PIL).

Every video backend shares one probe (:func:`probe_video`, in ``video_probe.py``): a PyAV demux of every
packet, no decoding. It counts the frames exactly (one per packet, counted rather than read from the
header), lists every frame's pts in presentation order, and rejects truncated files (fewer packets than
the MP4 header declares, or packets ending well before the declared duration). Streams without usable
pts (raw elementary streams, H.264 with B-frames in AVI) are counted by a full decode and read
sequentially.

- ``"pyav"`` (``video_pyav.py``) — the reference: decodes forward from the keyframe before each requested
  frame and names every decoded frame by its pts, so a returned frame provably is the requested one.
- ``"decord"`` (default, ``video_decord.py``) — decord's ``get_batch`` where decord is known to be exact,
  else the PyAV path (see :class:`DecordVideoReader`).
- ``"torchcodec"`` (``video_torchcodec.py``) — torchcodec's exact-seek decoder on the CPU or, with
  ``device="cuda"``, on the GPU; every frame checked against the probe's pts, the PyAV path where
  torchcodec is not verified (see :class:`TorchCodecVideoReader`). Needs FFmpeg's shared libraries.

Every failure (missing, unreadable, empty, truncated, not a video, decoder error, index out of range)
raises :class:`VideoDecodeError` naming the file and the reason; no reader returns substitute frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

# Importing the backend modules registers them in VIDEO_BACKENDS (the registry loads this module for them).
# Their classes and the shared types (VideoDecodeError, VideoInfo ...) are imported from their own modules.
from umt_distill.data import video_decord, video_pyav, video_torchcodec  # noqa: F401  (registers the backends)
from umt_distill.data.video_base import ReaderBase, VideoDecodeError, VideoInfo, VideoReader, normalize_indices
from umt_distill.registry import VIDEO_BACKENDS

__all__ = ["IMAGE_SUFFIXES", "ImageReader", "open_video", "preload_video_backend"]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})


def open_video(path: str | Path, backend: str = "decord", threads: int = 1, device: str = "cpu") -> VideoReader:
    """Open a video (or an image as a 1-frame video) for exact frame access.

    Args:
        path: Video or image file; images are recognised by suffix (.jpg, .jpeg, .png, .bmp, .webp).
        backend: ``"decord"``, ``"pyav"`` or ``"torchcodec"`` (names in ``VIDEO_BACKENDS``); images always
            use PIL.
        threads: Decoder threads; keep 1 inside DataLoader workers.
        device: Where to decode: ``"cpu"``, or ``"cuda"`` with the torchcodec backend (NVDEC); images
            are decoded on the CPU whatever the device.

    Returns:
        An open :class:`VideoReader`.

    Raises:
        VideoDecodeError: The file is missing, unreadable, empty, truncated or not decodable.
        RegistryError: ``backend`` is not registered.
        BackendUnavailableError: The backend's package or system libraries are missing (says which).
        ValueError: ``device`` is not the CPU and the backend decodes on the CPU only.
    """
    factory = VIDEO_BACKENDS.get(backend)  # a bad name is a configuration error: raise it before any I/O
    on_device = device != "cpu"
    if on_device and not getattr(factory, "supports_device", False):
        raise ValueError(f"video backend {backend!r} decodes on the CPU only; device={device!r} needs 'torchcodec'")
    path = Path(path)
    _check_readable(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return ImageReader(path)
    return factory(path, threads=threads, device=device) if on_device else factory(path, threads=threads)


def preload_video_backend(backend: str) -> None:
    """Import ``backend``'s decoding library now, e.g. in the parent before DataLoader workers fork.

    Each worker otherwise imports it on its first clip: cheap for PyAV and decord, seconds for torchcodec
    (it imports ``torch._dynamo``). Raises what :func:`open_video` would for a missing library.
    """
    preload = getattr(VIDEO_BACKENDS.get(backend), "preload", None)
    if preload is not None:
        preload()


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


class ImageReader(ReaderBase):
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
