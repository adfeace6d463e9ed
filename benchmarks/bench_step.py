"""Step cost of stage 1: student only vs cached targets vs online teacher, from one run.

Run (CPU, about 5 minutes on 2 cores):

    .venv/bin/python benchmarks/bench_step.py
    .venv/bin/python benchmarks/bench_step.py --device cuda --batch-size 32 --steps 20 --student umt_base_patch16

Modes, all with the same student (UMT-B/16 by default), teacher architecture (ViT-B-16, random
weights), T = 8, 224 px, 80 % semantic masking and the same views:

  a. student only — targets and attention already in memory; mask, gather, forward, backward, step.
  b. cached       — the real stage-1 loop (`stages.stage1.train`) reading a Zarr store through a
                    DataLoader (pixels re-decoded from the videos with the stored views).
  c. online       — the same loop with `teacher.mode=online`: the teacher runs on every batch.

Each mode runs in its own subprocess so its peak RSS (CPU) / peak CUDA memory is its own. Step time is
the median (and min/max) over the steps after the warm-up steps. Goals: b/a ≤ 1.05, c/b ≥ 2.5.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _overrides(args, manifest: Path, store: Path, out: Path) -> list[str]:
    return [
        f"corpus.source={manifest}", f"cache.store={store}", "corpus.video_backend=pyav", "teacher.pretrained=null",
        "teacher.precision=fp32", f"cache.device={args.device}", "cache.num_views=1", "cache.batch_size=2",
        "cache.num_workers=1", f"cache.codec={args.codec}", f"student.name={args.student}",
        f"train.device={args.device}", f"train.batch_size={args.batch_size}", f"train.num_workers={args.workers}",
        f"train.max_steps={args.warmup + args.steps}", "train.log_every=1", "train.ckpt_every=100000",
        f"train.output_dir={out}", "train.amp=bf16", "student.drop_path_rate=0.0",
    ]


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_student_only(args, cfg) -> list[float]:
    """Mode a: everything the loop does on the GPU side, with targets already in memory."""
    from umt_distill.data.pixels import normalize_video
    from umt_distill.losses import gather_visible, uta_loss
    from umt_distill.registry import MASKS
    from umt_distill.training.optim import build_adamw
    from umt_distill.training.stage_parts import build_student, mask_generator

    device = torch.device(args.device)
    torch.manual_seed(0)
    K, D, T, N, B = cfg.teacher.layers, 512, cfg.views.num_frames, (cfg.views.size // 16) ** 2, args.batch_size
    student = build_student(cfg, D).to(device)
    opt = build_adamw(student, 1e-4, 0.05, (0.9, 0.95), 1e-8, skip=student.no_weight_decay())
    pixels = torch.randint(0, 256, (B, T, 3, cfg.views.size, cfg.views.size), dtype=torch.uint8, device=device)
    tokens = torch.randn(K, B, T * N, D, device=device)
    attn = torch.rand(B, T, N, device=device)
    times = []
    amp = torch.bfloat16 if device.type == "cuda" else None
    for step in range(args.warmup + args.steps):
        t = time.perf_counter()
        vis = MASKS.get("semantic")(B, T, N, cfg.mask.ratio, mask_generator(0, step, 0), attn=attn, device=device)
        targets = gather_visible(tokens, vis)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss, _ = uta_loss(student(normalize_video(pixels), vis).float(), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t)
    return times[args.warmup:]


def run_loop(args, cfg) -> list[float]:
    """Modes b and c: the real stage-1 loop; step times from its metrics.jsonl."""
    from umt_distill.stages.stage1 import train
    from umt_distill.training.metrics import read_metrics

    train(cfg)
    steps = read_metrics(Path(cfg.train.output_dir) / "metrics.jsonl")
    return [m["step_time"] for m in steps][args.warmup:]


def child(args) -> None:
    from umt_distill.config import load_recipe

    torch.set_num_threads(args.threads)
    extra = ["teacher.mode=online"] if args.mode == "online" else []
    cfg = load_recipe("stage1/b16_k710", _overrides(args, args.manifest, args.store, args.out) + extra)
    times = run_student_only(args, cfg) if args.mode == "student" else run_loop(args, cfg)
    print(json.dumps({"mode": args.mode, "times": times, "peak_mb": _peak_memory_mb(args.device)}))


def parent(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from umt_distill.cache.pipeline import cache_teacher
    from umt_distill.config import load_recipe
    from umt_distill.data.synthetic import moving_shapes_video, write_video

    tmp = Path(tempfile.mkdtemp(prefix="bench_step_"))
    try:
        clips = args.batch_size * (args.warmup + args.steps)
        with open(tmp / "m.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "path"])
            for i in range(clips):
                write_video(tmp / f"c{i}.mp4", moving_shapes_video(16, 240, 320, seed=i), fps=25)
                w.writerow([f"c{i}", f"c{i}.mp4"])
        store = tmp / "store"
        cache_teacher(load_recipe("stage1/b16_k710", _overrides(args, tmp / "m.csv", store, tmp / "unused")), progress=False)
        results = {}
        for mode in ("student", "cached", "online"):
            cmd = [sys.executable, __file__, "--child", mode, "--manifest", str(tmp / "m.csv"), "--store", str(store),
                   "--out", str(tmp / f"run_{mode}"), *sys.argv[1:]]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"mode {mode} failed:\n{proc.stderr[-4000:]}")
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {m: statistics.median(r["times"]) for m, r in results.items()}
    table = Table(title=f"stage-1 step, {args.student} + ViT-B-16 teacher (random weights), T=8, 224 px, 80% semantic mask, "
                        f"batch {args.batch_size}, {args.device}, {args.threads} threads")
    for col in ("mode", "median s", "min s", "max s", "steps", "peak MB", "ratio"):
        table.add_column(col)
    ratio = {"student": "1.00 (a)", "cached": f"{med['cached'] / med['student']:.3f} b/a (goal ≤ 1.05)",
             "online": f"{med['online'] / med['cached']:.3f} c/b (goal ≥ 2.5); c/a {med['online'] / med['student']:.3f}"}
    for mode, r in results.items():
        table.add_row(mode, f"{med[mode]:.3f}", f"{min(r['times']):.3f}", f"{max(r['times']):.3f}", str(len(r["times"])),
                      f"{r['peak_mb']:.0f}", ratio[mode])
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--student", default="umt_base_patch16")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="measured steps per mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers of the cached/online loops")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--codec", default="fp16")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.mode = args.child
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
