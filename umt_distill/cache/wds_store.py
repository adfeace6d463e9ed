"""WebDataset layout: one tar per work shard, one sample per (clip, view), grouped by epoch slot.

A shard's samples are grouped by *epoch slot* (``data.views.epoch_slot``): group ``g`` holds the one
view of each clip that epochs ``e ≡ g (mod K)`` train on. The index records each group's byte range,
so an epoch streams one contiguous range per shard, exactly the bytes it trains on (format 2; format
1 tars hold the views in clip order and must be read whole). The tar itself stays a standard tar that
plain ``webdataset`` reads from start to end.

A sample's files share a key ``<shard>_<group:03d>_<row:06d>`` (``shard-000003_002_000017``; row
within the group). WebDataset splits a file name at the first dot of its base name into key and
extension, so keys never contain dots; the clip id, which may contain anything, travels in
``view.json``. See ``cache/FORMAT.md``.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from umt_distill import storage
from umt_distill.cache.codecs import (
    Codec,
    check_compressor,
    compress_bytes,
    compressor_from_suffix,
    decompress_bytes,
    entry_suffix,
    get_codec,
)
from umt_distill.cache.record import (
    CodecErrorTally,
    StoreDamagedError,
    TargetRecord,
    check_new_key,
    record_arrays,
    record_from_arrays,
    record_jpegs,
    stored_names,
)
from umt_distill.cache.wds_stream import (
    BatchAssembler,
    check_entry,
    check_jpegs,
    check_npy,
    entry_checksum,
    entry_limit,
    iter_range_samples,
    npy_array,
    parse_meta,
    seal_meta,
)
from umt_distill.data.jpeg import decode_jpegs
from umt_distill.data.views import epoch_slot
from umt_distill.io import fsync_dir

FORMAT_VERSION = 2
SUFFIX = ".tar"
FRAME_MODES = ("none", "jpeg", "raw")
# A fixed member mtime makes the same records produce byte-identical tars (2001-09-09; 0 would make
# GNU tar warn about an "implausibly old time stamp").
_MTIME = 1_000_000_000
_BLOCK = 512
_END_OF_ARCHIVE = b"\0" * (2 * _BLOCK)


def sample_key(shard: str, group: int, row: int) -> str:
    """WebDataset key of the ``row``-th sample of a shard's ``group``: unique across shards, no dots."""
    return f"{shard}_{group:03d}_{row:06d}"


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def tar_member(name: str, data: bytes) -> bytes:
    """One ustar member: header (mode 0444, owner ``bigdata``, fixed mtime) + data + padding to 512."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), _MTIME, 0o444
    info.uname = info.gname = "bigdata"
    return info.tobuf(format=tarfile.USTAR_FORMAT) + bytes(data) + b"\0" * (-len(data) % _BLOCK)


class WdsShardWriter:
    """WebDataset: one tar per shard, one sample per clip-view, grouped by epoch slot.

    Samples go to one temporary part file per group as they arrive; ``close`` concatenates the parts
    into the shard's tar (so memory stays at one sample, whatever the shard size).

    Args:
        num_views: K, the views per clip (the number of groups); ``None``: one group, samples in
            arrival order (a tar that training must read whole).
        view_seed: The seed of the store's view rotation (``data.views.epoch_slot``); the pipeline
            passes the recipe seed, which also drew the views.
    """

    def __init__(
        self,
        shards_dir: str | Path,
        name: str,
        codec: str,
        compressor: str = "zstd",
        frames: str = "none",
        jpeg_quality: int = 95,
        num_views: int | None = None,
        view_seed: int = 0,
    ) -> None:
        if frames not in FRAME_MODES:
            raise ValueError(f"frames must be one of {', '.join(FRAME_MODES)}, not {frames!r}")
        if num_views is not None and num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {num_views}")
        self.shards_dir, self.name = Path(shards_dir), name
        self.codec_name, self.codec = codec, get_codec(codec)
        self.compressor = check_compressor(compressor)
        self.frames, self.jpeg_quality = frames, jpeg_quality
        self.num_views, self.view_seed = num_views, view_seed
        self.num_groups = 1 if num_views is None else num_views
        self.final_path = self.shards_dir / f"{name}{SUFFIX}"
        self.tmp_path = self.shards_dir / f".tmp-{name}{SUFFIX}"
        # Part files are opened on first use; "wb" truncates what a crashed earlier attempt left.
        self._parts: dict[int, Any] = {}
        self._records: list[list[list]] = [[] for _ in range(self.num_groups)]  # per group, in write order
        self._keys: set[tuple[str, int]] = set()
        self._error = CodecErrorTally()
        self._closed = False

    def _part_path(self, group: int) -> Path:
        return self.shards_dir / f".tmp-{self.name}.g{group:03d}"

    def group_of(self, record: TargetRecord) -> int:
        if self.num_views is None:
            return 0
        if record.view_index >= self.num_views:
            raise ValueError(f"record {record.clip_id!r} view {record.view_index}: the store has {self.num_views} views")
        return epoch_slot(self.view_seed, record.clip_id, int(record.view_index), self.num_views)

    def add(self, record: TargetRecord) -> None:
        """Validate, encode and append one sample to its group's part file."""
        if self._closed:
            raise RuntimeError(f"shard writer {self.name} is closed")
        check_new_key(record, self._keys)
        group = self.group_of(record)
        entries: dict[str, bytes] = {}
        sfx = entry_suffix(self.compressor)
        arrays = record_arrays(record, self.codec, frames=self.frames == "raw")
        self._error.add(self.codec, record.tokens, arrays)
        for name, arr in arrays.items():
            entries[f"{name}.npy{sfx}"] = compress_bytes(self.compressor, _npy_bytes(arr), arr.dtype.itemsize)
        if self.frames == "jpeg":
            for t, data in enumerate(record_jpegs(record, self.jpeg_quality)):
                entries[f"frame{t:03d}.jpg"] = data
        # Tar checksums cover headers only; a CRC-32C per entry turns flipped data bits into an error
        # whatever the compressor (the zarr layout has CRC32C per chunk for the same reason).
        meta = record.describe(self.codec_name, self.compressor) | {
            "frames": self.frames,
            "group": group,
            "crc32c": {entry: entry_checksum(data) for entry, data in entries.items()},
        }
        entries["view.json"] = seal_meta(meta)  # its own CRC-32C inside: every byte a reader uses is checked
        key = sample_key(self.name, group, len(self._records[group]))
        part = self._parts.get(group)
        if part is None:
            part = self._parts[group] = open(self._part_path(group), "wb")
        part.write(b"".join(tar_member(f"{key}.{entry}", entries[entry]) for entry in sorted(entries)))
        self._records[group].append([record.clip_id, int(record.view_index)])
        self._keys.add((record.clip_id, int(record.view_index)))

    def close(self) -> dict[str, Any]:
        """Concatenate the groups into the tar, fsync, rename to the final name; return the shard info.

        Returns:
            ``{"name", "path", "num_records", "nbytes", "records", "groups", "codec_error"}``; ``records``
            in tar order (group 0's samples first), ``groups[g] = {"offset", "nbytes", "num_records"}`` the
            byte range of group ``g``'s samples in the tar, ``codec_error`` the codec's worst
            reconstruction error over the shard's records (``record.CodecErrorTally``).
        """
        if self._closed:
            raise RuntimeError(f"shard writer {self.name} is closed")
        self._closed = True
        groups, records = [], []
        try:
            with open(self.tmp_path, "wb") as out:
                for g in range(self.num_groups):
                    offset = out.tell()
                    part = self._parts.pop(g, None)
                    if part is not None:
                        part.close()
                        with open(self._part_path(g), "rb") as src:
                            shutil.copyfileobj(src, out, 1 << 22)
                        self._part_path(g).unlink()
                    groups.append({"offset": offset, "nbytes": out.tell() - offset, "num_records": len(self._records[g])})
                    records += self._records[g]
                out.write(_END_OF_ARCHIVE)
                out.write(b"\0" * (-out.tell() % tarfile.RECORDSIZE))  # tar's 10 KiB record, as tarfile pads
                out.flush()
                os.fsync(out.fileno())
            nbytes = os.path.getsize(self.tmp_path)
            os.replace(self.tmp_path, self.final_path)
            fsync_dir(self.shards_dir)
        except BaseException:
            self._discard()
            raise
        return {
            "name": self.name,
            "path": str(self.final_path),
            "num_records": len(records),
            "nbytes": nbytes,
            "records": records,
            "groups": groups,
            "codec_error": self._error.as_dict(),
        }

    def abort(self) -> None:
        """Close and delete the temporary files; the final name is never touched."""
        self._closed = True
        self._discard()

    def _discard(self) -> None:
        for g, part in list(self._parts.items()):
            part.close()
        self._parts.clear()
        for g in range(self.num_groups):
            self._part_path(g).unlink(missing_ok=True)
        self.tmp_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# reading


def iter_tar_samples(url: str, expected_records: list | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples (entry name -> bytes) of one tar, in order; damage raises :class:`StoreDamagedError`.

    Args:
        url: Local path or any URL ``webdataset.gopen`` opens (``http://``, ``pipe:`` ...).
        expected_records: ``[[clip_id, view_index], ...]`` from ``index.json``. A tar cut at a member
            boundary still parses cleanly, so the count is the only way to notice it.
    """
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_expander

    count = 0
    try:
        # A URL is fetched whole first (retried; a network fault is storage.NetworkError, never tar damage).
        stream = io.BytesIO(storage.fetch_range(url)) if storage.is_url(url) else wds.gopen(url)
        try:
            for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}], eof_value=None)):
                count += 1
                yield sample
        finally:
            stream.close()
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        detail = e.args[0] if e.args else e  # webdataset appends stream objects to args; keep the message
        where = _locate_tar_damage(url)  # the byte offset, which tarfile does not say
        raise StoreDamagedError(url, f"unreadable tar after {count} samples: {type(e).__name__}: {detail}"
                                     + (f" ({where})" if where else "")) from e
    if expected_records is not None and count != len(expected_records):
        raise StoreDamagedError(url, f"{count} samples, index.json lists {len(expected_records)} (truncated tar?)")


def _locate_tar_damage(url: str) -> str | None:
    """Where a tar that ``tarfile`` refused is damaged (``byte N: ...``), found by walking its headers."""
    if url.startswith("pipe:"):
        return None
    try:
        for _ in iter_range_samples(url):
            pass
    except StoreDamagedError as e:
        return e.reason
    except Exception:
        return None
    return None


def decode_sample(sample: dict[str, Any], codec: Codec | None = None,
                  layout: dict[str, tuple[np.dtype, tuple[int, ...]]] | None = None) -> TargetRecord:
    """Decode one raw WebDataset sample of this layout into a float32 :class:`TargetRecord`.

    Args:
        codec: The store's codec object when it carries store-level state (``pca<r>``, bound to the
            basis: ``CacheReader.codec``); by default the one ``view.json`` names.
        layout: The store's ``record.record_layout(spec, "wds")``: entries are checked against it and
            their decoded sizes bounded by it (``None``: only the general cap).
    """
    where = f"{sample.get('__url__', '?')}"
    key = sample.get("__key__", "?")
    entries = {k: v for k, v in sample.items() if not k.startswith("__")}
    meta = parse_meta(where, key, entries)  # checks view.json's own checksum and its fields
    try:
        if codec is None or codec.name != meta["codec"]:
            codec = get_codec(meta["codec"])
        frames_mode = meta.get("frames", "none")
    except Exception as e:
        raise StoreDamagedError(where, f"sample {key}: bad view.json: {type(e).__name__}: {e}") from e
    arrays: dict[str, np.ndarray] = {}
    jpegs = []
    for entry, data in entries.items():
        if entry == "view.json":
            continue
        if not check_entry(meta, entry, data):
            raise StoreDamagedError(where, f"sample {key}: entry {entry}: checksum mismatch (CRC32C; corrupted data)")
        try:
            if ".npy" in entry:
                name = entry.split(".npy")[0]
                raw = decompress_bytes(compressor_from_suffix(entry), data, entry_limit(layout, name))
                arrays[name] = npy_array(raw).copy()  # a writable array, as np.load gives
                check_npy(arrays[name], layout, name)
            elif entry.endswith(".jpg"):
                jpegs.append((entry, data))
        except Exception as e:
            raise StoreDamagedError(where, f"sample {key}: entry {entry}: {type(e).__name__}: {e}") from e
    missing = set(stored_names(codec, meta.get("mode", "full"), frames_mode == "raw")) - arrays.keys()
    if missing:
        raise StoreDamagedError(where, f"sample {key}: missing entries {sorted(missing)}")
    if frames_mode == "jpeg":
        jpegs.sort()
        arrays["frames"] = _decode_jpegs(jpegs, where, key, (meta.get("view") or {}).get("size"))
    try:
        record = record_from_arrays(meta, arrays, codec)
        if frames_mode == "jpeg":
            record.frames_jpeg = tuple(bytes(data) for _, data in jpegs)
        return record
    except (KeyError, ValueError, TypeError) as e:
        raise StoreDamagedError(where, f"sample {key}: cannot rebuild the record: {type(e).__name__}: {e}") from e


def _decode_jpegs(entries: list[tuple[str, bytes]], where: str, key: str, size=None) -> np.ndarray:
    if not entries:
        raise StoreDamagedError(where, f"sample {key}: frames were stored as jpeg but none are present")
    try:
        check_jpegs([data for _, data in entries], size)  # the dimensions a decoder would allocate
        return np.ascontiguousarray(decode_jpegs([data for _, data in entries]).numpy())  # [T, 3, H, W]
    except ValueError as e:
        raise StoreDamagedError(where, f"sample {key}: jpeg frames: {e}") from e


def stored_sample_arrays(sample: dict[str, Any], frames: bool = False) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One raw sample's description and stored arrays (codec parts undecoded; JPEG frames decoded)."""
    where, key = str(sample.get("__url__", "?")), str(sample.get("__key__", "?"))
    entries = {k: v for k, v in sample.items() if not k.startswith("__")}
    meta = parse_meta(where, key, entries)
    assembler = BatchAssembler(1, epoch=None, frames="array" if frames else None)  # all M masks: the caller picks
    assembler.add(where, key, entries, meta)
    batch = assembler.finish()
    arrays = {k: v[0].numpy() for k, v in batch.items() if k not in ("clip_id", "view_index")}
    if "pixels" in arrays:
        arrays["frames"] = arrays.pop("pixels")
    return meta, arrays


def iter_tar_records(url: str, expected_records: list | None = None, codec: Codec | None = None) -> Iterator[TargetRecord]:
    """Decoded records of one tar, in order, checked against ``expected_records`` when given
    (``codec``: see :func:`decode_sample`)."""
    for row, sample in enumerate(iter_tar_samples(url, expected_records)):
        record = decode_sample(sample, codec)
        if expected_records is not None and [record.clip_id, record.view_index] != list(expected_records[row]):
            got = f"{record.clip_id!r} view {record.view_index}"
            raise StoreDamagedError(url, f"sample {row} is {got}, index.json says {expected_records[row]}")
        yield record


def group_problem(url: str, shard: dict[str, Any], num_views: int, seed: int) -> str | None:
    """What is wrong with a shard's epoch-slot byte ranges (``index.json`` or sidecar ``groups``), from
    the numbers alone: they must be contiguous from byte 0, end before the end-of-archive blocks, and
    each list the records of its slot. None if nothing (or a format-1 shard, read whole)."""
    groups = shard.get("groups")
    if groups is None:
        return None
    where = f"{url} (index.json groups)"
    if len(groups) != num_views:
        return f"{where}: {len(groups)} epoch-slot groups, the store has {num_views} views"
    at, start = 0, 0
    for g, group in enumerate(groups):
        if group["offset"] != at or group["nbytes"] < 0 or group["num_records"] < 0:
            return f"{where}: group {g} starts at byte {group['offset']}, the previous group ends at byte {at}"
        at += group["nbytes"]
        for clip, k in shard["records"][start : start + group["num_records"]]:
            slot = epoch_slot(seed, clip, int(k), num_views)
            if slot != g:
                return f"{where}: group {g} lists {clip!r} view {k}, whose epoch slot is {slot}"
        start += group["num_records"]
    if start != shard["num_records"]:
        return f"{where}: the groups hold {start} records, the shard {shard['num_records']}"
    if at + len(_END_OF_ARCHIVE) > shard["nbytes"]:
        return f"{where}: the groups end at byte {at}, past the tar's data (it has {shard['nbytes']} bytes)"
    return None


def read_groups(url: str, shard: dict[str, Any], codec: Codec | None = None,
                layout: dict[str, tuple[np.dtype, tuple[int, ...]]] | None = None,
                seen: dict[tuple[str, int], str] | None = None) -> str | None:
    """Read a shard as training reads it and say what is wrong, or None: each epoch slot's byte range on
    its own (a format-1 tar whole), every sample the record the shard lists at its place (key, clip,
    view, slot) and held once (``seen``: records already read, from other shards too), its view.json
    checksum and every entry checked and decoded; after the last group only the end of the archive."""
    seen = {} if seen is None else seen
    grouped = "groups" in shard
    groups = shard["groups"] if grouped else [{"offset": 0, "nbytes": None, "num_records": shard["num_records"]}]
    start = 0
    try:
        for g, group in enumerate(groups):
            expected = shard["records"][start : start + group["num_records"]]
            count = 0
            for row, (key, entries) in enumerate(iter_range_samples(url, group["offset"], group["nbytes"])):
                meta = parse_meta(url, key, entries)  # view.json's own checksum
                record = (meta["clip_id"], int(meta["view_index"]))
                if record in seen:
                    return (f"{url}: sample {key} repeats {record[0]!r} view {record[1]} of sample {seen[record]}: "
                            "a duplicated record (training would show it twice)")
                seen[record] = key
                want_key = sample_key(shard["name"], g, row) if grouped else None
                want = expected[row] if row < len(expected) else None
                if (want_key is not None and key != want_key) or want is None or list(record) != list(want):
                    return (f"{url}: sample {key} holds {record[0]!r} view {record[1]}, index.json lists {want} "
                            f"as sample {want_key or row}")
                if grouped and meta.get("group") != g:
                    return f"{url}: sample {key} is in epoch slot {meta.get('group')}, its byte range is group {g}'s"
                decode_sample({"__url__": url, "__key__": key, **entries}, codec, layout)
                count += 1
            if count != group["num_records"]:
                return (f"{url}: group {g} (bytes {group['offset']}+{group['nbytes']}) holds {count} of the "
                        f"{group['num_records']} samples index.json lists for it")
            start += group["num_records"]
    except StoreDamagedError as e:
        return str(e)
    if grouped:
        end = sum(g["nbytes"] for g in groups)
        if storage.is_url(url):
            want = min(tarfile.RECORDSIZE + len(_END_OF_ARCHIVE), max(0, storage.size(url) - end))
            tail = storage.fetch_ranges(url, [(end, end + want)])[(end, end + want)] if want else b""
        else:
            with open(url, "rb") as f:
                f.seek(end)
                tail = f.read(tarfile.RECORDSIZE + len(_END_OF_ARCHIVE))
        if len(tail) < len(_END_OF_ARCHIVE) or tail.count(0) != len(tail):
            return f"{url}: byte {end}: after the last group the tar must end (zero blocks), it holds other bytes"
    return None


def _worker_info() -> tuple[int, int, int, int]:
    from webdataset.utils import pytorch_worker_info

    return pytorch_worker_info()  # (rank, world_size, worker, num_workers): env, torch.distributed, DataLoader


try:
    from torch.utils.data import IterableDataset as _IterableDataset
except ImportError:  # pragma: no cover - torch is a hard dependency; this keeps the reader importable alone
    _IterableDataset = object  # type: ignore[assignment,misc]


class WdsRecords(_IterableDataset):
    """Streams :class:`TargetRecord` from WebDataset shards, split by node and worker, optionally shuffled.

    Shuffling is deterministic: the shard order depends on ``(seed, epoch)`` (the same on every rank,
    before the split), the sample buffer on ``(seed, epoch, rank, worker)``. Call :meth:`set_epoch`
    before each epoch for a new order. Python's ``random.Random`` is used because WebDataset's shuffle
    buffer takes one; it is seeded explicitly from those integers, never from global state.
    """

    def __init__(
        self,
        shards: list[tuple[str, list | None]],
        shuffle: int = 0,
        split_by_node: bool = True,
        split_by_worker: bool = True,
        seed: int = 0,
        epoch: int = 0,
    ) -> None:
        self.shards, self.shuffle = shards, shuffle
        self.split_by_node, self.split_by_worker = split_by_node, split_by_worker
        self.seed, self.epoch = seed, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[TargetRecord]:
        import webdataset as wds

        shards: Iterable[tuple[str, list | None]] = list(self.shards)
        if self.shuffle:
            random.Random(f"shards:{self.seed}:{self.epoch}").shuffle(shards)  # type: ignore[arg-type]
        if self.split_by_node:
            shards = wds.split_by_node(shards)
        if self.split_by_worker:
            shards = wds.split_by_worker(shards)
        samples: Iterable[dict[str, Any]] = (s for url, expected in shards for s in iter_tar_samples(url, expected))
        if self.shuffle:
            rank, _, worker, _ = _worker_info()
            rng = random.Random(f"samples:{self.seed}:{self.epoch}:{rank}:{worker}")
            # Shuffle the still-encoded samples: the buffer holds compressed bytes, not float32 arrays.
            samples = wds.shuffle(self.shuffle, initial=self.shuffle, rng=rng)(iter(samples))
        for sample in samples:
            yield decode_sample(sample)
