"""Zarr v3 layout: one zarr group per work shard, one chunk per record, one zarr shard per array.

``shards/shard-XXXXXX.zarr/`` holds an array per stored name (``tokens``, ``attn`` ...), first axis =
record row. A chunk is one record, so a random read decompresses exactly one record; the sharding
codec packs all chunks of an array into a single file (``<array>/c/0/0/...``), so a shard of 1000
records is a handful of files, not thousands. See ``cache/FORMAT.md``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import numpy as np

from umt_distill.cache.codecs import Codec, check_compressor, get_codec, zarr_compressors
from umt_distill.cache.record import (
    RecordError,
    StoreDamagedError,
    TargetRecord,
    check_new_key,
    record_arrays,
    record_from_arrays,
    stored_names,
)

FORMAT_VERSION = 1
SUFFIX = ".zarr"

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
    }.get(name) if ndim > 1 else None


def shard_file_key(ndim: int) -> str:
    """Key of an array's only shard file: chunk grid position 0 on every axis (``c/0/0/0``)."""
    return "c/" + "/".join(["0"] * ndim)


def fsync_tree(path: Path) -> int:
    """fsync every file and directory under ``path`` (deepest first); return the total file bytes."""
    total = 0
    for dirpath, _, files in os.walk(path, topdown=False):
        for f in files:
            fp = os.path.join(dirpath, f)
            total += os.path.getsize(fp)
            fd = os.open(fp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))
    return total


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ZarrShardWriter:
    """Zarr v3: one group per shard, sharded arrays, one chunk per record (random access)."""

    def __init__(
        self, shards_dir: str | Path, name: str, codec: str, compressor: str = "zstd", frames: str = "none"
    ) -> None:
        if frames not in ("none", "raw"):
            raise ValueError(f"layout zarr stores frames as 'raw' or not at all ('none'), not {frames!r}")
        self.shards_dir, self.name = Path(shards_dir), name
        self.codec_name, self.codec = codec, get_codec(codec)
        self.compressor = check_compressor(compressor)
        self.frames = frames == "raw"
        self.final_path = self.shards_dir / f"{name}{SUFFIX}"
        self.tmp_path = self.shards_dir / f".tmp-{name}{SUFFIX}"
        # Encoded records wait in memory and are written at close: writing a zarr shard row by row
        # would rewrite the whole shard file on every row. Memory = records x encoded record size.
        self._rows: list[dict[str, np.ndarray]] = []
        self._meta: list[dict[str, Any]] = []
        self._mode: str | None = None
        self._keys: set[tuple[str, int]] = set()
        self._closed = False

    def add(self, record: TargetRecord) -> None:
        """Validate and encode one record; raise :class:`RecordError` if it does not fit the shard."""
        if self._closed:
            raise RuntimeError(f"shard writer {self.name} is closed")
        check_new_key(record, self._keys)
        arrays = record_arrays(record, self.codec, self.frames)
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
        self._mode = record.mode
        self._rows.append(arrays)
        self._meta.append(record.describe(self.codec_name, self.compressor))
        self._keys.add((record.clip_id, int(record.view_index)))

    def close(self) -> dict[str, Any]:
        """Write the shard under its temporary name, fsync, rename to the final name.

        Returns:
            ``{"name", "path", "num_records", "nbytes", "records"}``.
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
        }

    def _attributes(self, records: list) -> dict[str, Any]:
        return {
            "umt_distill_format": FORMAT_VERSION,
            "layout": "zarr",
            "codec": self.codec_name,
            "compressor": self.compressor,
            "mode": self._mode or "full",
            "frames": "raw" if self.frames else "none",
            "records": records,
            "views": [m["view"] for m in self._meta],
            "frames_digests": [m["frames_digest"] for m in self._meta],
        }

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

    def abort(self) -> None:
        """Drop buffered records and remove temporary files; the final name is never touched."""
        self._closed = True
        self._rows.clear()
        shutil.rmtree(self.tmp_path, ignore_errors=True)


class ZarrShardReader:
    """Random access to the records of one zarr shard group (opened once, read row by row)."""

    def __init__(self, path: str, expected_records: list | None = None) -> None:
        import zarr

        self.path = path
        try:
            group = zarr.open_group(path, mode="r", zarr_format=3)
            attrs = dict(group.attrs)
        except Exception as e:  # missing dir, unreadable or invalid zarr.json
            raise StoreDamagedError(path, f"cannot open the shard's zarr group: {type(e).__name__}: {e}") from e
        try:
            self.codec: Codec = get_codec(attrs["codec"])
            self.mode = attrs["mode"]
            self.records = [(str(c), int(v)) for c, v in attrs["records"]]
            self.views = attrs["views"]
            self.digests = attrs["frames_digests"]
            has_frames = attrs["frames"] == "raw"
        except Exception as e:
            raise StoreDamagedError(f"{path}/zarr.json", f"bad shard attributes: {type(e).__name__}: {e}") from e
        if expected_records is not None and [tuple(r) for r in expected_records] != self.records:
            raise StoreDamagedError(path, "the shard's records differ from index.json")
        n = len(self.records)
        self.arrays = {}
        for name in stored_names(self.codec, self.mode, has_frames):
            try:
                arr = group[name]
                initialized = arr.nchunks_initialized
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
            self.arrays[name] = arr

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
            try:
                arrays[name] = self.arrays[name][row]
            except Exception as e:  # checksum mismatch, truncated shard file, decompression error
                raise StoreDamagedError(self.shard_file(name), f"row {row}: {type(e).__name__}: {e}") from e
        clip_id, view_index = self.records[row]
        meta = {
            "clip_id": clip_id,
            "view_index": view_index,
            "view": self.views[row],
            "frames_digest": self.digests[row],
            "mode": self.mode,
            "codec": self.codec.name,
        }
        return meta, arrays

    def read(self, row: int) -> TargetRecord:
        """Read and decode one record (one chunk per array)."""
        meta, arrays = self.read_stored(row)
        try:
            return record_from_arrays(meta, arrays, self.codec)
        except (KeyError, ValueError, TypeError) as e:
            raise StoreDamagedError(self.path, f"row {row}: cannot rebuild the record: {type(e).__name__}: {e}") from e
