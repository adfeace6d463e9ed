"""WebDataset layout: one tar per work shard, one sample per (clip, view), streamed sequentially.

A sample's files share a key ``<shard>_<row>`` (``shard-000003_000017``). WebDataset splits a file name
at the first dot of its base name into key and extension, so keys never contain dots; the clip id,
which may contain anything, travels in ``view.json``. See ``cache/FORMAT.md``.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from umt_distill.cache.codecs import (
    check_compressor,
    compress_bytes,
    compressor_from_suffix,
    decompress_bytes,
    entry_suffix,
    get_codec,
)
from umt_distill.cache.record import (
    StoreDamagedError,
    TargetRecord,
    check_new_key,
    record_arrays,
    record_from_arrays,
    require_frames,
    stored_names,
)
from umt_distill.cache.zarr_store import fsync_dir

FORMAT_VERSION = 1
SUFFIX = ".tar"
FRAME_MODES = ("none", "jpeg", "raw")
# A fixed member mtime makes the same records produce byte-identical tars (2001-09-09; 0 would make
# GNU tar warn about an "implausibly old time stamp").
_MTIME = 1_000_000_000


def sample_key(shard: str, row: int) -> str:
    """WebDataset key of a shard's ``row``-th sample: unique across shards and free of dots."""
    return f"{shard}_{row:06d}"


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _jpeg_bytes(frame: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    # 4:4:4 (no chroma subsampling): the student should see colours as close as possible to what the
    # teacher saw; at quality 95, on the test frames, it costs ~25% more bytes and cuts the mean pixel
    # error ~3x.
    image = Image.fromarray(np.ascontiguousarray(frame.transpose(1, 2, 0)))  # [H, W, 3]
    image.save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


class WdsShardWriter:
    """WebDataset: one tar per shard, one sample per clip-view (sequential streaming, optional frames)."""

    def __init__(
        self,
        shards_dir: str | Path,
        name: str,
        codec: str,
        compressor: str = "zstd",
        frames: str = "none",
        jpeg_quality: int = 95,
    ) -> None:
        import webdataset as wds

        if frames not in FRAME_MODES:
            raise ValueError(f"frames must be one of {', '.join(FRAME_MODES)}, not {frames!r}")
        self.shards_dir, self.name = Path(shards_dir), name
        self.codec_name, self.codec = codec, get_codec(codec)
        self.compressor = check_compressor(compressor)
        self.frames, self.jpeg_quality = frames, jpeg_quality
        self.final_path = self.shards_dir / f"{name}{SUFFIX}"
        self.tmp_path = self.shards_dir / f".tmp-{name}{SUFFIX}"
        self._file = open(self.tmp_path, "wb")  # truncates what a crashed earlier attempt left
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=_MTIME)
        self._records: list[list] = []
        self._keys: set[tuple[str, int]] = set()
        self._closed = False

    def add(self, record: TargetRecord) -> None:
        """Validate, encode and append one sample to the temporary tar."""
        if self._closed:
            raise RuntimeError(f"shard writer {self.name} is closed")
        check_new_key(record, self._keys)
        entries: dict[str, bytes] = {}
        sfx = entry_suffix(self.compressor)
        for name, arr in record_arrays(record, self.codec, frames=self.frames == "raw").items():
            entries[f"{name}.npy{sfx}"] = compress_bytes(self.compressor, _npy_bytes(arr), arr.dtype.itemsize)
        if self.frames == "jpeg":
            for t, frame in enumerate(require_frames(record)):  # [3, H, W]
                entries[f"frame{t:03d}.jpg"] = _jpeg_bytes(frame, self.jpeg_quality)
        # Tar checksums cover headers only; a CRC32 per entry turns flipped data bits into an error
        # whatever the compressor (the zarr layout has CRC32C per chunk for the same reason).
        meta = record.describe(self.codec_name, self.compressor) | {
            "frames": self.frames,
            "crc32": {entry: zlib.crc32(data) for entry, data in entries.items()},
        }
        key = sample_key(self.name, len(self._records))
        self._tar.write({"__key__": key, "view.json": json.dumps(meta, sort_keys=True).encode(), **entries})
        self._records.append([record.clip_id, int(record.view_index)])
        self._keys.add((record.clip_id, int(record.view_index)))

    def close(self) -> dict[str, Any]:
        """Finish the tar, fsync, rename to the final name; return the shard info (see ``stores``)."""
        if self._closed:
            raise RuntimeError(f"shard writer {self.name} is closed")
        self._closed = True
        try:
            self._tar.close()  # writes the end-of-archive blocks
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            nbytes = os.path.getsize(self.tmp_path)
            os.replace(self.tmp_path, self.final_path)
            fsync_dir(self.shards_dir)
        except BaseException:
            self._discard()
            raise
        return {
            "name": self.name,
            "path": str(self.final_path),
            "num_records": len(self._records),
            "nbytes": nbytes,
            "records": self._records,
        }

    def abort(self) -> None:
        """Close and delete the temporary tar; the final name is never touched."""
        self._closed = True
        self._discard()

    def _discard(self) -> None:
        if not self._file.closed:
            try:  # close the tar stream first, or its finaliser later writes into a closed file
                self._tar.close()
            except Exception:  # e.g. the disk is full; the file is deleted below anyway
                pass
            self._file.close()
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
        stream = wds.gopen(url)
        try:
            for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}], eof_value=None)):
                count += 1
                yield sample
        finally:
            stream.close()
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        detail = e.args[0] if e.args else e  # webdataset appends stream objects to args; keep the message
        raise StoreDamagedError(url, f"unreadable tar after {count} samples: {type(e).__name__}: {detail}") from e
    if expected_records is not None and count != len(expected_records):
        raise StoreDamagedError(url, f"{count} samples, index.json lists {len(expected_records)} (truncated tar?)")


def decode_sample(sample: dict[str, Any]) -> TargetRecord:
    """Decode one raw WebDataset sample of this layout into a float32 :class:`TargetRecord`."""
    where = f"{sample.get('__url__', '?')}"
    key = sample.get("__key__", "?")
    if "view.json" not in sample:
        raise StoreDamagedError(where, f"sample {key}: no view.json (incomplete sample: truncated tar?)")
    try:
        meta = json.loads(sample["view.json"])
        codec = get_codec(meta["codec"])
        frames_mode = meta.get("frames", "none")
        checksums = meta["crc32"]
    except Exception as e:
        raise StoreDamagedError(where, f"sample {key}: bad view.json: {type(e).__name__}: {e}") from e
    arrays: dict[str, np.ndarray] = {}
    jpegs = []
    for entry, data in sample.items():
        if entry.startswith("__") or entry == "view.json":
            continue
        if entry in checksums and zlib.crc32(data) != checksums[entry]:
            raise StoreDamagedError(where, f"sample {key}: entry {entry}: CRC32 mismatch (corrupted data)")
        try:
            if ".npy" in entry:
                raw = decompress_bytes(compressor_from_suffix(entry), data)
                arrays[entry.split(".npy")[0]] = np.load(io.BytesIO(raw), allow_pickle=False)
            elif entry.endswith(".jpg"):
                jpegs.append((entry, data))
        except Exception as e:
            raise StoreDamagedError(where, f"sample {key}: entry {entry}: {type(e).__name__}: {e}") from e
    missing = set(stored_names(codec, meta.get("mode", "full"), frames_mode == "raw")) - arrays.keys()
    if missing:
        raise StoreDamagedError(where, f"sample {key}: missing entries {sorted(missing)}")
    if frames_mode == "jpeg":
        arrays["frames"] = _decode_jpegs(sorted(jpegs), where, key)
    try:
        return record_from_arrays(meta, arrays, codec)
    except (KeyError, ValueError, TypeError) as e:
        raise StoreDamagedError(where, f"sample {key}: cannot rebuild the record: {type(e).__name__}: {e}") from e


def _decode_jpegs(entries: list[tuple[str, bytes]], where: str, key: str) -> np.ndarray:
    from PIL import Image

    if not entries:
        raise StoreDamagedError(where, f"sample {key}: frames were stored as jpeg but none are present")
    frames = []
    for entry, data in entries:
        try:
            with Image.open(io.BytesIO(data)) as im:
                frames.append(np.asarray(im.convert("RGB")).transpose(2, 0, 1))  # [3, H, W]
        except Exception as e:
            raise StoreDamagedError(where, f"sample {key}: entry {entry}: {type(e).__name__}: {e}") from e
    return np.ascontiguousarray(np.stack(frames))  # [T, 3, H, W]


def iter_tar_records(url: str, expected_records: list | None = None) -> Iterator[TargetRecord]:
    """Decoded records of one tar, in order, checked against ``expected_records`` when given."""
    for row, sample in enumerate(iter_tar_samples(url, expected_records)):
        record = decode_sample(sample)
        if expected_records is not None and [record.clip_id, record.view_index] != list(expected_records[row]):
            got = f"{record.clip_id!r} view {record.view_index}"
            raise StoreDamagedError(url, f"sample {row} is {got}, index.json says {expected_records[row]}")
        yield record


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
