"""The torchcodec backend: torchcodec's exact-seek ``VideoDecoder`` (CPU, or CUDA/NVDEC), checked by pts.

torchcodec (the PyTorch video decoder) uses the FFmpeg shared libraries of the system (FFmpeg 4 to 9),
not a bundled copy: without them it imports but cannot decode, and this backend says so with the fix
(:class:`~umt_distill.data.video_base.BackendUnavailableError`) instead of falling back quietly.

Exactness: in ``seek_mode="exact"`` torchcodec scans the file once and finds frames by their pts, so
open GOPs and B-frames come out right (tests/unit/data/test_video.py checks it on the same files as decord). Every
returned frame's pts is also compared with the shared probe's pts table, so a frame is returned only if
it provably is the requested one. torchcodec 0.17 cannot read MPEG-TS by index (it runs out of frames)
nor seek streams without pts; as with decord, files outside MP4/MOV and Matroska/WebM, streams without
usable pts, and any file on which torchcodec errs or disagrees with the probe go to the PyAV reader.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from umt_distill.data.video_base import BackendUnavailableError, ReaderBase, VideoDecodeError, normalize_indices
from umt_distill.data.video_probe import open_container, probe_video
from umt_distill.data.video_pyav import PyAVVideoReader
from umt_distill.registry import VIDEO_BACKENDS

_log = logging.getLogger(__name__)

FFMPEG_HINT = ("install FFmpeg 4-9 shared libraries (Debian/Ubuntu: `apt-get install ffmpeg`; conda: "
               "`conda install ffmpeg`), or set the video backend to 'pyav'")

# Containers with a seek index where torchcodec's exact mode was verified frame-exact (tests/unit/data/test_video.py).
_TORCHCODEC_CONTAINERS = frozenset({"mp4", "matroska"})


def torchcodec_unavailable_reason() -> str | None:
    """Why the torchcodec backend cannot decode on this machine, or None if it can."""
    try:
        _import_torchcodec()
    except BackendUnavailableError as err:
        return str(err)
    return None


def _import_torchcodec() -> Any:
    """torchcodec's ``VideoDecoder`` class, or :class:`BackendUnavailableError` saying what to install."""
    try:
        import torchcodec
        from torchcodec.decoders import VideoDecoder
    except ImportError as err:
        raise BackendUnavailableError(
            f"video backend 'torchcodec' needs the torchcodec package ({err}): `pip install torchcodec` in the "
            f"version made for your torch {torch.__version__} (see torchcodec's compatibility table), or set the "
            "video backend to 'pyav'."
        ) from err
    except (OSError, RuntimeError) as err:  # its own libraries failed to load: usually a build for another torch
        raise BackendUnavailableError(
            f"video backend 'torchcodec' failed to import ({_first_line(err)}): install the torchcodec made for "
            f"your torch {torch.__version__} (see torchcodec's compatibility table), or set the video backend to 'pyav'."
        ) from err
    # torchcodec imports without FFmpeg (its image decoders need none) and reports the FFmpeg it loaded.
    if getattr(torchcodec, "ffmpeg_major_version", 0) is None:
        raise BackendUnavailableError(f"video backend 'torchcodec' could not load FFmpeg's libraries: {FFMPEG_HINT}.")
    return VideoDecoder


def _check_device(device: str) -> str:
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"torchcodec decodes on 'cpu' or 'cuda', not {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device {device!r} needs a CUDA GPU, and torch.cuda.is_available() is False")
    return device


@VIDEO_BACKENDS.register("torchcodec")
class TorchCodecVideoReader(ReaderBase):
    """Frames via torchcodec's exact-seek decoder (``device="cuda"`` decodes on the GPU), checked by pts.

    ``decoder`` says which decoder serves the file ("torchcodec" or "pyav"), ``fallback_reason`` why
    PyAV does. On CUDA the same frames are returned but their pixels may differ slightly from the CPU's
    (NVDEC's colour conversion); :meth:`get_frames_tensor` keeps them on the GPU.

    Args:
        path: Video file.
        threads: FFmpeg decoder threads (``num_ffmpeg_threads``); keep 1 inside DataLoader workers.
        device: ``"cpu"`` or ``"cuda[:i]"``. CUDA inside DataLoader workers needs the ``spawn`` start
            method (CUDA cannot be used in forked processes).
    """

    supports_device = True

    @staticmethod
    def preload() -> None:
        """Import torchcodec (seconds: it imports ``torch._dynamo``); see ``preload_video_backend``."""
        _import_torchcodec()

    def __init__(self, path: str | Path, threads: int = 1, device: str = "cpu") -> None:
        video_decoder = _import_torchcodec()
        self.path = str(path)
        self.device = _check_device(device)
        self._threads = threads
        with open_container(self.path) as container:  # the same info and damage checks as every backend
            self._index = probe_video(container, self.path)
        self.info = self._index.info
        self._decoder: Any = None
        self._fallback: PyAVVideoReader | None = None
        self.decoder = "torchcodec"
        self.fallback_reason = self._distrust(video_decoder)
        if self.fallback_reason is not None:
            self._use_pyav(self.fallback_reason)
            return
        self._seconds = self._index.pts.astype(np.float64) * float(self._index.time_base)  # [N] frame i shown at
        gaps = np.diff(self._seconds)
        # Half the closest spacing of two frames: a pts within it of frame i's can only be frame i.
        self._tolerance = 0.5 * float(gaps.min()) if gaps.size else 1e-3

    def _distrust(self, video_decoder: Any) -> str | None:
        """Why torchcodec cannot be trusted with this file, or None if it can (then ``_decoder`` is open)."""
        index = self._index
        if not set(index.container_format.split(",")) & _TORCHCODEC_CONTAINERS:
            return f"torchcodec is trusted with MP4/MOV and Matroska/WebM only, not {index.container_format!r}"
        if index.pts is None:
            return "the stream has no usable pts"
        try:
            self._decoder = video_decoder(self.path, seek_mode="exact", dimension_order="NHWC",
                                          num_ffmpeg_threads=max(1, self._threads), device=self.device)
            count = len(self._decoder)
        except RuntimeError as err:
            if "Could not load libtorchcodec" in str(err):
                raise BackendUnavailableError(f"video backend 'torchcodec' could not load FFmpeg's libraries: "
                                              f"{FFMPEG_HINT}.") from None
            return f"torchcodec could not open it: {_first_line(err)}"
        except Exception as err:  # torchcodec raises RuntimeError, ValueError ...
            return f"torchcodec could not open it: {_first_line(err)}"
        if count != self.info.num_frames:
            return f"torchcodec indexes {count} frames, the stream has {self.info.num_frames}"
        return None

    def _use_pyav(self, reason: str) -> None:
        """Serve this file with the PyAV reader from now on."""
        _log.debug("%s: decoding with PyAV, not torchcodec: %s", self.path, reason)
        self._decoder = None
        self.fallback_reason = reason
        self._fallback = PyAVVideoReader(self.path, threads=self._threads, index=self._index)
        self.decoder = "pyav"

    def close(self) -> None:
        self._decoder = None  # torchcodec has no close(); dropping the decoder frees FFmpeg's state
        if self._fallback is not None:
            self._fallback.close()

    def get_frames(self, indices: Sequence[int]) -> np.ndarray:
        return self.get_frames_tensor(indices).cpu().numpy()  # [n, H, W, 3]

    def get_frames_tensor(self, indices: Sequence[int]) -> torch.Tensor:
        """Like :meth:`get_frames`, as a uint8 tensor [n, H, W, 3] on the reader's ``device``."""
        if self._fallback is not None:
            return torch.from_numpy(self._fallback.get_frames(indices)).to(self.device)
        idx = normalize_indices(indices, self.info.num_frames, self.path)
        if idx.size == 0:
            return torch.from_numpy(self._empty()).to(self.device)
        if self._decoder is None:
            raise VideoDecodeError(self.path, "reader is closed")
        wanted, inverse = np.unique(idx, return_inverse=True)  # [u], [n]
        try:
            batch = self._decoder.get_frames_at(wanted.tolist())
        except Exception as err:  # e.g. a damaged packet: PyAV decodes exactly these frames or says why not
            self._use_pyav(f"torchcodec failed to decode frames: {_first_line(err)}")
            return self.get_frames_tensor(idx)
        data = batch.data  # [u, H, W, 3] uint8 on self.device
        expected = (wanted.size, self.info.height, self.info.width, 3)
        if tuple(data.shape) != expected or data.dtype != torch.uint8:
            raise VideoDecodeError(self.path, f"torchcodec returned {data.dtype} {tuple(data.shape)}, expected uint8 {expected}")
        got = batch.pts_seconds.double().numpy()  # [u], always on the CPU
        bad = np.flatnonzero(np.abs(got - self._seconds[wanted]) > self._tolerance)
        if bad.size:
            i = int(bad[0])
            self._use_pyav(f"torchcodec returned the frame at {got[i]:.4f}s for frame {int(wanted[i])} "
                           f"(at {self._seconds[wanted[i]]:.4f}s)")
            return self.get_frames_tensor(idx)
        return data[torch.from_numpy(inverse).to(data.device)].contiguous()  # [n, H, W, 3]


def _first_line(err: BaseException) -> str:
    """torchcodec's message without its C++ source location and the lines after it."""
    text = str(err).strip() or type(err).__name__
    line = text.splitlines()[0]
    return line.rsplit(".cpp:", 1)[-1].split(", ", 1)[-1][:300] if ".cpp:" in line else line[:300]
