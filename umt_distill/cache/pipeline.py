"""``cache-teacher``: corpus → K views per clip → decode → teacher → codec → atomic shards.

One writer per store, whatever the world size: rank 0 takes the store's lock (``cache/lock.py``,
through ``cache/store_folder.py``) before any rank touches a file, and every rank learns whether it got
it; a refused run stops on every rank, naming the holder. Rank 0 then creates the store or checks it
against the recipe and the corpus (rows by content: rows appended to the manifest become new work, other
changes are refused naming the row), and tells every rank the plan. A store on object storage
(``cache.store=s3://bucket/prefix``) is written the same way through a local staging folder, each shard
uploaded whole as it closes and the lock a lease object (``cache/remote_write.py``).

Work is split into shards of ``cache.clips_per_shard`` consecutive clips; shard ``s`` belongs to rank
``s % world_size``. Rows added to a grown corpus go into new shards after the existing ones (a shard
never spans two growths: ``spec.corpus.extents``), so existing shards are never rewritten. A shard is
finished when its sidecar ``shards/<name>.json`` exists; that file is written (atomically) only after
the shard's data has been renamed into place. So a re-run keeps finished shards, deletes leftovers of
unfinished ones, and redoes them; a killed run loses at most the shards in flight. Decoding runs in
DataLoader workers, encoding and writing in a background thread, so the teacher forward is the only
work on the main thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from torch.utils.data import DataLoader

from umt_distill.cache.basis import codec_for_store, codec_spec_fields, ensure_basis
from umt_distill.cache.captions import record_captions, shard_score_writer
from umt_distill.cache.messages import print_redone, print_summary
from umt_distill.cache.record import TargetRecord, frames_digest
from umt_distill.cache.remote_write import (
    collect_shards,
    is_url,
    open_remote_store,
    publish_shard,
    push_small_files,
    sync_small_files,
)
from umt_distill.cache.repair import plan_shard_work
from umt_distill.cache.spec import (
    SPEC_FORMAT,
    corpus_location,
    now_iso,
    package_versions,
    read_spec,
)
from umt_distill.cache.store_folder import (
    CacheError,
    corpus_source,
    decided_by_rank0,
    prepare_store,
    take_store_lock,
)
from umt_distill.cache.stores import open_shard_writer, write_index
from umt_distill.config import Recipe
from umt_distill.data.admission import FAILURES_FILE, check_failed_fraction
from umt_distill.data.clipviews import (
    ClipViewsDataset,
    worker_init,
)
from umt_distill.data.corpus import ClipRow, corpus_digest, read_corpus
from umt_distill.data.views import view_generator
from umt_distill.io import atomic_write_json
from umt_distill.registry import MASKS, load_all_parts
from umt_distill.teachers.build import build_teacher
from umt_distill.teachers.clip import TeacherError
from umt_distill.training import distributed as du


SHARDS_DIR = "shards"
INDEX_FILE = "index.json"
SUMMARY_FILE = "summary.jsonl"


@dataclass(frozen=True)
class ShardPlan:
    """Shard ``index`` covers corpus rows ``[start, stop)``."""

    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"shard-{self.index:06d}"


def plan_shards(num_clips: int, clips_per_shard: int, extents: list[int] | None = None) -> list[ShardPlan]:
    """Shards of ``clips_per_shard`` consecutive rows, numbered in corpus order.

    ``extents`` (``spec.corpus.extents``): the corpus size after each growth, ascending, the last one
    ``num_clips``; no shard spans two extents, so the shards of rows already cached keep their rows
    when rows are appended. Default: one extent, ``[num_clips]``.
    """
    plans: list[ShardPlan] = []
    start = 0
    for stop in extents or [num_clips]:
        for first in range(start, stop, clips_per_shard):
            plans.append(ShardPlan(len(plans), first, min(stop, first + clips_per_shard)))
        start = stop
    return plans


def rank_shards(plans: list[ShardPlan], env: du.DistEnv) -> list[ShardPlan]:
    """The disjoint, deterministic share of one rank."""
    return [p for p in plans if p.index % env.world_size == env.rank]


# --------------------------------------------------------------------------------------------------
# teacher and spec


def layout_options(cfg: Recipe) -> dict:
    """The store layout's writer options: wds groups each shard's samples by epoch slot, which needs
    K and the seed of the view rotation (the recipe seed, which also draws the views)."""
    return {"num_views": cfg.cache.num_views, "view_seed": cfg.seed} if cfg.cache.layout == "wds" else {}


def build_spec(cfg: Recipe, teacher, rows, corpus_digest: str) -> dict:
    """The spec a run of ``cfg`` writes (identity fields + volatile ones filled later).

    Paths are recorded absolute (the corpus also relative to the store, ``spec.corpus_location``), in
    the ``corpus`` section and in the recipe, so ``cache verify`` and ``--repair`` work from any folder.
    The pipeline adds ``corpus.rows`` (the checksum of ``corpus.jsonl``) and ``corpus.extents``.
    """
    v, c = cfg.views, cfg.cache
    recipe = cfg.model_dump(mode="json")
    location = corpus_location(cfg.corpus.source, cfg.corpus.root, c.store)
    recipe["corpus"].update(source=location["source"], root=location["root"])
    recipe["cache"]["store"] = c.store if is_url(c.store) else os.path.abspath(Path(c.store).expanduser())
    if is_url(c.store):  # a bucket has no place relative to the corpus's folder
        location.update(source_from_store=None, root_from_store=None)
    return {
        "format": SPEC_FORMAT,
        "teacher": teacher.describe(),  # records the precision actually used (CPU: fp32)
        "views": {
            "policy": v.policy,
            "num_frames": v.num_frames,
            "size": v.size,
            "scales": list(v.scales),
            "max_distort": v.max_distort,
            "flip": v.flip,
            "seed": cfg.seed,
            "num_views": c.num_views,
        },
        "mode": {"mode": c.mode, **({"mask_ratio": c.mask_ratio, "masks_per_view": c.masks_per_view} if c.mode == "visible" else {})},
        "codec": {"name": c.codec, "compressor": c.compressor, **codec_spec_fields(cfg)},
        "layout": c.layout,
        "frames": c.frames,
        "corpus": {**location, "digest": corpus_digest, "num_clips": len(rows)},
        "clips_per_shard": c.clips_per_shard,
        "status": "in_progress",
        "created": now_iso(),
        "versions": package_versions(),
        "recipe": recipe,
    }


# --------------------------------------------------------------------------------------------------
# background writer


class _Writer:
    """Encodes and writes records on a background thread; closes shards and writes their sidecars."""

    def __init__(self, cfg: Recipe, shards_dir: Path) -> None:
        self.cfg, self.shards_dir = cfg, shards_dir
        self.codec = codec_for_store(shards_dir.parent)  # pca codecs: bound to the store's basis
        self.queue: queue.Queue = queue.Queue(maxsize=4 * cfg.cache.batch_size)
        self.error: BaseException | None = None
        self.writers: dict[str, object] = {}
        self.done: list[dict] = []
        self.thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self.thread.start()

    def put(self, op: tuple) -> None:
        if self.error is not None:
            raise CacheError(f"writing failed: {self.error}") from self.error
        self.queue.put(op)

    def _run(self) -> None:
        c = self.cfg.cache
        while True:
            op = self.queue.get()
            if op is None:
                return
            if self.error is not None:
                continue  # drain
            try:
                kind, plan = op[0], op[1]
                if kind == "add":
                    if plan.name not in self.writers:
                        self.writers[plan.name] = open_shard_writer(
                            c.layout, self.shards_dir, plan.name, self.codec, c.compressor, frames=c.frames,
                            **layout_options(self.cfg),
                        )
                    self.writers[plan.name].add(op[2])
                elif kind == "close":
                    failures = op[2]
                    writer = self.writers.pop(plan.name, None)
                    if writer is None:  # every clip of the shard failed: no data, only the sidecar
                        info = {"name": plan.name, "path": None, "num_records": 0, "nbytes": 0, "records": []}
                    else:
                        info = writer.close()
                    # Nothing run-specific (no time, no absolute path, no rank): a shard's sidecar is the same
                    # bytes whatever engine, world size or store folder wrote it (FORMAT.md §4).
                    path = info["path"] and f"{SHARDS_DIR}/{Path(info['path']).name}"
                    sidecar = {**info, "path": path, "clips": [plan.start, plan.stop], "failures": failures}
                    atomic_write_json(self.shards_dir / f"{plan.name}.json", sidecar)
                    publish_shard(self.shards_dir, sidecar)  # object storage: data, then sidecar uploaded
                    self.done.append(sidecar)
            except BaseException as e:  # surfaced on the main thread at the next put/finish
                self.error = e

    def finish(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            self.abort()
            raise CacheError(f"writing failed: {self.error}") from self.error

    def abort(self) -> None:
        for writer in self.writers.values():
            try:
                writer.abort()
            except Exception:
                pass
        self.writers.clear()


# --------------------------------------------------------------------------------------------------
# the run


def cache_teacher(cfg: Recipe, progress: bool = True, deep: bool = False, retry_failed: bool = False,
                  purpose: str = "cache-teacher") -> dict:
    """Run the teacher over the corpus and write the store; returns the summary (also in summary.jsonl).

    A re-run redoes unfinished shards and finished ones that are damaged (``repair.plan_shard_work``:
    data missing or resized; with ``deep`` any record unreadable); with ``retry_failed`` also the shards
    holding failed clips that decode now. Each redone shard is named with its reason. Rows appended to
    the manifest since the last run are cached into new shards.

    Args:
        purpose: What the store's lock file says its holder is doing (a refused run names it).
    """
    env = du.init_distributed(backend="gloo", timeout_minutes=24 * 60)
    if not cfg.corpus.source:
        raise CacheError("corpus.source is empty: give a manifest or a folder (corpus.source=PATH)")
    rows = None
    if Path(cfg.corpus.source).expanduser().exists():
        rows = read_corpus(cfg.corpus.source, cfg.corpus.root)  # a bad manifest stops before anything is written
    # A store on object storage is written through a local staging folder, under its lease (remote_write.py).
    remote = open_remote_store(cfg.cache.store, env, purpose, cfg.storage) if is_url(cfg.cache.store) else None
    root = remote.staging if remote is not None else Path(cfg.cache.store)
    lock = take_store_lock(root, env, purpose) if remote is None else remote.lease
    try:
        with remote.named() if remote is not None else contextlib.nullcontext():
            return _cache_locked(cfg, root, env, progress, deep, retry_failed, rows)
    finally:
        if lock is not None:
            lock.release()
        if remote is not None:
            remote.close()


def corpus_rows(cfg: Recipe, root: Path, rows: list[ClipRow] | None) -> tuple[Recipe, list[ClipRow]]:
    """The corpus a run caches, under the store's lock: the recipe's manifest (``rows``, read before the lock),
    or the store's own when the recipe's is gone (the recipe then names it), cut at ``cache.limit``."""
    source, corpus_root = corpus_source(cfg, root)
    if (source, corpus_root) != (cfg.corpus.source, cfg.corpus.root):
        cfg = cfg.model_copy(update={"corpus": cfg.corpus.model_copy(update={"source": source, "root": corpus_root})})
        rows = None
    if rows is None:
        rows = read_corpus(source, corpus_root)
    if cfg.cache.limit is not None:
        rows = rows[: cfg.cache.limit]
    return cfg, rows


def _cache_locked(cfg: Recipe, root: Path, env: du.DistEnv, progress: bool, deep: bool, retry_failed: bool,
                  rows: list[ClipRow] | None) -> dict:
    """``rows``: the recipe's manifest as read before the lock (None when it is gone: the store's own is used)."""
    cfg, rows = corpus_rows(cfg, root, rows)
    device = du.resolve_device(cfg.cache.device, env)
    teacher = build_teacher(cfg, device)
    wanted = build_spec(cfg, teacher, rows, corpus_digest(rows))
    console = Console(stderr=True) if progress else None

    def prepare() -> dict:
        try:
            return prepare_store(root, cfg, wanted, rows, console)
        except OSError as e:  # read-only or full disk, no permission: say so before any work
            raise CacheError(f"cannot write the store {root}: {e.strerror or e}") from None

    spec = decided_by_rank0(env, prepare)
    shards_dir = root / SHARDS_DIR
    ensure_basis(root, cfg, rows, teacher, device, env)  # pca codecs: fit (or check) the store's basis
    decided_by_rank0(env, lambda: caption_step(root, cfg, rows, teacher))  # captions embedded once (captions.py)
    sync_small_files(root, env)  # object storage: spec, rows, basis, captions up before any shard, to every rank
    du.barrier()
    plans = plan_shards(len(rows), cfg.cache.clips_per_shard, spec["corpus"]["extents"])
    mine = rank_shards(plans, env)
    todo, redone = plan_shard_work(shards_dir, cfg.cache.layout, mine, deep=deep, retry_failed=retry_failed,
                                   rows=rows, cfg=cfg)
    print_redone(redone, env, progress)
    stats = _run_shards(cfg, rows, teacher, todo, shards_dir, device, env, progress)
    stats["skipped_shards"] = len(mine) - len(todo)
    stats["redone_shards"] = [{"shard": r.shard, "reason": r.reason} for r in redone]
    collect_shards(root, env)  # a barrier (object storage: rank 0 then holds every rank's sidecars)
    summary = decided_by_rank0(env, lambda: finalize_store(root, plans, env))
    summary = {**summary, **{f"rank{env.rank}_{k}": v for k, v in stats.items()}}
    if env.is_main:
        if is_url(cfg.cache.store):
            summary["store"] = cfg.cache.store
        with open(root / SUMMARY_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(summary) + "\n")
        push_small_files(root)  # object storage: sidecars, failures, index, then spec.json
        if progress:
            print_summary(root, summary)
    du.barrier()
    # The store is complete for every usable clip; past the limit the run still fails, so a wrong
    # corpus.root or a half-copied dataset is not mistaken for a finished store.
    check_failed_fraction(summary.get("failures", 0), summary.get("clips", 0), cfg.corpus.max_failed_fraction,
                          str(cfg.corpus.source), str(root / FAILURES_FILE), " (then re-run with --retry-failed)")
    return summary


def write_shard(cfg: Recipe, rows: list[ClipRow], teacher, plan: ShardPlan, shards_dir: Path, device,
                deep: bool = False, retry_failed: bool = False) -> dict:
    """One shard, idempotently (what one Ray task of ``cache/ray_engine.py`` runs): a finished, undamaged
    shard is kept (``repair.plan_shard_work``), anything else is deleted and written again. Returns this
    shard's stats (``_run_shards``) with ``skipped`` and ``redone`` (``Redo`` reasons)."""
    todo, redone = plan_shard_work(shards_dir, cfg.cache.layout, [plan], deep=deep, retry_failed=retry_failed,
                                   rows=rows, cfg=cfg)
    stats = _run_shards(cfg, rows, teacher, todo, shards_dir, device, du.DistEnv(), False) if todo else {}
    return {**stats, "skipped": not todo, "redone": [{"shard": r.shard, "reason": r.reason} for r in redone]}


def _iter_items(cfg: Recipe, rows, plans: list[ShardPlan]) -> Iterator[dict]:
    indices = [i for p in plans for i in range(p.start, p.stop)]
    if not indices:
        return iter(())
    workers = cfg.cache.num_workers
    loader = DataLoader(
        ClipViewsDataset(rows, indices, cfg),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        worker_init_fn=worker_init if workers else None,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    return iter(loader)


def caption_step(root: Path, cfg: Recipe, rows, teacher) -> None:
    """Embed the rows' captions with the teacher's text tower (``cache/captions.py``); CacheError if it has none."""
    try:
        record_captions(root, cfg, rows, teacher)
    except TeacherError as e:
        raise CacheError(str(e)) from None


def _run_shards(cfg, rows, teacher, plans, shards_dir, device, env, progress) -> dict:
    writer = _Writer(cfg, shards_dir)
    scorer = shard_score_writer(shards_dir.parent, rows)  # frame x caption scores, when the store keeps captions
    shard_of = {i: p for p in plans for i in range(p.start, p.stop)}
    remaining = {p.name: p.stop - p.start for p in plans}
    failures: dict[str, list] = {p.name: [] for p in plans}
    pending: list[tuple] = []  # (plan, row, k, view, pixels [T,3,H,W], jpegs or None)
    n_clips = sum(p.stop - p.start for p in plans)
    # Where the wall time went: in the teacher, waiting for the first decoded clip (worker start-up),
    # and draining the writer at the end; the rest is the main thread's own work and decode stalls.
    stats = {"clips": 0, "records": 0, "failures": 0, "frames": 0, "teacher_seconds": 0.0,
             "first_clip_seconds": 0.0, "drain_seconds": 0.0}
    t0 = time.perf_counter()

    def flush() -> None:
        if not pending:
            return
        pixels = torch.stack([p[4] for p in pending])  # [B, T, 3, H, W]
        t = time.perf_counter()
        out = teacher(pixels.to(device, non_blocking=True))
        tokens, attn, pooled = (x.float().cpu().numpy() for x in (out.tokens, out.attn, out.pooled))
        stats["teacher_seconds"] += time.perf_counter() - t
        for b, (plan, row, k, view, pix, jpegs) in enumerate(pending):
            rec_tokens, visible = tokens[b], None  # [K, T, N, D]
            if cfg.cache.mode == "visible":
                rec_tokens, visible = visible_tokens(cfg, row.id, k, tokens[b], out.attn[b])
            record = TargetRecord(
                clip_id=row.id, view_index=k, view=view, frames_digest=frames_digest(pix.numpy()),
                tokens=rec_tokens, attn=attn[b], pooled=pooled[b], visible_idx=visible,
                frames=pix.numpy() if cfg.cache.frames != "none" else None,
                frames_jpeg=jpegs,
            )
            writer.put(("add", plan, record))
            if scorer is not None:
                scorer.add(plan.name, row.id, k, pooled[b])
        stats["records"] += len(pending)
        stats["frames"] += int(pixels.shape[0] * pixels.shape[1])
        pending.clear()

    def clip_done(plan: ShardPlan) -> None:
        remaining[plan.name] -= 1
        if remaining[plan.name] == 0:
            flush()  # the shard's last records go in before it is closed
            if scorer is not None:  # before the sidecar marks the shard finished
                scorer.close(plan.name)
            writer.put(("close", plan, failures[plan.name]))

    bar = _progress(progress and env.is_main, n_clips)
    try:
        for item in _iter_items(cfg, rows, plans):
            if stats["clips"] == 0:
                stats["first_clip_seconds"] = time.perf_counter() - t0
            idx = item["index"]
            plan, row = shard_of[idx], rows[idx]
            if "error" in item:
                failures[plan.name].append({"id": row.id, "path": row.path, "reason": item["error"], "shard": plan.name})
                stats["failures"] += 1
            else:
                for k, view in enumerate(item["views"]):
                    jpegs = tuple(item["jpegs"][k]) if "jpegs" in item else None
                    pending.append((plan, row, k, view, item["pixels"][k], jpegs))
                    if len(pending) >= cfg.cache.batch_size:
                        flush()
            stats["clips"] += 1
            clip_done(plan)
            if bar is not None:
                elapsed = max(time.perf_counter() - t0, 1e-9)
                bar.update(stats["clips"], stats["clips"] / elapsed, stats["frames"] / elapsed, stats["failures"])
        flush()
        t = time.perf_counter()
        writer.finish()
        stats["drain_seconds"] = time.perf_counter() - t
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    for key in ("teacher_seconds", "first_clip_seconds", "drain_seconds"):
        stats[key] = round(stats[key], 3)
    stats["shards_written"] = len(writer.done)
    return stats


def visible_tokens(cfg: Recipe, clip_id: str, view_index: int, tokens: np.ndarray, attn: torch.Tensor):
    """Mode ``visible``: draw M semantic masks for one view and keep only the visible tokens.

    Returns tokens [M, K, T, N_vis, D] and sorted per-frame patch indices [M, T, N_vis] (int16).
    The masks come from a generator seeded by (seed, clip, view), so they are reproducible.
    """
    load_all_parts()
    c = cfg.cache
    T, N = attn.shape
    gen = view_generator(cfg.seed, f"{clip_id}#mask", view_index)
    sample = MASKS.get("semantic")
    vis = sample(c.masks_per_view, T, N, c.mask_ratio, gen, attn=attn.detach().float().cpu().expand(c.masks_per_view, T, N))
    vis = vis.view(c.masks_per_view, T, -1) % N  # [M, T, N_vis] patch index within each frame
    idx = vis.numpy()
    out = np.stack([tokens[:, np.arange(T)[:, None], idx[m]] for m in range(c.masks_per_view)])  # [M, K, T, N_vis, D]
    return out, idx.astype(np.int16)


# --------------------------------------------------------------------------------------------------
# finishing and inspecting


def finalize_store(root: Path, plans: list[ShardPlan], env: du.DistEnv) -> dict:
    """Rank 0, after the barrier: merge sidecars into index.json and failures.jsonl; update the spec."""
    shards_dir = root / SHARDS_DIR
    sidecars, missing = [], []
    for plan in plans:
        path = shards_dir / f"{plan.name}.json"
        if path.exists():
            sidecars.append(json.loads(path.read_text(encoding="utf-8")))
        else:
            missing.append(plan.name)
    if missing:
        raise CacheError(f"{len(missing)} shard(s) unfinished after all ranks returned: {missing[:5]} — re-run to complete")
    spec = read_spec(root)
    write_index(root, spec["layout"], [s for s in sidecars if s["num_records"] > 0])
    failures = [f for s in sidecars for f in s["failures"]]
    with open(root / f".tmp-{FAILURES_FILE}", "w", encoding="utf-8") as f:
        for line in failures:
            f.write(json.dumps(line) + "\n")
    (root / f".tmp-{FAILURES_FILE}").replace(root / FAILURES_FILE)
    counts = {
        "clips": spec["corpus"]["num_clips"],
        "records": sum(s["num_records"] for s in sidecars),
        "failures": len(failures),
        "shards": len(plans),
        "bytes": sum(s["nbytes"] for s in sidecars),
    }
    errors = [s.get("codec_error") for s in sidecars if s["num_records"] > 0]
    if errors and all(errors):  # the worst reconstruction error the writers measured: verify's tolerance
        spec["tolerance"] = {"min_cos": min(e["min_cos"] for e in errors), "max_abs": max(e["max_abs"] for e in errors)}
    spec.update(status="complete", counts=counts, updated=now_iso())
    atomic_write_json(root / "spec.json", spec)
    return {"store": str(root), "finished": now_iso(), **counts}


def store_info(root: str | Path) -> dict:
    """The spec and sizes of a store, for ``cache info``."""
    from umt_distill import storage
    from umt_distill.cache.stores import read_index

    root = storage.store_root(root)  # a URL stays a URL
    try:
        spec = read_spec(root)
    except (FileNotFoundError, ValueError) as e:
        raise CacheError(str(e)) from None
    counts = spec.get("counts", {})
    if storage.is_url(root):  # no listing needed: the index records every finished shard's bytes
        data_bytes = sum(int(s["nbytes"]) for s in read_index(root)["shards"])
    else:
        data_bytes = sum(p.stat().st_size for p in (root / SHARDS_DIR).rglob("*") if p.is_file() and not p.name.endswith(".json"))
    records = counts.get("records", 0)
    return {
        "status": spec.get("status"),
        "layout": spec.get("layout"),
        "teacher": {k: spec["teacher"].get(k) for k in ("name", "pretrained", "layer_indices", "input_size", "normalize", "weights_digest")},
        "views": spec.get("views"),
        "mode": spec.get("mode"),
        "codec": spec.get("codec"),
        "frames": spec.get("frames"),
        "corpus": spec.get("corpus"),
        "counts": counts,
        "sizes": {
            "data_bytes": data_bytes,
            "bytes_per_clip_view": round(data_bytes / records) if records else None,
            "total_mb": round(data_bytes / 2**20, 3),
        },
        "created": spec.get("created"),
        "versions": spec.get("versions"),
    }


# --------------------------------------------------------------------------------------------------
# progress


class _Bar:
    def __init__(self, total: int) -> None:
        self.progress = Progress(
            TextColumn("[bold]cache-teacher"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(), transient=False,
        )
        self.task = self.progress.add_task("clips", total=total, rate="")
        self.progress.start()

    def update(self, done: int, clips_s: float, frames_s: float, failures: int) -> None:
        rate = f"{clips_s:.2f} clips/s {frames_s:.1f} frames/s" + (f" [red]{failures} failed" if failures else "")
        self.progress.update(self.task, completed=done, rate=rate)

    def close(self) -> None:
        self.progress.stop()


def _progress(enabled: bool, total: int):
    return _Bar(total) if enabled and total else None
