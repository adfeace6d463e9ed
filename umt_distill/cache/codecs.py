"""Lossy number codecs for teacher tokens, and the lossless compressors applied on top.

A codec turns float32 ``[..., D]`` into one or more named numpy arrays ("parts") and back:

=========  ==========================================  ==========================================
codec      parts                                       decode
=========  ==========================================  ==========================================
``fp32``   ``data`` float32 [..., D]                   identity (lossless)
``fp16``   ``data`` float16 [..., D]                   ``data.astype(float32)``
``bf16``   ``data`` uint16 [..., D] (bfloat16 bits)    ``(data.astype(uint32) << 16).view(float32)``
``int8``   ``q`` int8 [..., D], ``scale`` float32      ``q.astype(float32) * scale``
           [..., 1] (max|x| over D / 127)
=========  ==========================================  ==========================================

Compressors (``zstd`` default, ``blosc``, ``none``) are lossless and applied per stored chunk (zarr)
or per ``.npy`` entry (WebDataset). ``cache/FORMAT.md`` describes both byte for byte.
"""

from __future__ import annotations

import abc
from typing import Any

from typing import TYPE_CHECKING

import numpy as np

from umt_distill.registry import CODECS

if TYPE_CHECKING:  # decode_torch takes tensors; the numpy side of this module never needs torch
    import torch


class CodecError(ValueError):
    """Values cannot be encoded faithfully (e.g. outside the fp16 range, NaN)."""


class Codec(abc.ABC):
    """Encodes float32 ``[..., D]`` into named parts and decodes them back to float32."""

    #: Part name of codecs that store a single array; stored under the field's own name.
    SINGLE_PART = "data"
    name: str
    parts: tuple[str, ...]
    lossless: bool = False

    @abc.abstractmethod
    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Encode float32 ``[..., D]`` into parts (C-contiguous arrays)."""

    @abc.abstractmethod
    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        """Decode parts back into float32 ``[..., D]``."""

    @abc.abstractmethod
    def decode_torch(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Decode parts given as tensors in their stored dtypes into float32, on the parts' device.

        The training path ships parts through the DataLoader untouched and calls this inside the step,
        so the bytes that cross to the GPU are the stored ones. It computes exactly what :meth:`decode`
        computes (same float32 operations), so both paths give bit-identical targets.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _as_float32(x: np.ndarray, codec: str) -> np.ndarray:
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise CodecError(f"codec {codec}: expects floating point input, got {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise CodecError(f"codec {codec}: input contains NaN or inf")
    return x


@CODECS.register("fp32")
class Fp32Codec(Codec):
    """float32, lossless (4 bytes per value)."""

    name, parts, lossless = "fp32", ("data",), True

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {"data": _as_float32(x, self.name)}

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(parts["data"], dtype=np.float32)

    def decode_torch(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return parts["data"].float()


@CODECS.register("fp16")
class Fp16Codec(Codec):
    """IEEE float16 (2 bytes per value; relative error <= 2^-11, range +-65504)."""

    name, parts = "fp16", ("data",)

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = _as_float32(x, self.name)
        peak = float(np.abs(x).max(initial=0.0))
        if peak > float(np.finfo(np.float16).max):
            raise CodecError(f"codec fp16: |value| {peak:.6g} exceeds the float16 range (65504); use bf16 or fp32")
        return {"data": x.astype(np.float16)}

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(parts["data"]).astype(np.float32)

    def decode_torch(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return parts["data"].float()


def fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (round to nearest, ties to even) and return the uint16 bit patterns.

    bfloat16 is the top 16 bits of a float32, so rounding adds half of the dropped range (0x7FFF, plus
    one when the kept lowest bit is odd, which breaks ties towards even) before truncating. This matches
    ``torch.Tensor.to(torch.bfloat16)`` bit for bit on finite values.
    """
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16
    return rounded.astype(np.uint16)


def bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    """Widen uint16 bfloat16 bit patterns to float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


@CODECS.register("bf16")
class Bf16Codec(Codec):
    """bfloat16 as uint16 bits (2 bytes per value; float32 range, relative error <= 2^-8)."""

    name, parts = "bf16", ("data",)

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        # _as_float32 rejects NaN, the one input the bit arithmetic would mangle (it could carry into inf).
        return {"data": fp32_to_bf16_bits(_as_float32(x, self.name))}

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        return bf16_bits_to_fp32(parts["data"])

    def decode_torch(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        import torch

        bits = parts["data"]  # uint16 bit patterns (or int16 with the same bits)
        return bits.view(torch.int16).view(torch.bfloat16).float()


@CODECS.register("int8")
class Int8Codec(Codec):
    """int8 with one float32 scale per token (symmetric; ~1 byte per value)."""

    name, parts = "int8", ("q", "scale")

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = _as_float32(x, self.name)
        scale = np.abs(x).max(axis=-1, keepdims=True) / np.float32(127)  # [..., 1]
        # An all-zero token has scale 0: store q = 0 instead of dividing by zero.
        safe = np.where(scale > 0, scale, np.float32(1))
        q = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)
        return {"q": q, "scale": scale.astype(np.float32)}

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(parts["q"]).astype(np.float32) * np.asarray(parts["scale"], dtype=np.float32)

    def decode_torch(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return parts["q"].float() * parts["scale"].float()


def get_codec(name: str) -> Codec:
    """Instantiate the codec registered as ``name`` (unknown names list the known ones)."""
    return CODECS.get(name)()


# --------------------------------------------------------------------------------------------------
# lossless compressors

COMPRESSORS = ("zstd", "blosc", "none")
ZSTD_LEVEL = 3
BLOSC = {"cname": "zstd", "clevel": 3}  # byte-shuffled by element size, which helps float exponents


def check_compressor(name: str) -> str:
    if name not in COMPRESSORS:
        raise ValueError(f"unknown compressor {name!r}; choose one of {', '.join(COMPRESSORS)}")
    return name


def zarr_compressors(name: str) -> list[Any]:
    """Zarr v3 bytes-to-bytes codecs for ``name``, each chunk closed by a CRC32C checksum.

    The checksum makes a corrupted chunk an error instead of silently wrong numbers, whatever the
    compressor (zstd's own frame checksum is on as well).
    """
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    check_compressor(name)
    if name == "zstd":
        return [ZstdCodec(level=ZSTD_LEVEL, checksum=True), Crc32cCodec()]
    if name == "blosc":
        return [BloscCodec(shuffle="shuffle", **BLOSC), Crc32cCodec()]
    return [Crc32cCodec()]


def entry_suffix(name: str) -> str:
    """File-name suffix a compressor adds to a WebDataset ``.npy`` entry."""
    return {"zstd": ".zst", "blosc": ".blosc", "none": ""}[check_compressor(name)]


def compressor_from_suffix(entry: str) -> str:
    """The compressor of a WebDataset entry name (``tokens.npy.zst`` -> ``zstd``)."""
    if entry.endswith(".zst"):
        return "zstd"
    if entry.endswith(".blosc"):
        return "blosc"
    return "none"


def compress_bytes(name: str, data: bytes, itemsize: int = 1) -> bytes:
    """Compress one entry. zstd writes a standard zstd frame with content checksum (``zstd -d`` reads
    it); blosc a Blosc1 frame, byte-shuffled by ``itemsize``."""
    import numcodecs

    check_compressor(name)
    if name == "none":
        return bytes(data)
    if name == "zstd":
        return bytes(numcodecs.Zstd(level=ZSTD_LEVEL, checksum=True).encode(data))
    # Blosc shuffles by the buffer's element size; an .npy header is padded to a multiple of 64 bytes,
    # so viewing the whole entry as itemsize-wide words keeps the array's elements aligned.
    if len(data) % itemsize:
        itemsize = 1
    words = np.frombuffer(data, dtype=f"u{itemsize}") if itemsize > 1 else np.frombuffer(data, np.uint8)
    return bytes(numcodecs.Blosc(shuffle=numcodecs.Blosc.SHUFFLE, **BLOSC).encode(words))


def decompress_bytes(name: str, data: bytes) -> bytes:
    """Inverse of :func:`compress_bytes`."""
    import numcodecs

    check_compressor(name)
    if name == "none":
        return bytes(data)
    if name == "zstd":
        return bytes(numcodecs.Zstd().decode(data))
    return bytes(numcodecs.Blosc().decode(data))
