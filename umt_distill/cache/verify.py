"""``cache verify``: check a store's files as training reads them, then recompute a sample of records.

Two parts, each problem one line naming the file, shard, sample key or clip:

1. :func:`check_structure` — what training would trip over, without the teacher: every clip of the
   corpus has its K views or a line in ``failures.jsonl`` (an empty store fails); every shard present
   with its recorded size; every zarr shard's attributes (their checksum), array metadata (against the
   spec) and shard indices (no absent chunk); every wds shard's epoch-slot byte ranges (contiguous, in
   the file, each holding its slot's records). With ``deep``, every record is read the way training
   reads it: each wds group's byte range on its own, each sample's key, record, slot and checksums
   (``view.json``'s own included), no record twice.
2. :func:`verify_store` — re-decode ``sample`` records from the videos, rebuild the exact pixels the
   teacher saw (with JPEG frames: encoded and decoded as ``cache-teacher`` does), compare the frame
   digests, re-run the teacher and compare the decoded targets with it. A lossy codec reports its real
   error and is held to the error measured when the records were written (the shard writers'
   ``codec_error`` in each sidecar, or ``spec.json["tolerance"]``), less a slack for the teacher's float
   reassociation; stores without one fall back to a fixed tolerance per codec.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from umt_distill import storage
from umt_distill.cache.pipeline import cache_teacher
from umt_distill.cache.store_folder import CacheError
from umt_distill.cache.record import (
    StoreDamagedError,
    frames_digest,
    record_layout,
    vector_cosines,
)
from umt_distill.cache.spec import read_spec, store_corpus
from umt_distill.cache.stores import CacheReader
from umt_distill.cache.wds_store import group_problem, read_groups
from umt_distill.cache.zarr_store import ZarrShardReader
from umt_distill.config import recipe_from_dict
from umt_distill.data.admission import FAILURES_FILE
from umt_distill.data.clipviews import clip_frame_range, policy_kwargs
from umt_distill.data.jpeg import jpeg_round_trip
from umt_distill.data.video import open_video
from umt_distill.data.video_base import VideoDecodeError
from umt_distill.data.views import apply_view, sample_view
from umt_distill.teachers.build import build_teacher
from umt_distill.training.distributed import resolve_device

# Minimum cosine (over the last dim, worst vector) a decoded field must keep against a fresh teacher
# run, per codec. fp32 differs only by float reassociation between batch sizes. attn and pooled are
# stored float32 whatever the codec, so they are held to fp32's tolerance.
COSINE_TOLERANCE = {"fp32": 1 - 1e-5, "fp16": 0.9995, "bf16": 0.995, "int8": 0.99, "int4": 0.95}
# Basis codecs (pca/jpca) of stores written before the writers recorded the codec's error: their
# records are compared with the codec's own round trip of the fresh tokens instead.
BASIS_TOLERANCE = 0.999
# A recorded error (the worst cosine ``c`` the writers measured) becomes the tolerance
# ``c - TOLERANCE_SLACK - TOLERANCE_MARGIN * (1 - c)``: the fresh teacher run differs from the one that
# was encoded only by float reassociation, far below any codec's own error.
TOLERANCE_SLACK = 1e-5
TOLERANCE_MARGIN = 0.01
SHARDS_DIR = "shards"


def _compare(name: str, stored: np.ndarray, fresh: np.ndarray, tol: float, source: str) -> dict:
    err = np.abs(stored.astype(np.float64) - fresh)
    cos = vector_cosines(stored, fresh)  # as the writers measured the codec's error
    return {
        "field": name,
        "max_abs": float(err.max()),
        "mean_abs": float(err.mean()),
        "min_cos": float(cos.min()),
        "mean_cos": float(cos.mean()),
        "tol": tol,
        "tol_source": source,
        "ok": bool(cos.min() >= tol),
    }


def recorded_error(root: Path, spec: dict, shard_names) -> dict | None:
    """The codec's worst reconstruction error over the store's records, measured when they were written:
    ``spec.json["tolerance"]`` where the pipeline recorded it, else the minimum over the shards'
    sidecars' ``codec_error`` (written by the shard writers); None for a store that has neither."""
    recorded = spec.get("tolerance")
    if isinstance(recorded, dict) and isinstance(recorded.get("min_cos"), (int, float)):
        return {"min_cos": float(recorded["min_cos"]), "source": "the codec's error measured at write time, spec.json"}
    worst = 1.0
    for name in shard_names:
        try:
            error = json.loads(storage.read_text(storage.join(root, SHARDS_DIR, f"{name}.json"))).get("codec_error")
        except (OSError, ValueError):
            return None
        if not isinstance(error, dict) or not isinstance(error.get("min_cos"), (int, float)):
            return None
        worst = min(worst, float(error["min_cos"]))
    return {"min_cos": worst, "source": "the codec's error measured at write time, shard sidecars"}


def token_tolerance(root: Path, spec: dict, codec, shard_names) -> tuple[float, str, bool]:
    """``(minimum cosine of the tokens, where it comes from, compare with the codec's round trip)``.

    The stored tokens decoded are compared with a fresh teacher run, so a lossy codec reports its real
    error; they must keep the worst cosine the writers measured on the same records (less a slack for
    the teacher's float reassociation between batch sizes). Stores without a recorded error: the
    codec's fixed tolerance, or for a basis codec (whose error depends on the teacher) its round trip of
    the fresh tokens, which must agree closely.
    """
    recorded = recorded_error(root, spec, shard_names)
    if recorded is not None:
        slack = TOLERANCE_SLACK + TOLERANCE_MARGIN * (1.0 - recorded["min_cos"])
        return recorded["min_cos"] - slack, recorded["source"], False
    if codec.needs_basis:
        return BASIS_TOLERANCE, "codec round trip (no error recorded at write time)", True
    name = spec["codec"]["name"]
    return COSINE_TOLERANCE.get(name, 0.99), f"codec {name}", False


# --------------------------------------------------------------------------------------------------
# the files


def _failures(root: Path) -> tuple[list[dict], list[str]]:
    path = storage.join(root, FAILURES_FILE)
    if not storage.exists(path):
        return [], [f"{path}: missing (every store has one, empty when no clip failed)"]
    lines, problems = [], []
    for n, line in enumerate(storage.read_text(path).splitlines(), 1):
        try:
            item = json.loads(line)
            item["id"]  # noqa: B018 - presence check
            lines.append(item)
        except (ValueError, KeyError, TypeError) as e:
            problems.append(f"{path}: line {n} is not a failure record ({type(e).__name__}: {e})")
    return lines, problems


def check_records(root: Path, spec: dict, reader: CacheReader, rows=None) -> list[str]:
    """The records the index lists against the corpus: ``num_clips x K`` minus the failed clips' views."""
    problems = []
    K = int(spec.get("views", {}).get("num_views", 1))
    num_clips = int(spec.get("corpus", {}).get("num_clips", len(rows or ())))
    failures, bad = _failures(root)
    problems += bad
    failed = {str(f["id"]) for f in failures}
    index_records = len(reader.keys)
    counted = spec.get("counts", {}).get("records")
    if counted != index_records:
        problems.append(f"{root}/spec.json: counts {counted} records, index.json lists {index_records}")
    expected = (num_clips - len(failed)) * K
    views: dict[str, set[int]] = {}
    for clip, k in reader.keys:
        views.setdefault(clip, set()).add(k)
    if index_records == 0:
        problems.append(f"{root}/index.json: no records: the store is empty ({num_clips} clips in the corpus, "
                        f"{len(failed)} in {FAILURES_FILE}); training would have nothing to read")
    elif index_records != expected:
        missing = []
        if rows is not None:
            missing = [f"{r.id} ({len(views.get(r.id, ()))} of {K} views)" for r in rows
                       if r.id not in failed and len(views.get(r.id, ())) != K]
        shown = "; clips without all their views and no failure line: " + ", ".join(missing[:5]) if missing else ""
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        problems.append(f"{root}/index.json: {index_records} records, the corpus needs {expected} ({num_clips} "
                        f"clips x {K} views, minus {len(failed)} failed clips in {FAILURES_FILE}){shown}{more}")
    for clip, ks in views.items():
        if clip in failed:
            problems.append(f"{root}/index.json: clip {clip!r} has records and a line in {FAILURES_FILE}")
        bad_views = sorted(k for k in ks if not 0 <= k < K)
        if bad_views:
            problems.append(f"{root}/index.json: clip {clip!r} has view {bad_views[0]}, the store has {K} views")
    if rows is not None:
        ids = {r.id for r in rows}
        strangers = sorted(set(views) - ids)
        if strangers:
            problems.append(f"{root}/index.json: {len(strangers)} clip(s) not in the corpus (first: {strangers[0]!r})")
    return problems


def check_structure(root: Path, spec: dict, reader: CacheReader, deep: bool = False, rows=None) -> list[str]:
    """Problems with the store's files that training would hit (see the module docstring)."""
    root = storage.store_root(root)
    problems = check_records(root, spec, reader, rows)
    seen: dict[tuple[str, int], str] = {}
    for shard in reader.shards.values():
        path = storage.store_root(reader.shard_path(shard["name"]))
        if not _shard_exists(path, reader.layout):
            problems.append(f"{path}: shard data is missing")
            continue
        size = _shard_size(path, reader.layout)
        if size is not None and size != shard["nbytes"]:  # and read on: a more specific line may say why
            problems.append(f"{path}: {size} bytes on disk, index.json says {shard['nbytes']} (truncated or modified)")
        if reader.layout == "wds":
            views = spec.get("views", {})
            found = group_problem(str(path), shard, int(views.get("num_views", 1)), int(views.get("seed", 0)))
            if found is None and deep:
                found = read_groups(str(path), shard, reader.codec, record_layout(spec, "wds"), seen)
            problems += [found] if found else []
            continue
        try:
            zarr_shard = ZarrShardReader(str(path), shard["records"], spec)
            zarr_shard.check_indexes()
            if zarr_shard.codec.needs_basis:
                zarr_shard.codec = reader.codec
            if deep:
                for row in range(len(zarr_shard)):
                    zarr_shard.read(row)
        except StoreDamagedError as e:
            problems.append(str(e))
    return problems


# --------------------------------------------------------------------------------------------------
# the numbers


def _shard_exists(path: str | Path, layout: str) -> bool:
    if storage.is_url(path):  # no listing needed: a zarr group is there if its zarr.json is
        return storage.exists(storage.join(path, "zarr.json") if layout == "zarr" else path)
    return Path(path).exists()


def _shard_size(path: str | Path, layout: str) -> int | None:
    """A shard's bytes, or None where they cannot be counted without a listing (a zarr group on object
    storage: its shard indexes and records are checked instead, so a server without listings is not
    reported as damage)."""
    if storage.is_url(path):
        return storage.size(path) if layout == "wds" else None
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def verify_store(root: str | Path, sample: int = 8, seed: int = 0, device: str = "auto", deep: bool = False) -> dict:
    """Check the store's files, then re-decode and re-run the teacher on ``sample`` random records.

    Returns ``{"ok", "fields": [per-field error rows], "problems": [str], "checked": n, "records": n}``.
    A store on object storage (a URL) is read over the network; a network fault is
    ``storage.NetworkError``, never a problem of the store.
    """
    root = storage.store_root(root)
    try:
        spec = read_spec(root)
        reader = CacheReader(root)
        codec = reader.codec  # a basis codec's basis: missing or replaced is damage, reported before any work
    except (FileNotFoundError, ValueError, StoreDamagedError) as e:
        raise CacheError(str(e)) from None
    if spec.get("status") != "complete":
        raise CacheError(f"{root}: the store is not complete (status {spec.get('status')!r}); finish cache-teacher first")
    cfg = recipe_from_dict(spec["recipe"], origin=f"{root}/spec.json")
    # The rows the store was cached from, wherever its manifest lies now (found beside a moved store),
    # checked against the rows the store recorded; rows appended since are not in the store yet.
    corpus = store_corpus(root, spec)[: int(spec.get("corpus", {}).get("num_clips", 0)) or None]
    problems: list[str] = check_structure(root, spec, reader, deep, rows=corpus)
    teacher = build_teacher(cfg, resolve_device(device))
    if teacher.weights_digest != spec["teacher"]["weights_digest"]:
        problems.append(
            f"teacher weights differ from the spec: {teacher.weights_digest} vs {spec['teacher']['weights_digest']}"
        )
    rows = {r.id: r for r in corpus}
    keys = list(reader.keys)
    rng = np.random.default_rng(seed)
    chosen = [keys[i] for i in sorted(rng.choice(len(keys), size=min(sample, len(keys)), replace=False))]
    tol, source, round_trip = token_tolerance(root, spec, codec, list(reader.shards))
    jpeg = spec.get("frames") == "jpeg"
    collected: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"tokens": [], "attn": [], "pooled": []}
    sampled: list[tuple[str, int]] = []  # the records compared, in the order of collected's pairs
    damaged: dict[str, list] = {}  # damaged file -> [its first message, sampled records it made unreadable]
    for clip_id, k in chosen:
        try:
            rec = reader.get(clip_id, k)
        except StoreDamagedError as e:
            damaged.setdefault(e.path, [str(e), 0])[1] += 1
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
        pixels = apply_view(frames, rec.view)  # [T, 3, H, W]: the view's pixels
        if jpeg:  # the teacher saw them encoded and decoded as training decodes the stored JPEGs
            pixels = torch.from_numpy(jpeg_round_trip(pixels.numpy())[1])
        if frames_digest(pixels.numpy()) != rec.frames_digest:
            problems.append(f"{clip_id} view {k}: frame digest differs (the video changed or decoding is not exact)")
        if rec.frames is not None and frames_digest(rec.frames) != rec.frames_digest:
            problems.append(f"{clip_id} view {k}: the stored view pixels differ from the digest of the pixels the "
                            "teacher saw (the student would see other pixels)")
        with torch.no_grad():
            out = teacher(pixels[None].to(teacher_device(teacher)))
        tokens = out.tokens[0].float().cpu().numpy()  # [K, T, N, D]
        if rec.visible_idx is not None:
            T = tokens.shape[1]
            tokens = np.stack([tokens[:, np.arange(T)[:, None], idx.astype(np.int64)] for idx in rec.visible_idx])
        if round_trip:
            tokens = codec.decode(codec.encode(tokens))
        sampled.append((clip_id, k))
        collected["tokens"].append((rec.tokens, tokens))
        collected["attn"].append((rec.attn, out.attn[0].float().cpu().numpy()))
        collected["pooled"].append((rec.pooled, out.pooled[0].float().cpu().numpy()))
    for path, (message, n) in damaged.items():  # one line per damaged file, unless the files' check named it
        if not any(p.startswith(f"{path}:") for p in problems):
            problems.append(f"{message} ({n} sampled record{'s' if n > 1 else ''} unreadable)")
    shard_of = {tuple(key): name for name, shard in reader.shards.items() for key in shard["records"]}
    fields = []
    for name, pairs in collected.items():
        if pairs:
            stored = np.concatenate([p[0].reshape(-1, p[0].shape[-1]) for p in pairs])
            fresh = np.concatenate([p[1].reshape(-1, p[1].shape[-1]) for p in pairs])
            row_tol, row_source = (tol, source) if name == "tokens" else (COSINE_TOLERANCE["fp32"], "stored float32")
            row = _compare(name, stored, fresh, row_tol, row_source)
            fields.append(row)
            if not row["ok"]:
                worst = min(range(len(pairs)), key=lambda i: float(vector_cosines(*pairs[i]).min()))
                clip, k = sampled[worst]
                problems.append(f"{reader.shard_path(shard_of[(clip, k)])}: record {clip!r} view {k}: {name}: worst "
                                f"cosine {row['min_cos']:.6f} below the tolerance {row_tol:.6g} ({row_source})")
    checked = len(chosen) - sum(n for _, n in damaged.values())
    return {"ok": not problems, "fields": fields, "problems": problems, "checked": checked, "records": len(keys)}


def repair_store(root: str | Path, deep: bool = False, device: str = "auto") -> dict:
    """``cache verify --repair``: redo the store's damaged shards with the recipe in its spec.

    The same code as a ``cache-teacher`` re-run (``repair.plan_shard_work``): shards whose data is
    missing or resized (with ``deep``: unreadable) are discarded and recomputed; the index and counts
    are rewritten. Returns the run's summary.
    """
    root = storage.store_root(root)  # a store on object storage is repaired in place (cache/remote_write.py)
    try:
        spec = read_spec(root)
    except (FileNotFoundError, ValueError) as e:
        raise CacheError(str(e)) from None
    recipe = spec["recipe"]
    cache = {**recipe["cache"], "store": str(root), **({"device": device} if device != "auto" else {})}
    cfg = recipe_from_dict({**recipe, "cache": cache}, origin=f"{root}/spec.json")
    return cache_teacher(cfg, deep=deep, purpose="cache verify --repair")


def teacher_device(teacher) -> torch.device:
    return next(teacher.parameters()).device
