"""The training read path of the WebDataset layout: byte ranges of tars → batches in stored dtypes.

A training epoch needs one view per clip. A format-2 shard keeps those views together (one *group*
per epoch slot, its byte range in ``index.json``), so an epoch reads one contiguous range per shard:
the bytes it trains on and nothing else. This module does only what a CPU core must do per sample —
read, check the CRC, decompress — and leaves every numeric step to the training device:

- :func:`iter_range_samples` parses the ustar members of a byte range directly (one ``read`` per
  header and per member, no ``tarfile`` machinery) and groups them into samples by key;
- :class:`BatchAssembler` checks each needed entry's CRC32, decompresses it, parses its ``.npy``
  header once per distinct header, and copies the array straight into a preallocated batch array.
  Entries the step does not use (``pooled``) are not decompressed. Targets keep their stored dtype
  (int8 + scales, fp16, bf16 bits); the step dequantises them on the device (``Codec.decode_torch``).

Damage raises :class:`~umt_distill.cache.record.StoreDamagedError` naming the tar and the sample.
Nothing a file says is allocated before it is checked: a member's size against its byte range and the
file, an entry's decoded size against what the spec allows (``record.record_layout``), a ``.npy``
header against the bytes that follow it, a JPEG's dimensions against the view. ``view.json`` carries
its own CRC-32C (:func:`seal_meta`), so every byte a sample's reader uses is covered by a checksum.
The plain reader (``wds_store.iter_tar_records``, float32 records through ``webdataset``) is the
reference this path is tested against.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import zlib
from collections.abc import Container, Iterator, Mapping, Sequence
from typing import Any, BinaryIO

import google_crc32c
import numpy as np
import torch

from umt_distill import storage
from umt_distill.cache.codecs import compressor_from_suffix, decompress_bytes, get_codec
from umt_distill.cache.record import (
    StoreDamagedError,
    layout_nbytes,
    shape_matches,
    stored_names,
)
from umt_distill.data.jpeg import decode_jpegs

_BLOCK = 512
#: ``view.json``'s own checksum: CRC-32C of the file's bytes with this field's value written as
#: ``"00000000"`` (8 lowercase hex digits otherwise). Samples written before it existed have none.
META_CHECKSUM = "json_crc32c"
_PLACEHOLDER = "00000000"
_HEX8 = re.compile(r"^[0-9a-f]{8}$")
#: Every field a ``view.json`` may hold (formats 1 and 2). An unknown one is damage: a flipped bit in a
#: field's *name* would otherwise drop the field silently (for the checksum field: the check itself).
META_FIELDS = frozenset({"clip_id", "view_index", "view", "frames_digest", "codec", "compressor", "mode", "frames",
                         "group", "crc32c", "crc32", META_CHECKSUM})
#: Room for an ``.npy`` header beside an entry's array data (format 1.0 headers are at most 65545 bytes).
NPY_HEADER_MAX = 65_546


def entry_checksum(data: bytes) -> int:
    """CRC-32C (Castagnoli) of a member's bytes, as zarr's ``crc32c`` codec computes it (hardware-
    accelerated in google-crc32c: ~5x zlib's CRC-32, which format 1 used)."""
    return google_crc32c.value(bytes(data) if not isinstance(data, bytes) else data)


def check_entry(meta: dict[str, Any], entry: str, data: bytes) -> bool:
    """Whether a member's bytes match the checksum ``view.json`` records for it (``crc32c``; format 1:
    ``crc32``). An entry without a recorded checksum passes."""
    if "crc32c" in meta:
        want = meta["crc32c"].get(entry)
        return want is None or entry_checksum(data) == want
    want = meta.get("crc32", {}).get(entry)
    return want is None or zlib.crc32(data) == want


def seal_meta(meta: Mapping[str, Any]) -> bytes:
    """A sample's ``view.json`` bytes with their own CRC-32C (:data:`META_CHECKSUM`) inside.

    The JSON is written with sorted keys and the field's value as ``"00000000"``; the CRC-32C of those
    bytes then replaces the placeholder (same length). A reader undoes the replacement and recomputes.
    """
    text = json.dumps({**meta, META_CHECKSUM: _PLACEHOLDER}, sort_keys=True).encode()
    field = f'"{META_CHECKSUM}": "{_PLACEHOLDER}"'.encode()
    return text.replace(field, f'"{META_CHECKSUM}": "{entry_checksum(text):08x}"'.encode(), 1)


def check_meta_checksum(data: bytes, meta: Mapping[str, Any]) -> None:
    """Raise ValueError unless ``view.json``'s bytes match the checksum inside them (none: an older sample)."""
    value = meta.get(META_CHECKSUM)
    if value is None:
        return
    if not isinstance(value, str) or not _HEX8.match(value):
        raise ValueError(f"{META_CHECKSUM} is {value!r}, not 8 hex digits")
    field = f'"{META_CHECKSUM}": "{value}"'.encode()
    if bytes(data).count(field) != 1:
        raise ValueError(f"{META_CHECKSUM} is not written as the writer writes it")
    if entry_checksum(bytes(data).replace(field, f'"{META_CHECKSUM}": "{_PLACEHOLDER}"'.encode())) != int(value, 16):
        raise ValueError("checksum mismatch (CRC32C of view.json; corrupted metadata)")


def _open(url: str) -> BinaryIO:
    if "://" in url:
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url, "rb", buffering=0)  # unbuffered: every read lands once, in its own buffer


def _file_size(f: Any) -> int | None:
    try:
        return os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        size = getattr(f, "size", None)
        return int(size) if isinstance(size, int) else None


def _tar_number(field: bytes) -> int:
    """A numeric tar header field: octal text, or GNU base-256 (first byte 0x80: big-endian binary)."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    if field[:1] == b"\xff":
        raise ValueError("negative base-256 number")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _header(block: bytes, url: str, pos: int) -> tuple[str, int]:
    """(member name, data size) of a ustar header block; damage raises StoreDamagedError."""
    stored = block[148:156].split(b"\0", 1)[0].strip()
    try:
        checksum = int(stored or b"0", 8)
        size = _tar_number(block[124:136])
    except ValueError:
        raise StoreDamagedError(url, f"byte {pos}: not a tar header (truncated or corrupt tar?)") from None
    if checksum != sum(block) - sum(block[148:156]) + 8 * 32:
        raise StoreDamagedError(url, f"byte {pos}: tar header checksum mismatch (corrupt tar)")
    if block[156:157] not in (b"0", b"\0"):
        raise StoreDamagedError(url, f"byte {pos}: tar member type {block[156:157]!r}; this layout has regular files only")
    name = block[:100].split(b"\0", 1)[0]
    if block[257:262] == b"ustar" and block[345] != 0:
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8"), size


def iter_range_samples(url: str, offset: int = 0, nbytes: int | None = None,
                       keep: Container[int] | None = None,
                       data: bytes | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples ``(key, {entry: bytes})`` of the tar members in ``[offset, offset + nbytes)``.

    The range must start at a member header (a group's offset from ``index.json``); ``nbytes=None``
    reads to the end-of-archive marker (a whole format-1 tar). A member whose header claims more bytes
    than its range (or the file) holds is damage, raised before anything of that size is allocated.

    Args:
        keep: Ordinals (0-based, in the range) of the samples wanted; the others' headers are read and
            their data skipped (a seek, no read): a sample another rank trains on costs its headers only.
            Skipped samples are yielded as ``(key, None)``, so the caller still counts them. None: all.
        data: The range's bytes, already fetched (``storage.read_ahead``). A URL without them is fetched
            here, the range whole (``storage.fetch_range``: retried, in block-sized requests), so a
            network fault is a ``storage.NetworkError`` before parsing starts, never tar damage.
    """
    end = None if nbytes is None else offset + nbytes
    key, entries, pos, ordinal = None, {}, offset, -1
    if data is None and storage.is_url(url):
        data = storage.fetch_range(url, offset, nbytes)
    with (_open(url) if data is None else storage.RangeFile(data, offset)) as f:
        size_of_file = _file_size(f)
        if size_of_file is not None and end is not None and end > size_of_file:
            raise StoreDamagedError(url, f"byte {size_of_file}: the file ends inside the range [{offset}, {end}) "
                                         "that index.json records (truncated tar, or a wrong index.json)")
        stop = end if end is not None else size_of_file
        f.seek(offset)
        while end is None or pos < end:
            block = f.read(_BLOCK)
            if len(block) < _BLOCK:
                if end is None and not block:
                    break
                raise StoreDamagedError(url, f"byte {pos}: the tar ends inside the range (truncated tar?)")
            if block.count(0) == _BLOCK:  # end-of-archive marker
                if end is not None:
                    raise StoreDamagedError(url, f"byte {pos}: end of archive inside a group's range (index.json disagrees)")
                break
            name, size = _header(block, url, pos)
            padded = size + (-size % _BLOCK)
            if stop is not None and pos + _BLOCK + padded > stop:
                what = "its group's byte range (index.json)" if end is not None else "the file"
                raise StoreDamagedError(url, f"byte {pos}: member {name!r} claims {size} bytes, past the end of "
                                             f"{what} at byte {stop} (corrupt tar header)")
            base = name.rsplit("/", 1)[-1]
            k, _, entry = base.partition(".")
            if k != key:
                if key is not None:
                    yield key, entries
                key, ordinal = k, ordinal + 1
                entries = {} if keep is None or ordinal in keep else None
            if entries is None:  # a sample not wanted: skip its data
                f.seek(padded, os.SEEK_CUR)
                pos += _BLOCK + padded
                continue
            data = f.read(padded)
            if len(data) < padded:
                raise StoreDamagedError(url, f"member {name}: {len(data)} of {padded} bytes (truncated tar)")
            pos += _BLOCK + padded
            entries[entry] = data[:size] if padded != size else data
    if key is not None:
        yield key, entries


class _NpyHeaders:
    """``.npy`` headers parsed once: every record of a store repeats the same few headers.

    A header is bounded by the bytes that hold it, and the array it declares must be exactly the bytes
    that follow it: nothing a header claims is allocated (arrays are views of the entry's bytes).
    """

    MAX_KNOWN = 64  # distinct headers remembered (a store has a handful)

    def __init__(self) -> None:
        self._known: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}

    def parse(self, raw: bytes | memoryview) -> tuple[np.dtype, tuple[int, ...], int]:
        """(dtype, shape, data offset) of one ``.npy`` file's bytes; ValueError if they disagree."""
        if len(raw) < 10 or raw[:6] != b"\x93NUMPY":
            raise ValueError("not a .npy file")
        major = raw[6]
        if major == 1:
            end = 10 + int.from_bytes(raw[8:10], "little")
        elif major in (2, 3) and len(raw) >= 12:
            end = 12 + int.from_bytes(raw[8:12], "little")
        else:
            raise ValueError(f".npy format version {major} is not one this reader knows")
        if end > len(raw):
            raise ValueError(f".npy header claims {end} bytes, the entry has {len(raw)}")
        head = bytes(raw[:end])
        known = self._known.get(head)
        if known is None:
            buf = io.BytesIO(head)
            version = np.lib.format.read_magic(buf)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(buf)
            if fortran or dtype.hasobject:
                raise ValueError(f"unsupported .npy layout (fortran_order={fortran}, dtype={dtype})")
            known = (dtype, tuple(int(x) for x in shape), end)
            if len(self._known) < self.MAX_KNOWN:
                self._known[head] = known
        dtype, shape, end = known
        want = math.prod(shape) * dtype.itemsize  # exact Python ints: a huge claim cannot wrap around
        if want != len(raw) - end:
            raise ValueError(f".npy header declares {dtype} {list(shape)} ({want} bytes), the entry holds "
                             f"{len(raw) - end} bytes of data")
        return known

    def array(self, raw: bytes | memoryview) -> np.ndarray:
        """The array of one ``.npy`` file's bytes: a read-only view of them, no copy, no allocation."""
        dtype, shape, start = self.parse(raw)
        return np.frombuffer(raw, dtype=dtype, count=math.prod(shape), offset=start).reshape(shape)


_HEADERS = _NpyHeaders()


def npy_array(raw: bytes | memoryview) -> np.ndarray:
    """A ``.npy`` file's array, bounded by its bytes (what ``np.load`` does, minus trusting the header)."""
    return _HEADERS.array(raw)


def entry_limit(layout: Mapping[str, tuple[np.dtype, tuple[int, ...]]] | None, name: str) -> int | None:
    """The most bytes an entry named ``name`` may decode to: its exact ``.npy`` size when the spec fixes
    it, else None (the codecs' general cap)."""
    want = (layout or {}).get(name)
    nbytes = None if want is None else layout_nbytes(*want)
    return None if nbytes is None else nbytes + NPY_HEADER_MAX


def check_npy(arr: np.ndarray, layout: Mapping[str, tuple[np.dtype, tuple[int, ...]]] | None, name: str) -> None:
    """Raise ValueError when a stored array's dtype or shape is not what the spec fixes."""
    want = (layout or {}).get(name)
    if want is not None and (arr.dtype != want[0] or not shape_matches(want[1], arr.shape)):
        shape = [("*" if d < 0 else d) for d in want[1]]
        raise ValueError(f"{arr.dtype} {list(arr.shape)}, the store's spec says {want[0]} {shape}")


def jpeg_dimensions(data: bytes | memoryview) -> tuple[int, int]:
    """``(height, width)`` from a JPEG's start-of-frame marker, read without decoding; ValueError if none."""
    data = memoryview(data)
    if bytes(data[:2]) != b"\xff\xd8":
        raise ValueError("not a JPEG (no start-of-image marker)")
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise ValueError(f"byte {i}: not a JPEG marker")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before the data
            break
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                break
            return int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big")
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    raise ValueError("no JPEG frame header before the image data")


def check_jpegs(jpegs: Sequence[bytes], size: Sequence[int] | None) -> None:
    """Raise ValueError unless every JPEG declares the view's ``size`` ([H, W]): a decoder allocates what
    the header says, so the header is checked against the (checksummed) view first."""
    for t, data in enumerate(jpegs):
        hw = jpeg_dimensions(data)
        if size is not None and list(hw) != [int(x) for x in size]:
            raise ValueError(f"frame {t}: the JPEG is {hw[0]}x{hw[1]}, the view is {size[0]}x{size[1]}")


class BatchAssembler:
    """Fills batch arrays from raw samples: CRC check, decompression, one copy into the batch.

    Args:
        batch_size: Samples per batch.
        epoch: Selects mask ``epoch mod M`` of a mode-visible record, as the reference dataset does
            (``None``: keep all M).
        frames: ``"array"``: the stored view frames become ``pixels`` (raw ones copied, JPEGs decoded
            or shipped, see ``jpeg_device``); ``None``: frames are not read.
        jpeg_device: ``None``: decode the JPEGs here, into ``pixels`` (a CPU worker); else ship
            ``frames_jpeg`` (uint8, all frames concatenated) + ``frames_jpeg_sizes`` ([B, T]) for the
            step to decode on that device.
        layout: The store's ``record.record_layout(spec, "wds")``: every entry's dtype and shape are
            checked against it and its decoded size bounded by it (``None``: only the general cap).
    """

    def __init__(self, batch_size: int, epoch: int | None, frames: str | None, jpeg_device: str | None = None,
                 layout: Mapping[str, tuple[np.dtype, tuple[int, ...]]] | None = None) -> None:
        self.batch_size, self.epoch, self.frames, self.jpeg_device = batch_size, epoch, frames, jpeg_device
        self.layout = layout
        self.headers = _NpyHeaders()
        self._codecs: dict[str, Any] = {}  # by name: only their part names are used here
        self._reset()

    def _reset(self) -> None:
        self.n = 0
        self.arrays: dict[str, np.ndarray] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self.clip_ids: list[str] = []
        self.view_index = np.empty(self.batch_size, dtype=np.int64)
        self.jpegs: list[bytes] = []

    def __len__(self) -> int:
        return self.n

    def add(self, url: str, key: str, entries: dict[str, bytes], meta: dict[str, Any] | None = None) -> None:
        """Add one sample (``meta``: its parsed ``view.json``, if the caller already parsed it)."""
        if meta is None:
            meta = parse_meta(url, key, entries)
        codec = self._codecs.get(meta["codec"]) or self._codecs.setdefault(meta["codec"], get_codec(meta["codec"]))
        mode, stored_frames = meta.get("mode", "full"), meta.get("frames", "none")
        # Everything the step uses (pooled is not), in stored dtypes: only these are checked and decompressed.
        names = [n for n in stored_names(codec, mode, self.frames is not None and stored_frames == "raw") if n != "pooled"]
        if self.frames is not None and stored_frames == "none":
            raise ValueError(f"{url}: sample {key}: the store keeps no view frames (cache.frames=none); "
                             "use train.pixels_from=video")
        sfx = {e.split(".npy")[0]: e for e in entries if ".npy" in e}
        i = self.n
        for name in names:
            entry = sfx.get(name)
            if entry is None:
                raise StoreDamagedError(url, f"sample {key}: missing entry {name}.npy")
            arr = self._entry_array(url, key, entry, entries[entry], meta)
            if mode == "visible" and self.epoch is not None and name not in ("attn", "frames"):
                arr = arr[self.epoch % arr.shape[0]]  # this epoch's mask: [K, T, N_vis, D] / [T, N_vis]
            self._put("pixels" if name == "frames" else name, i, arr, url, key)
        if stored_frames == "jpeg" and self.frames is not None:
            frames = sorted(e for e in entries if e.endswith(".jpg"))
            for entry in frames:
                data = entries[entry]
                if not check_entry(meta, entry, data):
                    raise StoreDamagedError(url, f"sample {key}: entry {entry}: checksum mismatch (CRC32C; corrupted data)")
            try:
                check_jpegs([entries[e] for e in frames], (meta.get("view") or {}).get("size"))
            except ValueError as e:
                raise StoreDamagedError(url, f"sample {key}: jpeg frames: {e}") from None
            if self.n and len(frames) != len(self.jpegs) // self.n:
                raise StoreDamagedError(url, f"sample {key}: {len(frames)} jpeg frames, the batch's first sample has "
                                             f"{len(self.jpegs) // self.n}")
            self.jpegs += [entries[e] for e in frames]
        self.clip_ids.append(str(meta["clip_id"]))
        self.view_index[i] = int(meta["view_index"])
        self.n += 1

    def _entry_array(self, url: str, key: str, entry: str, data: bytes, meta: dict) -> np.ndarray:
        if not check_entry(meta, entry, data):
            raise StoreDamagedError(url, f"sample {key}: entry {entry}: checksum mismatch (CRC32C; corrupted data)")
        name = entry.split(".npy")[0]
        try:
            raw = data
            if not entry.endswith(".npy"):
                raw = decompress_bytes(compressor_from_suffix(entry), data, entry_limit(self.layout, name))
            arr = self.headers.array(raw)
            check_npy(arr, self.layout, name)
            return arr
        except Exception as e:
            raise StoreDamagedError(url, f"sample {key}: entry {entry}: {type(e).__name__}: {e}") from e

    def _put(self, name: str, i: int, arr: np.ndarray, url: str, key: str) -> None:
        out = self.arrays.get(name)
        if out is None:
            if i:
                raise StoreDamagedError(url, f"sample {key}: has {name}, the batch's first sample has not")
            tensor = self.tensors[name] = _batch_tensor((self.batch_size, *arr.shape), arr.dtype)
            out = self.arrays[name] = tensor.numpy()  # the same memory, filled through numpy
        elif out.shape[1:] != arr.shape or out.dtype != arr.dtype:
            raise StoreDamagedError(url, f"sample {key}: {name} is {arr.dtype} {list(arr.shape)}, the batch's first "
                                         f"sample has {out.dtype} {list(out.shape[1:])}")
        out[i] = arr

    def finish(self) -> dict[str, Any]:
        """The batch as tensors (stored dtypes), and a fresh assembler state."""
        batch: dict[str, Any] = {k: v[: self.n] for k, v in self.tensors.items()}
        batch["clip_id"], batch["view_index"] = self.clip_ids, torch.from_numpy(self.view_index[: self.n])
        if self.jpegs:
            t = len(self.jpegs) // self.n
            if self.jpeg_device is None:
                frames = decode_jpegs(self.jpegs)  # [B*T, 3, H, W]
                batch["pixels"] = frames.view(self.n, t, *frames.shape[1:])
            else:
                sizes = np.array([len(d) for d in self.jpegs], dtype=np.int64)
                batch["frames_jpeg"] = torch.frombuffer(bytearray(b"".join(self.jpegs)), dtype=torch.uint8)
                batch["frames_jpeg_sizes"] = torch.from_numpy(sizes.reshape(self.n, t))
        self._reset()
        return batch


def _batch_tensor(shape: tuple[int, ...], dtype: np.dtype) -> torch.Tensor:
    """An uninitialised batch tensor; in a DataLoader worker, allocated in shared memory, as
    ``default_collate`` does, so handing it to the training process copies nothing."""
    like = torch.from_numpy(np.empty(0, dtype=dtype))
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=like.dtype)
    numel = int(np.prod(shape, dtype=np.int64))
    return like.new(like._typed_storage()._new_shared(numel, device="cpu")).view(shape)  # noqa: SLF001


def parse_meta(url: str, key: str, entries: dict[str, bytes]) -> dict[str, Any]:
    """A sample's ``view.json``; a missing or bad one raises StoreDamagedError naming the sample."""
    data = entries.get("view.json")
    if data is None:
        raise StoreDamagedError(url, f"sample {key}: no view.json (incomplete sample: truncated tar?)")
    try:
        meta = json.loads(data)
        if not isinstance(meta, dict):
            raise TypeError(f"a JSON {type(meta).__name__}, not an object")
        unknown = sorted(set(meta) - META_FIELDS)
        if unknown:
            raise KeyError(f"unknown field {unknown[0]!r}")
        meta["codec"], meta["clip_id"], meta["view_index"]  # noqa: B018 - presence check
        if "crc32c" not in meta and "crc32" not in meta:
            raise KeyError("crc32c")
    except Exception as e:
        raise StoreDamagedError(url, f"sample {key}: bad view.json: {type(e).__name__}: {e}") from e
    try:
        check_meta_checksum(data, meta)
    except ValueError as e:
        raise StoreDamagedError(url, f"sample {key}: view.json: {e}") from None
    if not isinstance(meta["clip_id"], str) or isinstance(meta["view_index"], bool) or not isinstance(meta["view_index"], int):
        raise StoreDamagedError(url, f"sample {key}: bad view.json: clip_id {meta['clip_id']!r}, view_index "
                                     f"{meta['view_index']!r}")
    return meta


def decode_jpeg_batch(data: torch.Tensor, sizes: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """Decode a batch's shipped JPEGs (see :class:`BatchAssembler`) on ``device`` → uint8 [B, T, 3, H, W]."""
    B, T = sizes.shape
    frames = decode_jpegs(list(torch.split(data, sizes.flatten().tolist())), device=device)  # [B*T, 3, H, W]
    return frames.view(B, T, *frames.shape[1:])
