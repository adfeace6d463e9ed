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
``int4``   ``q`` uint8 [..., D/2] (two signed nibbles  nibbles sign-extended, interleaved,
           per byte), ``scale`` float32 [..., 1]       ``* scale``
           (max|x| over D / 7)
``pca<r>`` ``q`` int8 [..., K, T, N, r], ``scale``     ``(q * scale) @ basis[:, 1:] + basis[:, 0]``
           float32 [..., K, T, N, 1]: coefficients     per layer: one matmul (``cache/basis.py``
           in a per-layer basis stored once per store  fits, stores and binds the basis)
=========  ==========================================  ==========================================

Compressors (``zstd`` default, ``blosc``, ``none``) are lossless and applied per stored chunk (zarr)
or per ``.npy`` entry (WebDataset). ``cache/FORMAT.md`` describes both byte for byte.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

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
    #: The codec needs store-level state (a basis) to encode or decode: build it with
    #: ``umt_distill.cache.basis.codec_for_store(root)``, not :func:`get_codec`.
    needs_basis: bool = False

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

    def part_layout(self, shape: tuple[int, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Dtype and shape of each stored part for float32 values of ``shape`` (readers allocate from it).

        The default covers codecs whose only part has the values' shape (fp32, fp16, bf16).
        """
        return {self.parts[0]: (self._dtype, tuple(shape))}

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Uncompressed bytes of the parts of values of ``shape``."""
        return sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for d, s in self.part_layout(shape).values())

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
    _dtype = "float32"

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
    _dtype = "float16"

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
    _dtype = "uint16"

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

    def part_layout(self, shape: tuple[int, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {"q": ("int8", tuple(shape)), "scale": ("float32", (*shape[:-1], 1))}


@CODECS.register("int4")
class Int4Codec(Codec):
    """int4 with one float32 scale per token, two values per byte (symmetric; ~0.5 byte per value).

    ``scale = max|x| over D / 7``, ``q = clip(rint(x / scale), -7, 7)``; the two's-complement nibbles
    of values ``2i`` (low nibble) and ``2i + 1`` (high nibble) share byte ``i``. D must be even.
    """

    name, parts = "int4", ("q", "scale")

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = _as_float32(x, self.name)
        if x.shape[-1] % 2:
            raise CodecError(f"codec int4 packs two values per byte: the last axis must be even, got {x.shape[-1]}")
        scale = np.abs(x).max(axis=-1, keepdims=True) / np.float32(7)  # [..., 1]
        safe = np.where(scale > 0, scale, np.float32(1))  # all-zero token: scale 0, q 0
        q = np.clip(np.rint(x / safe), -7, 7).astype(np.int8).view(np.uint8) & np.uint8(0x0F)  # [..., D] nibbles
        packed = q[..., 0::2] | (q[..., 1::2] << np.uint8(4))  # [..., D/2]
        return {"q": np.ascontiguousarray(packed), "scale": scale.astype(np.float32)}

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        b = np.asarray(parts["q"], dtype=np.uint8)  # [..., D/2]
        lo = (b << np.uint8(4)).view(np.int8) >> 4  # arithmetic shift sign-extends the nibble
        hi = b.view(np.int8) >> 4
        q = np.stack([lo, hi], axis=-1).reshape(*b.shape[:-1], 2 * b.shape[-1])  # [..., D]
        return q.astype(np.float32) * np.asarray(parts["scale"], dtype=np.float32)

    def decode_torch(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        import torch

        b = parts["q"].to(torch.uint8)  # [..., D/2]
        lo = (b << 4).view(torch.int8) >> 4
        hi = b.view(torch.int8) >> 4
        q = torch.stack([lo, hi], dim=-1).reshape(*b.shape[:-1], 2 * b.shape[-1])  # [..., D]
        return q.float() * parts["scale"].float()

    def part_layout(self, shape: tuple[int, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {"q": ("uint8", (*shape[:-1], shape[-1] // 2)), "scale": ("float32", (*shape[:-1], 1))}


class PcaCodec(Codec):
    """Per-layer low-rank basis (fitted on a sample of the corpus, stored once) + int8 coefficients.

    Values are teacher tokens ``[..., K, T, N, D]`` (the layer axis is the 4th from last, as in both
    record modes). The store's basis is float32 ``[K, 1 + r, D]``: row 0 of layer k is the mean,
    rows 1..r the principal directions scaled by their standard deviation, so coefficients are
    whitened: ``c_j = (x - mean) . B_j / |B_j|^2``. Coefficients are int8 with one float32 scale per
    token (``max|c| / 127``). Decoding is ``(q * scale) @ B + mean``: one matmul per layer.

    :func:`get_codec` gives an *unbound* instance (name, parts, layout); encoding or decoding needs
    the store's basis: ``umt_distill.cache.basis.codec_for_store(root)`` returns a bound one.
    """

    parts = ("q", "scale")
    needs_basis = True
    rank: int

    def __init__(self, basis: np.ndarray | None = None) -> None:
        self.name = f"pca{self.rank}"
        self.basis: np.ndarray | None = None
        self._device_basis: dict[Any, Any] = {}  # device -> torch basis, moved once
        if basis is not None:
            self.basis = self._check_basis(basis)

    def bind(self, basis: np.ndarray) -> PcaCodec:
        """A codec of the same rank using ``basis`` (float32 [K, 1 + r, D])."""
        return type(self)(basis)

    def _check_basis(self, basis: np.ndarray) -> np.ndarray:
        basis = np.asarray(basis)
        if basis.dtype != np.float32 or basis.ndim != 3 or basis.shape[1] != self.rank + 1:
            raise CodecError(f"codec {self.name}: the basis must be float32 [K, {self.rank + 1}, D], "
                             f"got {basis.dtype} {list(basis.shape)}")
        if not np.isfinite(basis).all() or not (np.abs(basis[:, 1:]).sum(-1) > 0).all():
            raise CodecError(f"codec {self.name}: the basis has non-finite values or an all-zero direction")
        return np.ascontiguousarray(basis)

    def _bound(self) -> np.ndarray:
        if self.basis is None:
            raise CodecError(f"codec {self.name} needs the store's basis (basis.npy): build the codec with "
                             "umt_distill.cache.basis.codec_for_store(root), not get_codec")
        return self.basis

    def _check_values(self, shape: tuple[int, ...], last: int, what: str) -> None:
        K, D = self.basis.shape[0], self.basis.shape[2]  # type: ignore[union-attr]
        if len(shape) < 4 or shape[-4] != K or shape[-1] != last:
            raise CodecError(f"codec {self.name}: {what} must be [..., K={K}, T, N, {last}] "
                             f"(basis of {K} layers, D={D}), got {list(shape)}")

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        basis = self._bound()
        x = _as_float32(x, self.name)
        self._check_values(x.shape, basis.shape[2], "values")
        mean, B = basis[:, None, 0:1], basis[:, None, 1:]  # [K, 1, 1, D], [K, 1, r, D]
        enc = B / (B * B).sum(-1, keepdims=True)  # whitening: unit-variance coefficients
        c = np.matmul(x - mean, np.swapaxes(enc, -1, -2))  # [..., K, T, N, r]
        scale = np.abs(c).max(axis=-1, keepdims=True) / np.float32(127)
        safe = np.where(scale > 0, scale, np.float32(1))
        q = np.clip(np.rint(c / safe), -127, 127).astype(np.int8)
        return {"q": q, "scale": scale.astype(np.float32)}

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        basis = self._bound()
        q = np.asarray(parts["q"])
        self._check_values(q.shape, self.rank, "coefficients")
        c = q.astype(np.float32) * np.asarray(parts["scale"], dtype=np.float32)  # [..., K, T, N, r]
        return np.matmul(c, basis[:, None, 1:]) + basis[:, None, 0:1]  # [..., K, T, N, D]

    def decode_torch(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Same arithmetic as :meth:`decode` on the parts' device (equal up to the matmul's summation order)."""
        import torch

        self._bound()
        q = parts["q"]
        self._check_values(tuple(q.shape), self.rank, "coefficients")
        basis = self._device_basis.get(q.device)
        if basis is None:  # moved to the training device once, then reused
            basis = torch.from_numpy(self.basis).to(q.device)  # type: ignore[arg-type]
            self._device_basis[q.device] = basis
        c = q.float() * parts["scale"].float()  # [..., K, T, N, r]
        return torch.matmul(c, basis[:, None, 1:]) + basis[:, None, 0:1]  # [..., K, T, N, D]

    def part_layout(self, shape: tuple[int, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {"q": ("int8", (*shape[:-1], self.rank)), "scale": ("float32", (*shape[:-1], 1))}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_device_basis": {}}  # DataLoader workers: no device tensors

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bound={self.basis is not None})"


#: Registered ranks of the low-rank codec (``pca<r>``); a rank must be smaller than the teacher's D.
PCA_RANKS = (4, 8, 16, 32, 48, 64, 96, 128, 192, 256)
for _r in PCA_RANKS:
    CODECS.register(f"pca{_r}", type(f"Pca{_r}Codec", (PcaCodec,), {
        "rank": _r, "__doc__": f"rank-{_r} per-layer basis + int8 coefficients (the basis is fitted per store)"}))


def get_codec(name: str) -> Codec:
    """Instantiate the codec registered as ``name`` (unknown names list the known ones).

    Codecs with store-level state (``pca<r>``) come back unbound: use
    ``umt_distill.cache.basis.codec_for_store(root)`` to read a store.
    """
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
