"""Cache stores: per-shard writers, the store index, and readers that give back :class:`TargetRecord`.

Two layouts share one record model (``record.py``) and one codec set (``codecs.py``):

- ``zarr`` (``zarr_store.py``): random access by (clip id, view index);
- ``wds`` (``wds_store.py``): tar shards streamed sequentially, split by node and worker.

The pipeline opens one writer per work shard (:func:`open_shard_writer`), closes it when the shard's
clips are done (temporary name, fsync, rename), and at the end records every finished shard in
``index.json`` (:func:`write_index`). :class:`CacheReader` reads any store through that index.
The on-disk format is specified in ``cache/FORMAT.md``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from umt_distill import storage
from umt_distill.cache import wds_store, zarr_store
from umt_distill.cache.basis import codec_for_store
from umt_distill.cache.codecs import Codec
from umt_distill.cache.record import StoreDamagedError, TargetRecord
from umt_distill.cache.wds_store import (
    WdsRecords,
    WdsShardWriter,
    iter_tar_records,
    iter_tar_samples,
    stored_sample_arrays,
)
from umt_distill.cache.zarr_store import ZarrShardReader, ZarrShardWriter, read_stored_many
from umt_distill.io import atomic_write_json
from umt_distill.registry import STORES

__all__ = [
    "CacheReader",
    "INDEX_FORMAT",
    "ShardWriter",
    "init_store_root",
    "open_shard_writer",
    "read_index",
    "shard_path",
    "wds_records",
    "write_index",
]

INDEX_FORMAT = 2
READABLE_INDEX_FORMATS = (1, 2)  # 1: wds shards without epoch-slot groups (read whole; see FORMAT.md §8)
INDEX_FILE = "index.json"
SPEC_FILE = "spec.json"
SHARDS_DIR = "shards"
_SUFFIX = {"zarr": zarr_store.SUFFIX, "wds": wds_store.SUFFIX}

STORES.register("zarr", ZarrShardWriter)
STORES.register("wds", WdsShardWriter)


class ShardWriter(Protocol):
    """Writes one work shard: ``add`` records, then ``close`` (atomic) or ``abort``."""

    def add(self, record: TargetRecord) -> None: ...

    def close(self) -> dict[str, Any]: ...

    def abort(self) -> None: ...


def open_shard_writer(
    layout: str,
    shards_dir: str | Path,
    name: str,
    codec: str | Codec,
    compressor: str = "zstd",
    frames: str = "none",
    **options: Any,
) -> ShardWriter:
    """Open a writer for shard ``name`` (e.g. ``shard-000003``) of a store's ``shards/`` directory.

    Args:
        layout: ``"zarr"`` or ``"wds"``.
        shards_dir: ``<root>/shards``.
        name: Shard name; the data lands at ``<name>.zarr`` / ``<name>.tar`` on close.
        codec: Token codec name (``fp32``, ``fp16``, ``bf16``, ``int8``, ``int4``), or a codec object
            (``pca<r>`` needs one bound to the store's basis: ``cache.basis.codec_for_store``).
        compressor: ``zstd``, ``blosc`` or ``none``.
        frames: Keep the view pixels: ``none``, ``raw`` or ``jpeg`` (both layouts).
        **options: Layout-specific options, e.g. ``jpeg_quality=95`` for wds.
    """
    writer_cls = STORES.get(layout)
    name_of = codec.name if isinstance(codec, Codec) else codec
    writer = writer_cls(Path(shards_dir), name, name_of, compressor, frames, **options)
    if isinstance(codec, Codec):
        writer.codec = codec  # the writers look codecs up by name; a bound codec carries the store's state
    return writer


def shard_path(root: str | Path, layout: str, name: str) -> str:
    """Path or URL of a shard's data: ``<root>/shards/<name>.zarr`` or ``.tar``."""
    STORES.get(layout)
    return f"{str(root).rstrip('/')}/{SHARDS_DIR}/{name}{_SUFFIX[layout]}"


def init_store_root(root: str | Path, layout: str, attrs: dict[str, Any]) -> None:
    """Create ``<root>/shards`` and, for zarr, the root and ``shards`` group metadata.

    With it ``zarr.open_group(root)["shards"]["shard-000000.zarr"]`` works with plain zarr. Calling it
    again (a resumed run) keeps existing shards and updates the root attributes.
    """
    STORES.get(layout)
    root = Path(root)
    (root / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    if layout == "zarr":
        import zarr

        group = zarr.open_group(str(root), mode="a", zarr_format=3)
        group.attrs.update({**attrs, "layout": layout})
        group.require_group(SHARDS_DIR)


def write_index(root: str | Path, layout: str, shard_infos: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Write ``<root>/index.json`` atomically from shard infos (``ShardWriter.close`` results or sidecars).

    Only ``name``, ``num_records``, ``nbytes`` and ``records`` are kept; shards are sorted by name so the
    index does not depend on which rank finished first.

    Returns:
        The index written.
    """
    STORES.get(layout)
    shards, seen = [], set()
    for info in sorted(shard_infos, key=lambda s: s["name"]):
        if info["name"] in seen:
            raise ValueError(f"shard {info['name']} listed twice")
        seen.add(info["name"])
        records = [[str(c), int(v)] for c, v in info["records"]]
        if len(records) != info["num_records"]:
            raise ValueError(f"shard {info['name']}: num_records {info['num_records']} but {len(records)} records")
        entry = {"name": info["name"], "num_records": len(records), "nbytes": int(info["nbytes"]), "records": records}
        if "groups" in info:  # wds: the byte range of each epoch slot's samples
            groups = [{k: int(g[k]) for k in ("offset", "nbytes", "num_records")} for g in info["groups"]]
            if sum(g["num_records"] for g in groups) != len(records):
                raise ValueError(f"shard {info['name']}: its groups hold {sum(g['num_records'] for g in groups)} "
                                 f"records, it has {len(records)}")
            entry["groups"] = groups
        shards.append(entry)
    index = {"format": INDEX_FORMAT, "layout": layout, "shards": shards}
    atomic_write_json(Path(root) / INDEX_FILE, index)
    return index


def _read_json(root: str, name: str) -> Any:
    path = f"{root}/{name}"
    try:
        return json.loads(storage.read_text(path))  # a URL: retried; a network fault is storage.NetworkError
    except FileNotFoundError as e:
        hint = " (the store is incomplete: cache-teacher has not finished)" if name == INDEX_FILE else ""
        raise StoreDamagedError(path, f"missing{hint}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreDamagedError(path, f"not valid JSON: {e}") from e


def read_index(root: str | Path) -> dict[str, Any]:
    """Read and check ``<root>/index.json``; problems raise :class:`StoreDamagedError`."""
    root = str(root).rstrip("/")
    index = _read_json(root, INDEX_FILE)
    path = f"{root}/{INDEX_FILE}"
    try:
        if index["format"] not in READABLE_INDEX_FORMATS:
            raise StoreDamagedError(path, f"index format {index['format']}, this reader knows "
                                          f"{', '.join(map(str, READABLE_INDEX_FORMATS))}: upgrade umt-distill")
        STORES.get(index["layout"])
        for s in index["shards"]:
            if len(s["records"]) != s["num_records"]:
                raise StoreDamagedError(path, f"shard {s['name']}: num_records disagrees with its records")
    except (KeyError, TypeError) as e:
        raise StoreDamagedError(path, f"malformed index: {type(e).__name__}: {e}") from e
    return index


class CacheReader:
    """Reads a finished store through ``spec.json`` + ``index.json``; both layouts give :class:`TargetRecord`.

    Zarr shards are opened lazily on first access and kept open; ``get`` reads one chunk per array.
    WebDataset stores support ``get`` by scanning the record's tar (slow; stream with
    :func:`wds_records` for training).

    Args:
        root: Store directory, or an fsspec URL for zarr stores.

    Attributes:
        spec: The parsed ``spec.json``.
        layout: ``"zarr"`` or ``"wds"``.
        keys: Every ``(clip_id, view_index)`` in index order.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = str(root).rstrip("/")
        self.spec: dict[str, Any] = _read_json(self.root, SPEC_FILE)
        index = read_index(self.root)
        self.layout: str = index["layout"]
        self.shards: dict[str, dict[str, Any]] = {s["name"]: s for s in index["shards"]}
        self.keys: list[tuple[str, int]] = []
        self._where: dict[tuple[str, int], tuple[str, int]] = {}
        for s in index["shards"]:
            for row, (clip_id, view_index) in enumerate(s["records"]):
                key = (str(clip_id), int(view_index))
                if key in self._where:
                    raise StoreDamagedError(f"{self.root}/{INDEX_FILE}", f"record {key} listed twice")
                self._where[key] = (s["name"], row)
                self.keys.append(key)
        self._zarr: dict[str, ZarrShardReader] = {}
        self._codec: Codec | None = None

    @property
    def codec(self) -> Codec:
        """The store's codec, bound to its basis for ``pca<r>`` (refuses a missing or replaced basis)."""
        if self._codec is None:
            self._codec = codec_for_store(self.root, self.spec)
        return self._codec

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers started by spawn get a copy without open handles; each opens its own.
        return {**self.__dict__, "_zarr": {}, "_codec": None}

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def shard_path(self, name: str) -> str:
        return shard_path(self.root, self.layout, name)

    def _zarr_shard(self, name: str) -> ZarrShardReader:
        shard = self._zarr.get(name)
        if shard is None:
            shard = ZarrShardReader(self.shard_path(name), self.shards[name]["records"])
            if shard.codec.needs_basis:  # the shard knows its codec by name only; the basis is the store's
                shard.codec = self.codec
            self._zarr[name] = shard
        return shard

    def get(self, clip_id: str, view_index: int) -> TargetRecord:
        """The record of ``(clip_id, view_index)``; ``KeyError`` if the store has none."""
        try:
            name, row = self._where[(clip_id, int(view_index))]
        except KeyError:
            raise KeyError(f"{self.root}: no record for clip {clip_id!r} view {view_index}") from None
        if self.layout == "zarr":
            return self._zarr_shard(name).read(row)
        for i, record in enumerate(self.iter_shard(name)):
            if i == row:
                return record
        raise StoreDamagedError(self.shard_path(name), f"ended before row {row}")  # unreachable: count is checked

    def get_stored(self, clip_id: str, view_index: int, frames: bool = False) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(description, stored arrays)`` of one record, for training: codec parts undecoded, no ``pooled``.

        Args:
            frames: Also read the view pixels (``frames``, uint8 [T, 3, H, W]; JPEGs decoded).
        """
        try:
            name, row = self._where[(clip_id, int(view_index))]
        except KeyError:
            raise KeyError(f"{self.root}: no record for clip {clip_id!r} view {view_index}") from None
        if self.layout == "zarr":
            return self.get_stored_many([(clip_id, view_index)], frames)[0]
        for i, sample in enumerate(iter_tar_samples(self.shard_path(name), self.shards[name]["records"])):
            if i == row:
                return stored_sample_arrays(sample, frames)
        raise StoreDamagedError(self.shard_path(name), f"ended before row {row}")  # unreachable: count is checked

    def get_stored_many(self, keys: Sequence[tuple[str, int]], frames: bool = False) -> list[tuple[dict[str, Any], dict[str, np.ndarray]]]:
        """:meth:`get_stored` of many records; a zarr store reads them all in one call into zarr's event
        loop (its chunks fetched and decoded concurrently), not one call per array and record."""
        if self.layout != "zarr":
            return [self.get_stored(c, v, frames) for c, v in keys]
        requests = []
        for clip_id, view_index in keys:
            try:
                name, row = self._where[(clip_id, int(view_index))]
            except KeyError:
                raise KeyError(f"{self.root}: no record for clip {clip_id!r} view {view_index}") from None
            requests.append((self._zarr_shard(name), row))

        def names_of(shard: ZarrShardReader) -> list[str]:
            return [n for n in shard.arrays if n != "pooled" and (frames or not n.startswith("frames"))]

        return read_stored_many(requests, names_of)

    def iter_shard(self, name: str) -> Iterator[TargetRecord]:
        """The records of shard ``name`` in order."""
        if name not in self.shards:
            raise KeyError(f"{self.root}: no shard {name!r} in {INDEX_FILE}")
        if self.layout == "zarr":
            shard = self._zarr_shard(name)
            for row in range(len(shard)):
                yield shard.read(row)
        else:
            yield from iter_tar_records(self.shard_path(name), self.shards[name]["records"], self.codec)

    def __iter__(self) -> Iterator[TargetRecord]:
        for name in self.shards:
            yield from self.iter_shard(name)


def wds_records(
    root_or_urls: str | Path | Sequence[str],
    shuffle: int = 0,
    split_by_node: bool = True,
    split_by_worker: bool = True,
    *,
    seed: int = 0,
    epoch: int = 0,
) -> WdsRecords:
    """Stream a WebDataset store's records as a torch ``IterableDataset``.

    Args:
        root_or_urls: A store root (its ``index.json`` lists the shards and their record counts, which
            are checked), a brace pattern (``.../shard-{000000..000009}.tar``) or a list of tar URLs.
        shuffle: Shuffle buffer size in samples (0 = store order, no shard shuffling either).
        split_by_node: Give each rank (``RANK``/``WORLD_SIZE`` or torch.distributed) every
            world-size-th shard.
        split_by_worker: Likewise across DataLoader workers.
        seed: Seed of the shard order and shuffle buffer.
        epoch: Initial epoch (see ``WdsRecords.set_epoch``).
    """
    from webdataset.shardlists import expand_urls

    if isinstance(root_or_urls, (list, tuple)):
        shards = [(str(u), None) for u in root_or_urls]
    else:
        text = str(root_or_urls)
        if text.endswith(wds_store.SUFFIX) or "{" in text:
            shards = [(u, None) for u in expand_urls(text)]
        else:
            root = text.rstrip("/")
            index = read_index(root)
            if index["layout"] != "wds":
                raise ValueError(f"{root}: layout {index['layout']!r}; wds_records streams 'wds' stores")
            shards = [(shard_path(root, "wds", s["name"]), s["records"]) for s in index["shards"]]
    return WdsRecords(shards, shuffle, split_by_node, split_by_worker, seed=seed, epoch=epoch)
