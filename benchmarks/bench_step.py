"""Step cost of stage 1: student only vs cached targets vs online teacher, from one run.

Modes, all with the same student, teacher architecture (random weights), frames, mask ratio and views:

  student  targets and attention already in memory (on the device): mask, gather, forward, backward,
           clip, step — the floor no target source can beat.
  cached   the real stage-1 loop (``stages.stage1.train``) over a Zarr store through its DataLoader
           (pixels re-decoded from the videos with the stored views, as in training).
  online   the same loop with ``teacher.mode=online``: the teacher runs on every batch.

Each (configuration, mode) runs in a fresh process forked from a preloaded server, so its peak memory
(CPU resident set / CUDA allocated) is its own. The three processes live side by side and take turns,
one training step at a time in mirrored order (student, cached, online, online, cached, student ...),
the waiting ones paused with their DataLoader workers stopped: on a shared machine whose speed
changes from minute to minute (other users' jobs), the modes are compared within seconds of each
other. ``interleave=False`` runs the modes one after the other instead (e.g. when three processes
do not fit on one GPU). Step time = median, min, max over the steps after the warm-up steps. Goals for UMT-B/16 + CLIP-B/16, T=8, 80 %: cached/student ≤ 1.05, online/cached ≥ 2.5.

Standalone (one configuration; ``run.py`` runs the grid and writes the report):

    .venv/bin/python -m benchmarks.bench_step                       # UMT-B/16, T=8, 80 %, batch 2, CPU, ~5 min
    .venv/bin/python -m benchmarks.bench_step --size tiny --frames 16 --ratio 0.9
    .venv/bin/python -m benchmarks.bench_step --device cuda --batch-size 32 --steps 20 --warmup 5 --amp bf16
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    IsolatedRun,
    gate,
    load_average,
    log,
    peak_memory_mb,
    ratio,
    reset_peak_memory,
    run_interleaved,
    run_isolated,
    timing_stats,
)

# Student sizes with their matching teachers (the recipe supplies the teacher, its layers, resolution).
SIZES: dict[str, dict[str, str]] = {
    "tiny": {"recipe": "stage1/tiny", "student": "umt_test_tiny", "teacher": "umt-test-tiny",
             "label": "UMT test-tiny + CLIP test-tiny (64 px, K=2, D=32)"},
    "small": {"recipe": "stage1/b16_k710", "student": "umt_small_patch16", "teacher": "ViT-B-16",
              "label": "UMT-S/16 + CLIP-B/16 (224 px, K=6, D=512)"},
    "base": {"recipe": "stage1/b16_k710", "student": "umt_base_patch16", "teacher": "ViT-B-16",
             "label": "UMT-B/16 + CLIP-B/16 (224 px, K=6, D=512)"},
    "large": {"recipe": "stage1/l16_k710", "student": "umt_large_patch16", "teacher": "ViT-L-14",
              "label": "UMT-L/16 + CLIP-L/14 at 196 px (K=6, D=768)"},
}
MODES = ("student", "cached", "online")


@dataclass(frozen=True)
class StepSettings:
    """How each configuration is run (one preset fills these)."""

    device: str = "cpu"
    batch_size: int = 1
    warmup: int = 1
    steps: int = 6  # measured steps per mode
    interleave: bool = True  # modes take turns step by step (else one mode after the other)
    workers: int = 1  # DataLoader workers of the cached/online loops
    threads: int = 2
    amp: str = "bf16"  # used on CUDA only (the loop runs fp32 on CPU)
    teacher_precision: str = "fp32"
    backend: str = "decord"
    codec: str = "fp16"


def store_overrides(size: str, frames: int, manifest: str, store: str, s: StepSettings, codec: str,
                    batch_size: int, workers: int) -> list[str]:
    """Recipe overrides of the cache-teacher run that builds a configuration's store (1 view per clip).

    The step's cached mode reads a zarr store and re-decodes the pixels from the videos, like its
    online mode: the comparison isolates the teacher (the recipes' stored-frames WebDataset path is
    measured by the loader section, ``bench_loader.py``).
    """
    return [
        f"corpus.source={manifest}", f"cache.store={store}", f"corpus.video_backend={s.backend}",
        "teacher.pretrained=null", f"teacher.precision={s.teacher_precision}", f"cache.device={s.device}",
        "cache.num_views=1", f"cache.batch_size={batch_size}", f"cache.num_workers={workers}",
        f"cache.codec={codec}", "cache.mode=full", "cache.clips_per_shard=64", f"views.num_frames={frames}",
        "cache.layout=zarr", "cache.frames=none", "cache.compressor=zstd", "train.pixels_from=video",
    ]


def loop_overrides(size: str, frames: int, mask_ratio: float, manifest: str, store: str, out: str,
                   s: StepSettings) -> list[str]:
    """Overrides of the training runs (every mode uses the same ones; online adds teacher.mode)."""
    return store_overrides(size, frames, manifest, store, s, s.codec, 1, 0) + [
        f"student.name={SIZES[size]['student']}", "student.drop_path_rate=0.0", f"mask.ratio={mask_ratio}",
        f"train.device={s.device}", f"train.batch_size={s.batch_size}", f"train.num_workers={s.workers}",
        f"train.max_steps={s.warmup + s.steps}", "train.log_every=1", "train.ckpt_every=1000000",
        f"train.output_dir={out}", f"train.amp={s.amp}", "train.accum_steps=1",
    ]


def rows_needed(s: StepSettings) -> int:
    """Clips in the store: one epoch covers every step, so no DataLoader restarts inside the timing."""
    return s.batch_size * (s.warmup + s.steps)


# --------------------------------------------------------------------------------------------------
# child side


def _student_only(cfg, s: StepSettings) -> tuple[list[float], list[float]]:
    """Mode ``student``: the loop's GPU-side work with targets already in device memory."""
    import torch

    from umt_distill.data.pixels import normalize_video
    from umt_distill.losses.uta import uta_loss
    from umt_distill.training.optim import build_adamw
    from umt_distill.stages.parts import build_student, mask_generator, step_targets

    device = torch.device(s.device)
    torch.manual_seed(cfg.seed)
    teacher = _teacher_shape(cfg)
    K, D, N = cfg.teacher.layers, teacher["D"], teacher["N"]
    B, T, H = s.batch_size, cfg.views.num_frames, cfg.views.size
    student = build_student(cfg, D).to(device)
    o = cfg.optim
    optimizer = build_adamw(student, o.lr, o.weight_decay, o.betas, o.eps, skip=student.no_weight_decay())
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (B, T, 3, H, H), dtype=torch.uint8, generator=gen).to(device)
    batch = {"tokens": torch.randn(B, K, T, N, D, generator=gen).to(device),  # as the loader delivers them
             "attn": torch.rand(B, T, N, generator=gen).to(device)}
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp) if device.type == "cuda" else None
    times = []
    for step in range(s.warmup + s.steps):
        gate()  # interleaved runs: wait for this mode's turn (untimed)
        t = time.perf_counter()
        targets, visible_idx = step_targets(cfg, batch, pixels, None, mask_generator(cfg.seed, step, 0), device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            preds = student(normalize_video(pixels), visible_idx)  # [K, B, L, D]
            loss, _ = uta_loss(preds.float(), targets)
        loss.backward()
        loss.item()  # the loop's sync point
        torch.nn.utils.clip_grad_norm_(student.parameters(), float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times[s.warmup:], [0.0] * s.steps


def _teacher_shape(cfg) -> dict[str, int]:
    """N and D of the recipe's teacher without building it (the store spec has them too)."""
    from umt_distill.cache.spec import read_spec

    spec = read_spec(cfg.cache.store)
    return {"N": int(spec["teacher"]["N"]), "D": int(spec["teacher"]["D"])}


def _pace_loop(loop_module) -> None:
    """Make the stage-1 loop wait at a gate before its first step and after each logged step.

    ``loop_module`` is ``umt_distill.training.loop``, whose ``open_run`` builds the loop's metrics logger.

    The loop logs every step (``train.log_every=1``) after its step time is taken and before the next
    step's clock starts, so the waits fall outside the timed region. The caller restores the original.
    """
    from umt_distill.training.metrics import MetricsLogger

    class PacedMetricsLogger(MetricsLogger):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            gate()

        def log(self, record: dict) -> None:
            super().log(record)
            t = time.perf_counter()
            gate()
            # The next step's data clock started before this wait: measure_mode takes it back out.
            _GATE_WAITS.append(time.perf_counter() - t)

    _GATE_WAITS.clear()
    loop_module.MetricsLogger = PacedMetricsLogger


_GATE_WAITS: list[float] = []  # seconds paused after each logged step of a paced loop


def _without_waits(data_times: list[float], waits: list[float]) -> list[float]:
    """Data time of each step minus the pause that preceded it (step i+1 follows the wait after step i)."""
    return [max(0.0, d - (waits[i - 1] if 0 < i <= len(waits) else 0.0)) for i, d in enumerate(data_times)]


def measure_mode(mode: str, recipe: str, overrides: list[str], s: StepSettings) -> dict[str, Any]:
    """One mode of one configuration, in the current (fresh) process. Returns times and memory."""
    import torch

    from umt_distill.config import load_recipe

    torch.set_num_threads(s.threads)
    load_start = load_average()
    baseline = reset_peak_memory(s.device)
    cfg = load_recipe(recipe, overrides + (["teacher.mode=online"] if mode == "online" else []))
    if mode == "student":
        times, data_times = _student_only(cfg, s)
    else:
        from umt_distill.stages import stage1
        from umt_distill.training import loop
        from umt_distill.training.metrics import read_metrics

        original = loop.MetricsLogger
        _pace_loop(loop)
        try:
            stage1.train(cfg)
        finally:
            loop.MetricsLogger = original  # in-process runs (smoke preset) leave the loop as they found it
        metrics = read_metrics(Path(cfg.train.output_dir) / "metrics.jsonl")
        data_all = _without_waits([m["data_time"] for m in metrics], _GATE_WAITS)
        times, data_times = [m["step_time"] for m in metrics][s.warmup:], data_all[s.warmup:]
    return {"mode": mode, **timing_stats(times), "data_time_median": sorted(data_times)[len(data_times) // 2],
            "peak_mb": round(peak_memory_mb(s.device), 1), "baseline_mb": round(baseline, 1),
            "load_start": load_start, "load_end": load_average()}


# --------------------------------------------------------------------------------------------------
# parent side


def bench_config(size: str, frames: int, mask_ratio: float, manifest: str, store: str, out_dir: Path,
                 s: StepSettings, modes: tuple[str, ...] = MODES, isolate: bool = True) -> dict[str, Any]:
    """All modes of one configuration over the same store and corpus; ratios from the medians.

    ``isolate=False`` measures in this process (peak memory then includes what ran before).
    """
    recipe = SIZES[size]["recipe"]
    result: dict[str, Any] = {"size": size, "label": SIZES[size]["label"], "frames": frames, "mask_ratio": mask_ratio,
                              "batch_size": s.batch_size, "modes": {}}
    args = {m: (m, recipe, loop_overrides(size, frames, mask_ratio, manifest, store, str(out_dir / f"{size}_T{frames}_r{mask_ratio}_{m}"), s), s)
            for m in modes}
    if isolate and s.interleave:
        log(f"step: {size} T={frames} ratio={mask_ratio}, modes {'/'.join(modes)} interleaved")
        measured = run_interleaved({m: IsolatedRun(measure_mode, *a) for m, a in args.items()})
    else:
        measured = {}
        for m, a in args.items():
            log(f"step: {size} T={frames} ratio={mask_ratio} mode={m}")
            measured[m] = run_isolated(measure_mode, *a) if isolate else measure_mode(*a)
    result["modes"] = {m: measured[m] for m in modes}
    med = {m: r["median"] for m, r in result["modes"].items()}
    result["ratios"] = {
        "cached_over_student": ratio(med.get("cached"), med.get("student")),
        "online_over_cached": ratio(med.get("online"), med.get("cached")),
        "online_over_student": ratio(med.get("online"), med.get("student")),  # the ceiling of online/cached
    }
    result["student_clips_per_s"] = ratio(s.batch_size, med.get("student"))
    result["cached_clips_per_s"] = ratio(s.batch_size, med.get("cached"))
    return result


def step_table(result: dict[str, Any]) -> str:
    """The result of one configuration as a markdown table (times in seconds), with the goal ratios."""
    st = result["settings"]
    lines = [f"{result['label']}, T={result['frames']}, mask {result['mask_ratio']:.0%}, batch {st['batch_size']}, "
             f"{st['device']} ({st['threads']} threads), {st['steps']} steps after {st['warmup']} warm-up"
             f"{'' if st['interleave'] else ', sequential'}", "",
             "| mode | median s | min s | max s | data wait median s | peak MB |", "|---|---|---|---|---|---|"]
    for name, m in result["modes"].items():
        lines.append(f"| {name} | {m['median']:.3f} | {m['min']:.3f} | {m['max']:.3f} | {m['data_time_median']:.3f} "
                     f"| {m['peak_mb']:.0f} |")
    r = result["ratios"]
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    lines += ["", f"cached / student-only = {fmt(r.get('cached_over_student'))} (goal <= 1.05); "
              f"online / cached = {fmt(r.get('online_over_cached'))} (goal >= 2.5); "
              f"ceiling online / student-only = {fmt(r.get('online_over_student'))}"]
    return "\n".join(lines)


def main() -> None:
    from benchmarks.common import clean_dir, scratch_dir, write_corpus

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="base", choices=list(SIZES))
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--ratio", type=float, default=0.8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="measured steps per mode")
    p.add_argument("--sequential", action="store_true", help="run the modes one after the other, not step by step")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers of the cached/online loops")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--amp", default="bf16", choices=["none", "bf16", "fp16"], help="CUDA autocast of the student")
    p.add_argument("--teacher-precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--backend", default="decord", choices=["decord", "pyav", "torchcodec"])
    p.add_argument("--codec", default="fp16")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args()
    import os

    from umt_distill.cache.pipeline import cache_teacher
    from umt_distill.config import load_recipe

    s = StepSettings(device=args.device, batch_size=args.batch_size, warmup=args.warmup, steps=args.steps, interleave=not args.sequential,
                     workers=args.workers, threads=args.threads or os.cpu_count() or 1, amp=args.amp,
                     teacher_precision=args.teacher_precision, backend=args.backend, codec=args.codec)
    with scratch_dir("bench_step_") as tmp:
        corpus = write_corpus(tmp / "videos", num_videos=min(rows_needed(s), 8), num_rows=rows_needed(s),
                              frames=max(64, 4 * args.frames), height=240, width=320)
        store = str(clean_dir(tmp / "store") / "s")
        cache_teacher(load_recipe(SIZES[args.size]["recipe"], store_overrides(
            args.size, args.frames, corpus["manifest"], store, s, s.codec, 2, 1)), progress=False)
        result = bench_config(args.size, args.frames, args.ratio, corpus["manifest"], store, tmp / "runs", s)
    result["settings"] = asdict(s)
    print(step_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    # Child processes unpickle functions and settings by module name; `__main__` is not importable
    # there, so run the copy of this module that lives under its package name.
    from benchmarks.bench_step import main as package_main

    package_main()
