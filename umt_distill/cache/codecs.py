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
``jpca<r>`` as ``pca<r>`` but one basis over the K    ``(q * scale) @ basis[1:] + basis[0]`` over
           layers jointly: ``q`` [..., 1, T, N, r]      K*D, then [..., T, N, K, D] -> [..., K, T, N, D]
``...i4``  coefficients int4, two per byte
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


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-7, 7], last axis even -> uint8 [..., n/2]: value 2i in the low nibble of byte i,
    2i + 1 in the high nibble, each as 4-bit two's complement."""
    nib = q.astype(np.int8).view(np.uint8) & np.uint8(0x0F)
    return np.ascontiguousarray(nib[..., 0::2] | (nib[..., 1::2] << np.uint8(4)))


def unpack_int4(b: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_int4`: uint8 [..., n] -> int8 [..., 2n]."""
    b = np.asarray(b, dtype=np.uint8)
    lo = (b << np.uint8(4)).view(np.int8) >> 4  # arithmetic shift sign-extends the nibble
    hi = b.view(np.int8) >> 4
    return np.stack([lo, hi], axis=-1).reshape(*b.shape[:-1], 2 * b.shape[-1])


def unpack_int4_torch(b: torch.Tensor) -> torch.Tensor:
    """:func:`unpack_int4` on a tensor's device."""
    import torch

    b = b.to(torch.uint8)
    lo = (b << 4).view(torch.int8) >> 4
    hi = b.view(torch.int8) >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*b.shape[:-1], 2 * b.shape[-1])


def _quantize(c: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-vector quantisation of the last axis to integers in [-levels, levels]."""
    scale = np.abs(c).max(axis=-1, keepdims=True) / np.float32(levels)  # [..., 1]
    safe = np.where(scale > 0, scale, np.float32(1))  # an all-zero vector: scale 0, q 0
    q = np.clip(np.rint(c / safe), -levels, levels).astype(np.int8)
    return q, scale.astype(np.float32)


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
        q, scale = _quantize(x, 7)
        return {"q": pack_int4(q), "scale": scale}

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        return unpack_int4(parts["q"]).astype(np.float32) * np.asarray(parts["scale"], dtype=np.float32)

    def decode_torch(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return unpack_int4_torch(parts["q"]).float() * parts["scale"].float()

    def part_layout(self, shape: tuple[int, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {"q": ("uint8", (*shape[:-1], shape[-1] // 2)), "scale": ("float32", (*shape[:-1], 1))}


class PcaCodec(Codec):
    """Low-rank codes of teacher tokens in a basis fitted per store, coefficients int8 (or int4).

    Values are teacher tokens ``[..., K, T, N, D]`` (the layer axis is the 4th from last in both record
    modes). Names: ``pca<r>`` -- r coefficients per layer, basis float32 ``[K, 1 + r, D]`` (per layer:
    row 0 the mean, rows 1..r the principal directions times their standard deviation);
    ``jpca<r>`` -- *joint* over layers: the K tokens of one (frame, patch) concatenated to ``K*D`` values
    share r coefficients (layers are correlated: the residual stream changes little from block to
    block), basis ``[1 + r, K, D]`` (row 0 the mean, rows 1..r the directions, each reshaped to [K, D]);
    its parts keep a layer axis of size 1 (``q`` [..., 1, T, N, r]), so every codec's parts have the
    values' number of axes.
    Suffix ``i4``: coefficients int4, two per byte (as :class:`Int4Codec`), else int8. Coefficients are
    whitened, ``c_j = (x - mean) . B_j / |B_j|^2``, then quantised with one float32 scale per vector
    (``max|c| / 127`` or ``/ 7``). Decoding is ``c @ B + mean``: one matmul.

    :func:`get_codec` gives an *unbound* instance (name, parts, layout); encoding or decoding needs the
    store's basis: ``umt_distill.cache.basis.codec_for_store(root)`` returns a bound one.
    """

    parts = ("q", "scale")
    needs_basis = True

    def __init__(self, rank: int, joint: bool = False, bits: int = 8, basis: np.ndarray | None = None) -> None:
        if rank < 1 or bits not in (4, 8):
            raise ValueError(f"rank must be >= 1 and bits 4 or 8, got rank {rank}, bits {bits}")
        if bits == 4 and rank % 2:
            raise ValueError(f"int4 coefficients pack two per byte: the rank must be even, got {rank}")
        self.rank, self.joint, self.bits = rank, joint, bits
        self.name = f"{'j' if joint else ''}pca{rank}{'i4' if bits == 4 else ''}"
        self.basis: np.ndarray | None = None
        self._device_basis: dict[Any, Any] = {}  # device -> (mean, directions) tensors, moved once
        if basis is not None:
            self.basis = self._check_basis(basis)

    def bind(self, basis: np.ndarray) -> PcaCodec:
        """A codec of the same kind using ``basis``."""
        return PcaCodec(self.rank, self.joint, self.bits, basis)

    def basis_shape(self, K: int, D: int) -> tuple[int, int, int]:
        return (1 + self.rank, K, D) if self.joint else (K, 1 + self.rank, D)

    def _check_basis(self, basis: np.ndarray) -> np.ndarray:
        basis = np.asarray(basis)
        rows = basis.shape[0] if self.joint else (basis.shape[1] if basis.ndim == 3 else -1)
        if basis.dtype != np.float32 or basis.ndim != 3 or rows != self.rank + 1:
            want = f"[{self.rank + 1}, K, D]" if self.joint else f"[K, {self.rank + 1}, D]"
            raise CodecError(f"codec {self.name}: the basis must be float32 {want}, got {basis.dtype} {list(basis.shape)}")
        mean, dirs = self._split(basis)
        if not np.isfinite(basis).all() or not (np.abs(dirs).sum(-1) > 0).all():
            raise CodecError(f"codec {self.name}: the basis has non-finite values or an all-zero direction")
        return np.ascontiguousarray(basis)

    def _split(self, basis):
        """(mean, directions) shaped to broadcast against the values: per layer [K, 1, 1, D] and
        [K, 1, r, D] (values [..., K, T, N, D]); joint [K*D] and [r, K*D] (values [..., T, N, K*D])."""
        if self.joint:
            return basis[0].reshape(-1), basis[1:].reshape(self.rank, -1)
        return basis[:, None, 0:1], basis[:, None, 1:]

    def _bound(self) -> np.ndarray:
        if self.basis is None:
            raise CodecError(f"codec {self.name} needs the store's basis (basis.npy): build the codec with "
                             "umt_distill.cache.basis.codec_for_store(root), not get_codec")
        return self.basis

    def _layers(self) -> tuple[int, int]:
        b = self._bound()
        return (b.shape[1], b.shape[2]) if self.joint else (b.shape[0], b.shape[2])

    def _check_values(self, shape: tuple[int, ...]) -> None:
        K, D = self._layers()
        if len(shape) < 4 or shape[-4] != K or shape[-1] != D:
            raise CodecError(f"codec {self.name}: values must be [..., K={K}, T, N, D={D}] (the basis), got {list(shape)}")

    def _check_codes(self, shape: tuple[int, ...]) -> None:
        K, _ = self._layers()
        n = self.rank if self.bits == 8 else self.rank // 2
        layers = 1 if self.joint else K
        if len(shape) < 4 or shape[-1] != n or shape[-4] != layers:
            want = f"[..., {'1' if self.joint else f'K={K}'}, T, N, {n}]"
            raise CodecError(f"codec {self.name}: coefficients must be {want}, got {list(shape)}")

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        basis = self._bound()
        x = _as_float32(x, self.name)
        self._check_values(x.shape)
        mean, dirs = self._split(basis)
        enc = dirs / (dirs * dirs).sum(-1, keepdims=True)  # whitening: unit-variance coefficients
        if self.joint:  # [..., K, T, N, D] -> [..., T, N, K*D]
            x = np.moveaxis(x, -4, -2).reshape(*x.shape[:-4], *x.shape[-3:-1], -1)
        c = np.matmul(x - mean, np.swapaxes(enc, -1, -2))  # [..., (K,) T, N, r]
        if self.joint:  # keep a layer axis (of size 1: all layers at once) so parts have the values' rank
            c = c[..., None, :, :, :]  # [..., 1, T, N, r]
        q, scale = _quantize(c, 127 if self.bits == 8 else 7)
        return {"q": q if self.bits == 8 else pack_int4(q), "scale": scale}

    def _unjoin(self, y, K: int, D: int, moveaxis):
        """Joint codes: [..., 1, T, N, K*D] -> [..., K, T, N, D]; per layer: unchanged."""
        if not self.joint:
            return y
        y = y.reshape(*y.shape[:-4], *y.shape[-3:-1], K, D)  # [..., T, N, K, D]
        return moveaxis(y, -2, -4)

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        basis = self._bound()
        q = np.asarray(parts["q"])
        self._check_codes(q.shape)
        q = q if self.bits == 8 else unpack_int4(q)
        c = q.astype(np.float32) * np.asarray(parts["scale"], dtype=np.float32)  # [..., (K,) T, N, r]
        mean, dirs = self._split(basis)
        y = np.matmul(c, dirs) + mean
        return np.ascontiguousarray(self._unjoin(y, *self._layers(), np.moveaxis))

    def decode_torch(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Same arithmetic as :meth:`decode` on the parts' device (equal up to the matmul's summation order)."""
        import torch

        self._bound()
        q = parts["q"]
        self._check_codes(tuple(q.shape))
        mats = self._device_basis.get(q.device)
        if mats is None:  # moved to the training device once, then reused
            mats = tuple(torch.from_numpy(np.ascontiguousarray(m)).to(q.device) for m in self._split(self.basis))
            self._device_basis[q.device] = mats
        q = q if self.bits == 8 else unpack_int4_torch(q)
        c = q.float() * parts["scale"].float()  # [..., (K,) T, N, r]
        y = torch.matmul(c, mats[1]) + mats[0]
        return self._unjoin(y, *self._layers(), torch.movedim)  # [..., K, T, N, D]

    def part_layout(self, shape: tuple[int, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
        lead = (*shape[:-4], 1, *shape[-3:-1]) if self.joint else tuple(shape[:-1])
        n, dtype = (self.rank, "int8") if self.bits == 8 else (self.rank // 2, "uint8")
        return {"q": (dtype, (*lead, n)), "scale": ("float32", (*lead, 1))}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_device_basis": {}}  # DataLoader workers: no device tensors

    def __repr__(self) -> str:
        return f"PcaCodec({self.name}, bound={self.basis is not None})"


def _pca_family(match: Any):
    import functools

    joint, rank, int4 = bool(match.group(1)), int(match.group(2)), bool(match.group(3))
    PcaCodec(rank, joint, 4 if int4 else 8)  # refuses a bad rank now (ValueError -> registry error)
    return functools.partial(PcaCodec, rank, joint, 4 if int4 else 8)


CODECS.register_family(r"(j?)pca([0-9]+)(i4)?", "pca<r>[i4], jpca<r>[i4]", _pca_family,
                       "rank-r basis fitted per store (jpca: joint over layers) + int8 (i4: int4) coefficients")


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


#: Decoded bytes a reader accepts from one compressed entry when it does not know the entry's layout. A
#: reader that knows the store's spec bounds every entry by its exact size instead
#: (``record.record_layout``); either way the size a header declares is checked before any allocation.
MAX_DECODED_BYTES = 1 << 30
_ZSTD_MAGIC = 0xFD2FB528
_BLOSC_HEADER = 16


def declared_size(name: str, data: bytes) -> int:
    """The decompressed size a compressed entry declares in its own header, read without decompressing.

    zstd: the frame's content size (our writers always record it); blosc: the header's ``nbytes``;
    ``none``: the entry's length.

    Raises:
        ValueError: the header is not one of the compressor's, or declares no size (a zstd frame
            written without its content size: its output could not be bounded before decoding).
    """
    check_compressor(name)
    data = memoryview(data)
    if name == "none":
        return len(data)
    if name == "blosc":
        if len(data) < _BLOSC_HEADER:
            raise ValueError(f"blosc frame of {len(data)} bytes is shorter than its 16-byte header")
        nbytes, cbytes = int.from_bytes(data[4:8], "little"), int.from_bytes(data[12:16], "little")
        if cbytes != len(data):
            raise ValueError(f"blosc header says {cbytes} compressed bytes, the entry has {len(data)}")
        return nbytes
    if len(data) < 6 or int.from_bytes(data[:4], "little") != _ZSTD_MAGIC:
        raise ValueError("not a zstd frame (bad magic number)")
    fhd = data[4]
    fcs_flag, single_segment, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    at = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if size == 0:
        raise ValueError("zstd frame without a content size (its output cannot be bounded before decoding)")
    if len(data) < at + size:
        raise ValueError("zstd frame header cut short")
    value = int.from_bytes(data[at : at + size], "little")
    return value + 256 if size == 2 else value


def decompress_bytes(name: str, data: bytes, limit: int | None = None) -> bytes:
    """Inverse of :func:`compress_bytes`, bounded: the size the entry's header declares is checked
    against ``limit`` (default :data:`MAX_DECODED_BYTES`) before anything is allocated.

    Raises:
        ValueError: the declared size exceeds ``limit``, the header is malformed, or decoding fails.
    """
    import numcodecs

    limit = MAX_DECODED_BYTES if limit is None else int(limit)
    size = declared_size(name, data)
    if size > limit:
        raise ValueError(f"declares {size} decoded bytes, more than the {limit} this entry can hold")
    if name == "none":
        return bytes(data)
    if name == "zstd":
        out = bytes(numcodecs.Zstd().decode(data))
    else:
        out = bytes(numcodecs.Blosc().decode(data))
    if len(out) != size:
        raise ValueError(f"decoded {len(out)} bytes, its header declares {size}")
    return out
