"""The store's read side for training: the view's pixels with the cached teacher targets.

Epoch ``e`` shows clip ``c`` its view ``(e + offset(c)) mod K`` (``data.views.epoch_view``), where
``offset`` is a stable hash of (seed, clip id); so every epoch sees every clip once, and consecutive
epochs cycle through the K cached views. The seed of that rotation is the store's (``views.seed`` in
``spec.json``, the seed that drew the views), so the WebDataset layout can group each epoch's views
together. ``data.clipviews.OnlineViewDataset`` yields the same views (from the recipe seed) without targets.

Targets leave the datasets in their *stored* dtypes (``tokens`` fp16 / bf16 bits, or ``tokens.q``
int8 + ``tokens.scale``; ``attn`` float32; ``visible_idx`` int16): they cross to the device at the
size they were stored, and :func:`device_targets` dequantises them there.
"""

from __future__ import annotations

import functools
import itertools
import os
import random
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset
from webdataset.utils import pytorch_worker_info

from umt_distill import storage
from umt_distill.cache.basis import codec_for_store
from umt_distill.cache.record import StoreDamagedError, part_name, record_layout
from umt_distill.cache.spec import read_spec
from umt_distill.cache.stores import CacheReader, read_index, shard_path
from umt_distill.cache.wds_store import sample_key
from umt_distill.cache.wds_stream import (
    BatchAssembler,
    decode_jpeg_batch,
    iter_range_samples,
    parse_meta,
)
from umt_distill.config import Recipe
from umt_distill.data.samplers import StreamOrder, worker_positions
from umt_distill.data.video import open_video
from umt_distill.data.views import ViewSpec, apply_view, epoch_view


class CorpusMismatchError(ValueError):
    """Training was given a corpus that lacks clips the store holds (pixels decoded from the videos)."""


def rotation_seed(spec: dict, cfg: Recipe) -> int:
    """The seed of a store's view rotation: the seed that drew its views (older specs: the recipe's)."""
    return int(spec.get("views", {}).get("seed", cfg.seed))


def _decode_view_pixels(row, view, backend: str) -> torch.Tensor:
    with open_video(row.path, backend=backend) as video:
        frames = video.get_frames(list(view.frame_indices))
    return apply_view(frames, view)  # [T, 3, H, W] uint8


def stored_targets(arrays: dict[str, np.ndarray], mode: str, epoch: int) -> dict[str, torch.Tensor]:
    """One record's targets as the step takes them: stored dtypes; mode visible: this epoch's mask.

    Args:
        arrays: The record's stored arrays (``tokens`` or ``tokens.<part>``, ``attn``, ``visible_idx``).
        mode: ``full`` or ``visible`` (M stored masks, cycled over epochs: mask ``epoch mod M``).
    """
    out = {"attn": torch.from_numpy(np.ascontiguousarray(arrays["attn"]))}  # [T, N] float32
    for name, arr in arrays.items():
        if name == "visible_idx" or name.startswith("tokens"):
            if mode == "visible":
                arr = arr[epoch % arr.shape[0]]  # [K, T, N_vis, D] (or [.., 1] scales), [T, N_vis]
            out[name] = torch.from_numpy(np.ascontiguousarray(arr))
    return out


class CachedViewDataset(Dataset):
    """Random access over a store (Zarr, or any layout the reader can index): one item per clip.

    Args:
        store: The cache store.
        cfg: The training recipe (pixel source, video backend).
        rows: Corpus rows by id, needed when pixels are re-decoded from the videos.
        pixels: ``False``: targets only (benchmarks, tools).
    """

    def __init__(self, store: str | Path, cfg: Recipe, rows: dict | None = None, pixels: bool = True) -> None:
        self.store, self.cfg, self.rows, self.pixels = storage.store_root(store), cfg, rows or {}, pixels
        storage.configure_from(cfg.storage)  # block size, retries, read-ahead of a store on object storage
        self.reader = None  # opened lazily in each worker
        reader = CacheReader(self.store)
        self.num_views = int(reader.spec["views"]["num_views"])
        self.seed = rotation_seed(reader.spec, cfg)
        self.clip_ids = sorted({clip for clip, _ in reader.keys})
        self.epoch = 0
        if pixels and cfg.train.pixels_from == "video":
            missing = [c for c in self.clip_ids if c not in self.rows]
            if missing:
                raise CorpusMismatchError(f"{self.store}: {len(missing)} cached clip(s) are not in the corpus "
                                          f"{cfg.corpus.source} (first: {missing[0]!r}); train with the manifest the "
                                          "store was cached from, or with train.pixels_from=store")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.clip_ids)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """The items of a batch (the DataLoader calls this with a batch's indices): one read per batch."""
        if self.reader is None:
            self.reader = CacheReader(self.store)
        # Index e·N + i is clip i shown as in epoch (set_epoch's + e): data.samplers.ElasticSampler's stream indices.
        picks = [(self.epoch + i // len(self), i % len(self)) for i in indices]
        keys = [(self.clip_ids[i], epoch_view(self.seed, self.clip_ids[i], e, self.num_views)) for e, i in picks]
        from_store = self.pixels and self.cfg.train.pixels_from == "store"
        stored = self.reader.get_stored_many(keys, frames=from_store)
        return [self._item(clip, view_index, meta, arrays, from_store, e)
                for (e, _), (clip, view_index), (meta, arrays) in zip(picks, keys, stored)]

    def _item(self, clip: str, view_index: int, meta: dict, arrays: dict, from_store: bool, epoch: int) -> dict:
        item = {"clip_id": clip, "view_index": view_index, "epoch": epoch, **stored_targets(arrays, meta["mode"], epoch)}
        if from_store:
            if "frames" not in arrays:
                raise ValueError(f"{self.store}: the store has no view frames (cache.frames=none); use train.pixels_from=video")
            item["pixels"] = torch.from_numpy(np.ascontiguousarray(arrays["frames"]))  # [T, 3, H, W] uint8
        elif self.pixels:
            view = ViewSpec.from_dict(meta["view"])
            item["pixels"] = _decode_view_pixels(self.rows[clip], view, self.cfg.corpus.video_backend)
        return item


class StreamingViewDataset(IterableDataset):
    """WebDataset streaming: this epoch's view of every clip, as whole batches, split by node and worker.

    Rank ``r`` of ``w`` takes shards ``r, r + w, ...`` (index order) and DataLoader worker ``j`` of
    ``W`` every ``W``-th of those, a fixed split, so every rank knows its step count in advance
    (:meth:`batches_per_rank`); the shard order of a worker and a shuffle buffer of raw samples are
    seeded by (seed, epoch, rank, worker). From a format-2 store an epoch reads one byte range per
    shard, the group of its epoch slot: exactly the views it trains on. A format-1 store (views in clip
    order) is read whole and the other K − 1 views are skipped.

    Batches are assembled in the worker (``cache.wds_stream.BatchAssembler``) with targets in their
    stored dtypes; use it with ``DataLoader(batch_size=None)``. A worker's last incomplete batch is
    dropped, as ``drop_last`` would.

    Args:
        store: The store root.
        cfg: The training recipe (seed, pixel source, video backend, batch size, workers).
        rows: Corpus rows by id (pixels re-decoded from the videos).
        shuffle: Shuffle buffer size in samples (0: store order, shards unshuffled; default
            ``train.shuffle_buffer``).
        jpeg_device: Where JPEG frames are decoded: ``None`` in the worker; a device name to ship the
            bytes and decode in the step (``cache.datasets.batch_pixels``).
        pixels: ``False``: targets only (benchmarks, tools).
    """

    def __init__(self, store: str | Path, cfg: Recipe, rows: dict | None = None, shuffle: int | None = None,
                 jpeg_device: str | None = None, pixels: bool = True) -> None:
        self.store, self.cfg, self.rows = storage.store_root(store), cfg, rows or {}  # a URL stays a URL
        storage.configure_from(cfg.storage)  # block size, retries, read-ahead of a store on object storage
        self.shuffle = cfg.train.shuffle_buffer if shuffle is None else shuffle
        self.jpeg_device, self.pixels = jpeg_device, pixels
        spec = read_spec(self.store)
        self.num_views = int(spec["views"]["num_views"])
        self.seed = rotation_seed(spec, cfg)
        self.shards = read_index(self.store)["shards"]
        # Every entry's dtype and shape as the spec fixes them (and so the most bytes it may decode to).
        self.layout = record_layout(spec, "wds")
        self.grouped = all(len(s.get("groups", ())) == self.num_views for s in self.shards)
        if not self.grouped and self.num_views > 1:
            warnings.warn(f"{self.store}: a store without epoch-slot groups (format 1): every epoch reads all "
                          f"{self.num_views} views of every clip and keeps one; re-run cache-teacher into a new "
                          "store to read only the epoch's views (cache/FORMAT.md §8)", stacklevel=2)
        self.batch_size, self.num_workers = cfg.train.batch_size, max(1, cfg.train.num_workers)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shard_clips(self, shard: dict) -> int:
        if self.grouped:
            return min(g["num_records"] for g in shard["groups"])  # one record per clip in every group
        return len({c for c, _ in shard["records"]})

    def _worker_shards(self, rank: int, world_size: int, worker: int) -> list[dict]:
        return self.shards[rank::world_size][worker :: self.num_workers]

    def batches_per_rank(self, world_size: int) -> int:
        """Full batches every rank streams per epoch: the smallest rank's (ranks take equal steps)."""
        def batches(rank: int) -> int:
            return sum(sum(self._shard_clips(s) for s in self._worker_shards(rank, world_size, w)) // self.batch_size
                       for w in range(self.num_workers))

        return min(batches(r) for r in range(world_size))

    def clips_per_rank(self, world_size: int) -> int:
        """Clips every rank trains on per epoch (whole batches only)."""
        return self.batches_per_rank(world_size) * self.batch_size

    def _ranges(self, shard: dict) -> tuple[str, int, int | None]:
        url = shard_path(self.store, "wds", shard["name"])
        if not self.grouped:
            return url, 0, None
        g = shard["groups"][self.epoch % self.num_views]
        return url, g["offset"], g["nbytes"]

    def _expected(self, shard: dict, slot: int) -> tuple[list, int]:
        """The index's records of the range an epoch reads from ``shard``, and the first one's row."""
        if not self.grouped:
            return shard["records"], 0
        start = sum(g["num_records"] for g in shard["groups"][:slot])
        return shard["records"][start : start + shard["groups"][slot]["num_records"]], start

    def _samples(self, shards: list[dict]) -> Iterator[tuple[str, str, dict, dict]]:
        slot = self.epoch % self.num_views
        # Over a URL: each range fetched whole, the next ones in the background (storage.read_ahead).
        fetched = (storage.read_ahead(shards, self._ranges) if storage.is_url(self.store)
                   else ((shard, None) for shard in shards))
        for shard, data in fetched:
            url, offset, nbytes = self._ranges(shard)
            expected, _ = self._expected(shard, slot)
            count = 0
            # A local store: the plain call (its reads are the file's); over a URL: the bytes fetched ahead.
            samples = (iter_range_samples(url, offset, nbytes) if data is None
                       else iter_range_samples(url, offset, nbytes, data=data))
            for row, (key, entries) in enumerate(samples):
                meta = parse_meta(url, key, entries)  # checks view.json's own checksum
                # The sample is the record index.json lists at its place: nothing trains twice or never.
                want_key = sample_key(shard["name"], slot if self.grouped else 0, row)
                keys = (want_key,) if self.grouped else (want_key, f"{shard['name']}_{row:06d}")  # format 1 keys
                want = expected[row] if row < len(expected) else None
                if key not in keys or want is None or [meta["clip_id"], meta["view_index"]] != list(want):
                    raise StoreDamagedError(url, f"sample {key}: holds {meta['clip_id']!r} view {meta['view_index']}, "
                                                 f"index.json lists {want} as sample {want_key}")
                if self.grouped:
                    if meta.get("group") != slot:
                        raise StoreDamagedError(url, f"sample {key}: group {meta.get('group')}, index.json says {slot}")
                elif meta["view_index"] != epoch_view(self.seed, meta["clip_id"], self.epoch, self.num_views):
                    continue
                count += 1
                yield url, key, entries, meta
            want = shard["groups"][slot]["num_records"] if self.grouped else self._shard_clips(shard)
            if count != want:
                raise StoreDamagedError(url, f"{count} samples for epoch slot {slot}, index.json lists {want}")

    def _rotation(self, shards: list[dict], rank: int, world: int) -> tuple[list[dict], int]:
        """Store order without a shuffle buffer, turned by the epoch where an epoch drops samples.

        An epoch drops a worker's last partial batch and a rank's batches beyond the smallest rank's
        (ranks take equal steps); in plain store order those would be the same clips every epoch, and
        never trained. Where this rank drops anything, epoch ``e`` starts at shard ``e mod S`` and,
        within the stream, ``(e x tail) mod B`` samples later (the skipped ones come last; at most
        B - 1 samples are held). Where nothing is dropped, the order is the store's.
        """
        n = sum(self._shard_clips(s) for s in shards)
        tail = n % self.batch_size
        own = sum(sum(self._shard_clips(s) for s in self._worker_shards(rank, world, w)) // self.batch_size
                  for w in range(self.num_workers))
        if not shards or not (tail or own > self.batches_per_rank(world)):
            return shards, 0
        turn = self.epoch % len(shards)
        return shards[turn:] + shards[:turn], (self.epoch * tail) % self.batch_size

    def __iter__(self) -> Iterator[dict]:
        rank, world, worker, workers = pytorch_worker_info()  # env / torch.distributed, DataLoader worker
        if max(1, workers) != self.num_workers:  # the split (and the step count) assume the recipe's workers
            running = workers if torch.utils.data.get_worker_info() is not None else 0
            raise ValueError(f"{self.store}: the dataset splits shards for train.num_workers={self.num_workers}, "
                             f"the DataLoader runs {running} workers")
        shards = self._worker_shards(rank, world, worker)
        offset = 0
        if self.shuffle:
            random.Random(f"shards:{self.seed}:{self.epoch}:{rank}:{worker}").shuffle(shards)
        else:
            shards, offset = self._rotation(shards, rank, world)
        samples: Iterator = self._samples(shards)
        if self.shuffle:
            samples = _shuffled(samples, self.shuffle, random.Random(f"samples:{self.seed}:{self.epoch}:{rank}:{worker}"))
        elif offset:
            samples = _rotated(samples, offset)
        from_store = self.pixels and self.cfg.train.pixels_from == "store"
        from_video = self.pixels and not from_store
        assembler = BatchAssembler(self.batch_size, self.epoch, "array" if from_store else None, self.jpeg_device,
                                   layout=self.layout)
        pixels: list[torch.Tensor] = []
        for url, key, entries, meta in samples:
            assembler.add(url, key, entries, meta)
            if from_video:
                row = self.rows[meta["clip_id"]]
                pixels.append(_decode_view_pixels(row, ViewSpec.from_dict(meta["view"]), self.cfg.corpus.video_backend))
            if len(assembler) == self.batch_size:
                batch = assembler.finish()
                if pixels:
                    batch["pixels"] = torch.stack(pixels)  # [B, T, 3, H, W] uint8
                    pixels = []
                yield batch


class ElasticStreamingViewDataset(StreamingViewDataset):
    """WebDataset streaming in stage 1's global order: the same samples in the same order at any world size
    and any number of loader workers (``data.samplers``: :class:`~umt_distill.data.samplers.StreamOrder`
    per epoch, position mod W = rank).

    Epoch ``e``'s order is the shards in an order drawn from ``(seed, e)``, each shard's epoch group in an
    order of its rows drawn from ``(seed, e, shard)`` (``train.shuffle_buffer`` > 0; 0: store order). A
    loader worker reads, group by group, only the rows of its positions: the other samples' tar headers
    are read and their data skipped (``iter_range_samples(keep=...)``), and it holds at most its share of
    one group. Batches of consecutive positions of the rank go to workers round-robin, as the DataLoader
    takes them. A batch may hold samples of two epochs: each carries its ``epoch`` (its view, its stored
    mask). Call :meth:`set_position` before building the loader.
    """

    def __init__(self, store: str | Path, cfg: Recipe, rows: dict | None = None, shuffle: int | None = None,
                 jpeg_device: str | None = None, pixels: bool = True) -> None:
        super().__init__(store, cfg, rows, shuffle, jpeg_device, pixels)
        self.order_seed = cfg.seed
        counts = {sum(len(self._epoch_rows(s, e)) for s in self.shards) for e in range(self.num_views)}
        if len(counts) != 1:
            raise StoreDamagedError(f"{self.store}/index.json", f"the epoch slots hold {sorted(counts)} samples; "
                                    "every slot must hold one view of every clip")
        self.epoch_samples = counts.pop()  # N: samples of every epoch
        self.start = self.end = 0

    def set_position(self, start: int, end: int) -> None:
        """Stream global positions ``[start, end)`` (``end`` after a whole step of every rank)."""
        self.start, self.end = start, end

    def _epoch_rows(self, shard: dict, epoch: int) -> list[int]:
        """The tar ordinals (in the epoch's byte range) of the epoch's rows of ``shard``."""
        if self.grouped:
            return list(range(shard["groups"][epoch % self.num_views]["num_records"]))
        return [t for t, (clip, view) in enumerate(shard["records"])
                if view == epoch_view(self.seed, clip, epoch, self.num_views)]

    def _order(self, epoch: int, cache: dict) -> StreamOrder:
        if epoch not in cache:
            cache.clear()
            sizes = [len(self._epoch_rows(s, epoch)) for s in self.shards]
            cache[epoch] = StreamOrder(self.order_seed, epoch, sizes, shuffle=self.shuffle > 0)
        return cache[epoch]

    def _group_range(self, shard: dict, epoch: int) -> tuple[str, int, int | None]:
        """(tar, offset, nbytes) of ``shard``'s epoch range (a format-1 tar: all of it)."""
        if self.grouped:
            g = shard["groups"][epoch % self.num_views]
            return shard_path(self.store, "wds", shard["name"]), g["offset"], g["nbytes"]
        return shard_path(self.store, "wds", shard["name"]), 0, None

    def _read_rows(self, shard: dict, epoch: int, ordinals: set[int], data: bytes | None = None) -> dict[int, tuple]:
        """The samples at ``ordinals`` of ``shard``'s epoch range, checked against index.json (``data``:
        the range's bytes, fetched ahead from object storage)."""
        slot = epoch % self.num_views
        url, offset, nbytes = self._group_range(shard, epoch)
        expected, _ = self._expected(shard, slot)
        got, count = {}, 0
        samples = (iter_range_samples(url, offset, nbytes, keep=ordinals) if data is None
                   else iter_range_samples(url, offset, nbytes, keep=ordinals, data=data))
        for t, (key, entries) in enumerate(samples):
            count = t + 1
            if entries is None:
                continue
            meta = parse_meta(url, key, entries)  # checks view.json's own checksum
            want_key = sample_key(shard["name"], slot if self.grouped else 0, t)
            keys = (want_key,) if self.grouped else (want_key, f"{shard['name']}_{t:06d}")
            want = expected[t] if t < len(expected) else None
            if key not in keys or want is None or [meta["clip_id"], meta["view_index"]] != list(want):
                raise StoreDamagedError(url, f"sample {key}: holds {meta['clip_id']!r} view {meta['view_index']}, "
                                             f"index.json lists {want} as sample {want_key}")
            if self.grouped and meta.get("group") != slot:
                raise StoreDamagedError(url, f"sample {key}: group {meta.get('group')}, index.json says {slot}")
            got[t] = (url, key, entries, meta)
        if count != len(expected) or len(got) != len(ordinals):
            raise StoreDamagedError(url, f"{count} samples for epoch slot {slot}, index.json lists {len(expected)}")
        return got

    def _positions(self) -> Iterator[tuple[int, int, tuple]]:
        """(global position, epoch, sample) of this worker's positions, in order."""
        rank, world, worker, workers = pytorch_worker_info()  # env / torch.distributed, DataLoader worker
        mine = worker_positions(self.start, self.end, rank, world, self.batch_size, worker, max(1, workers))
        orders: dict = {}

        def where(p: int) -> tuple[int, int, int]:
            epoch, i = divmod(p, self.epoch_samples)
            _, shard, row = self._order(epoch, orders).locate(i)
            return epoch, shard, row

        located = ((p, *where(p)) for p in mine)
        runs = ((epoch, shard_index, list(run))  # this worker's positions in one shard's epoch group
                for (epoch, shard_index), run in itertools.groupby(located, key=lambda x: (x[1], x[2])))
        if storage.is_url(self.store):  # each group fetched whole, the next ones in the background
            fetched = storage.read_ahead(runs, lambda r: self._group_range(self.shards[r[1]], r[0]))
        else:
            fetched = ((r, None) for r in runs)
        for (epoch, shard_index, run), data in fetched:
            shard = self.shards[shard_index]
            ordinals = self._epoch_rows(shard, epoch)
            got = self._read_rows(shard, epoch, {ordinals[row] for _, _, _, row in run}, data)
            for p, _, _, row in run:
                yield p, epoch, got[ordinals[row]]

    def __iter__(self) -> Iterator[dict]:
        from_store = self.pixels and self.cfg.train.pixels_from == "store"
        from_video = self.pixels and not from_store
        assembler = BatchAssembler(self.batch_size, 0, "array" if from_store else None, self.jpeg_device,
                                   layout=self.layout)
        pixels: list[torch.Tensor] = []
        epochs: list[int] = []
        for _, epoch, (url, key, entries, meta) in self._positions():
            assembler.epoch = epoch  # a mode-visible record gives the mask of its own epoch
            assembler.add(url, key, entries, meta)
            epochs.append(epoch)
            if from_video:
                row = self.rows[meta["clip_id"]]
                pixels.append(_decode_view_pixels(row, ViewSpec.from_dict(meta["view"]), self.cfg.corpus.video_backend))
            if len(assembler) == self.batch_size:
                batch = assembler.finish()
                batch["epoch"] = torch.tensor(epochs)  # [B] int64
                epochs = []
                if pixels:
                    batch["pixels"] = torch.stack(pixels)  # [B, T, 3, H, W] uint8
                    pixels = []
                yield batch


def _rotated(items: Iterator, offset: int) -> Iterator:
    """``items`` from the ``offset``-th on, then the first ``offset`` (held meanwhile)."""
    head = list(itertools.islice(items, offset))
    yield from items
    yield from head


def _shuffled(items: Iterator, size: int, rng) -> Iterator:
    """A shuffle buffer of ``size`` items drawn with ``rng`` (what ``webdataset.shuffle`` does, explicitly)."""
    buf: list = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def batch_pixels(batch: dict, device: torch.device) -> torch.Tensor:
    """A batch's view pixels on ``device``: uint8 [B, T, 3, H, W] (JPEGs shipped as bytes are decoded there)."""
    if "pixels" in batch:
        return batch["pixels"].to(device, non_blocking=True)
    if "frames_jpeg" in batch:
        return decode_jpeg_batch(batch["frames_jpeg"], batch["frames_jpeg_sizes"], device)
    raise KeyError("the batch has no pixels")


def jpeg_device(cfg: Recipe) -> str | None:
    """Where JPEG view frames are decoded: on the training GPU (nvJPEG) when there is one, else in the
    DataLoader workers (a CPU step would otherwise decode in the training process)."""
    device = cfg.train.device
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return "cuda" if device == "auto" else device
    return None


def target_codec(store: str, name: str):
    """The codec that dequantises a store's targets in the step, bound to its basis where it has one
    (``name`` is the recipe's ``cache.codec``, checked against the spec). Built once per version of the
    store's ``spec.json``: a store rebuilt at the same path (another basis) is not decoded with a stale one."""
    spec = os.path.join(str(store), "spec.json")
    if storage.is_url(store):  # a store on object storage is read as it is; no local version to track
        return _target_codec(str(store), name, 0)
    return _target_codec(str(store), name, os.stat(spec).st_mtime_ns if os.path.exists(spec) else 0)


@functools.lru_cache(maxsize=8)
def _target_codec(store: str, name: str, spec_version: int):
    codec = codec_for_store(store)
    if codec.name != name:
        raise ValueError(f"{store}: targets are {codec.name}, the recipe says cache.codec={name}")
    return codec


def device_targets(batch: dict, codec, device: torch.device) -> torch.Tensor:
    """The batch's cached tokens, moved in their stored dtype and decoded to float32 on ``device``.

    The parts are the record's stored arrays (``tokens`` or ``tokens.<part>``, see ``cache/record.py``);
    only their bytes cross to the device.
    """
    parts = {p: batch[part_name("tokens", p)].to(device, non_blocking=True) for p in codec.parts}
    return codec.decode_torch(parts)
