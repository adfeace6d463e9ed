"""Stores written record by record, with random targets: tests of the store formats, readers and damage
checks build them without a teacher or videos (the pipeline's own stores come from ``cache-teacher``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from umt_distill.cache.record import TargetRecord, frames_digest
from umt_distill.cache.stores import init_store_root, open_shard_writer, write_index
from umt_distill.data.views import ViewSpec

K, T, N, D = 2, 3, 16, 8  # layers, frames, patches (4x4 grid), channels
H = W = 32


def smooth_frames(seed: int) -> np.ndarray:
    """uint8 [T, 3, H, W] gradients with a moving bright square: JPEG-friendly, distinct per seed."""
    yy, xx = np.mgrid[0:H, 0:W]
    frames = np.empty((T, 3, H, W), np.uint8)
    for t in range(T):
        for c in range(3):
            frames[t, c] = (xx * 4 + yy * 2 + 40 * c + 10 * seed) % 200
        x0 = (5 * t + seed) % (W - 8)
        frames[t, :, 8:16, x0 : x0 + 8] = 250
    return frames


def make_record(
    clip_id: str, view_index: int, seed: int, visible: int | None = None, frames: bool = True
) -> TargetRecord:
    """A valid record with random targets; ``visible`` = number of masks M for mode visible."""
    rng = np.random.default_rng(seed)
    pixels = smooth_frames(seed)
    view = ViewSpec(frame_indices=tuple(int(i) for i in sorted(rng.choice(40, T, replace=False))),
                    crop=(1, 2, 60, 50), flip=bool(seed % 2), size=(H, W))
    tokens = rng.standard_normal((K, T, N, D)).astype(np.float32)
    visible_idx = None
    if visible:
        n_vis = 5
        visible_idx = np.stack(
            [np.stack([np.sort(rng.choice(N, n_vis, replace=False)) for _ in range(T)]) for _ in range(visible)]
        ).astype(np.int16)  # [M, T, N_vis]
        frame = np.arange(T)[:, None]
        tokens = np.stack([tokens[:, frame, visible_idx[m]] for m in range(visible)])  # [M, K, T, N_vis, D]
    attn = rng.dirichlet(np.ones(N), size=T).astype(np.float32)
    return TargetRecord(
        clip_id=clip_id, view_index=view_index, view=view, frames_digest=frames_digest(pixels),
        tokens=tokens, attn=attn, pooled=rng.standard_normal((T, D)).astype(np.float32),
        visible_idx=visible_idx, frames=pixels if frames else None,
    )


def build_store(root: Path, layout: str, codec: str = "fp32", compressor: str = "zstd", frames: str = "none",
                shards: int = 2, clips: int = 2, views: int = 2, visible: int | None = None) -> list[TargetRecord]:
    """Write a complete store (spec, shards, index) the way the pipeline does; return its records."""
    init_store_root(root, layout, {"umt_distill_spec": "spec.json"})
    (root / "spec.json").write_text(json.dumps({"layout": layout, "codec": {"name": codec, "compressor": compressor}}))
    records, infos = [], []
    for s in range(shards):
        writer = open_shard_writer(layout, root / "shards", f"shard-{s:06d}", codec, compressor, frames=frames)
        for c in range(clips):
            for v in range(views):
                # ids with dots and slashes: keys must not depend on them
                rec = make_record(f"vids/clip.{s}.{c}.mp4", v, seed=100 * s + 10 * c + v, visible=visible)
                writer.add(rec)
                records.append(rec)
        infos.append(writer.close())
    write_index(root, layout, infos)
    return records
