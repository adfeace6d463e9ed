"""Shared parts of the benchmark suite: machine description, timing statistics, isolated child
processes with their own peak memory, the synthetic corpus, and store transcoding.

Nothing here measures anything by itself; ``bench_*.py`` do, and ``run.py`` puts them together.
"""

from __future__ import annotations

import contextlib
import csv
import multiprocessing as mp
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent

# Kinetics-710 training clips: ~0.66 M (658,340 in the k710 list of github.com/OpenGVLab/VideoMAEv2,
# docs/DATASET.md; UMT's K710, prepared as in UniFormerV2, is the union of K400/600/700 training sets with
# the validation videos of all three removed).
K710_CLIPS = 660_000


# --------------------------------------------------------------------------------------------------
# machine and load


def load_average() -> list[float]:
    """1/5/15-minute load averages (runnable processes); compare with the core count."""
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or None
    except OSError:
        return None


def machine_info(device: str) -> dict[str, Any]:
    """What the absolute numbers depend on: CPU, cores, threads, GPU, memory, versions."""
    import torch

    info: dict[str, Any] = {
        "hostname": platform.node(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "gpu": None,
        "git_commit": _git_commit(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def machine_slug(info: dict[str, Any]) -> str:
    """A file-name-safe label: ``cuda-nvidia-a100-sxm4-80gb`` or ``cpu-2c-intel-xeon-...``."""
    if info.get("gpu"):
        name = f"cuda-{info['gpu']}"
    else:
        model = re.sub(r"\(r\)|\(tm\)|cpu|@.*$", "", info["cpu"].lower())
        name = f"cpu-{info['cores']}c-{model}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


def today() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------
# statistics


def timing_stats(times: Sequence[float]) -> dict[str, Any]:
    """Median/min/max/mean of per-step seconds (the list is kept for re-analysis)."""
    return {
        "n": len(times),
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "mean": statistics.fmean(times),
        "times": [round(t, 6) for t in times],
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


# --------------------------------------------------------------------------------------------------
# peak memory of one process


def reset_peak_memory(device: str) -> float:
    """Start a fresh peak-memory window; returns the current footprint in MB (the baseline).

    CPU: resets the kernel's resident-set high-water mark (``/proc/self/clear_refs`` = 5), so VmHWM
    afterwards is the peak of this process from now on. CUDA: ``reset_peak_memory_stats``.
    """
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux or not permitted: VmHWM then covers the whole process life (said in the JSON)
    return _proc_status_mb("VmRSS")


def peak_memory_mb(device: str) -> float:
    """Peak since :func:`reset_peak_memory`: CUDA allocated bytes, or CPU resident set (VmHWM)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return _proc_status_mb("VmHWM")


def _proc_status_mb(field: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------------------
# isolated runs: one fresh process per measurement, without paying the import time each time

_CONTEXT: Any = None
# Everything a measurement imports: torch, open_clip (+ torchvision: ~6 s alone), the registered parts.
PRELOAD = [
    "torch", "open_clip", "zarr", "webdataset",
    "umt_distill.data.video", "umt_distill.data.views", "umt_distill.cache.datasets", "umt_distill.teachers.clip",
    "umt_distill.teachers.configs", "umt_distill.cache.codecs", "umt_distill.cache.stores", "umt_distill.masking",
    "umt_distill.models.vit", "umt_distill.losses", "umt_distill.stages.stage1", "umt_distill.cache.pipeline",
    "benchmarks.common", "benchmarks.bench_step",
]


def _context():
    # A forkserver imports torch and the package once (no threads, no CUDA context, no model yet);
    # every measurement is a fork of that clean process, so its peak memory is its own and it starts
    # in ~1 s instead of the 10-20 s a fresh interpreter needs on a loaded 2-core machine.
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


_GATE: Any = None  # in a measurement child: the connection to the parent that paces it


def gate() -> None:
    """Wait here until the parent says go (a no-op outside a paced child).

    While waiting, this process's own children (DataLoader workers) are stopped with SIGSTOP, so a
    paused measurement takes no CPU from the one being timed; they continue when this one does.
    """
    if _GATE is None:
        return
    _GATE.send(("gate", None))
    workers = [p.pid for p in mp.active_children() if p.pid]
    for pid in workers:
        _signal(pid, signal.SIGSTOP)
    try:
        _GATE.recv()
    finally:
        for pid in workers:
            _signal(pid, signal.SIGCONT)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # a worker that has just exited
        pass


def _child_main(conn, fn: Callable, args: tuple, kwargs: dict) -> None:
    global _GATE
    _GATE = conn
    try:
        result = ("ok", fn(*args, **kwargs))
    except BaseException as e:  # sent back whole: the parent names the failing measurement
        result = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    conn.send(result)
    conn.close()


class IsolatedRun:
    """``fn(*args, **kwargs)`` running in a fresh process forked from the preloaded server.

    The child stops at every :func:`gate` until :meth:`go`; :meth:`next_event` returns ``"gate"`` or,
    at the end, ``("ok", result)``. ``fn`` must be a module-level function (pickled by reference).
    """

    def __init__(self, fn: Callable, *args: Any, **kwargs: Any) -> None:
        ctx = _context()
        self.name = fn.__name__
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_child_main, args=(child, fn, args, kwargs))
        self.proc.start()
        child.close()

    def next_event(self) -> tuple[str, Any]:
        """Block until the child reaches a gate (``("gate", None)``) or finishes (``("ok", result)``)."""
        try:
            status, value = self.conn.recv()
        except EOFError:
            self.proc.join()
            raise RuntimeError(f"{self.name} died without a result (exit code {self.proc.exitcode})") from None
        if status == "error":
            self.proc.join()
            raise RuntimeError(f"{self.name} failed in its child process:\n{value}")
        if status == "ok":
            self.proc.join()
        return status, value

    def go(self) -> None:
        self.conn.send("go")

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def run_isolated(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` in a fresh process (forked from a preloaded server); return its result.

    Gates in the child are passed straight through. A failure in the child is raised here as a
    ``RuntimeError`` carrying the child's traceback.
    """
    run = IsolatedRun(fn, *args, **kwargs)
    try:
        while True:
            status, value = run.next_event()
            if status == "ok":
                return value
            run.go()
    finally:
        run.kill()


def run_interleaved(runs: dict[str, IsolatedRun]) -> dict[str, Any]:
    """Pace several gated runs one step each in turn, in mirrored order (A B C, C B A, A B C ...).

    Every run first reaches its setup gate (setups overlap, untimed); then exactly one run works at a
    time, so runs measured side by side see the same machine within seconds of each other.

    Returns:
        Each run's result by name.
    """
    results: dict[str, Any] = {}
    try:
        for run in runs.values():
            status, value = run.next_event()
            if status == "ok":
                raise RuntimeError(f"{run.name} finished without reaching a gate")
        active, turn = list(runs), 0
        while active:
            for name in list(active if turn % 2 == 0 else active[::-1]):
                runs[name].go()
                status, value = runs[name].next_event()
                if status == "ok":
                    results[name] = value
                    active.remove(name)
            turn += 1
    finally:
        for run in runs.values():
            run.kill()
    return results


# --------------------------------------------------------------------------------------------------
# synthetic corpus


def textured_video(num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """A moving disc over a gradient plus a panning noise texture: uint8 [T, H, W, 3].

    The plain toy clip compresses to ~30 kbit/s, which makes decoding unrealistically cheap; the
    texture brings the bitrate to a few hundred kbit/s (Kinetics clips at 320 px: ~300-800) while
    motion compensation still works, as in real footage.
    """
    from umt_distill.testing.media import moving_shapes_video

    base = moving_shapes_video(num_frames, height, width, seed=seed).astype(np.float32)  # [T, H, W, 3]
    rng = np.random.default_rng(seed + 10_000)
    texture = rng.normal(0.0, 24.0, (height + num_frames // 2 + 1, width + num_frames + 1, 1)).astype(np.float32)
    texture = (texture + np.roll(texture, 1, 0) + np.roll(texture, 1, 1)) / 3  # slight blur, like a real sensor
    for t in range(num_frames):
        dy, dx = t // 2, t  # a slow diagonal pan
        base[t] += texture[dy : dy + height, dx : dx + width]
    return np.clip(base, 0, 255).astype(np.uint8)


def write_corpus(
    folder: Path, num_videos: int, num_rows: int, frames: int, height: int, width: int, fps: int = 30
) -> dict[str, Any]:
    """Encode ``num_videos`` distinct MP4s (libx264, default GOP) and a manifest of ``num_rows`` rows.

    Rows beyond ``num_videos`` reuse the files under new ids: a new id means new views (views are
    seeded by the clip id), so a GPU-sized corpus of thousands of rows needs only a few encodes.

    Returns:
        ``{"manifest", "videos", "rows", "frames", "height", "width", "fps", "kbit_per_s"}``.
    """
    from umt_distill.testing.media import write_video

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num_videos):
        path = folder / f"v{i:03d}.mp4"
        if not path.exists():
            write_video(path, textured_video(frames, height, width, seed=i), fps=fps)
        paths.append(path)
    manifest = folder / f"manifest_{num_rows}.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path"])
        for r in range(num_rows):
            w.writerow([f"clip{r:05d}", paths[r % num_videos].name])
    seconds = frames / fps
    kbps = statistics.fmean(p.stat().st_size * 8 / seconds / 1000 for p in paths)
    return {"manifest": str(manifest), "videos": num_videos, "rows": num_rows, "frames": frames, "height": height,
            "width": width, "fps": fps, "kbit_per_s": round(kbps, 1), "encoder": "libx264 (PyAV defaults: crf 23, GOP 250)"}


# --------------------------------------------------------------------------------------------------
# stores


def store_data_bytes(root: Path) -> int:
    """Bytes of shard data (sidecar JSON excluded), as ``cache info`` counts them."""
    return sum(p.stat().st_size for p in (Path(root) / "shards").rglob("*") if p.is_file() and not p.name.endswith(".json"))


def evict_page_cache(root: Path) -> None:
    """Drop the store's files from the OS page cache so the next read comes from the disk.

    ``posix_fadvise(DONTNEED)`` touches only these files (no root, no effect on other users); the
    writers fsynced them, so their pages are clean and can be dropped.
    """
    for path in Path(root).rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except (AttributeError, OSError):
                pass
            finally:
                os.close(fd)


def transcode_store(
    src: Path,
    dst: Path,
    codec: str,
    mode: str = "full",
    layout: str = "zarr",
    mask_ratio: float = 0.8,
    seed: int = 0,
    replicate: int = 1,
    records_per_shard: int | None = None,
    frames: bool = False,
    basis_clips: int = 32,
) -> dict[str, Any]:
    """Re-encode a complete fp32 store into another codec / mode / layout, timing the writes.

    The records (and their views) are the source's, so every codec is compared on the same targets.
    Mode ``visible`` draws one semantic mask per record from the stored attention with the same
    seeded generator ``cache-teacher`` uses. ``replicate`` writes each record that many times under
    new clip ids (``<id>~r``) to make a larger store for read benchmarks.

    Returns:
        ``{"write_seconds", "encode_seconds", "nbytes", "records", "shards"}``; ``write_seconds`` covers
        encode + compress + write + fsync of every shard (the writer's ``add`` and ``close``).
    """
    import torch

    from umt_distill.cache.pipeline import visible_tokens
    from umt_distill.cache.spec import read_spec
    from umt_distill.io import atomic_write_json
    from umt_distill.cache.record import TargetRecord
    from umt_distill.cache.stores import CacheReader, init_store_root, open_shard_writer, write_index
    from umt_distill.config import load_recipe

    reader = CacheReader(src)
    spec = read_spec(src)
    records = [reader.get(*key) for key in reader.keys]
    if dst.exists():
        shutil.rmtree(dst)
    init_store_root(dst, layout, {"umt_distill_spec": "spec.json"})
    cfg = load_recipe("stage1/tiny", [f"seed={seed}", "cache.mode=visible", f"cache.mask_ratio={mask_ratio}", "cache.masks_per_view=1"])
    all_records = []
    for r in range(replicate):
        for rec in records:
            clip_id = rec.clip_id if r == 0 else f"{rec.clip_id}~{r}"
            tokens, visible = rec.tokens, None
            if mode == "visible":
                tokens, visible = visible_tokens(cfg, clip_id, rec.view_index, rec.tokens, torch.from_numpy(rec.attn))
            all_records.append(TargetRecord(clip_id=clip_id, view_index=rec.view_index, view=rec.view,
                                            frames_digest=rec.frames_digest, tokens=tokens, attn=rec.attn,
                                            pooled=rec.pooled, visible_idx=visible, frames=rec.frames if frames else None))
    codec_obj, basis_entry = _transcode_codec(codec, records, dst, basis_clips, seed)
    per_shard = records_per_shard or len(all_records)
    infos, t0 = [], time.perf_counter()
    for s in range(0, len(all_records), per_shard):
        writer = open_shard_writer(layout, dst / "shards", f"shard-{s // per_shard:06d}", codec_obj,
                                   frames="raw" if frames else "none")
        for rec in all_records[s : s + per_shard]:
            writer.add(rec)
        infos.append(writer.close())
    write_seconds = time.perf_counter() - t0
    write_index(dst, layout, infos)
    mode_spec = {"mode": mode, **({"mask_ratio": mask_ratio, "masks_per_view": 1} if mode == "visible" else {})}
    codec_spec = {"name": codec, "compressor": spec["codec"]["compressor"], **({"basis_clips": basis_clips} if basis_entry else {})}
    spec.pop("basis", None)
    if basis_entry:
        spec["basis"] = basis_entry
    spec.update(codec=codec_spec, layout=layout, mode=mode_spec, frames="raw" if frames else "none",
                status="complete", counts={"clips": len({r.clip_id for r in all_records}), "records": len(all_records),
                                           "failures": 0, "shards": len(infos), "bytes": sum(i["nbytes"] for i in infos)},
                transcoded_from=str(src))
    atomic_write_json(dst / "spec.json", spec)
    return {"write_seconds": write_seconds, "nbytes": sum(i["nbytes"] for i in infos), "records": len(all_records),
            "shards": len(infos), "array_bytes": zarr_array_bytes(dst) if layout == "zarr" else None}


def _transcode_codec(codec: str, records: list, dst: Path, basis_clips: int, seed: int):
    """The codec object for ``transcode_store`` and, for ``pca<r>``, the spec entry of its new basis."""
    from umt_distill.cache.basis import MAX_FIT_TOKENS, MAX_FIT_TOKENS_JOINT, fit_basis, sample_clip_indices, subsample, write_basis
    from umt_distill.cache.codecs import get_codec

    c = get_codec(codec)
    if not c.needs_basis:
        return c, None
    clips = list(dict.fromkeys(r.clip_id for r in records))  # store (= corpus) order
    chosen = {clips[i] for i in sample_clip_indices(len(clips), basis_clips)}
    x = np.concatenate([r.tokens.reshape(r.tokens.shape[0], -1, r.tokens.shape[-1])
                        for r in records if r.clip_id in chosen], axis=1)  # [K, S, D] (full-mode records)
    x = subsample(x, MAX_FIT_TOKENS_JOINT if c.joint else MAX_FIT_TOKENS, seed)
    basis = fit_basis(x, c.rank, c.joint)
    entry = write_basis(dst, basis, {"clips": len(chosen), "tokens_per_layer": int(x.shape[1])})
    return c.bind(basis), entry


def zarr_array_bytes(root: Path) -> dict[str, int]:
    """Bytes on disk per stored array name, summed over a zarr store's shards (``tokens.q``, ``frames`` ...)."""
    out: dict[str, int] = {}
    for shard in sorted((root / "shards").glob("*.zarr")):
        for array in shard.iterdir():
            if array.is_dir():
                out[array.name] = out.get(array.name, 0) + sum(f.stat().st_size for f in array.rglob("*") if f.is_file())
    return out


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A temporary work directory, removed afterwards (stores of a run can take gigabytes)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def clean_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def log(message: str) -> None:
    """Progress on stderr with a timestamp and the load (the JSON keeps the numbers)."""
    print(f"[{time.strftime('%H:%M:%S')} load {load_average()[0]:.2f}] {message}", file=sys.stderr, flush=True)
