"""What caching costs: cache-teacher throughput against the bare teacher, and bytes per clip-view.

Run (CPU, about 2-4 minutes on 2 cores):

    .venv/bin/python benchmarks/bench_cache.py
    .venv/bin/python benchmarks/bench_cache.py --device cuda --clips 64 --batch-size 32 --precision bf16

Prints two tables:

1. Throughput: frames/s of `cache-teacher` end to end (decode in DataLoader workers → teacher →
   codec → shard writer) against the teacher's forward-only frames/s on the same already-decoded
   frames, same batch size. The ratio is what the pipeline keeps of the teacher's speed (goal ≥ 0.9).
2. Storage vs fidelity for UMT-B's target set (6 layers × 196 tokens × 512, 8 frames) from the real
   ViT-B-16 architecture (random weights): bytes per clip-view on disk for each codec × mode, and mean /
   1st-percentile cosine of the decoded tokens to fp32.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

console = Console()


def make_corpus(folder: Path, clips: int, frames: int, height: int, width: int) -> Path:
    from umt_distill.data.synthetic import moving_shapes_video, write_video

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path"])
        for i in range(clips):
            write_video(folder / f"c{i}.mp4", moving_shapes_video(frames, height, width, seed=i), fps=25)
            w.writerow([f"c{i}", f"c{i}.mp4"])
    return folder / "m.csv"


def recipe(args, manifest: Path, store: Path, *extra: str):
    from umt_distill.config import load_recipe

    return load_recipe("stage1/b16_k710", [
        f"corpus.source={manifest}", f"cache.store={store}", "teacher.pretrained=null",
        f"teacher.precision={args.precision}", f"cache.device={args.device}", f"cache.num_views={args.views}",
        f"cache.batch_size={args.batch_size}", f"cache.num_workers={args.workers}", "cache.clips_per_shard=4",
        "corpus.video_backend=pyav", *extra,
    ])


def bench_throughput(args, tmp: Path, manifest: Path) -> dict:
    from umt_distill.cache.pipeline import build_teacher, cache_teacher, decode_clip_views
    from umt_distill.data.corpus import read_corpus

    cfg = recipe(args, manifest, tmp / "store_tp")
    device = torch.device(args.device)
    teacher = build_teacher(cfg, device)
    # Forward-only: the same views, decoded beforehand, in the same batch size.
    pixels = torch.cat([decode_clip_views(r, cfg)[1] for r in read_corpus(manifest)])  # [clips*K, T, 3, H, W]
    batches = pixels.split(args.batch_size)
    teacher(batches[0].to(device))  # warm-up
    t = time.perf_counter()
    for b in batches:
        out = teacher(b.to(device))
        out.tokens.float().cpu()
    forward_s = time.perf_counter() - t
    frames = pixels.shape[0] * pixels.shape[1]
    summary = cache_teacher(cfg, progress=False)
    cache_s = summary["rank0_seconds"]
    return {
        "frames": frames,
        "teacher_forward_fps": frames / forward_s,
        "cache_teacher_fps": summary["rank0_frames"] / cache_s,
        "cache_teacher_time_in_teacher": summary["rank0_teacher_seconds"] / cache_s,
        "ratio": (summary["rank0_frames"] / cache_s) / (frames / forward_s),
    }


def bench_storage(args, tmp: Path, manifest: Path) -> list[dict]:
    from umt_distill.cache.pipeline import cache_teacher
    from umt_distill.cache.stores import CacheReader

    rows = []
    reference = None
    settings = [(codec, "full") for codec in ("fp32", "fp16", "bf16", "int8")]
    settings += [(codec, "visible") for codec in ("fp16", "int8")]
    for codec, mode in settings:
        store = tmp / f"store_{codec}_{mode}"
        extra = [f"cache.codec={codec}", f"cache.mode={mode}", "cache.num_views=1", "cache.masks_per_view=1"]
        cache_teacher(recipe(args, manifest, store, *extra), progress=False)
        reader = CacheReader(store)
        recs = {key: reader.get(*key) for key in reader.keys}
        data_bytes = sum(p.stat().st_size for p in (store / "shards").rglob("*") if p.is_file() and not p.name.endswith(".json"))
        if codec == "fp32" and mode == "full":
            reference = recs
        cos = []
        for key, rec in recs.items():
            ref = reference[key].tokens  # [K, T, N, D]
            if rec.visible_idx is not None:
                T = ref.shape[1]
                ref = ref[:, np.arange(T)[:, None], rec.visible_idx[0].astype(np.int64)][None]
            a = rec.tokens.reshape(-1, rec.tokens.shape[-1]).astype(np.float64)
            b = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
            cos.append((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
        cos = np.concatenate(cos)
        rows.append({
            "codec": codec, "mode": mode, "bytes_per_clip_view": data_bytes / len(recs),
            "tokens_shape": list(next(iter(recs.values())).tokens.shape),
            "mean_cos": float(cos.mean()), "p1_cos": float(np.percentile(cos, 1)),
        })
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--clips", type=int, default=6)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2, help="clip-views per teacher forward")
    p.add_argument("--workers", type=int, default=1, help="decode workers")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    try:
        manifest = make_corpus(tmp / "videos", args.clips, frames=32, height=240, width=320)
        tp = bench_throughput(args, tmp, manifest)
        storage = bench_storage(args, tmp, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    machine = f"{platform.machine()} {torch.get_num_threads()} threads, {args.device}"
    t = Table(title=f"cache-teacher vs teacher forward — ViT-B-16 (random weights), T=8, 224 px, {machine}")
    for col in ("frames", "teacher forward frames/s", "cache-teacher frames/s", "ratio (goal ≥ 0.9)", "share of time in teacher"):
        t.add_column(col)
    t.add_row(str(tp["frames"]), f"{tp['teacher_forward_fps']:.2f}", f"{tp['cache_teacher_fps']:.2f}", f"{tp['ratio']:.3f}",
              f"{tp['cache_teacher_time_in_teacher']:.3f}")
    console.print(t)
    t = Table(title="UMT-B targets per clip-view (6 layers x 8 frames x 196 tokens x 512), zstd on top")
    for col in ("codec", "mode", "tokens shape", "MB per clip-view", "mean cos to fp32", "p1 cos"):
        t.add_column(col)
    for r in storage:
        t.add_row(r["codec"], r["mode"], str(r["tokens_shape"]), f"{r['bytes_per_clip_view'] / 1e6:.3f}",
                  f"{r['mean_cos']:.6f}", f"{r['p1_cos']:.6f}")
    console.print(t)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "throughput": tp, "storage": storage}, indent=2))


if __name__ == "__main__":
    main()
