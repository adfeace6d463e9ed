"""``cache verify``: recompute a sample of records from the videos and compare with the store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from umt_distill.cache.pipeline import CacheError, cache_teacher
from umt_distill.cache.record import StoreDamagedError, frames_digest
from umt_distill.cache.spec import read_spec
from umt_distill.cache.stores import CacheReader
from umt_distill.config import recipe_from_dict
from umt_distill.data.clipviews import clip_frame_range, policy_kwargs
from umt_distill.data.corpus import read_corpus
from umt_distill.data.video import open_video
from umt_distill.data.video_base import VideoDecodeError
from umt_distill.data.views import apply_view, sample_view
from umt_distill.teachers.build import build_teacher
from umt_distill.training.distributed import resolve_device

# Minimum cosine (over the last dim, worst vector) a decoded field must keep against a fresh teacher
# run, per codec. fp32 differs only by float reassociation between batch sizes.
COSINE_TOLERANCE = {"fp32": 1 - 1e-5, "fp16": 0.9995, "bf16": 0.995, "int8": 0.99, "int4": 0.95}
# Basis codecs (pca/jpca) lose what the basis does not span, which depends on the teacher: their records
# are compared with the codec's own round trip of the fresh tokens instead, which must agree closely.
BASIS_TOLERANCE = 0.999


def _compare(name: str, stored: np.ndarray, fresh: np.ndarray, tol: float) -> dict:
    a = stored.reshape(-1, stored.shape[-1]).astype(np.float64)
    b = fresh.reshape(-1, fresh.shape[-1]).astype(np.float64)
    err = np.abs(a - b)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(denom > 0, (a * b).sum(1) / np.maximum(denom, 1e-30), 1.0)
    return {
        "field": name,
        "max_abs": float(err.max()),
        "mean_abs": float(err.mean()),
        "min_cos": float(cos.min()),
        "mean_cos": float(cos.mean()),
        "tol": tol,
        "ok": bool(cos.min() >= tol),
    }


def check_structure(root: Path, spec: dict, reader, deep: bool = False) -> list[str]:
    """Problems with the store's files: missing or resized shards, counts or codecs that disagree with
    the spec; with ``deep``, every record is read (checksums, shapes)."""
    problems = []
    index_records = sum(len(s["records"]) for s in reader.shards.values())
    if spec.get("counts", {}).get("records") != index_records:
        problems.append(f"spec.json counts {spec.get('counts', {}).get('records')} records, index.json lists {index_records}")
    for shard in reader.shards.values():
        path = Path(reader.shard_path(shard["name"]))
        if not path.exists():
            problems.append(f"{path}: shard data is missing")
            continue
        size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if size != shard["nbytes"]:
            problems.append(f"{path}: {size} bytes on disk, index.json says {shard['nbytes']} (truncated or modified)")
        if deep:
            try:
                count = sum(1 for _ in reader.iter_shard(shard["name"]))
            except StoreDamagedError as e:
                problems.append(str(e))
                continue
            if count != shard["num_records"]:
                problems.append(f"{path}: {count} records readable, index.json says {shard['num_records']}")
    return problems


def verify_store(root: str | Path, sample: int = 8, seed: int = 0, device: str = "auto", deep: bool = False) -> dict:
    """Check the store's files, then re-decode and re-run the teacher on ``sample`` random records.

    Returns ``{"ok", "fields": [per-field error rows], "problems": [str], "checked": n}``.
    """
    root = Path(root)
    try:
        spec = read_spec(root)
        reader = CacheReader(root)
        reader.codec  # a basis codec's basis: missing or replaced is damage, reported before any work
    except (FileNotFoundError, ValueError, StoreDamagedError) as e:
        raise CacheError(str(e)) from None
    if spec.get("status") != "complete":
        raise CacheError(f"{root}: the store is not complete (status {spec.get('status')!r}); finish cache-teacher first")
    cfg = recipe_from_dict(spec["recipe"], origin=f"{root}/spec.json")
    problems: list[str] = check_structure(root, spec, reader, deep)
    teacher = build_teacher(cfg, resolve_device(device))
    if teacher.weights_digest != spec["teacher"]["weights_digest"]:
        problems.append(
            f"teacher weights differ from the spec: {teacher.weights_digest} vs {spec['teacher']['weights_digest']}"
        )
    rows = {r.id: r for r in read_corpus(cfg.corpus.source, cfg.corpus.root)}
    keys = list(reader.keys)
    rng = np.random.default_rng(seed)
    chosen = [keys[i] for i in sorted(rng.choice(len(keys), size=min(sample, len(keys)), replace=False))]
    codec = reader.codec
    tol = BASIS_TOLERANCE if codec.needs_basis else COSINE_TOLERANCE.get(spec["codec"]["name"], 0.99)
    collected: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"tokens": [], "attn": [], "pooled": []}
    damaged: dict[str, int] = {}  # one line per damaged file, however many sampled records it holds
    for clip_id, k in chosen:
        try:
            rec = reader.get(clip_id, k)
        except StoreDamagedError as e:
            damaged[str(e)] = damaged.get(str(e), 0) + 1
            continue
        row = rows.get(clip_id)
        if row is None:
            problems.append(f"{clip_id}: not in the corpus {cfg.corpus.source}")
            continue
        try:
            with open_video(row.path, backend=cfg.corpus.video_backend) as video:
                info = video.info
                frames = video.get_frames(list(rec.view.frame_indices))
        except VideoDecodeError as e:
            problems.append(f"{clip_id} view {k}: cannot decode: {e}")
            continue
        redrawn = sample_view(cfg.views.policy, info, cfg.views.num_frames, cfg.views.size, cfg.seed, clip_id, k,
                              **policy_kwargs(cfg, clip_frame_range(row, info)))
        if redrawn != rec.view:
            problems.append(f"{clip_id} view {k}: the view drawn now differs from the stored one")
        pixels = apply_view(frames, rec.view)  # [T, 3, H, W]
        if frames_digest(pixels.numpy()) != rec.frames_digest:
            problems.append(f"{clip_id} view {k}: frame digest differs (the video changed or decoding is not exact)")
        with torch.no_grad():
            out = teacher(pixels[None].to(teacher_device(teacher)))
        tokens = out.tokens[0].float().cpu().numpy()  # [K, T, N, D]
        if rec.visible_idx is not None:
            T = tokens.shape[1]
            tokens = np.stack([tokens[:, np.arange(T)[:, None], idx.astype(np.int64)] for idx in rec.visible_idx])
        if codec.needs_basis:
            tokens = codec.decode(codec.encode(tokens))
        collected["tokens"].append((rec.tokens, tokens))
        collected["attn"].append((rec.attn, out.attn[0].float().cpu().numpy()))
        collected["pooled"].append((rec.pooled, out.pooled[0].float().cpu().numpy()))
    for message, n in damaged.items():
        known = any(message.startswith(p.split(":")[0]) for p in problems)
        if not known or n > 1:
            problems.append(f"{message} ({n} sampled record{'s' if n > 1 else ''} unreadable)")
    fields = []
    for name, pairs in collected.items():
        if pairs:
            stored = np.concatenate([p[0].reshape(-1, p[0].shape[-1]) for p in pairs])
            fresh = np.concatenate([p[1].reshape(-1, p[1].shape[-1]) for p in pairs])
            row = _compare(name, stored, fresh, tol)
            fields.append(row)
            if not row["ok"]:
                problems.append(f"{name}: worst cosine {row['min_cos']:.6f} below the {spec['codec']['name']} "
                                f"tolerance {tol:.6g}")
    checked = len(chosen) - sum(damaged.values())
    return {"ok": not problems, "fields": fields, "problems": problems, "checked": checked, "records": len(keys)}


def repair_store(root: str | Path, deep: bool = False, device: str = "auto") -> dict:
    """``cache verify --repair``: redo the store's damaged shards with the recipe in its spec.

    The same code as a ``cache-teacher`` re-run (``repair.plan_shard_work``): shards whose data is
    missing or resized (with ``deep``: unreadable) are discarded and recomputed; the index and counts
    are rewritten. Returns the run's summary.
    """
    root = Path(root)
    try:
        spec = read_spec(root)
    except (FileNotFoundError, ValueError) as e:
        raise CacheError(str(e)) from None
    recipe = spec["recipe"]
    cache = {**recipe["cache"], "store": str(root), **({"device": device} if device != "auto" else {})}
    cfg = recipe_from_dict({**recipe, "cache": cache}, origin=f"{root}/spec.json")
    return cache_teacher(cfg, deep=deep)


def teacher_device(teacher) -> torch.device:
    return next(teacher.parameters()).device
