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
The plain reader (``wds_store.iter_tar_records``, float32 records through ``webdataset``) is the
reference this path is tested against.
"""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO

import google_crc32c
import numpy as np
import torch

from umt_distill.cache.codecs import compressor_from_suffix, decompress_bytes, get_codec
from umt_distill.cache.record import StoreDamagedError, stored_names
from umt_distill.data.jpeg import decode_jpegs

_BLOCK = 512


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


def _open(url: str) -> BinaryIO:
    if "://" in url:
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url, "rb", buffering=0)  # unbuffered: every read lands once, in its own buffer


def _header(block: bytes, url: str, pos: int) -> tuple[str, int]:
    """(member name, data size) of a ustar header block; damage raises StoreDamagedError."""
    stored = block[148:156].split(b"\0", 1)[0].strip()
    try:
        checksum = int(stored or b"0", 8)
        size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
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


def iter_range_samples(url: str, offset: int = 0, nbytes: int | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples ``(key, {entry: bytes})`` of the tar members in ``[offset, offset + nbytes)``.

    The range must start at a member header (a group's offset from ``index.json``); ``nbytes=None``
    reads to the end-of-archive marker (a whole format-1 tar).
    """
    end = None if nbytes is None else offset + nbytes
    key, entries, pos = None, {}, offset
    with _open(url) as f:
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
            data = f.read(padded)
            if len(data) < padded:
                raise StoreDamagedError(url, f"member {name}: {len(data)} of {padded} bytes (truncated tar)")
            pos += _BLOCK + padded
            base = name.rsplit("/", 1)[-1]
            k, _, entry = base.partition(".")
            if k != key:
                if key is not None:
                    yield key, entries
                key, entries = k, {}
            entries[entry] = data[:size] if padded != size else data
    if key is not None:
        yield key, entries


class _NpyHeaders:
    """``.npy`` headers parsed once: every record of a store repeats the same few headers."""

    def __init__(self) -> None:
        self._known: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}

    def parse(self, raw: bytes | memoryview) -> tuple[np.dtype, tuple[int, ...], int]:
        """(dtype, shape, data offset) of one ``.npy`` file's bytes."""
        if raw[:6] != b"\x93NUMPY":
            raise ValueError("not a .npy file")
        major = raw[6]
        if major == 1:
            end = 10 + int.from_bytes(raw[8:10], "little")
        else:
            end = 12 + int.from_bytes(raw[8:12], "little")
        head = bytes(raw[:end])
        known = self._known.get(head)
        if known is None:
            buf = io.BytesIO(head)
            version = np.lib.format.read_magic(buf)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(buf)
            if fortran or dtype.hasobject:
                raise ValueError(f"unsupported .npy layout (fortran_order={fortran}, dtype={dtype})")
            known = self._known[head] = (dtype, tuple(shape), end)
        return known


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
    """

    def __init__(self, batch_size: int, epoch: int | None, frames: str | None, jpeg_device: str | None = None) -> None:
        self.batch_size, self.epoch, self.frames, self.jpeg_device = batch_size, epoch, frames, jpeg_device
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
        try:
            raw = decompress_bytes(compressor_from_suffix(entry), data) if not entry.endswith(".npy") else data
            dtype, shape, start = self.headers.parse(raw)
            count = int(np.prod(shape, dtype=np.int64))
            return np.frombuffer(raw, dtype=dtype, count=count, offset=start).reshape(shape)
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
        meta["codec"], meta["clip_id"], meta["view_index"]  # noqa: B018 - presence check
        if "crc32c" not in meta and "crc32" not in meta:
            raise KeyError("crc32c")
        return meta
    except Exception as e:
        raise StoreDamagedError(url, f"sample {key}: bad view.json: {type(e).__name__}: {e}") from e


def decode_jpeg_batch(data: torch.Tensor, sizes: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """Decode a batch's shipped JPEGs (see :class:`BatchAssembler`) on ``device`` → uint8 [B, T, 3, H, W]."""
    B, T = sizes.shape
    frames = decode_jpegs(list(torch.split(data, sizes.flatten().tolist())), device=device)  # [B*T, 3, H, W]
    return frames.view(B, T, *frames.shape[1:])
