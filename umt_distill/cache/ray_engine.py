"""``cache-teacher --engine ray``: the same store as the default engine, written by one Ray task per shard.

The work is the default engine's (``pipeline.plan_shards``: shard ``s`` holds the same corpus rows however
many workers run), so the store is the same bytes: each task writes one shard with
``pipeline.write_shard``, which keeps a finished, undamaged shard and redoes anything else, so a task
that Ray runs again (a retry, a lost node, a re-run of the command) never writes a shard twice.

The driver (the process running the command) does what needs one writer: it takes the store's lock
(``cache/lock.py``) for the whole run, creates or checks the store (``store_folder.prepare_store``),
fits a pca basis and embeds the captions (in one task, on a worker's device), submits the shards that are not finished,
updates its progress bar as shards finish (each task returns its shard's stats), and when every task
has returned writes ``index.json``, ``failures.jsonl`` and the final spec (``pipeline.finalize_store``).
The store's folder must be one path that the driver and every worker see (a shared file system).

Resources: a task asks Ray for one GPU when the recipe's ``cache.device`` is CUDA (``auto``: when the
cluster has GPUs), else one CPU; its decode workers (``cache.num_workers``) run inside it. A task that
fails is retried by Ray up to :data:`MAX_RETRIES` times: a lost worker or node always, an exception
only when it is transient (:data:`TRANSIENT`: I/O errors, e.g. a shared file system that hiccups); any
other error stops the run naming the shard, keeping the finished shards for the re-run.

Ray is imported here only, and only when the engine runs, so ``--help`` and ``validate`` do not need it
(``pip install 'umt-distill[ray]'``). The cluster is Ray's own choice: ``RAY_ADDRESS`` (or a cluster
started with ``ray start`` on this machine), else a local instance that lives as long as the run; a
caller that already called ``ray.init`` keeps its own.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

import torch
from rich.console import Console

from umt_distill.cache.basis import ensure_basis
from umt_distill.cache.codecs import get_codec
from umt_distill.cache.messages import print_redone, print_summary
from umt_distill.cache.pipeline import (
    SHARDS_DIR,
    SUMMARY_FILE,
    ShardPlan,
    _progress,
    build_spec,
    caption_step,
    corpus_rows,
    finalize_store,
    plan_shards,
    write_shard,
)
from umt_distill.cache.repair import Redo, plan_shard_work
from umt_distill.cache.store_folder import (
    CacheError,
    prepare_store,
    take_store_lock,
)
from umt_distill.config import Recipe
from umt_distill.data.admission import FAILURES_FILE, check_failed_fraction
from umt_distill.data.corpus import ClipRow, corpus_digest, read_corpus
from umt_distill.teachers.build import build_teacher
from umt_distill.training import distributed as du

MAX_RETRIES = 3  # per task, on top of its first attempt; Ray counts lost workers and retried exceptions alike
INSTALL_HINT = "--engine ray needs Ray: pip install 'umt-distill[ray]'"


class TransientShardError(RuntimeError):
    """A shard's write failed on an I/O error (the shard writer wraps it in a CacheError): worth a retry."""


TRANSIENT: tuple[type[BaseException], ...] = (OSError, TransientShardError)


def import_ray():
    """``ray``, or a :class:`CacheError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise CacheError(INSTALL_HINT) from None
    return ray


# --------------------------------------------------------------------------------------------------
# what runs on the workers (plain functions: Ray ships them by reference to this module)

_TEACHERS: dict[tuple[str, str], object] = {}  # one teacher per worker process, reused by its next tasks


def _worker_device(use_gpu: bool) -> torch.device:
    """The task's device: the one GPU Ray gave it (Ray sets CUDA_VISIBLE_DEVICES to it), or the CPU."""
    return torch.device("cuda", 0) if use_gpu else torch.device("cpu")


def _worker_teacher(cfg: Recipe, use_gpu: bool):
    device = _worker_device(use_gpu)
    key = (json.dumps(cfg.teacher.model_dump(mode="json"), sort_keys=True), str(device))
    if key not in _TEACHERS:
        _TEACHERS.clear()
        _TEACHERS[key] = build_teacher(cfg, device)
    return _TEACHERS[key], device


def describe_task(cfg: Recipe, use_gpu: bool) -> dict:
    """The teacher's ``describe()`` as a worker builds it (its precision is the worker's device's)."""
    return _worker_teacher(cfg, use_gpu)[0].describe()


def setup_task(root: str, cfg: Recipe, rows: list[ClipRow], use_gpu: bool) -> None:
    """What the teacher writes once, before any shard, as the default engine's rank 0 does: a pca codec's
    basis (fitted, or the recorded one checked) and the rows' caption embeddings (``pipeline.caption_step``)."""
    teacher, device = _worker_teacher(cfg, use_gpu)
    ensure_basis(Path(root), cfg, rows, teacher, device, du.DistEnv())
    caption_step(Path(root), cfg, rows, teacher)


def needs_setup(cfg: Recipe, rows: list[ClipRow]) -> bool:
    """Whether :func:`setup_task` has work: a basis codec, or captions to embed."""
    return bool(getattr(get_codec(cfg.cache.codec), "needs_basis", False)
                or (cfg.frame_select.cache_captions and any(getattr(r, "captions", ()) for r in rows)))


def shard_task(cfg: Recipe, rows: list[ClipRow], plan: ShardPlan, root: str, use_gpu: bool, deep: bool,
               retry_failed: bool) -> dict:
    """Write one shard (idempotent, ``pipeline.write_shard``); returns its stats for the driver."""
    t0 = time.perf_counter()
    teacher, device = _worker_teacher(cfg, use_gpu)
    try:
        stats = write_shard(cfg, rows, teacher, plan, Path(root) / SHARDS_DIR, device, deep, retry_failed)
    except CacheError as e:
        if isinstance(e.__cause__, OSError):
            raise TransientShardError(str(e)) from e
        raise
    return {**stats, "shard": plan.name, "clips_planned": plan.stop - plan.start,
            "worker": f"{socket.gethostname()}:{os.getpid()}", "task_seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------------
# the driver


class _Described:
    """A teacher's description standing in for the teacher where only ``describe()`` is asked for."""

    def __init__(self, description: dict) -> None:
        self.description = description

    def describe(self) -> dict:
        return self.description


def wants_gpu(device: str, cluster_gpus: float) -> bool:
    """Whether a task asks for a GPU: ``cuda``/``cuda:N`` yes (the cluster must have one), ``cpu`` no,
    ``auto`` when the cluster has GPUs."""
    if device == "auto":
        return cluster_gpus >= 1
    if device.startswith("cuda"):
        if cluster_gpus < 1:
            raise CacheError(f"cache.device={device} but the Ray cluster has no GPU; start workers with GPUs, "
                             "or set cache.device=cpu")
        return True
    return False


def cache_teacher_ray(cfg: Recipe, progress: bool = True, deep: bool = False, retry_failed: bool = False,
                      purpose: str = "cache-teacher") -> dict:
    """``pipeline.cache_teacher`` with one Ray task per shard; same arguments, same store, same summary
    counts (plus ``engine`` and ``ray_*`` bookkeeping)."""
    if du.dist_env_from_environ().world_size > 1:
        raise CacheError("--engine ray runs from one driver process: start it without torchrun")
    ray = import_ray()
    if "://" in str(cfg.cache.store):
        raise CacheError(f"cache.store={cfg.cache.store}: --engine ray writes into a folder that the driver and every "
                         "worker see (a shared file system); give such a folder, or use the default engine")
    if not cfg.corpus.source:
        raise CacheError("corpus.source is empty: give a manifest or a folder (corpus.source=PATH)")
    root = Path(cfg.cache.store)
    rows = None
    if Path(cfg.corpus.source).expanduser().exists():
        rows = read_corpus(cfg.corpus.source, cfg.corpus.root)  # a bad manifest stops before anything is written
    lock = take_store_lock(root, du.DistEnv(), purpose)
    started = not ray.is_initialized()
    try:
        if started:
            ray.init(logging_level=logging.WARNING, configure_logging=True)
        return _cache_locked(ray, cfg, root, progress, deep, retry_failed, rows)
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
        if lock is not None:
            lock.release()


def _cache_locked(ray, cfg: Recipe, root: Path, progress: bool, deep: bool, retry_failed: bool,
                  rows: list[ClipRow] | None) -> dict:
    t0 = time.perf_counter()
    cfg, rows = corpus_rows(cfg, root, rows)
    use_gpu = wants_gpu(cfg.cache.device, ray.cluster_resources().get("GPU", 0))
    resources = {"num_gpus": 1 if use_gpu else 0, "num_cpus": 1}

    description = _get(ray, ray.remote(describe_task).options(**resources, max_retries=MAX_RETRIES).remote(cfg, use_gpu))
    wanted = build_spec(cfg, _Described(description), rows, corpus_digest(rows))
    console = Console(stderr=True) if progress else None
    try:
        spec = prepare_store(root, cfg, wanted, rows, console)
    except OSError as e:  # read-only or full disk, no permission: say so before any work
        raise CacheError(f"cannot write the store {root}: {e.strerror or e}") from None
    rows_ref = ray.put(rows)
    if needs_setup(cfg, rows):
        _get(ray, ray.remote(setup_task).options(**resources, max_retries=MAX_RETRIES).remote(str(root), cfg, rows_ref, use_gpu))

    shards_dir = root / SHARDS_DIR
    plans = plan_shards(len(rows), cfg.cache.clips_per_shard, spec["corpus"]["extents"])
    # The cheap check (sidecar present, data of the recorded size) here; --deep and --retry-failed read
    # or decode, so every shard's own task does them.
    todo, redone = plan_shard_work(shards_dir, cfg.cache.layout, plans)
    if deep or retry_failed:
        todo = plans
    print_redone(redone, du.DistEnv(), progress)
    stats = _run_tasks(ray, cfg, rows_ref, todo, root, use_gpu, resources, deep, retry_failed, progress, redone)
    summary = finalize_store(root, plans, du.DistEnv())
    skipped = len(plans) - len(todo) + stats.pop("skipped")
    summary = {**summary, "engine": "ray", **stats, "skipped_shards": skipped,
               "redone_shards": [{"shard": r.shard, "reason": r.reason} for r in redone],
               "ray_seconds": round(time.perf_counter() - t0, 3)}
    with open(root / SUMMARY_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(summary) + "\n")
    if progress:
        print_summary(root, summary)
    check_failed_fraction(summary.get("failures", 0), summary.get("clips", 0), cfg.corpus.max_failed_fraction,
                          str(cfg.corpus.source), str(root / FAILURES_FILE), " (then re-run with --retry-failed)")
    return summary


def _get(ray, ref):
    """``ray.get(ref)``; a task's own exception is raised as itself (a missing weights file stays the user's
    one-line error), not wrapped in Ray's traceback of the worker."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise


def _run_tasks(ray, cfg: Recipe, rows_ref, todo: list[ShardPlan], root: Path, use_gpu: bool, resources: dict,
               deep: bool, retry_failed: bool, progress: bool, redone: list[Redo]) -> dict:
    """Submit one task per shard and follow them: the bar moves as shards finish; the first task that
    fails for good cancels the others and stops the run naming its shard."""
    # max_calls=0: a GPU worker stays (Ray's default for GPU tasks is a new process each time), keeping its
    # teacher for the next shard
    task = ray.remote(max_calls=0)(shard_task).options(**resources, max_retries=MAX_RETRIES,
                                                       retry_exceptions=list(TRANSIENT))
    pending = {task.remote(cfg, rows_ref, plan, str(root), use_gpu, deep, retry_failed): plan for plan in todo}
    totals = {"clips": 0, "records": 0, "failures": 0, "frames": 0, "teacher_seconds": 0.0, "task_seconds": 0.0}
    workers: set[str] = set()
    skipped, t0 = 0, time.perf_counter()
    bar = _progress(progress, sum(p.stop - p.start for p in todo))
    done_clips = 0
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0.5)
            for ref in ready:
                plan = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as e:
                    for other in pending:
                        ray.cancel(other)
                    cause = getattr(e, "cause", None) or e
                    raise CacheError(f"shard {plan.name} (rows {plan.start}..{plan.stop - 1}) failed in its Ray task "
                                     f"(retried up to {MAX_RETRIES} times if transient): {type(cause).__name__}: "
                                     f"{str(cause).strip().splitlines()[-1] if str(cause).strip() else ''} — the "
                                     "finished shards are kept: re-run the command to resume") from None
                workers.add(result["worker"])
                skipped += int(result["skipped"])
                mine = [Redo(r["shard"], r["reason"]) for r in result["redone"]]
                print_redone(mine, du.DistEnv(), progress)
                redone.extend(mine)
                for key in totals:
                    totals[key] += result.get(key, 0)
                done_clips += result["clips_planned"]
            if bar is not None:
                elapsed = max(time.perf_counter() - t0, 1e-9)
                bar.update(done_clips, totals["clips"] / elapsed, totals["frames"] / elapsed, totals["failures"])
    finally:
        if bar is not None:
            bar.close()
    out = {f"ray_{k}": round(v, 3) if isinstance(v, float) else v for k, v in totals.items()}
    return {**out, "ray_tasks": len(todo), "ray_workers": len(workers), "skipped": skipped}
