"""SMAUG on the cache, measured at toy scale: what token sparsification costs and keeps (docs/smaug.md).

SMAUG (ICCV 2023, arXiv 2211.11446) keeps each frame's most-attended visible tokens. Three measurements,
each of the real parts (``models/sparsify.py``, the student, ``uta_loss``, AdamW):

1. **Step cost.** One stage-1 training step (student forward on the visible tokens, UTA loss, backward,
   AdamW) with cached targets already in memory, at ρ ∈ {1, 0.75, 0.5} × ℓ ∈ {0, L/3}, teacher ranking,
   plus ρ = 0.5 with the student's own ranking and with fusion at ℓ = L/3. Every configuration is a copy of
   the same student on the same batch, and the configurations take turns step by step (interleaved), so
   load on a shared machine hits them alike. ``token_speedup_keep_0.5`` = median step time at ρ = 1 ÷ at
   ρ = 0.5, ℓ = 0. Memory: the bytes autograd saves for backward in one step (the activations the kept
   tokens cut), on every device; on CUDA also ``max_memory_allocated`` of the step.
2. **Recall of object tokens.** A toy world generated here (128 px frames, patch 16: an 8×8 token grid;
   one textured disc on a noise background, labels = which patches the disc covers ≥ 25 %). A small
   open_clip ViT trained here to name the disc's colour × pattern is the teacher; its CLS attention
   (the function the cache stores as ``attn``) ranks each frame's visible tokens. Recall = object tokens
   kept ÷ visible object tokens, for teacher ranking, the trained student's own ranking (block L/3),
   and random ranking (≈ ρ by construction).
3. **Probe accuracy.** Stage 1 on that world (targets from the teacher, computed once: the cache), then a
   ridge probe on the frozen student's mean token (``evaluation.probe.linear_probe``) for colour ×
   pattern, over ≥ 3 seeds: ρ = 1 vs ρ = 0.5 (teacher ranking, ℓ = 0; student ranking, ℓ = L/3; and
   random ranking as the control). Deltas are against ρ = 1 of the same seed; the spread is the
   standard deviation over seeds.

    .venv/bin/python -m benchmarks.bench_smaug --quick          # a few minutes on 2 CPU cores
    .venv/bin/python -m benchmarks.bench_smaug                  # bigger student, more steps and seeds
    .venv/bin/python -m benchmarks.run --sections smaug         # the same inside the suite's report
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import load_average, log

GRID, PATCH, FRAMES = 8, 16, 4  # the toy world: 8×8 tokens per frame of 128 px, 4 frames per clip
COLOURS = ((225, 45, 40), (40, 200, 70), (55, 95, 235), (235, 215, 45))
PATTERNS = ("plain", "ringed")


@dataclass(frozen=True)
class SmaugSettings:
    """Sizes of the three measurements (``--quick`` shrinks them to minutes on 2 CPU cores)."""

    device: str = "cpu"
    threads: int = 1
    # step cost
    step_student: str = "umt_small_patch16"
    step_batch: int = 2
    step_frames: int = 8
    step_size: int = 224
    step_mask_ratio: float = 0.8
    step_warmup: int = 1
    step_steps: int = 5
    # toy world, teacher, stage 1, probe
    train_clips: int = 384
    test_clips: int = 192
    teacher_steps: int = 300
    student_steps: int = 300
    student_batch: int = 16
    mask_ratio: float = 0.5
    seeds: int = 3

    @classmethod
    def quick(cls, device: str = "cpu") -> SmaugSettings:
        return cls(device=device, step_batch=1, step_steps=6, train_clips=192, test_clips=128, teacher_steps=200,
                   student_steps=150, seeds=3)

    @classmethod
    def smoke(cls, device: str = "cpu") -> SmaugSettings:
        """Seconds: every code path once (the suite's smoke preset); the numbers mean nothing."""
        return cls(device=device, step_student="umt_test_tiny", step_frames=4, step_size=64, step_steps=1,
                   train_clips=8, test_clips=8, teacher_steps=1, student_steps=1, student_batch=4, seeds=2)


# --------------------------------------------------------------------------------------------------
# the toy world


def toy_world(num_clips: int, seed: int) -> dict[str, np.ndarray]:
    """Clips of one moving, textured disc over a per-clip noise background, and their labels.

    Returns:
        ``pixels`` uint8 [n, T, 3, 128, 128], ``label`` int [n] (colour × pattern, 8 classes), ``object``
        bool [n, T, 64] (the disc covers ≥ 25 % of the patch).
    """
    rng = np.random.default_rng(seed)
    size = GRID * PATCH
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    pixels = np.empty((num_clips, FRAMES, 3, size, size), np.uint8)
    labels = np.empty(num_clips, np.int64)
    obj = np.empty((num_clips, FRAMES, GRID * GRID), bool)
    for i in range(num_clips):
        colour, pattern = int(rng.integers(4)), int(rng.integers(2))
        labels[i] = colour * len(PATTERNS) + pattern
        base = rng.integers(60, 200, 3)
        noise = rng.normal(0, 30, (size // 4, size // 4, 3)).repeat(4, 0).repeat(4, 1)  # coarse grain
        background = np.clip(base + noise, 0, 255)
        radius = rng.uniform(18, 26)
        start = rng.uniform(radius, size - radius, 2)
        step = rng.uniform(-6, 6, 2)
        for t in range(FRAMES):
            cy, cx = np.clip(start + t * step, radius, size - radius)
            d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
            disc = d <= radius
            fill = np.array(COLOURS[colour], np.float32)
            if PATTERNS[pattern] == "ringed":  # a dark ring at mid-radius
                ring = (d > 0.45 * radius) & (d < 0.7 * radius)
                frame_fill = np.where(ring[..., None], fill * 0.3, fill)
            else:
                frame_fill = np.broadcast_to(fill, (size, size, 3))
            frame = np.where(disc[..., None], frame_fill, background)
            pixels[i, t] = frame.transpose(2, 0, 1).astype(np.uint8)
            cover = disc.reshape(GRID, PATCH, GRID, PATCH).mean(axis=(1, 3))  # [8, 8]
            obj[i, t] = (cover >= 0.25).reshape(-1)
    return {"pixels": pixels, "label": labels, "object": obj}


def toy_teacher(world: dict[str, np.ndarray], steps: int, seed: int):
    """A 4-block open_clip ViT-Ti/16 at 128 px (CLS token, K = 2 returned blocks), trained here to name the
    disc (colour × pattern) from single frames, then frozen: :class:`~umt_distill.teachers.clip.ClipTeacher`."""
    import torch

    from umt_distill.teachers.clip import ClipTeacher
    from umt_distill.teachers.configs import register_model_config

    name = "umt-smaug-toy"
    register_model_config(name, {
        "embed_dim": 32, "quick_gelu": True,
        "vision_cfg": {"image_size": GRID * PATCH, "patch_size": PATCH, "width": 64, "layers": 4, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }, source="benchmarks.bench_smaug")
    torch.manual_seed(seed)
    teacher = ClipTeacher(name, pretrained=None, layers=2)
    teacher.visual.requires_grad_(True)
    head = torch.nn.Linear(teacher.embed_dim, len(COLOURS) * len(PATTERNS))
    params = [p for p in teacher.visual.parameters()] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    frames = torch.from_numpy(world["pixels"]).flatten(0, 1)  # [n·T, 3, H, W]
    labels = torch.from_numpy(world["label"]).repeat_interleave(FRAMES)
    g = torch.Generator().manual_seed(seed)
    teacher.visual.train()
    for step in range(steps):
        idx = torch.randint(len(frames), (64,), generator=g)
        for group in opt.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        _, _, pooled = teacher.encode_pixels(teacher.preprocess(frames[idx][:, None]))  # [64, D]
        loss = torch.nn.functional.cross_entropy(head(pooled.float()), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.visual.eval()
    teacher.requires_grad_(False)
    return teacher, float(loss.item())


def teacher_outputs(teacher, pixels: np.ndarray, batch: int = 32) -> tuple[Any, Any]:
    """The cache of the world: teacher tokens [n, K, T, N, D] and CLS attention [n, T, N] (float32)."""
    import torch

    tokens, attn = [], []
    for i in range(0, len(pixels), batch):
        out = teacher(torch.from_numpy(pixels[i:i + batch]))
        tokens.append(out.tokens)
        attn.append(out.attn)
    return torch.cat(tokens), torch.cat(attn)


# --------------------------------------------------------------------------------------------------
# 1. step cost


def step_cost(s: SmaugSettings) -> dict[str, Any]:
    """Stage-1 step time and memory per (ρ, ℓ, source, fuse), interleaved on one batch."""
    import torch

    from umt_distill.data.pixels import normalize_video
    from umt_distill.losses.uta import uta_loss
    from umt_distill.masking import gather_visible, sample_semantic_mask
    from umt_distill.models.sparsify import SparseSpec, teacher_scores
    from umt_distill.models.vit import create_student
    from umt_distill.training.optim import build_adamw

    torch.set_num_threads(s.threads)
    device = torch.device(s.device)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    base = create_student(s.step_student, drop_path_rate=0.0)
    depth, K, D = base.encoder.depth, base.num_align_layers, base.teacher_dim
    third = depth // 3
    B, T, S = s.step_batch, s.step_frames, s.step_size
    N = (S // PATCH) ** 2
    pixels = torch.randint(0, 256, (B, T, 3, S, S), dtype=torch.uint8, generator=g).to(device)
    attn = torch.rand(B, T, N, generator=g).to(device)
    vis = sample_semantic_mask(B, T, N, s.step_mask_ratio, g, attn=attn, device=device)  # [B, L_vis]
    targets = gather_visible(torch.randn(K, B, T * N, D, generator=g).to(device), vis)  # cached, in memory
    x = normalize_video(pixels)
    configs = [(1.0, 0, "teacher", False), (0.75, 0, "teacher", False), (0.5, 0, "teacher", False),
               (1.0, third, "teacher", False), (0.75, third, "teacher", False), (0.5, third, "teacher", False),
               (0.5, third, "student", False), (0.5, third, "teacher", True)]
    # One model and optimizer for every configuration: a step costs the same whatever the weights are, and
    # eight copies of a student plus their AdamW states would measure the memory system, not the step.
    model = base.to(device).train()
    opt = build_adamw(model, 1e-4, 0.05, (0.9, 0.95), 1e-8, skip=model.no_weight_decay())
    runs = []
    for keep, after, source, fuse in configs:
        spec = None if keep >= 1 else SparseSpec(keep, after, source, fuse)
        runs.append({"keep": keep, "after_block": after, "source": source, "fuse": fuse, "model": model, "opt": opt,
                     "spec": spec, "times": [], "saved_mb": None, "peak_mb": None})
    scores = teacher_scores(attn, vis)

    weights = {p.data_ptr() for p in model.parameters()}  # saved for backward too, but resident anyway

    def one_step(r: dict) -> None:
        saved = [0]

        def pack(t):
            if t.data_ptr() not in weights:  # activations only
                saved[0] += t.numel() * t.element_size()
            return t

        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if r["spec"] is None:
                preds, tgt = r["model"](x, vis), targets
            else:
                preds, kept = r["model"](x, vis, r["spec"], scores)
                tgt = gather_visible(targets, kept)
            loss, _ = uta_loss(preds.float(), tgt)
        r["opt"].zero_grad(set_to_none=True)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        r["opt"].step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            r["peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        r["last"], r["last_fb"] = time.perf_counter() - t0, t1 - t0
        r["saved_mb"] = round(saved[0] / 2**20, 2)

    for i in range(s.step_warmup + s.step_steps):
        order = runs if i % 2 == 0 else runs[::-1]  # alternate the order: no config always runs first
        for r in order:
            one_step(r)
            if i >= s.step_warmup:
                r["times"].append(r["last"])
                r.setdefault("fb", []).append(r["last_fb"])
    rows = []
    dense = statistics.median(runs[0]["times"])
    for r in runs:
        med = statistics.median(r["times"])
        rows.append({k: r[k] for k in ("keep", "after_block", "source", "fuse", "saved_mb", "peak_mb")}
                    | {"ms_per_step": round(1000 * med, 1), "speedup_vs_keep_1": round(dense / med, 3),
                       "ms_forward_backward": round(1000 * statistics.median(r["fb"]), 1),
                       "ms_optimizer": round(1000 * statistics.median([a - b for a, b in zip(r["times"], r["fb"])]), 1),
                       "step_seconds": [round(t, 4) for t in r["times"]]})
    by = {(r["keep"], r["after_block"], r["source"], r["fuse"]): r for r in rows}
    # Same-turn pairs: ρ = 1 and ρ = 0.5 (ℓ = 0) ran next to each other in every round, so load that drifts
    # between rounds cancels in each round's ratio; the minimum is the least disturbed step of each.
    pairs = [a / b for a, b in zip(runs[0]["times"], runs[2]["times"])]
    visible_per_frame = vis.shape[1] // T
    return {
        "student": s.step_student, "depth": depth, "batch": B, "frames": T, "size": S, "mask_ratio": s.step_mask_ratio,
        "visible_tokens": vis.shape[1], "visible_per_frame": visible_per_frame, "L_over_3": third,
        "device": s.device, "threads": s.threads, "rows": rows,
        "token_speedup_keep_0.5": round(dense / statistics.median(runs[2]["times"]), 3),
        "token_speedup_keep_0.5_paired": round(statistics.median(pairs), 3),
        "token_speedup_keep_0.5_min": round(min(runs[0]["times"]) / min(runs[2]["times"]), 3),
        "token_speedup_keep_0.5_forward_backward": round(statistics.median(runs[0]["fb"]) / statistics.median(runs[2]["fb"]), 3),
        "token_speedup_keep_0.5_after_L3": by[(0.5, third, "teacher", False)]["speedup_vs_keep_1"],
        "activation_ratio_keep_0.5": round(by[(0.5, 0, "teacher", False)]["saved_mb"] / by[(1.0, 0, "teacher", False)]["saved_mb"], 3),
    }


# --------------------------------------------------------------------------------------------------
# 2 + 3. recall and probe on the toy world


def recall(kept_pos, vis, obj, num_patches: int) -> float:
    """Object tokens among the kept ones ÷ visible object tokens (all clips and frames together)."""
    import torch

    kept_idx = torch.gather(vis, 1, kept_pos)  # flat (t, n)
    flat = obj.flatten(1)  # [B, T·N]
    return float(torch.gather(flat, 1, kept_idx).sum() / torch.gather(flat, 1, vis).sum().clamp_min(1))


def train_student(world, tokens, attn, spec, ranking: str, s: SmaugSettings, seed: int):
    """Stage 1 on the toy world's cached targets; returns the trained student and its last losses."""
    import torch

    from umt_distill.data.pixels import normalize_video
    from umt_distill.losses.uta import uta_loss
    from umt_distill.masking import gather_visible, sample_semantic_mask
    from umt_distill.models.sparsify import teacher_scores
    from umt_distill.models.vit import create_student
    from umt_distill.training.optim import build_adamw

    torch.manual_seed(seed)
    student = create_student("umt_test_tiny", drop_path_rate=0.0, teacher_dim=tokens.shape[-1],
                             num_align_layers=tokens.shape[1]).train()
    opt = build_adamw(student, 1e-3, 0.05, (0.9, 0.95), 1e-8, skip=student.no_weight_decay())
    g = torch.Generator().manual_seed(1000 + seed)
    pixels = torch.from_numpy(world["pixels"])
    n, N = len(pixels), GRID * GRID
    losses = []
    for step in range(s.student_steps):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * step / s.student_steps))
        idx = torch.randint(n, (s.student_batch,), generator=g)
        a = attn[idx]  # [B, T, N]
        vis = sample_semantic_mask(len(idx), FRAMES, N, s.mask_ratio, g, attn=a)
        target = gather_visible(tokens[idx].flatten(2, 3).transpose(0, 1), vis)  # [K, B, L, D]
        x = normalize_video(pixels[idx])
        if spec is None:
            preds = student(x, vis)
        else:
            scores = teacher_scores(a, vis) if ranking == "teacher" else torch.rand(len(idx), FRAMES, vis.shape[1] // FRAMES,
                                                                                   generator=g)
            preds, kept = student(x, vis, spec, scores if ranking != "student" else None)
            target = gather_visible(target, kept)
        loss, _ = uta_loss(preds.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return student.eval(), round(statistics.mean(losses[-10:]), 4)


def toy_rows(s: SmaugSettings) -> dict[str, Any]:
    """Recall of object tokens and probe accuracy over seeds on the toy world."""
    import torch

    from umt_distill.evaluation.probe import linear_probe, student_features
    from umt_distill.masking import sample_tube_mask
    from umt_distill.models.sparsify import (
        SparseSpec,
        keep_count,
        student_scores,
        teacher_scores,
        top_positions,
    )

    torch.set_num_threads(1)  # tiny models: one thread is faster than two on a shared machine
    t0 = time.perf_counter()
    train = toy_world(s.train_clips, seed=1)
    test = toy_world(s.test_clips, seed=2)
    teacher, teacher_loss = toy_teacher(train, s.teacher_steps, seed=0)
    tokens, attn = teacher_outputs(teacher, train["pixels"])
    test_tokens, test_attn = teacher_outputs(teacher, test["pixels"])
    teacher_probe = linear_probe(test_tokens[:, -1].mean((1, 2)).numpy()[: len(test_tokens) // 2],
                                 test["label"][: len(test_tokens) // 2],
                                 test_tokens[:, -1].mean((1, 2)).numpy()[len(test_tokens) // 2:],
                                 test["label"][len(test_tokens) // 2:]).accuracy
    log(f"smaug: toy teacher trained (loss {teacher_loss:.3f}) in {time.perf_counter() - t0:.0f} s")

    # stage 1 per seed and configuration, then the probe on the frozen student
    depth = 4
    third = depth // 3
    configs = {"keep_1": (None, "teacher"),
               "keep_0.5_teacher_l0": (SparseSpec(0.5, 0, "teacher"), "teacher"),
               f"keep_0.5_student_l{third}": (SparseSpec(0.5, third, "student"), "student"),
               "keep_0.5_random_l0": (SparseSpec(0.5, 0, "teacher"), "random")}
    probe: dict[str, list[float]] = {k: [] for k in configs}
    students = {}
    for seed in range(s.seeds):
        for name, (spec, ranking) in configs.items():
            student, last_loss = train_student(train, tokens, attn, spec, ranking, s, seed)
            feats_tr = student_features(student, torch.from_numpy(train["pixels"]))
            feats_te = student_features(student, torch.from_numpy(test["pixels"]))
            acc = linear_probe(feats_tr, train["label"], feats_te, test["label"]).accuracy
            probe[name].append(acc)
            log(f"smaug: seed {seed} {name}: last loss {last_loss}, probe {acc:.3f}")
            if seed == 0 and name == "keep_1":
                students["dense"] = student

    # recall on the test clips: tube masks (the visible set does not depend on any attention)
    g = torch.Generator().manual_seed(7)
    obj = torch.from_numpy(test["object"])  # [n, T, N]
    N = GRID * GRID
    vis = sample_tube_mask(len(obj), FRAMES, N, s.mask_ratio, g)
    n_vis = vis.shape[1] // FRAMES
    student = students["dense"]
    with torch.no_grad():
        emb, _ = student.encoder.embed(normalize(test["pixels"]), vis)
        for i in range(third):
            emb = student.encoder.blocks[i](emb)
        own = student_scores(student.encoder.blocks[third], emb, FRAMES)  # [n, T, n_vis]
    rec = {}
    for keep in (0.5, 0.25):
        k = keep_count(n_vis, keep)
        rec[f"keep_{keep}"] = {
            "teacher": round(recall(top_positions(teacher_scores(test_attn, vis), k), vis, obj, N), 4),
            f"student_l{third}": round(recall(top_positions(own, k), vis, obj, N), 4),
            "random": round(recall(top_positions(torch.rand(len(obj), FRAMES, n_vis, generator=g), k), vis, obj, N), 4),
        }
    dense = probe["keep_1"]
    deltas = {name: {"mean": round(statistics.mean(d), 4), "std": round(statistics.stdev(d), 4) if len(d) > 1 else 0.0,
                     "per_seed": [round(x, 4) for x in d]}
              for name, accs in probe.items() if name != "keep_1"
              for d in [[a - b for a, b in zip(accs, dense)]]}
    return {
        "world": {"train_clips": s.train_clips, "test_clips": s.test_clips, "frames": FRAMES, "size": GRID * PATCH,
                  "grid": f"{GRID}x{GRID}", "classes": len(COLOURS) * len(PATTERNS),
                  "object_token_fraction": round(float(test["object"].mean()), 4)},
        "teacher": {"steps": s.teacher_steps, "last_loss": round(teacher_loss, 4), "probe_accuracy": round(teacher_probe, 4)},
        "stage1": {"student": "umt_test_tiny", "steps": s.student_steps, "batch": s.student_batch,
                   "mask": f"semantic {s.mask_ratio}", "seeds": s.seeds},
        "object_token_recall": rec, "recall_mask": f"tube mask {s.mask_ratio}, {n_vis} visible tokens per frame",
        "probe_accuracy": {k: [round(x, 4) for x in v] for k, v in probe.items()},
        "probe_accuracy_mean": {k: round(statistics.mean(v), 4) for k, v in probe.items()},
        "probe_delta_vs_keep_1": deltas,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def normalize(pixels: np.ndarray):
    import torch

    from umt_distill.data.pixels import normalize_video

    return normalize_video(torch.from_numpy(pixels))


# --------------------------------------------------------------------------------------------------
# the section


def smaug_section(size: str, out_dir: Path, device: str = "cpu", threads: int = 1) -> dict[str, Any]:
    """The ``smaug`` section of the results JSON: token rows here, frame rows from ``benchmarks.smaug_frames``.

    Args:
        size: ``quick`` (minutes on 2 CPU cores), ``full``, or ``smoke`` (seconds; no frame rows).
    """
    if size not in ("smoke", "quick", "full"):
        raise ValueError(f"smaug size must be smoke, quick or full, got {size!r}")
    s = {"smoke": SmaugSettings.smoke, "quick": SmaugSettings.quick, "full": SmaugSettings}[size](device=device)
    s = SmaugSettings(**{**asdict(s), "threads": threads})
    load = load_average()
    log("smaug: step cost (interleaved)")
    cost = step_cost(s)
    log(f"smaug: token_speedup_keep_0.5 = {cost['token_speedup_keep_0.5']}")
    toy = toy_rows(s)
    out: dict[str, Any] = {
        "settings": asdict(s), "size": size, "load_start": load, "load_end": load_average(),
        "token_speedup_keep_0.5": cost["token_speedup_keep_0.5"], "step_cost": cost, "toy": toy,
        "reference": "SMAUG, ICCV 2023, arXiv 2211.11446: no public code; the per-module split of its reported "
                     ">= 1.9x is not verifiable",
    }
    try:
        from benchmarks.smaug_frames import frame_rows
    except ImportError:
        out["frame_selection"] = "not available"
    else:
        if size == "smoke":
            out["frame_selection"] = "not run in the smoke preset"
        else:
            out.update(frame_rows(size == "quick", out_dir))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="minutes on 2 CPU cores")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the step-cost measurement (default 1: steadier on a shared CPU)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = smaug_section("quick" if args.quick else "full", args.out, args.device, args.threads)
    path = args.out / f"smaug-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"smaug": result}, indent=1))
    print(path)


if __name__ == "__main__":
    main()


def smaug_markdown(res: dict[str, Any]) -> str:
    """The token-sparsification tables of docs/smaug.md from a ``smaug`` section (or its parts)."""
    lines = []
    cost = res.get("step_cost")
    if cost:
        lines += [(f"Stage-1 step, {cost['student']} (depth {cost['depth']}), batch {cost['batch']}, T = {cost['frames']}, "
                  f"{cost['size']} px, semantic mask {cost['mask_ratio']} ({cost['visible_per_frame']} visible tokens per "
                  f"frame), {cost['device']}, {cost['threads']} thread{'s' if cost['threads'] != 1 else ''}; medians of {len(cost['rows'][0]['step_seconds'])} "
                  "interleaved steps:"), "",
                  "| ρ | ℓ | ranking | fuse | ms / step | fwd+bwd ms | AdamW ms | speedup vs ρ = 1 | saved activations MB |"
                  + (" CUDA peak MB |" if cost["rows"][0].get("peak_mb") else ""),
                  "|---|---|---|---|---|---|---|---|---|" + ("---|" if cost["rows"][0].get("peak_mb") else "")]
        for r in cost["rows"]:
            lines.append(f"| {r['keep']} | {r['after_block']} | {r['source']} | {'yes' if r['fuse'] else 'no'} | "
                         f"{r['ms_per_step']} | {r.get('ms_forward_backward', '')} | {r.get('ms_optimizer', '')} | "
                         f"{r['speedup_vs_keep_1']} | {r['saved_mb']} |" + (f" {r['peak_mb']} |" if r.get("peak_mb") else ""))
        lines += ["", (f"`token_speedup_keep_0.5` = **{cost['token_speedup_keep_0.5']}** (ρ = 0.5, ℓ = 0; same-turn "
                  f"pairs: {cost.get('token_speedup_keep_0.5_paired')}, fastest steps: {cost.get('token_speedup_keep_0.5_min')}, "
                  f"forward + backward only: {cost.get('token_speedup_keep_0.5_forward_backward')}); at ℓ = "
                  f"{cost['L_over_3']}: {cost['token_speedup_keep_0.5_after_L3']}; saved activations at ρ = 0.5 / ρ = 1: "
                  f"{cost['activation_ratio_keep_0.5']}."), ""]
    toy = res.get("toy")
    if toy:
        w = toy["world"]
        lines += [(f"Toy world: {w['train_clips']} train / {w['test_clips']} test clips, T = {w['frames']}, {w['size']} px "
                  f"({w['grid']} tokens), {w['classes']} classes; {w['object_token_fraction']:.1%} of tokens show the "
                  f"object. Recall of object tokens among the kept ones ({toy['recall_mask']}):"), "",
                  "| ρ | " + " | ".join(next(iter(toy["object_token_recall"].values()))) + " |",
                  "|---|" + "---|" * len(next(iter(toy["object_token_recall"].values())))]
        for keep, row in toy["object_token_recall"].items():
            lines.append(f"| {keep.removeprefix('keep_')} | " + " | ".join(str(v) for v in row.values()) + " |")
        st = toy["stage1"]
        lines += ["", (f"Ridge probe on the frozen stage-1 student ({st['student']}, {st['steps']} steps × batch "
                  f"{st['batch']}, {st['mask']}), colour × pattern, {st['seeds']} seeds (teacher's own probe: "
                  f"{toy['teacher']['probe_accuracy']}):"), "",
                  "| run | accuracy per seed | mean | Δ vs ρ = 1 (mean ± sd over seeds) |", "|---|---|---|---|"]
        for name, accs in toy["probe_accuracy"].items():
            d = toy["probe_delta_vs_keep_1"].get(name)
            delta = f"{d['mean']:+.4f} ± {d['std']:.4f}" if d else "—"
            lines.append(f"| {name} | {', '.join(str(a) for a in accs)} | {toy['probe_accuracy_mean'][name]} | {delta} |")
    return "\n".join(lines)
