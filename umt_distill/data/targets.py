"""Training datasets: the view's pixels with the cached teacher targets (or without, for online mode).

Epoch ``e`` shows clip ``c`` its view ``(e + offset(c)) mod K``, where ``offset`` is a stable hash of
(seed, clip id); so every epoch sees every clip once, and consecutive epochs cycle through the K
cached views. The online dataset yields the same views without targets.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler

from umt_distill.config import Recipe


def view_offset(seed: int, clip_id: str, num_views: int) -> int:
    digest = hashlib.sha256(f"{seed}:{clip_id}:offset".encode()).digest()
    return int.from_bytes(digest[:8], "little") % num_views


def epoch_view(seed: int, clip_id: str, epoch: int, num_views: int) -> int:
    """The view of ``clip_id`` shown in ``epoch``."""
    return (epoch + view_offset(seed, clip_id, num_views)) % num_views


def _decode_view_pixels(row, view, backend: str) -> torch.Tensor:
    from umt_distill.data.video import open_video
    from umt_distill.data.views import apply_view

    with open_video(row.path, backend=backend) as video:
        frames = video.get_frames(list(view.frame_indices))
    return apply_view(frames, view)  # [T, 3, H, W] uint8


def _sample(record, pixels: torch.Tensor, epoch: int) -> dict:
    out = {
        "clip_id": record.clip_id,
        "view_index": record.view_index,
        "pixels": pixels,  # [T, 3, H, W] uint8
        "attn": torch.from_numpy(np.ascontiguousarray(record.attn, dtype=np.float32)),  # [T, N]
    }
    if record.visible_idx is None:
        out["tokens"] = torch.from_numpy(np.ascontiguousarray(record.tokens, dtype=np.float32))  # [K, T, N, D]
    else:  # mode visible: cycle through the M stored masks over epochs
        m = epoch % record.tokens.shape[0]
        out["tokens"] = torch.from_numpy(np.ascontiguousarray(record.tokens[m], dtype=np.float32))  # [K, T, N_vis, D]
        out["visible_idx"] = torch.from_numpy(record.visible_idx[m].astype(np.int64))  # [T, N_vis]
    return out


class CachedViewDataset(Dataset):
    """Random access over a store (Zarr, or any layout the reader can index): one item per clip.

    Args:
        store: The cache store.
        cfg: The training recipe (seed, pixel source, video backend).
        rows: Corpus rows by id, needed when pixels are re-decoded from the videos.
    """

    def __init__(self, store: str | Path, cfg: Recipe, rows: dict | None = None) -> None:
        from umt_distill.cache.stores import CacheReader

        self.store, self.cfg, self.rows = Path(store), cfg, rows or {}
        self.reader = None  # opened lazily in each worker
        reader = CacheReader(self.store)
        self.num_views = int(reader.spec["views"]["num_views"])
        self.clip_ids = sorted({clip for clip, _ in reader.keys})
        self.epoch = 0
        if cfg.train.pixels_from == "video":
            missing = [c for c in self.clip_ids if c not in self.rows]
            if missing:
                raise KeyError(f"{len(missing)} cached clip(s) are not in the corpus (first: {missing[0]!r}); "
                               "train with the corpus the store was built from, or train.pixels_from=store")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.clip_ids)

    def __getitem__(self, i: int) -> dict:
        from umt_distill.cache.stores import CacheReader

        if self.reader is None:
            self.reader = CacheReader(self.store)
        clip = self.clip_ids[i]
        record = self.reader.get(clip, epoch_view(self.cfg.seed, clip, self.epoch, self.num_views))
        if self.cfg.train.pixels_from == "store":
            if record.frames is None:
                raise ValueError(f"{self.store}: the store has no view frames (cache.frames=none); use train.pixels_from=video")
            pixels = torch.from_numpy(np.ascontiguousarray(record.frames))
        else:
            pixels = _decode_view_pixels(self.rows[clip], record.view, self.cfg.corpus.video_backend)
        return _sample(record, pixels, self.epoch)


class OnlineViewDataset(Dataset):
    """The same views as :class:`CachedViewDataset`, decoded from the corpus, without targets."""

    def __init__(self, rows: list, cfg: Recipe) -> None:
        # Sorted by id like CachedViewDataset, so a sampler index is the same clip in both modes.
        self.rows, self.cfg = sorted(rows, key=lambda r: r.id), cfg
        self.clip_ids = [r.id for r in self.rows]
        self.num_views = cfg.cache.num_views
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        from umt_distill.data.clipviews import decode_view

        row = self.rows[i]
        k = epoch_view(self.cfg.seed, row.id, self.epoch, self.num_views)
        return {"clip_id": row.id, "view_index": k, "pixels": decode_view(row, self.cfg, k)}


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, split across ranks, resumable from a position.

    Every rank gets ``len(dataset) // world_size`` indices (the remainder is dropped, like
    ``drop_last``), so all ranks take the same number of steps.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.seed, self.rank, self.world = size, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """``start``: how many of this rank's indices of the epoch were already consumed."""
        self.epoch, self.start = epoch, start

    def per_rank(self) -> int:
        return self.size // self.world

    def __len__(self) -> int:
        return self.per_rank() - self.start

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=g)[: self.per_rank() * self.world]
        mine = order[self.rank :: self.world]
        return iter(mine[self.start :].tolist())


class StreamingViewDataset(IterableDataset):
    """WebDataset streaming: this epoch's view of every clip, split by node and worker.

    Rank ``r`` of ``w`` streams shards ``r, r + w, ...`` (in index order); a shuffle buffer seeded by
    (seed, epoch, rank, worker) mixes their samples. Each shard holds all K views of its clips, so the
    other K − 1 views are read and skipped: streaming trades read bandwidth for sequential access.
    Pixels come from the store's frames or are re-decoded from the videos.
    """

    def __init__(self, store: str | Path, cfg: Recipe, rows: dict | None = None, shuffle: int = 64) -> None:
        from umt_distill.cache.spec import read_spec
        from umt_distill.cache.stores import read_index

        self.store, self.cfg, self.rows, self.shuffle = Path(store), cfg, rows or {}, shuffle
        self.num_views = int(read_spec(self.store)["views"]["num_views"])
        self.shards = read_index(self.store)["shards"]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def clips_per_rank(self, world_size: int) -> int:
        """Clips every rank can stream in one epoch: the smallest rank's share (ranks take equal steps)."""
        def clips(rank: int) -> int:
            return sum(len({c for c, _ in s["records"]}) for s in self.shards[rank::world_size])

        return min(clips(r) for r in range(world_size))

    def __iter__(self) -> Iterator[dict]:
        from umt_distill.cache.stores import wds_records

        records = wds_records(self.store, shuffle=self.shuffle, split_by_node=True, split_by_worker=True,
                              seed=self.cfg.seed, epoch=self.epoch)
        for record in records:
            if record.view_index != epoch_view(self.cfg.seed, record.clip_id, self.epoch, self.num_views):
                continue
            if self.cfg.train.pixels_from == "store":
                if record.frames is None:
                    raise ValueError(f"{self.store}: the store has no view frames; use train.pixels_from=video")
                pixels = torch.from_numpy(np.ascontiguousarray(record.frames))
            else:
                pixels = _decode_view_pixels(self.rows[record.clip_id], record.view, self.cfg.corpus.video_backend)
            yield _sample(record, pixels, self.epoch)
