"""Zarr v3 layout: one zarr group per work shard, one chunk per record, one zarr shard per array.

``shards/shard-XXXXXX.zarr/`` holds an array per stored name (``tokens``, ``attn`` ...), first axis =
record row. A chunk is one record, so a random read decompresses exactly one record; the sharding
codec packs all chunks of an array into a single file (``<array>/c/0/0/...``), so a shard of 1000
records is a handful of files, not thousands. See ``cache/FORMAT.md``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from umt_distill import storage
from umt_distill.cache.codecs import (
    Codec,
    check_compressor,
    get_codec,
    zarr_compressors,
)
from umt_distill.cache.record import (
    CodecErrorTally,
    RecordError,
    StoreDamagedError,
    TargetRecord,
    check_new_key,
    layout_nbytes,
    record_arrays,
    record_from_arrays,
    record_jpegs,
    record_layout,
    shape_matches,
    stored_names,
)
from umt_distill.cache.wds_stream import check_jpegs
from umt_distill.data.jpeg import decode_jpegs
from umt_distill.io import fsync_dir, fsync_tree

#: 2: the shard group's attributes carry their own CRC-32C (``attrs_crc32c``). 1 is still read.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
SUFFIX = ".zarr"
FRAME_MODES = ("none", "raw", "jpeg")
#: CRC-32C of the shard group's other attributes, as :func:`attrs_checksum` serialises them.
ATTRS_CHECKSUM = "attrs_crc32c"
#: Every attribute a shard group may hold; an unknown one is damage (a flipped bit in a *name* would
#: otherwise drop an attribute silently, the checksum's own included).
ATTRS_FIELDS = frozenset({"umt_distill_format", "layout", "codec", "compressor", "mode", "frames", "records", "views",
                          "frames_digests", ATTRS_CHECKSUM})
_ABSENT = 2**64 - 1  # a shard index entry of a chunk that was never written: (offset, nbytes) both all ones
_INDEX_ENTRY = 16  # uint64 offset + uint64 nbytes
_CRC = 4


def attrs_checksum(attrs: dict[str, Any]) -> int:
    """CRC-32C of a shard group's attributes (all but :data:`ATTRS_CHECKSUM`) in canonical JSON: sorted
    keys, no spaces (``separators=(",", ":")``), ASCII only; zarr may re-indent ``zarr.json`` freely."""
    rest = {k: v for k, v in attrs.items() if k != ATTRS_CHECKSUM}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return google_crc32c.value(text.encode())

# Axis names written into each array's metadata, so a plain zarr user sees what the axes mean.
_AXES = {
    "full": ["record", "layer", "frame", "token", "channel"],
    "visible": ["record", "mask", "layer", "frame", "token", "channel"],
}


def _dimension_names(name: str, ndim: int, mode: str) -> list[str] | None:
    if name.startswith("tokens"):
        return _AXES[mode]
    return {
        "attn": ["record", "frame", "token"],
        "pooled": ["record", "frame", "channel"],
        "visible_idx": ["record", "mask", "frame", "token"],
        "frames": ["record", "frame", "rgb", "height", "width"],
        "frames_jpeg": ["record", "frame", "byte"],
        "frames_jpeg_len": ["record", "frame"],
    }.get(name) if ndim > 1 else None


def shard_file_key(ndim: int) -> str:
    """Key of an array's only shard file: chunk grid position 0 on every axis (``c/0/0/0``)."""
    return "c/" + "/".join(["0"] * ndim)


class ZarrShardWriter:
    """Zarr v3: one group per shard, sharded arrays, one chunk per record (random access)."""

    def __init__(
        self, shards_dir: str | Path, name: str, codec: str, compressor: str = "zstd", frames: str = "none",
        jpeg_quality: int = 95,
    ) -> None:
        if frames not in FRAME_MODES:
            raise ValueError(f"frames must be one of {', '.join(FRAME_MODES)}, not {frames!r}")
        self.shards_dir, self.name = Path(shards_dir), name
        self.codec_name, self.codec = codec, get_codec(codec)
        self.compressor = check_compressor(compressor)
        self.frames, self.frames_mode, self.jpeg_quality = frames == "raw", frames, jpeg_quality
        self._jpegs: list[list[bytes]] = []  # frames jpeg: each row's T JPEGs, padded into one array at close
        self.final_path = self.shards_dir / f"{name}{SUFFIX}"
        self.tmp_path = self.shards_dir / f".tmp-{name}{SUFFIX}"
        # Encoded records wait in memory and are written at close: writing a zarr shard row by row
        # would rewrite the whole shard file on every row. Memory = records x encoded record size.
        self._rows: list[dict[str, np.ndarray]] = []
        self._meta: list[dict[str, Any]] = []
        self._mode: str | None = None
        self._keys: set[tuple[str, int]] = set()
        self._error = CodecErrorTally()
        self._closed = False

    def add(self, record: TargetRecord) -> None:
        """Validate and encode one record; raise :class:`RecordError` if it does not fit the shard."""
        if self._closed:
            raise RuntimeError(f"shard writer {self.name} is closed")
        check_new_key(record, self._keys)
        arrays = record_arrays(record, self.codec, self.frames)
        self._error.add(self.codec, record.tokens, arrays)
        if self._rows:
            first = self._rows[0]
            if record.mode != self._mode or arrays.keys() != first.keys() or any(
                arrays[k].shape != first[k].shape for k in arrays
            ):
                got = {k: list(v.shape) for k, v in arrays.items()}
                want = {k: list(v.shape) for k, v in first.items()}
                raise RecordError(
                    f"record {record.clip_id!r} view {record.view_index}: shapes {got} differ from the "
                    f"shard's first record {want}"
                )
        if self.frames_mode == "jpeg":
            jpegs = record_jpegs(record, self.jpeg_quality)
            self._jpegs.append(jpegs)
        self._mode = record.mode
        self._rows.append(arrays)
        self._meta.append(record.describe(self.codec_name, self.compressor))
        self._keys.add((record.clip_id, int(record.view_index)))

    def close(self) -> dict[str, Any]:
        """Write the shard under its temporary name, fsync, rename to the final name.

        Returns:
            ``{"name", "path", "num_records", "nbytes", "records", "codec_error"}`` (``codec_error``: the
            codec's worst reconstruction error over the shard's records, ``record.CodecErrorTally``).
        """
        import zarr

        if self._closed:
            raise RuntimeError(f"shard writer {self.name} is closed")
        self._closed = True
        records = [[m["clip_id"], m["view_index"]] for m in self._meta]
        try:
            shutil.rmtree(self.tmp_path, ignore_errors=True)  # a crashed earlier attempt
            group = zarr.open_group(str(self.tmp_path), mode="w", zarr_format=3, attributes=self._attributes(records))
            n = len(self._rows)
            names = list(self._rows[0]) if n else []
            for name in names:
                self._write_array(group, name, n)
            if self._jpegs:
                self._write_jpegs(group)
            self._rows.clear()
            nbytes = fsync_tree(self.tmp_path)
            if self.final_path.exists():  # left by a run that died between rename and its sidecar
                shutil.rmtree(self.final_path)
            os.rename(self.tmp_path, self.final_path)
            fsync_dir(self.shards_dir)
        except BaseException:
            shutil.rmtree(self.tmp_path, ignore_errors=True)
            raise
        return {
            "name": self.name,
            "path": str(self.final_path),
            "num_records": len(records),
            "nbytes": nbytes,
            "records": records,
            "codec_error": self._error.as_dict(),
        }

    def _attributes(self, records: list) -> dict[str, Any]:
        attrs = {
            "umt_distill_format": FORMAT_VERSION,
            "layout": "zarr",
            "codec": self.codec_name,
            "compressor": self.compressor,
            "mode": self._mode or "full",
            "frames": self.frames_mode,
            "records": records,
            "views": [m["view"] for m in self._meta],
            "frames_digests": [m["frames_digest"] for m in self._meta],
        }
        # zarr.json has no checksum of its own: the records, views and digests it holds get one here.
        return {**attrs, ATTRS_CHECKSUM: attrs_checksum(json.loads(json.dumps(attrs)))}

    def _write_array(self, group: Any, name: str, n: int) -> None:
        first = self._rows[0][name]
        data = np.empty((n, *first.shape), dtype=first.dtype)
        for i, row in enumerate(self._rows):
            data[i] = row.pop(name)  # free each encoded row as soon as it is copied: peak ~1x, not 2x
        group.create_array(
            name,
            shape=data.shape,
            dtype=data.dtype,
            chunks=(1, *first.shape),
            shards=data.shape,
            compressors=zarr_compressors(self.compressor),
            fill_value=0,
            dimension_names=_dimension_names(name, data.ndim, self._mode or "full"),
            # Store every chunk, even an all-zero one, so that "missing" can only mean "damaged".
            config={"write_empty_chunks": True},
        )[...] = data

    def _write_jpegs(self, group: Any) -> None:
        """``frames_jpeg`` uint8 [n, T, L] (each JPEG zero-padded to the longest) + ``frames_jpeg_len`` int32 [n, T]."""
        n, t = len(self._jpegs), len(self._jpegs[0])
        lengths = np.array([[len(d) for d in row] for row in self._jpegs], dtype=np.int32)  # [n, T]
        data = np.zeros((n, t, int(lengths.max())), dtype=np.uint8)
        for i, row in enumerate(self._jpegs):
            for f, d in enumerate(row):
                data[i, f, : len(d)] = np.frombuffer(d, dtype=np.uint8)
        self._jpegs.clear()
        for name, arr in (("frames_jpeg", data), ("frames_jpeg_len", lengths)):
            group.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=(1, *arr.shape[1:]), shards=arr.shape,
                               compressors=zarr_compressors("none"), fill_value=0,
                               dimension_names=_dimension_names(name, arr.ndim, self._mode or "full"),
                               config={"write_empty_chunks": True})[...] = arr

    def abort(self) -> None:
        """Drop buffered records and remove temporary files; the final name is never touched."""
        self._closed = True
        self._rows.clear()
        self._jpegs.clear()
        shutil.rmtree(self.tmp_path, ignore_errors=True)


def read_stored_many(requests: list[tuple[ZarrShardReader, int]], names_of) -> list[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """Many records' stored arrays with one call into zarr's event loop (not one per array and record).

    Args:
        requests: ``(shard, row)`` per record, in the order the results come back.
        names_of: ``shard -> the array names to read``.
    """
    import asyncio

    from zarr.core.sync import sync

    jobs = [(i, name) for i, (shard, _) in enumerate(requests) for name in names_of(shard)]
    remote: dict[int, tuple[ZarrShardReader, dict[str, list[tuple[int, int]]]]] = {}

    async def gather() -> list:  # created inside zarr's loop, which runs it
        # A network fault here is storage.NetworkError, raised (not a per-record result).
        await asyncio.gather(*(shard.prefetch_store.prefetch(wanted) for shard, wanted in remote.values()))
        return await asyncio.gather(*(requests[i][0].read_stored_async(requests[i][1], name) for i, name in jobs),
                                    return_exceptions=True)

    for i, name in jobs:  # the shard index of each array first (once per array): absent chunks, bounds
        requests[i][0].check_index(name, requests[i][1])
    for i, name in jobs:  # over a URL: every chunk's byte range (from the checked index), fetched ahead
        shard, row = requests[i]
        if shard.prefetch_store is not None:
            offset, nbytes = (int(x) for x in shard.chunk_ranges[name][row])
            wanted = remote.setdefault(id(shard), (shard, {}))[1]
            wanted.setdefault(shard.shard_key(name), []).append((offset, offset + nbytes))
    arrays: list[dict[str, np.ndarray]] = [{} for _ in requests]
    try:
        results = sync(gather())
    finally:
        for shard, _ in remote.values():
            shard.prefetch_store.forget()
    for (i, name), got in zip(jobs, results):
        shard, row = requests[i]
        if isinstance(got, storage.NetworkError):
            raise got
        if isinstance(got, BaseException):  # checksum mismatch, truncated shard file, decompression error
            raise StoreDamagedError(shard.shard_file(name), f"row {row}: {type(got).__name__}: {got}") from got
        arrays[i][name] = np.asarray(got)
    return [shard.describe(row, arrays[i]) for i, (shard, row) in enumerate(requests)]


def _store_spec(path: str) -> dict[str, Any] | None:
    """The spec.json of the store a shard group lies in (``<root>/shards/<name>.zarr``), if readable."""
    root = str(path).rstrip("/").rsplit("/", 2)[0]
    try:
        spec = json.loads(storage.read_text(f"{root}/spec.json"))
    except (OSError, ValueError):
        return None
    return spec if isinstance(spec, dict) and isinstance(spec.get("codec"), dict) else None


def _read_tail(path: str, nbytes: int) -> tuple[int, bytes]:
    """``(file size, its last nbytes bytes)``; FileNotFoundError if the file is missing."""
    if storage.is_url(path):  # retried; a network fault is storage.NetworkError
        size = storage.size(path)
        start = max(0, size - nbytes)
        return size, storage.fetch_ranges(path, [(start, size)])[(start, size)] if size else b""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - nbytes))
        return size, f.read(nbytes)


class ZarrShardReader:
    """Random access to the records of one zarr shard group (opened once, read row by row).

    Opening checks what decides how bytes are read before any record is: the group's attributes (their
    own CRC-32C, known fields, codec/mode/frames equal to the spec's) and every array's metadata (dtype,
    shape, chunk and shard shape, codec chain) against the store's spec (``record.record_layout``).
    Each array's shard index is checked on first use (:meth:`check_index`): every chunk present (plain
    zarr reads an absent one as zeros) and inside the file.

    Args:
        path: The shard group (``<root>/shards/<name>.zarr``, or an fsspec URL).
        expected_records: ``[[clip_id, view_index], ...]`` from ``index.json``.
        spec: The store's spec (default: the ``spec.json`` of the store the shard lies in, if any).
    """

    def __init__(self, path: str, expected_records: list | None = None, spec: dict[str, Any] | None = None) -> None:
        import zarr

        self.path = path
        # Over a URL: a store that fetches chunk ranges ahead and retries (storage.PrefetchStore).
        self.prefetch_store = storage.zarr_store(path) if storage.is_url(path) else None
        self.chunk_ranges: dict[str, np.ndarray] = {}  # array name -> [n, 2] (offset, nbytes) per row
        try:
            group = zarr.open_group(self.prefetch_store or path, mode="r", zarr_format=3)
            attrs = dict(group.attrs)
        except storage.NetworkError:
            raise
        except Exception as e:  # missing dir, unreadable or invalid zarr.json
            raise StoreDamagedError(path, f"cannot open the shard's zarr group: {type(e).__name__}: {e}") from e
        self._check_attrs(attrs)
        try:
            self.codec: Codec = get_codec(attrs["codec"])
            self.mode = attrs["mode"]
            self.records = [(str(c), int(v)) for c, v in attrs["records"]]
            self.views = attrs["views"]
            self.digests = attrs["frames_digests"]
            self.frames_mode = attrs["frames"]
            if not len(self.views) == len(self.digests) == len(self.records):
                raise ValueError(f"{len(self.records)} records, {len(self.views)} views, {len(self.digests)} digests")
        except Exception as e:
            raise StoreDamagedError(f"{path}/zarr.json", f"bad shard attributes: {type(e).__name__}: {e}") from e
        if expected_records is not None and [tuple(r) for r in expected_records] != self.records:
            raise StoreDamagedError(path, "the shard's records differ from index.json")
        spec = _store_spec(path) if spec is None else spec
        self.layout = self._layout(attrs, spec)
        n = len(self.records)
        self.arrays = {}
        self._index_ok: set[str] = set()
        names = stored_names(self.codec, self.mode, self.frames_mode == "raw")
        if self.frames_mode == "jpeg":
            names += ["frames_jpeg", "frames_jpeg_len"]
        for name in names:
            try:
                arr = group[name]
                # Counting chunks lists the folder, which a server without listings cannot do; there
                # check_index finds absent chunks (the shard index marks them) before any is read.
                initialized = arr.nchunks if self.prefetch_store is not None else arr.nchunks_initialized
            except storage.NetworkError:
                raise
            except Exception as e:
                raise StoreDamagedError(f"{path}/{name}", f"cannot open array: {type(e).__name__}: {e}") from e
            if arr.shape[0] != n:
                raise StoreDamagedError(f"{path}/{name}", f"{arr.shape[0]} rows, the shard has {n} records")
            # zarr reads a missing chunk file as fill values without complaint; refuse instead.
            if initialized != arr.nchunks:
                raise StoreDamagedError(
                    f"{path}/{name}/{shard_file_key(arr.ndim)}",
                    f"{arr.nchunks - initialized} of {arr.nchunks} chunks missing (shard file deleted?)",
                )
            self._check_metadata(name, arr)
            self.arrays[name] = arr

    def _check_attrs(self, attrs: dict[str, Any]) -> None:
        where = f"{self.path}/zarr.json"
        unknown = sorted(set(attrs) - ATTRS_FIELDS)
        if unknown:
            raise StoreDamagedError(where, f"bad shard attributes: unknown attribute {unknown[0]!r}")
        version = attrs.get("umt_distill_format")
        if version not in READABLE_FORMATS:
            raise StoreDamagedError(where, f"bad shard attributes: umt_distill_format {version!r}, this reader knows "
                                           f"{', '.join(map(str, READABLE_FORMATS))}")
        if ATTRS_CHECKSUM in attrs or version >= 2:
            if attrs.get(ATTRS_CHECKSUM) != attrs_checksum(attrs):
                raise StoreDamagedError(where, "the shard's attributes (records, views, frame digests) fail their "
                                               f"checksum {ATTRS_CHECKSUM} (corrupted metadata)")

    def _layout(self, attrs: dict[str, Any], spec: dict[str, Any] | None) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """The arrays this shard must hold, from the spec (its attributes must agree with it)."""
        if spec is not None:
            want = {"codec": (spec.get("codec") or {}).get("name"), "compressor": (spec.get("codec") or {}).get("compressor"),
                    "mode": (spec.get("mode") or {}).get("mode"), "frames": spec.get("frames")}
            for key, value in want.items():
                if value is not None and attrs.get(key) != value:
                    raise StoreDamagedError(f"{self.path}/zarr.json",
                                            f"the shard's {key} is {attrs.get(key)!r}, spec.json says {value!r}")
        spec = spec or {}
        merged = {**spec, "codec": {"name": attrs["codec"]}, "frames": attrs["frames"],  # equal where the spec says
                  "mode": {**(spec.get("mode") or {}), "mode": attrs["mode"]}}
        return record_layout(merged, "zarr")

    def _check_metadata(self, name: str, arr: Any) -> None:
        """An array's zarr.json against the spec, before any chunk is read: dtype, shape, one chunk per
        record in one shard, and the codec chain (little-endian bytes, CRC32C per chunk and index)."""
        where = f"{self.path}/{name}/zarr.json"
        dtype, shape = self.layout[name]
        if arr.dtype != dtype or not shape_matches(shape, arr.shape[1:]):
            want = [len(self.records), *("*" if d < 0 else d for d in shape)]
            raise StoreDamagedError(where, f"array {name} is {arr.dtype} {list(arr.shape)}, the store's spec says "
                                           f"{dtype} {want} (edited metadata)")
        problem = None
        codecs = arr.metadata.codecs
        sharding = codecs[0] if len(codecs) == 1 else None
        if sharding is None or type(sharding).__name__ != "ShardingCodec":
            problem = "not one sharding_indexed codec"
        elif tuple(arr.shards or ()) != tuple(arr.shape) or tuple(sharding.chunk_shape) != (1, *arr.shape[1:]):
            problem = f"shards {arr.shards} and chunks {tuple(sharding.chunk_shape)}, not one shard of one-record chunks"
        elif str(getattr(sharding.index_location, "value", sharding.index_location)) != "end" or [
                type(c).__name__ for c in sharding.index_codecs] != ["BytesCodec", "Crc32cCodec"]:
            problem = "a shard index that is not bytes + crc32c at the end"
        else:
            inner = [type(c).__name__ for c in sharding.codecs]
            endian = getattr(getattr(sharding.codecs[0], "endian", None), "value", None)
            if inner[:1] != ["BytesCodec"] or inner[-1:] != ["Crc32cCodec"] or (dtype.itemsize > 1 and endian != "little"):
                problem = f"inner codecs {inner} (endian {endian}), not little-endian bytes ... crc32c"
        if problem:
            raise StoreDamagedError(where, f"array {name}: {problem} (edited metadata)")

    def check_index(self, name: str, row: int | None = None) -> None:
        """Check array ``name``'s shard index once: its CRC-32C, every chunk present (zarr reads an absent
        one as zeros) and inside the file (an uncompressed chunk of exactly its size). The index size is
        fixed by the array's (checked) metadata, never read from the file. ``row``: the row being read,
        named in the error."""
        if name in self._index_ok:
            return
        arr = self.arrays[name]
        path = self.shard_file(name)
        prefix = f"row {row}: cannot read its chunk: " if row is not None else ""
        n = len(self.records)
        index_bytes = n * _INDEX_ENTRY + _CRC
        try:
            size, tail = _read_tail(path, index_bytes)
        except FileNotFoundError:
            raise StoreDamagedError(path, f"{prefix}{n} of {n} chunks missing (shard file deleted?)") from None
        except OSError as e:
            raise StoreDamagedError(path, f"{prefix}unreadable: {e}") from e
        if size < index_bytes or google_crc32c.value(tail[:-_CRC]) != int.from_bytes(tail[-_CRC:], "little"):
            raise StoreDamagedError(path, f"{prefix}the shard index (the file's last {index_bytes} bytes) fails its "
                                          "CRC32C (truncated or corrupt shard file)")
        entries = np.frombuffer(tail[:-_CRC], dtype="<u8").reshape(n, 2)
        self.chunk_ranges[name] = entries
        data_end = size - index_bytes
        compressed = len(arr.metadata.codecs[0].codecs) > 2
        exact = None if compressed else layout_nbytes(arr.dtype, tuple(arr.shape[1:]))
        for r, (offset, nbytes) in enumerate(entries.tolist()):
            if offset == _ABSENT and nbytes == _ABSENT:
                raise StoreDamagedError(path, f"{prefix}the shard index marks the chunk of row {r} absent "
                                              "(plain zarr would read zeros)")
            if offset + nbytes > data_end or nbytes <= _CRC:
                raise StoreDamagedError(path, f"{prefix}the shard index places row {r}'s chunk at bytes "
                                              f"[{offset}, {offset + nbytes}), outside the data's [0, {data_end})")
            if exact is not None and nbytes != exact + _CRC:
                raise StoreDamagedError(path, f"{prefix}the shard index gives row {r}'s chunk {nbytes} bytes, its "
                                              f"metadata {exact + _CRC}")
        self._index_ok.add(name)

    def check_indexes(self) -> None:
        """:meth:`check_index` of every array."""
        for name in self.arrays:
            self.check_index(name)

    def shard_key(self, name: str) -> str:
        """The shard file of array ``name`` relative to the group (a key of the group's zarr store)."""
        return f"{name}/{shard_file_key(self.arrays[name].ndim)}"

    def shard_file(self, name: str) -> str:
        """The file holding all chunks of array ``name`` (one zarr shard spans the whole array)."""
        return f"{self.path}/{name}/{shard_file_key(self.arrays[name].ndim)}"

    def __len__(self) -> int:
        return len(self.records)

    def read_stored(self, row: int, names: Iterable[str] | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """One record's description and stored arrays (codec parts undecoded), one chunk per array read.

        Args:
            names: The arrays to read (default: all of them).
        """
        arrays = {}
        for name in self.arrays if names is None else names:
            self.check_index(name, row)
            try:
                arrays[name] = self.arrays[name][row]
            except storage.NetworkError:
                raise
            except Exception as e:  # checksum mismatch, truncated shard file, decompression error
                raise StoreDamagedError(self.shard_file(name), f"row {row}: {type(e).__name__}: {e}") from e
        return self.describe(row, arrays)

    def read_stored_async(self, row: int, name: str):
        """A coroutine reading row ``row`` of array ``name`` (one chunk), for :func:`read_stored_many`
        to gather with others in one call into zarr's event loop. (An orthogonal selection of several
        rows of a sharded array was ~40x slower here than gathering one basic selection per row.)"""
        return self.arrays[name].async_array.getitem(row)

    def describe(self, row: int, arrays: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(description, arrays)`` of a row whose stored arrays were read (JPEG frames decoded here)."""
        clip_id, view_index = self.records[row]
        meta = {
            "clip_id": clip_id,
            "view_index": view_index,
            "view": self.views[row],
            "frames_digest": self.digests[row],
            "mode": self.mode,
            "codec": self.codec.name,
        }
        if "frames_jpeg" in arrays:  # decoded as training decodes them: the pixels the teacher saw
            data, lengths = arrays.pop("frames_jpeg"), arrays.pop("frames_jpeg_len")  # [T, L], [T]
            meta["frames_jpeg"] = tuple(data[f, : max(0, int(n))].tobytes() for f, n in enumerate(lengths))
            try:
                check_jpegs(meta["frames_jpeg"], (self.views[row] or {}).get("size"))  # what a decoder would allocate
                arrays["frames"] = np.ascontiguousarray(decode_jpegs(meta["frames_jpeg"]).numpy())  # [T, 3, H, W]
            except ValueError as e:
                raise StoreDamagedError(self.shard_file("frames_jpeg"), f"row {row}: {e}") from e
        return meta, arrays

    def read(self, row: int) -> TargetRecord:
        """Read and decode one record (one chunk per array)."""
        meta, arrays = self.read_stored(row)
        try:
            record = record_from_arrays(meta, arrays, self.codec)
            record.frames_jpeg = meta.get("frames_jpeg")
            return record
        except (KeyError, ValueError, TypeError) as e:
            raise StoreDamagedError(self.path, f"row {row}: cannot rebuild the record: {type(e).__name__}: {e}") from e
