"""UMT's Table 1, measured: unmasked token alignment vs pixel reconstruction, step time and peak memory.

UMT (ICCV 2023, Table 1, ViT-B/16 on K400) reports that UTA costs 36 % of the memory of VideoMAE's pixel
reconstruction; VideoMAE V2 (CVPR 2023) reports that its dual masking (decoder: running cell, 50 %)
halves the memory and cuts the computation 1.5×. Rows, each one training step of the real parts
(model, masks, targets, loss, backward, AdamW) with random weights and in-memory pixels:

  uta_cached   UMT-B/16 student, tubelet 1, semantic mask 80 %, cached CLIP-B/16 targets already in memory
  uta_online   the same with the CLIP-B/16 teacher run on every batch (the official UMT step)
  pixel        VideoMAE-B/16: tubelet 2, tube mask 90 %, decoder 384×4 on every invisible token
  pixel_dual   the same with VideoMAE V2's running-cell decoder mask (50 %)
  uta_pixel    UMT Table 1's combination: the UTA student (tubelet 1, semantic 80 %, cached targets) plus
               the pixel decoder on every masked token, both losses in one step

"As each paper trains": UTA rows at T = 8 (tubelet 1, 1568 tokens), pixel rows at T = 16 (tubelet 2,
1568 tokens). "At equal T": the UTA rows again at T = 16. Each row runs in a fresh process (forked from a
preloaded server); peak memory is CUDA ``max_memory_allocated`` or, on CPU, the resident-set high-water
mark over the process's footprint before the models were built (so weights, optimizer state and the
step's activations all count, as in the papers' GPU memory).

    .venv/bin/python -m benchmarks.bench_table1                        # CPU, batch 1, ~5-10 min on 2 cores
    .venv/bin/python -m benchmarks.bench_table1 --device cuda --batch-size 32 --steps 10 --warmup 3
    .venv/bin/python -m benchmarks.run --sections table1              # the same inside the suite's report
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import load_average, log, peak_memory_mb, reset_peak_memory, run_isolated, timing_stats

PAPER = {"uta_over_pixel_memory": 0.36, "dual_over_plain_memory": 0.5, "dual_over_plain_time": 1 / 1.5}
# (row name, mode, frames): the paper settings first, then the UTA rows at the pixel rows' T.
ROWS = [("uta_cached", "uta_cached", 8), ("uta_online", "uta_online", 8), ("pixel", "pixel", 16),
        ("pixel_dual", "pixel_dual", 16), ("uta_pixel", "uta_pixel", 8),
        ("uta_cached_T16", "uta_cached", 16), ("uta_online_T16", "uta_online", 16), ("uta_pixel_T16", "uta_pixel", 16)]


@dataclass(frozen=True)
class Table1Settings:
    device: str = "cpu"
    batch_size: int = 1
    warmup: int = 1  # >= 1: the step peak is measured over the state after the warm-up
    steps: int = 3
    threads: int = 2
    amp: str = "bf16"  # CUDA only; CPU runs fp32
    size: int = 224
    student: str = "umt_base_patch16"  # the smoke preset shrinks it; the rows are B/16 otherwise
    attention: str = "default"  # "math": the unfused softmax(QK^T)V kernel, which keeps the L×L attention
    # (as the official VideoMAE / UMT code computes it); "default": PyTorch's fused choice
    isolate: bool = True
    rows: tuple[str, ...] = tuple(r[0] for r in ROWS)


def _recipe(mode: str, frames: int, s: Table1Settings):
    from umt_distill.config import load_recipe

    common = [f"views.num_frames={frames}", f"views.size={s.size}", f"teacher.input_size={s.size}", f"train.amp={s.amp}",
              "teacher.pretrained=null", f"student.name={s.student}",
              "teacher.precision=" + ("fp32" if s.device == "cpu" else "fp16")]
    if mode.startswith("uta_") and mode != "uta_pixel":
        return load_recipe("stage1/b16_k710", [*common, "teacher.mode=" + mode.split("_")[1]])
    extra = {"pixel": [], "pixel_dual": ["videomae.decoder_mask=running_cell"],
             "uta_pixel": ["videomae.target=uta+pixel", "videomae.tubelet_size=1", "mask.type=semantic",
                           "mask.ratio=0.8", "teacher.mode=cached", "teacher.name=ViT-B-16"]}[mode]
    return load_recipe("videomae/b16_k400", [*common, *extra])


def _teacher_dim(name: str) -> int:
    import open_clip

    return int(open_clip.get_model_config(name)["embed_dim"])


def measure_row(mode: str, frames: int, s: Table1Settings) -> dict[str, Any]:
    """One row in this process: build, warm up, time ``steps`` steps; peak memory over the pre-build base."""
    import torch

    from umt_distill.data.pixels import normalize_video
    from umt_distill.losses.uta import uta_loss
    from umt_distill.training.optim import amp_setup, build_adamw
    from umt_distill.stages.parts import build_student, mask_generator, step_targets

    torch.set_num_threads(s.threads)
    device = torch.device(s.device)
    cfg = _recipe(mode, frames, s)
    B, T, H = s.batch_size, frames, s.size
    uses_teacher = mode.startswith("uta")
    K, N = cfg.teacher.layers, (H // 16) ** 2
    D = _teacher_dim(cfg.teacher.name) if uses_teacher else None  # open_clip's import alone takes seconds
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (B, T, 3, H, H), dtype=torch.uint8, generator=gen).to(device)
    base = reset_peak_memory(s.device)
    cached = {}  # the batch's targets count: the loader delivers them to the device at every step
    if mode in ("uta_cached", "uta_pixel"):
        cached = {"tokens": torch.randn(B, K, T, N, D, generator=gen).to(device), "attn": torch.rand(B, T, N, generator=gen).to(device)}
    elif mode == "uta_online":
        cached = {"attn": None}
    torch.manual_seed(0)
    teacher = None
    if mode == "uta_online":
        from umt_distill.teachers.build import build_teacher

        teacher = build_teacher(cfg, device)
    if mode.startswith("uta_") and mode != "uta_pixel":
        model = build_student(cfg, D).to(device)
    else:
        from umt_distill.stages.videomae_parts import build_model

        model = build_model(cfg, D).to(device)
    o = cfg.optim
    optimizer = build_adamw(model, o.lr, o.weight_decay, o.betas, o.eps, skip=model.no_weight_decay())
    amp, _ = amp_setup(cfg.train.amp, device)
    times, counts, warm_peak, steady = [], {}, 0.0, 0.0
    kernel = _attention_kernel(s.attention)
    for step in range(s.warmup + s.steps):
        if step == s.warmup:  # steady state: optimizer state allocated, the step's transient memory freed
            warm_peak = peak_memory_mb(s.device)
            steady = reset_peak_memory(s.device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None), kernel():
            if model.__class__.__name__ == "UMTStudent":
                gen = mask_generator(0, step, 0)
                targets, vis = (step_targets(cfg, cached, pixels, teacher, gen, device) if teacher is not None
                                else _in_memory_targets(cfg, cached, gen, device))
                loss, _ = uta_loss(model(normalize_video(pixels), vis).float(), targets)
                counts = {"visible_tokens": vis.shape[1], "decoded_tokens": 0}
            else:
                from umt_distill.stages.videomae import _losses
                from umt_distill.stages.videomae_parts import step_plan

                plan = step_plan(cfg, pixels, cached.get("tokens"), cached.get("attn"), step, list(range(B)), 16, device)
                pred, align = model(normalize_video(pixels), plan.visible_idx, plan.decode_idx)
                pix, uta_l = _losses(pred, align, plan)
                loss = pix + uta_l
                counts = {"visible_tokens": plan.visible_idx.shape[1], "decoded_tokens": plan.decode_idx.shape[1]}
        loss.backward()
        loss.item()  # the loops' sync point
        torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    step_peak = peak_memory_mb(s.device)
    peak = max(warm_peak, step_peak)
    return {"mode": mode, "frames": frames, "tubelet": 1 if mode.startswith("uta") else 2, **counts,
            "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "teacher_params_M": round(sum(p.numel() for p in teacher.parameters()) / 1e6, 2) if teacher else 0.0,
            "step_time": timing_stats(times[s.warmup:]),
            "peak_mb": round(peak - base, 1), "step_peak_mb": round(step_peak - steady, 1),
            "base_mb": round(base, 1), "memory": "cuda max_memory_allocated" if s.device.startswith("cuda")
            else "CPU resident-set high-water mark (VmHWM) minus the pre-build resident set"}


def _in_memory_targets(cfg, cached: dict, gen, device):
    """Stage 1's cached targets at the visible tokens (``step_targets`` without a store to decode from):
    the float32 tokens as the loader delivers them, a semantic mask from the attention."""
    from umt_distill.masking import gather_visible
    from umt_distill.registry import MASKS

    B, T, N = cached["attn"].shape
    visible_idx = MASKS.get(cfg.mask.type)(B, T, N, cfg.mask.ratio, gen, attn=cached["attn"], device=device)
    return gather_visible(cached["tokens"].flatten(2, 3).transpose(0, 1), visible_idx), visible_idx  # [K, B, L, D]


def _attention_kernel(name: str):
    import contextlib

    if name == "default":
        return contextlib.nullcontext
    if name != "math":
        raise ValueError(f"attention {name!r}: expected 'default' or 'math'")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return lambda: sdpa_kernel(SDPBackend.MATH)


def table1(s: Table1Settings) -> dict[str, Any]:
    """Every requested row (each in its own process when ``s.isolate``) and the ratios against the papers."""
    rows: dict[str, Any] = {}
    load_start = load_average()
    for name, mode, frames in ROWS:
        if name not in s.rows:
            continue
        log(f"table1: {name} (T={frames}, batch {s.batch_size})")
        rows[name] = run_isolated(measure_row, mode, frames, s) if s.isolate else measure_row(mode, frames, s)
    return {"settings": asdict(s), "rows": rows, "ratios": ratios(rows), "paper": PAPER,
            "load_start": load_start, "load_end": load_average()}


def state_mb(row: dict[str, Any]) -> float:
    """Training state by arithmetic: fp32 weights, gradients and AdamW's two moments of the trained model
    (16 B per parameter) plus the frozen teacher's fp32 weights (4 B per parameter)."""
    return round((16 * row["params_M"] + 4 * row["teacher_params_M"]) * 1e6 / 2**20, 1)


def activation_estimate_mb(row: dict[str, Any]) -> float:
    """``peak_mb`` minus :func:`state_mb`: what the step itself (activations, targets, workspace) added."""
    return round(row["peak_mb"] - state_mb(row), 1)


def ratios(rows: dict[str, Any]) -> dict[str, float | None]:
    rows = {k: {**v, "activation_est_mb": activation_estimate_mb(v)} for k, v in rows.items()}
    field = {"time": None, "memory": "peak_mb", "step_memory": "step_peak_mb", "activation": "activation_est_mb"}

    def r(a: str, b: str, key: str) -> float | None:
        if a not in rows or b not in rows:
            return None
        x = rows[a]["step_time"]["median"] if key == "time" else rows[a][field[key]]
        y = rows[b]["step_time"]["median"] if key == "time" else rows[b][field[key]]
        return round(x / y, 4) if y else None

    # "memory": weights + optimizer + step (the papers' GPU memory); "step_memory": a measured step's peak
    # over the steady state after the warm-up (activations, gradients, targets): what grows with the batch.
    return {
        "uta_cached_over_pixel_activation_est": r("uta_cached", "pixel", "activation"),
        "uta_online_over_pixel_activation_est": r("uta_online", "pixel", "activation"),
        "dual_over_plain_activation_est": r("pixel_dual", "pixel", "activation"),
        "uta_cached_over_pixel_step_memory": r("uta_cached", "pixel", "step_memory"),
        "uta_online_over_pixel_step_memory": r("uta_online", "pixel", "step_memory"),
        "dual_over_plain_step_memory": r("pixel_dual", "pixel", "step_memory"),
        "uta_cached_over_pixel_memory": r("uta_cached", "pixel", "memory"),
        "uta_online_over_pixel_memory": r("uta_online", "pixel", "memory"),
        "uta_cached_over_pixel_time": r("uta_cached", "pixel", "time"),
        "uta_online_over_pixel_time": r("uta_online", "pixel", "time"),
        "uta_pixel_over_uta_cached_memory": r("uta_pixel", "uta_cached", "memory"),
        "dual_over_plain_memory": r("pixel_dual", "pixel", "memory"),
        "dual_over_plain_time": r("pixel_dual", "pixel", "time"),
        "equal_T16_uta_cached_over_pixel_memory": r("uta_cached_T16", "pixel", "memory"),
        "equal_T16_uta_online_over_pixel_memory": r("uta_online_T16", "pixel", "memory"),
        "equal_T16_uta_cached_over_pixel_time": r("uta_cached_T16", "pixel", "time"),
        "equal_T16_uta_online_over_pixel_time": r("uta_online_T16", "pixel", "time"),
    }


def table1_markdown(result: dict[str, Any]) -> str:
    """The rows and ratios as markdown (the suite's report and the standalone script print this)."""
    s = result["settings"]
    lines = [f"### UMT Table 1: UTA vs pixel reconstruction (B/16, batch {s['batch_size']}, {s['device']}, "
             f"{s['size']} px, attention kernel {s.get('attention', 'default')})", "",
             "| row | T | tubelet | encoder tokens | decoded tokens | step s (median) | peak MB | state MB | peak − state MB "
             "| step peak MB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | {row['frames']} | {row['tubelet']} | {row['visible_tokens']} | {row['decoded_tokens']} "
                     f"| {row['step_time']['median']:.3f} | {row['peak_mb']:.0f} | {state_mb(row):.0f} | {activation_estimate_mb(row):.0f} "
                     f"| {row['step_peak_mb']:.0f} |")
    lines += ["", "| ratio | measured | paper |", "|---|---:|---:|"]
    paper = {"uta_cached_over_pixel_activation_est": "0.36 (UMT)", "uta_online_over_pixel_activation_est": "0.36 (UMT)",
             "dual_over_plain_activation_est": "0.5 (V2)", "uta_cached_over_pixel_memory": "0.36 (UMT)", "uta_online_over_pixel_memory": "0.36 (UMT)",
             "uta_cached_over_pixel_step_memory": "0.36 (UMT)", "uta_online_over_pixel_step_memory": "0.36 (UMT)",
             "dual_over_plain_memory": "0.5 (V2)", "dual_over_plain_step_memory": "0.5 (V2)", "dual_over_plain_time": "0.667 (V2: 1.5x less compute)"}
    for key, value in ratios(result["rows"]).items():  # recomputed: a re-rendered old JSON gets every ratio
        lines.append(f"| {key} | {'n/a' if value is None else f'{value:.3f}'} | {paper.get(key, '')} |")
    lines.append("\npeak MB: weights + optimizer state + the step, over the process before the build. state MB: by "
                 "arithmetic, 16 B per trained parameter (fp32 weights, gradients, AdamW moments) + 4 B per frozen teacher "
                 "parameter; peak − state: what the step itself added (activations, targets, workspace). step peak MB: a "
                 "measured step's peak over the steady state after the warm-up; on CPU a resident-set measure, which "
                 "misses memory the allocator kept from the warm-up step, so it is a lower bound.")
    lines.append(f"\nLoad average (1, 5, 15 min) at start {result['load_start']}, at end {result['load_end']}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, default=224, help="input side (224 for the papers' shapes)")
    p.add_argument("--rows", default=None, help="comma list from " + ",".join(r[0] for r in ROWS))
    p.add_argument("--in-process", action="store_true", help="no fresh process per row (memory then accumulates)")
    p.add_argument("--attention", default="default", choices=["default", "math"],
                   help="math: unfused attention that stores the L×L matrix, as the official code")
    p.add_argument("--json", type=Path, default=None, help="write {'table1': ...} here")
    a = p.parse_args(argv)
    s = Table1Settings(device=a.device, batch_size=a.batch_size, warmup=a.warmup, steps=a.steps, threads=a.threads,
                       size=a.size, isolate=not a.in_process, attention=a.attention,
                       rows=tuple(a.rows.split(",")) if a.rows else tuple(r[0] for r in ROWS))
    result = table1(s)
    print(table1_markdown(result))
    if a.json:
        a.json.write_text(json.dumps({"table1": result}, indent=1))
    return result


if __name__ == "__main__":
    from benchmarks.bench_table1 import main as package_main  # children import by package name (bench_step.py)

    package_main()
