"""What caching costs: cache-teacher throughput against the bare teacher, and storage vs fidelity.

1. Cache write: frames/s of ``cache-teacher`` end to end (decode in DataLoader workers → teacher →
   codec → shard writer) against the teacher's forward-only frames/s on the same views, already
   decoded, in the same batch size. The ratio is what the pipeline keeps of the teacher's speed.
2. Storage vs fidelity: the teacher's fp32 targets of one store re-encoded with every codec
   (fp32, fp16, bf16, int8; zstd on top) in mode full and visible — bytes per clip-view on disk,
   write and cold-read MB/s, mean and 1st-percentile cosine of decoded tokens to fp32, and the
   UTA-loss difference on a fixed batch; the UMT-B/UMT-L target shapes and a Kinetics-710 projection.

Standalone (``run.py`` runs both as part of the suite and writes the report):

    .venv/bin/python -m benchmarks.bench_cache                      # CLIP-B/16, fp16, batch 2 and 4, CPU, ~5 min
    .venv/bin/python -m benchmarks.bench_cache --device cuda --clips 256 --batch-sizes 8,32,64 --precision fp16
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import K710_CLIPS, clean_dir, evict_page_cache, log, transcode_store
from benchmarks.derived import smallest_faithful

CODECS = ("fp32", "fp16", "bf16", "int8", "int4", "pca128", "pca256", "jpca768i4", "jpca1152i4")
# Mask ratio of the projected visible-mode records (UMT's 80 %: 40 of 196 tokens a frame).
UMT_MASK_RATIO = 0.8
STORE_MODES = ("full", "visible")
# Target shapes of the two UMT models (UMT code @4fb4049, single_modality/exp/pretraining/*.sh): last 6 CLIP
# blocks, 8 frames, 14x14 tokens.
UMT_TARGETS = {
    "UMT-B/16 (CLIP-B/16, 224 px)": {"K": 6, "T": 8, "N": 196, "D": 512},
    "UMT-L/16 (CLIP-L/14, 196 px)": {"K": 6, "T": 8, "N": 196, "D": 768},
}


# --------------------------------------------------------------------------------------------------
# 1. cache write


def cache_write_point(recipe: str, overrides: list[str], device: str, batch_size: int, forward_only: bool = True,
                      min_seconds: float = 2.0) -> dict[str, Any]:
    """cache-teacher into ``cache.store`` (from ``overrides``), and the teacher alone on the same views.

    Forward-only times every batch once (after one untimed warm-up batch on CUDA), half before and
    half after the cache run; cache-teacher builds its own teacher and is timed whole (its first batch is cold:
    small on CPU, noticeable on a GPU with few batches).
    """
    import torch

    from umt_distill.cache.pipeline import cache_teacher
    from umt_distill.data.clipviews import decode_clip_views
    from umt_distill.teachers.build import build_teacher
    from umt_distill.config import load_recipe
    from umt_distill.data.corpus import read_corpus

    cfg = load_recipe(recipe, overrides + [f"cache.batch_size={batch_size}"])
    dev = torch.device(device)
    if forward_only:
        teacher = build_teacher(cfg, dev)
        rows = read_corpus(cfg.corpus.source)[: cfg.cache.limit]
        pixels = torch.cat([decode_clip_views(r, cfg)[1] for r in rows])  # [clips*K, T, 3, H, W], the cached views
        batches = pixels.split(batch_size)
        if dev.type == "cuda":  # lazy CUDA init and kernel selection; a CPU forward has no such first-call cost
            _sync(teacher(batches[0].to(dev)).tokens)  # warm-up, untimed

        def forward(part: list) -> tuple[int, float]:  # (frames, seconds)
            passes, t = 0, time.perf_counter()
            while passes == 0 or time.perf_counter() - t < min_seconds:  # tiny teachers: repeat for a stable time
                for b in part:
                    teacher(b.to(dev)).tokens.float().cpu()  # the cache copies targets to host memory too
                passes += 1
            return passes * sum(b.shape[0] * b.shape[1] for b in part), time.perf_counter() - t

    # Forward-only on the first half of the batches before cache-teacher and on the rest after it,
    # pooled: every view is forwarded once (the cost does not depend on the pixels), and a machine
    # whose speed drifts during the measurement (other jobs) biases the ratio less.
    half = (len(batches) + 1) // 2 if forward_only else 0
    before = forward(batches[:half]) if forward_only else None
    summary = cache_teacher(cfg, progress=False)
    after = forward(batches[half:] or batches[:half]) if forward_only else None
    point: dict[str, Any] = {
        "teacher": cfg.teacher.name, "input_size": cfg.teacher.input_size or cfg.views.size, "frames": cfg.views.num_frames,
        "batch_size": batch_size, "codec": cfg.cache.codec, "decode_workers": cfg.cache.num_workers,
        "clip_views": summary["rank0_records"], "total_frames": summary["rank0_frames"],
        "cache_teacher_seconds": summary["rank0_seconds"],
        "cache_teacher_fps": summary["rank0_frames"] / summary["rank0_seconds"],
        "share_of_time_in_teacher": summary["rank0_teacher_seconds"] / summary["rank0_seconds"],
        # fixed costs a longer run amortises: decode-worker start-up and the last shard's write
        "first_clip_seconds": summary.get("rank0_first_clip_seconds"),
        "drain_seconds": summary.get("rank0_drain_seconds"),
    }
    if forward_only:
        point["teacher_forward_fps_before_after"] = [before[0] / before[1], after[0] / after[1]]
        point["teacher_forward_fps"] = (before[0] + after[0]) / (before[1] + after[1])
        point["ratio"] = point["cache_teacher_fps"] / point["teacher_forward_fps"]
    return point


def _sync(x) -> None:
    x.float().cpu()  # a device→host copy waits for the forward (CUDA is asynchronous)


# --------------------------------------------------------------------------------------------------
# 2. storage vs fidelity


def _layer_cosines(got: np.ndarray, want: np.ndarray) -> list[np.ndarray]:
    """Per teacher layer (the axis 4th from last in both record modes): cosines of its tokens."""
    K = got.shape[-4]
    return [_cosines(np.take(got, k, axis=-4), np.take(want, k, axis=-4)) for k in range(K)]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _at_visible(full: np.ndarray, visible_idx: np.ndarray) -> np.ndarray:
    """fp32 tokens [K, T, N, D] at one mask's visible patches [T, N_vis] → [K, T, N_vis, D]."""
    T = full.shape[1]
    return full[:, np.arange(T)[:, None], visible_idx.astype(np.int64)]


def view_pixels(records: list, cfg):
    """The exact pixels the teacher saw for each record, decoded from the corpus: uint8 [B, T, 3, H, W]."""
    import torch

    from umt_distill.data.corpus import read_corpus
    from umt_distill.data.video import open_video
    from umt_distill.data.views import apply_view

    rows = {r.id: r for r in read_corpus(cfg.corpus.source)}
    out = []
    for record in records:
        with open_video(rows[record.clip_id].path, backend=cfg.corpus.video_backend) as video:
            out.append(apply_view(video.get_frames(list(record.view.frame_indices)), record.view))
    return torch.stack(out)


def _fixed_batch_preds(ref: list, cfg, student_name: str, device: str, visible_per_record: list | None):
    """Predictions of a freshly initialised student (seed 0) on the first records' view pixels.

    Returns (preds [K, B, L, D], visible_idx [B, L]). With ``visible_per_record`` the stored masks are
    used; otherwise one semantic mask is drawn from the fp32 attention with a fixed generator.
    """
    import torch

    from umt_distill.cache.spec import read_spec
    from umt_distill.data.pixels import normalize_video
    from umt_distill.registry import MASKS
    from umt_distill.stages.parts import build_student

    pixels = view_pixels(ref, cfg)  # [B, T, 3, H, W]
    T, N = ref[0].attn.shape
    if visible_per_record is None:
        attn = torch.from_numpy(np.stack([r.attn for r in ref]))  # [B, T, N]
        vis = MASKS.get("semantic")(len(ref), T, N, cfg.mask.ratio, torch.Generator().manual_seed(0), attn=attn)
    else:
        v = torch.from_numpy(np.stack(visible_per_record).astype(np.int64))  # [B, T, N_vis]
        vis = (v + torch.arange(T).view(1, T, 1) * N).flatten(1)  # [B, T*N_vis]
    torch.manual_seed(0)
    D = int(read_spec(cfg.cache.store)["teacher"]["D"])
    cfg = cfg.model_copy(update={"student": cfg.student.model_copy(update={"name": student_name, "drop_path_rate": 0.0})})
    student = build_student(cfg, D).to(device).eval()
    with torch.no_grad():
        preds = student(normalize_video(pixels.to(device)), vis.to(device)).float().cpu()  # [K, B, L, D]
    return preds, vis


def _targets_at(records_tokens: list[np.ndarray], vis, T: int, N: int):
    """Full-mode tokens [K, T, N, D] per record → targets [K, B, L, D] at flat visible indices [B, L]."""
    import torch

    from umt_distill.masking import gather_visible

    flat = torch.from_numpy(np.stack([t.reshape(t.shape[0], T * N, -1) for t in records_tokens], 1))  # [K, B, T*N, D]
    return gather_visible(flat, vis)


def _fits(codec: str, K: int, D: int) -> bool:
    """A ``pca``/``jpca`` rank must be below the teacher's D (K*D joint)."""
    from umt_distill.cache.codecs import PcaCodec, get_codec

    c = get_codec(codec)
    return not isinstance(c, PcaCodec) or c.rank < (K * D if c.joint else D)


def storage_fidelity(ref_store: Path, work: Path, cfg, student: str, device: str, loss_batch: int = 2,
                     mask_ratio: float = 0.8, codecs=CODECS, modes=STORE_MODES, frames: bool = False) -> dict[str, Any]:
    """Every codec x mode over the reference (fp32, full) store's records.

    ``mask_ratio`` is the mask of the loss batch (full mode) and of the stored masks (visible mode).
    ``frames`` keeps the view pixels in the codec stores (for training from them); their bytes are not
    counted. ``pca<r>`` codecs whose rank is not below the teacher's D are skipped.
    """
    import torch

    from umt_distill.cache.stores import CacheReader
    from umt_distill.losses.uta import uta_loss

    cfg = cfg.model_copy(update={"mask": cfg.mask.model_copy(update={"ratio": mask_ratio})})
    reader = CacheReader(ref_store)
    ref = [reader.get(*k) for k in reader.keys]
    T, N = ref[0].attn.shape
    K, D = ref[0].tokens.shape[0], ref[0].tokens.shape[-1]
    batch = ref[:loss_batch]
    preds_full, vis_full = _fixed_batch_preds(batch, cfg, student, device, None)
    loss_ref_full = float(uta_loss(preds_full, _targets_at([r.tokens for r in batch], vis_full, T, N))[0])
    rows, preds_vis = [], None
    codecs = [c for c in codecs if _fits(c, K, D)]
    for mode in modes:
        for codec in codecs:
            log(f"storage: {codec}/{mode}")
            dst = work / f"{codec}_{mode}"
            w = transcode_store(ref_store, dst, codec, mode=mode, mask_ratio=cfg.mask.ratio,
                                seed=int(reader.spec["views"]["seed"]), frames=frames)
            evict_page_cache(dst)
            t = time.perf_counter()
            got_reader = CacheReader(dst)
            got = [got_reader.get(*k) for k in reader.keys]
            read_s = time.perf_counter() - t
            layer_cos: list[list[np.ndarray]] = [[] for _ in range(K)]
            decoded_bytes = 0
            for r, g in zip(ref, got):
                decoded_bytes += g.tokens.nbytes + g.attn.nbytes + g.pooled.nbytes
                want = r.tokens if g.visible_idx is None else _at_visible(r.tokens, g.visible_idx[0])[None]
                for k, c in enumerate(_layer_cosines(g.tokens, want)):
                    layer_cos[k].append(c)
            per_layer = [np.concatenate(c) for c in layer_cos]
            cos = np.concatenate(per_layer)
            # Target bytes only: the view pixels some stores keep are not the codec's cost.
            nbytes = sum(v for k, v in w["array_bytes"].items() if k != "frames") if w.get("array_bytes") else w["nbytes"]
            if mode == "full":
                preds, vis, loss_ref = preds_full, vis_full, loss_ref_full
                targets = _targets_at([g.tokens for g in got[:loss_batch]], vis, T, N)
            else:
                masks = [g.visible_idx[0] for g in got[:loss_batch]]
                if preds_vis is None:  # the stored masks are the same for every codec (same seed, same attn)
                    preds_vis = _fixed_batch_preds(batch, cfg, student, device, masks)
                    loss_ref_vis = float(uta_loss(preds_vis[0], _targets_at([r.tokens for r in batch], preds_vis[1], T, N))[0])
                preds, vis, loss_ref = preds_vis[0], preds_vis[1], loss_ref_vis
                targets = torch.from_numpy(np.stack([g.tokens[0].reshape(K, -1, D) for g in got[:loss_batch]], 1))
            loss = float(uta_loss(preds, targets)[0])
            rows.append({
                "codec": codec, "mode": mode, "records": len(got), "tokens_shape": list(got[0].tokens.shape),
                "bytes_per_clip_view": nbytes / w["records"],
                "basis_bytes": (dst / "basis.npy").stat().st_size if (dst / "basis.npy").exists() else 0,
                "write_mb_per_s": w["nbytes"] / 1e6 / w["write_seconds"],
                "write_records_per_s": w["records"] / w["write_seconds"],
                "read_mb_per_s": w["nbytes"] / 1e6 / read_s,
                "read_decoded_mb_per_s": decoded_bytes / 1e6 / read_s,
                "read_records_per_s": len(got) / read_s,
                "mean_cos": float(cos.mean()), "p1_cos": float(np.percentile(cos, 1)), "min_cos": float(cos.min()),
                "layer_mean_cos": [float(c.mean()) for c in per_layer],
                "layer_p1_cos": [float(np.percentile(c, 1)) for c in per_layer],
                "loss_fp32": loss_ref, "loss": loss, "loss_abs_diff": abs(loss - loss_ref),
            })
    n_vis = next((r["tokens_shape"][-2] for r in rows if r["mode"] == "visible"), None)
    return _with_umt_b({"reference": {"store": "fp32/full", "records": len(ref), "shape_KTND": [K, int(T), int(N), D],
                          "tokens_compared": int(len(ref) * K * T * N), "loss_batch": len(batch),
                          "loss_student": student, "visible_tokens_per_frame": n_vis, "mask_ratio": cfg.mask.ratio},
            "rows": rows, "projection": project(rows, [K, int(T), int(N), D], cfg.mask.ratio)})


def _with_umt_b(section: dict[str, Any]) -> dict[str, Any]:
    """Copy each row's projected UMT-B/16 MB per clip-view into the row (what "smallest" is judged by)."""
    b16 = next(iter(UMT_TARGETS))
    by = {(p["codec"], p["mode"]): p for p in section["projection"] if p["model"] == b16}
    for r in section["rows"]:
        p = by[(r["codec"], r["mode"])]
        # Measured at the UMT-B shape: its on-disk bytes. Measured at another (tiny) shape, whose zstd
        # ratio is dominated by per-chunk overhead that a 6 x 8 x 196 x 512 record does not have: raw bytes.
        mb = p["disk_mb_per_clip_view"] if p["measured_shape"] else p["raw_mb_per_clip_view"]
        r.update(umt_b_codec=p["target_codec"], umt_b_mb_per_clip_view=mb, umt_b_bytes_basis="on disk" if p["measured_shape"] else "raw")
    return section


def raw_bytes(shape: dict[str, int], codec: str, mode: str, mask_ratio: float) -> int:
    """Exact uncompressed bytes of one record's arrays (tokens in the codec, attn/pooled float32).

    A ``pca<r>`` store also holds its basis once (float32 [K, 1 + r, D]); that is per store, not per
    clip-view, and not counted here.
    """
    from umt_distill.cache.codecs import get_codec
    from umt_distill.masking import num_visible

    K, T, N, D = shape["K"], shape["T"], shape["N"], shape["D"]
    n_vis = num_visible(N, mask_ratio)
    tokens_shape = (K, T, N, D) if mode == "full" else (1, K, T, n_vis, D)
    size = get_codec(codec).nbytes(tokens_shape)
    size += T * N * 4 + T * D * 4  # attn, pooled
    if mode == "visible":
        size += T * n_vis * 2  # int16 visible indices
    return size


def same_share_codec(codec: str, measured: dict[str, int], target: dict[str, int]) -> str:
    """The codec keeping the same share of the values at the target shape: ``pca8`` of D = 32 ->
    ``pca128`` of D = 512; ``jpca16`` of K*D = 2*32 -> ``jpca768`` of 6*512; other codecs unchanged."""
    import re

    m = re.fullmatch(r"(j?)pca([0-9]+)(i4)?", codec)
    if not m:
        return codec
    joint, rank = bool(m.group(1)), int(m.group(2))
    width = (lambda s: s["K"] * s["D"]) if joint else (lambda s: s["D"])
    new = rank * width(target) // width(measured)
    new += new % 2 if m.group(3) else 0  # int4 packs pairs
    return f"{m.group(1)}pca{new}{m.group(3) or ''}"


def project(rows: list[dict], measured_shape: list[int], mask_ratio: float) -> list[dict]:
    """UMT-B/UMT-L bytes per clip-view and TB per view of Kinetics-710.

    On disk = measured bytes x (raw bytes of the target shape / raw bytes of the measured shape):
    the zstd ratio measured on our targets carried over to the larger shapes. Visible mode is projected
    at UMT's mask ratio (80 %); ``pca``/``jpca`` at the same share of the values (:func:`same_share_codec`).
    """
    measured = dict(zip("KTND", measured_shape))
    out = []
    for r in rows:
        ratio_disk = r["bytes_per_clip_view"] / raw_bytes(measured, r["codec"], r["mode"], mask_ratio)
        for name, shape in UMT_TARGETS.items():
            codec = same_share_codec(r["codec"], measured, shape)
            raw = raw_bytes(shape, codec, r["mode"], UMT_MASK_RATIO)
            disk = raw * ratio_disk
            out.append({"model": name, "codec": r["codec"], "target_codec": codec, "mode": r["mode"],
                        "raw_mb_per_clip_view": raw / 1e6,
                        "disk_mb_per_clip_view": disk / 1e6, "k710_tb_per_view_raw": raw * K710_CLIPS / 1e12,
                        "k710_tb_per_view_disk": disk * K710_CLIPS / 1e12, "measured_shape": shape == measured})
    return out


#: Issue 14's goal for the smallest faithful record, projected to UMT-B/16 (MB per clip-view).
GOAL_UMT_B_MB = 0.25


def _summary(row: dict | None, probe: bool) -> dict | None:
    if row is None:
        return None
    keys = ("codec", "mode", "umt_b_codec", "bytes_per_clip_view", "umt_b_mb_per_clip_view", "mean_cos", "p1_cos",
            "layer_mean_cos", "appearance_linear", "probe_diff")
    return {**{k: row.get(k) for k in keys}, "judged_by": "mean cos" + (" and probe diff" if probe else ""),
            "goal_umt_b_mb": GOAL_UMT_B_MB, "goal_met": row["umt_b_mb_per_clip_view"] <= GOAL_UMT_B_MB}


def smallest_faithful_summary(storage: dict[str, Any]) -> dict[str, Any]:
    """``storage.smallest_faithful``: per teacher (random-weights headline, trained tiny CLIP), the
    smallest codec/mode that is faithful (mean cos >= 0.99; on the trained teacher also probe diff <=
    0.01), overall and in mode full, with its UMT-B/16 MB per clip-view against the 0.25 MB goal."""
    out = {"random_weights": _summary(smallest_faithful(storage["rows"]), False),
           "random_weights_full": _summary(smallest_faithful(storage["rows"], mode="full"), False)}
    trained = storage.get("trained")
    if trained:
        probe = bool(trained.get("downstream"))
        out["trained"] = _summary(smallest_faithful(trained["rows"], probe=probe), probe)
        out["trained_full"] = _summary(smallest_faithful(trained["rows"], mode="full", probe=probe), probe)
        out["trained_cos_only"] = _summary(smallest_faithful(trained["rows"]), False)
    return out


def main() -> None:
    import os

    from benchmarks.bench_step import SIZES, StepSettings, store_overrides
    from benchmarks.common import scratch_dir, write_corpus
    from umt_distill.cache.pipeline import cache_teacher
    from umt_distill.config import load_recipe

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="base", choices=list(SIZES), help="teacher/student pair (recipe)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="teacher precision")
    p.add_argument("--clips", type=int, default=12)
    p.add_argument("--batch-sizes", default="2,4", help="comma-separated cache/teacher batch sizes")
    p.add_argument("--codec", default="fp16", help="codec of the timed cache-teacher runs (the recipes' default)")
    p.add_argument("--workers", type=int, default=1, help="decode workers of cache-teacher")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    s = StepSettings(device=args.device, teacher_precision=args.precision, threads=os.cpu_count() or 1)
    with scratch_dir("bench_cache_") as tmp:
        corpus = write_corpus(tmp / "videos", min(args.clips, 8), args.clips, 64, 240, 320)
        recipe = SIZES[args.size]["recipe"]
        points = []
        for i, bs in enumerate(int(b) for b in args.batch_sizes.split(",")):
            store = str(clean_dir(tmp / f"store{i}") / "s")
            points.append(cache_write_point(recipe, store_overrides(args.size, 8, corpus["manifest"], store, s, args.codec, bs,
                                                                    args.workers), args.device, bs))
            shutil.rmtree(Path(store).parent, ignore_errors=True)
        # The fidelity reference: the same clip-views in fp32 (untimed).
        ref = clean_dir(tmp / "ref") / "s"
        cfg = load_recipe(recipe, store_overrides(args.size, 8, corpus["manifest"], str(ref), s, "fp32", 2, args.workers))
        cache_teacher(cfg, progress=False)
        storage = storage_fidelity(ref, clean_dir(tmp / "codecs"), cfg, SIZES[args.size]["student"], args.device)
    result = {"cache_write": points, "storage": storage}
    from benchmarks.report import cache_md, storage_md

    # The report's tables (without their chart links, which only the suite writes).
    print("\n".join(line for line in cache_md(result, "") + storage_md(result, "") if not line.startswith("![")))
    best = smallest_faithful(storage["rows"])
    if best:
        print(f"Smallest codec/mode with mean cos >= 0.99: {best['codec']}/{best['mode']}, "
              f"{best['bytes_per_clip_view'] / 1e6:.4f} MB per clip-view (goal <= 1 MB), mean cos {best['mean_cos']:.6f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    from benchmarks.bench_cache import main as package_main  # see bench_step.py: children import by package name

    package_main()
