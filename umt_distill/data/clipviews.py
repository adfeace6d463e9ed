"""The K views of one clip, decoded once: what cache-teacher's DataLoader workers produce.

The video is opened once per clip, the K views are drawn from (seed, clip id, view index), the union
of their frames is decoded once, and each view is applied to its frames.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from umt_distill.config import Recipe
from umt_distill.data.jpeg import jpeg_round_trip
from umt_distill.data.video import open_video
from umt_distill.data.video_base import VideoDecodeError
from umt_distill.data.views import ViewError, apply_view, epoch_view, sample_view


class ClipViewsDataset(Dataset):
    """One item per clip: its K views decoded and applied, or the reason it failed.

    The video is opened once per clip and the union of the K views' frames is decoded once.
    """

    def __init__(self, rows, indices: list[int], cfg: Recipe) -> None:
        self.rows, self.indices, self.cfg = rows, indices, cfg

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        idx = self.indices[i]
        row = self.rows[idx]
        try:
            views, pixels = decode_clip_views(row, self.cfg)
        except ClipFailure as e:
            return {"index": idx, "error": str(e)}
        if self.cfg.cache.frames == "jpeg":
            # The teacher must see the pixels training will decode from the stored JPEGs, not the raw
            # view: encode, decode with training's decoder, and carry both on.
            trips = [jpeg_round_trip(view_pixels.numpy()) for view_pixels in pixels]  # K x (T bytes, [T,3,H,W])
            pixels = torch.from_numpy(np.stack([decoded for _, decoded in trips]))  # [K, T, 3, H, W]
            return {"index": idx, "views": views, "pixels": pixels, "jpegs": [data for data, _ in trips]}
        return {"index": idx, "views": views, "pixels": pixels}


class ClipFailure(Exception):
    """A clip cannot be cached (undecodable, too short ...); becomes a line in failures.jsonl."""


def decode_clip_views(row, cfg: Recipe, num_views: int | None = None):
    """Sample and apply the K views of one clip → (list[ViewSpec], uint8 [K, T, 3, H, W])."""
    v = cfg.views
    k_views = cfg.cache.num_views if num_views is None else num_views
    try:
        with open_video(row.path, backend=cfg.corpus.video_backend) as reader:
            info = reader.info
            frame_range = clip_frame_range(row, info)
            views = [
                sample_view(
                    v.policy, info, v.num_frames, v.size, cfg.seed, row.id, k,
                    **policy_kwargs(cfg, frame_range),
                )
                for k in range(k_views)
            ]
            wanted = sorted({f for view in views for f in view.frame_indices})
            frames = reader.get_frames(wanted)  # [F, H, W, 3]
    except VideoDecodeError as e:  # the failure line carries the path already
        raise ClipFailure(e.reason) from None
    except ViewError as e:
        raise ClipFailure(str(e)) from None
    except (OSError, ValueError) as e:  # anything else the decoder raised about this file
        raise ClipFailure(f"{row.path}: {type(e).__name__}: {e}") from None
    pos = {f: i for i, f in enumerate(wanted)}
    pixels = [apply_view(frames[[pos[f] for f in view.frame_indices]], view) for view in views]
    return views, torch.stack(pixels)  # [K, T, 3, H, W]


def decode_view(row, cfg: Recipe, view_index: int) -> torch.Tensor:
    """View ``view_index`` of one clip under the recipe's view policy, decoded and applied.

    Returns:
        uint8 [T, 3, H, W].
    """
    v = cfg.views
    with open_video(row.path, backend=cfg.corpus.video_backend) as video:
        view = sample_view(v.policy, video.info, v.num_frames, v.size, cfg.seed, row.id, view_index,
                           **policy_kwargs(cfg, clip_frame_range(row, video.info)))
        frames = video.get_frames(list(view.frame_indices))
    return apply_view(frames, view)


def clip_frame_range(row, info) -> tuple[int, int] | None:
    """A manifest's start/end (seconds) as a frame range [lo, hi)."""
    if row.start is None and row.end is None:
        return None
    lo = 0 if row.start is None else int(math.floor(row.start * info.fps))
    hi = info.num_frames if row.end is None else min(info.num_frames, int(math.ceil(row.end * info.fps)))
    return (lo, hi)


def policy_kwargs(cfg: Recipe, frame_range) -> dict:
    v = cfg.views
    kwargs: dict = {"frame_range": frame_range}
    if v.policy == "umt_train":
        kwargs.update(scales=tuple(v.scales), max_distort=v.max_distort, flip=v.flip)
    elif v.policy == "videomae_train":
        kwargs.update(sampling_rate=v.sampling_rate, scales=tuple(v.scales), max_distort=v.max_distort, flip=v.flip)
    return kwargs


def worker_init(_: int) -> None:
    """DataLoader workers decode with one thread each: the cores belong to the teacher."""
    torch.set_num_threads(1)


class OnlineViewDataset(Dataset):
    """The views a store of this recipe holds (epoch ``e`` shows clip ``c`` its view ``epoch_view(seed, c,
    e, K)``, as ``cache.datasets.CachedViewDataset`` does), decoded from the corpus, without targets.

    With ``fresh_views`` every epoch shows a new view instead (view index ``e``: drawn from (seed, clip,
    epoch), never repeated), as fine-tuning without a store does (the retrieval stage).
    Items: ``{"clip_id", "view_index", "pixels": uint8 [T, 3, H, W]}``.
    """

    def __init__(self, rows: list, cfg: Recipe, fresh_views: bool = False) -> None:
        # Sorted by id like CachedViewDataset, so a sampler index is the same clip in both modes.
        self.rows, self.cfg, self.fresh_views = sorted(rows, key=lambda r: r.id), cfg, fresh_views
        self.clip_ids = [r.id for r in self.rows]
        self.num_views = cfg.cache.num_views
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        epoch, row = self.epoch + i // len(self), self.rows[i % len(self)]  # e·N + i: data.samplers.ElasticSampler
        k = epoch if self.fresh_views else epoch_view(self.cfg.seed, row.id, epoch, self.num_views)
        return {"clip_id": row.id, "view_index": k, "epoch": epoch, "pixels": decode_view(row, self.cfg, k)}
