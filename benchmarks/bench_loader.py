"""The stage-1 input path, measured the way training runs it: clip-views/s per CPU core.

Each row runs the real path — the training dataset (``StreamingViewDataset`` for a WebDataset store,
``CachedViewDataset`` + ``EpochSampler`` for Zarr) in a ``DataLoader`` with ONE worker process and one
torch thread, batches arriving in the training process (pinned, on CUDA); on a GPU the consumer then
does what the step does before the student: pixels to the device (JPEGs shipped as bytes decoded
there by nvJPEG), targets to the device and dequantised there (``device_targets``). With one worker,
the worker is one core: the rate is per core. On a CPU-only machine that device-side work would run in
the training process, not on the loader core, so it is timed apart (``device_ms_per_clip_view_on_cpu``:
what a GPU takes over, or what a CPU step adds).

Stores are written with UMT-B (K=6 layers, D=512) or UMT-L (K=6, D=768) target shapes, T=8 frames,
N=196 tokens, 224 px views, by the package's own shard writers (``layout_options`` as cache-teacher
uses them) with random tokens: the bytes and the work per byte are real, the values are not (they
matter for compression only; random tokens compress no better than trained ones). Views are sampled
from real MP4s (``benchmarks.common.write_corpus``), so ``pixels=video`` rows decode real H.264.
Each timed pass reads one epoch cold (page cache evicted first) and warm; the clock starts when the
first batch arrives, so the rate is the worker's steady state (its start-up, paid once per epoch, is
excluded).

Rows:
- ``pixels``: ``none`` (targets only), ``raw`` / ``jpeg`` frames from the store (``jpeg``: decoded in
  the worker; ``jpeg-device``: shipped as bytes, decoded in the training process — on a GPU by nvJPEG,
  here on the CPU, reported apart), or ``video-<backend>`` (decoded from the MP4 in the worker);
- ``targets``: codec × mode (``full`` all tokens, ``visible`` 20 % of them);
- ``layout``: ``wds`` streamed (format 2: one epoch slot per shard), ``wds-v1`` (every view read, the
  format-1 order), ``zarr`` random access;
- ``path``: ``fast`` (the package's path) or ``reference`` (the path before format 2, kept here for the
  before/after: every view of the tar through ``webdataset`` and float32 records decoded on the CPU).

Object storage (``object_storage`` rows; ``--no-object-storage`` skips them): the headline, targets-only
and a zarr targets-only case, each store uploaded to moto's S3 server on 127.0.0.1 and read through
``AWS_ENDPOINT_URL`` beside its local copy in the same run: clip-views/s of one worker from disk (cold,
warm) and from S3; then one in-process epoch from S3 counting what ``umt_distill.storage`` fetched:
bytes fetched / bytes the epoch uses (wds: its groups; zarr: the chunks it decodes), requests per
clip-view, MB per request, and the read-ahead's peak of bytes held. Loopback to an in-process Python
server: the rates are a floor for the client's overheads, not a network's.

Derived per row, for a student consuming ``--student-rate`` clip-views/s per GPU: CPU cores and storage
GB/s one GPU needs. Yardsticks: UMT's own run (60 h on 32 A100 for 200 epochs of K710's 0.66 M clips:
0.66e6 * 200 / (60 * 3600 * 32) = 19 clip-views/s per GPU) and the UMT-B student's compute at 40 % of
peak bf16 (~171 GFLOP per clip-view fwd+bwd at 314 visible tokens: A100 312 TFLOP/s -> ~700, H100 SXM
989 TFLOP/s -> ~2,000 clip-views/s).

    .venv/bin/python -m benchmarks.bench_loader                       # the default grid, ~5 min here
    .venv/bin/python -m benchmarks.bench_loader --quick               # a few rows (smoke)
    .venv/bin/python -m benchmarks.bench_loader --student-rate 700 --json loader.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import evict_page_cache, log

YARDSTICKS = {"umt_official_a100": 19.0, "a100_compute": 700.0, "h100_compute": 2000.0}
SHAPES = {"umt-b": {"K": 6, "D": 512}, "umt-l": {"K": 6, "D": 768}}
T, N, SIZE, MASK_RATIO, VIEWS = 8, 196, 224, 0.8, 2


@dataclass(frozen=True)
class LoaderCase:
    shape: str = "umt-b"
    codec: str = "int8"
    mode: str = "visible"
    pixels: str = "raw"          # none | raw | jpeg | jpeg-device | video-<backend>
    layout: str = "wds"          # wds | wds-v1 | zarr
    path: str = "fast"           # fast | reference
    compressor: str = "none"     # the stage-1 recipes' choice: int8 tokens and pixels barely compress

    @property
    def frames(self) -> str:
        return {"raw": "raw", "jpeg": "jpeg", "jpeg-device": "jpeg"}.get(self.pixels, "none")

    def label(self) -> str:
        return f"{self.shape} {self.codec}/{self.mode} {self.pixels} {self.layout} {self.path} {self.compressor}"


HEADLINE = LoaderCase()
TARGETS_ONLY = LoaderCase(pixels="none")


def default_grid(quick: bool) -> list[LoaderCase]:
    if quick:
        return [HEADLINE, TARGETS_ONLY, LoaderCase(path="reference", layout="wds-v1", compressor="zstd"),
                LoaderCase(pixels="video-pyav")]
    ref = {"path": "reference", "layout": "wds-v1", "compressor": "zstd"}  # the path and store of format 1
    return [
        # targets alone: codec x mode, fast vs the reference path, compressors, layouts
        *(LoaderCase(codec=c, mode=m, pixels="none") for c in ("fp16", "int8") for m in ("full", "visible")),
        *(LoaderCase(codec=c, mode=m, pixels="none", **ref) for c in ("fp16", "int8") for m in ("full", "visible")),
        LoaderCase(pixels="none", compressor="zstd"),
        LoaderCase(codec="fp16", mode="full", pixels="none", compressor="zstd"),
        LoaderCase(pixels="none", layout="wds-v1"),
        LoaderCase(pixels="none", layout="zarr"),
        LoaderCase(codec="fp16", mode="full", pixels="none", layout="zarr", compressor="zstd"),
        # pixels from the store and from the video, int8 visible targets
        HEADLINE,
        LoaderCase(compressor="zstd"),
        LoaderCase(pixels="jpeg"),
        LoaderCase(pixels="jpeg-device"),
        LoaderCase(pixels="raw", **ref),
        LoaderCase(pixels="jpeg", **ref),
        LoaderCase(pixels="raw", layout="zarr"),
        LoaderCase(mode="full"),  # the recipes' mode: fresh masks every epoch
        *(LoaderCase(pixels=f"video-{b}") for b in ("decord", "pyav", "torchcodec")),
        # UMT-L target shapes
        LoaderCase(shape="umt-l", pixels="none"),
        LoaderCase(shape="umt-l"),
        LoaderCase(shape="umt-l", codec="fp16", mode="full", pixels="none", compressor="zstd"),
    ]


# --------------------------------------------------------------------------------------------------
# stores


def _records(case: LoaderCase, rows: list, clips: int, seed: int):
    """Records with real views of real videos and random targets of the case's shape."""
    from umt_distill.cache.pipeline import visible_tokens
    from umt_distill.cache.record import TargetRecord, frames_digest
    from umt_distill.config import load_recipe
    from umt_distill.data.clipviews import decode_clip_views
    from umt_distill.data.jpeg import jpeg_round_trip

    K, D = SHAPES[case.shape]["K"], SHAPES[case.shape]["D"]
    cfg = load_recipe("stage1/tiny", [f"seed={seed}", "views.num_frames=8", f"views.size={SIZE}", f"cache.num_views={VIEWS}",
                                      "corpus.video_backend=pyav", f"cache.mask_ratio={MASK_RATIO}", "cache.masks_per_view=1"])
    rng = np.random.default_rng(seed)
    for row in rows[:clips]:
        views, pixels = decode_clip_views(row, cfg)  # [V, T, 3, H, W]
        for k, view in enumerate(views):
            frames, jpegs = pixels[k].numpy(), None
            if case.frames == "jpeg":
                jpegs, frames = jpeg_round_trip(frames)
            attn = rng.dirichlet(np.ones(N), size=T).astype(np.float32)
            tokens = (rng.standard_normal((K, T, N, D), dtype=np.float32) * 0.5)
            visible = None
            if case.mode == "visible":
                tokens, visible = visible_tokens(cfg, row.id, k, tokens, torch.from_numpy(attn))
            yield TargetRecord(clip_id=row.id, view_index=k, view=view, frames_digest=frames_digest(frames), tokens=tokens,
                               attn=attn, pooled=rng.standard_normal((T, D), dtype=np.float32), visible_idx=visible,
                               frames=frames if case.frames != "none" else None, frames_jpeg=tuple(jpegs) if jpegs else None)


def build_store(case: LoaderCase, root: Path, rows: list, clips: int, clips_per_shard: int, seed: int = 0) -> Path:
    """A complete store for ``case`` (spec, shards, index), written by the package's shard writers."""
    import shutil

    from umt_distill.io import atomic_write_json
    from umt_distill.cache.stores import init_store_root, open_shard_writer, write_index

    layout = "zarr" if case.layout == "zarr" else "wds"
    if root.exists():
        shutil.rmtree(root)
    init_store_root(root, layout, {})
    options = {"num_views": VIEWS, "view_seed": seed} if case.layout == "wds" else {}
    infos, writer, n = [], None, 0
    for rec in _records(case, rows, clips, seed):
        if writer is None:
            writer = open_shard_writer(layout, root / "shards", f"shard-{len(infos):06d}", case.codec, case.compressor,
                                       frames=case.frames, **options)
        writer.add(rec)
        n += 1
        if n % (clips_per_shard * VIEWS) == 0:
            infos.append(writer.close())
            writer = None
    if writer is not None:
        infos.append(writer.close())
    write_index(root, layout, infos)
    spec = {"format": 1, "layout": layout, "codec": {"name": case.codec, "compressor": case.compressor},
            "frames": case.frames, "mode": {"mode": case.mode}, "status": "complete",
            "views": {"num_views": VIEWS, "seed": seed, "num_frames": T, "size": SIZE}}
    atomic_write_json(root / "spec.json", spec)
    return root


# --------------------------------------------------------------------------------------------------
# the path under test


def _recipe(case: LoaderCase, store: Path, manifest: str, batch_size: int, workers: int):
    from umt_distill.config import load_recipe

    pixels_from = "video" if case.pixels.startswith("video") else "store"
    backend = case.pixels.split("-", 1)[1] if case.pixels.startswith("video") else "pyav"
    return load_recipe("stage1/tiny", [
        f"corpus.source={manifest}", f"corpus.video_backend={backend}", f"cache.store={store}",
        f"cache.layout={'zarr' if case.layout == 'zarr' else 'wds'}", f"cache.codec={case.codec}",
        f"train.batch_size={batch_size}", f"train.num_workers={workers}", f"train.pixels_from={pixels_from}",
        "train.shuffle_buffer=16", "views.num_frames=8", f"views.size={SIZE}", f"cache.num_views={VIEWS}"])


class _Reference(torch.utils.data.IterableDataset):
    """The input path before format 2: every sample of the tar through ``webdataset``, float32 records
    decoded on the CPU, the other views skipped; batches by the DataLoader's collate."""

    def __init__(self, store: Path, with_pixels: bool) -> None:
        self.store, self.with_pixels, self.epoch = store, with_pixels, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        from umt_distill.cache.stores import wds_records
        from umt_distill.data.views import epoch_view

        for rec in wds_records(self.store, shuffle=16, seed=0, epoch=self.epoch):
            if rec.view_index != epoch_view(0, rec.clip_id, self.epoch, VIEWS):
                continue
            item = {"clip_id": rec.clip_id, "attn": torch.from_numpy(rec.attn)}
            tokens = rec.tokens if rec.visible_idx is None else rec.tokens[0]
            item["tokens"] = torch.from_numpy(np.ascontiguousarray(tokens))
            if rec.visible_idx is not None:
                item["visible_idx"] = torch.from_numpy(rec.visible_idx[0].astype(np.int64))
            if self.with_pixels:
                item["pixels"] = torch.from_numpy(np.ascontiguousarray(rec.frames))
            yield item


def make_loader(case: LoaderCase, store: Path, manifest: str, batch_size: int, workers: int):
    """(dataset, DataLoader factory, device-side consumer) exactly as stage 1 builds them."""
    from umt_distill.cache.codecs import get_codec
    from umt_distill.data.corpus import read_corpus
    from umt_distill.cache.datasets import CachedViewDataset, StreamingViewDataset, batch_pixels
    from umt_distill.data.samplers import EpochSampler
    from umt_distill.cache.datasets import device_targets

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = _recipe(case, store, manifest, batch_size, workers)
    rows = {}
    if case.pixels.startswith("video"):
        from umt_distill.data.video import preload_video_backend

        rows = {r.id: r for r in read_corpus(manifest)}
        preload_video_backend(case.pixels.split("-", 1)[1])  # as build_data does: not in every worker
    init = _one_thread if workers else None
    common = {"num_workers": workers, "worker_init_fn": init, "pin_memory": device.type == "cuda",
              "prefetch_factor": 4 if workers else None}
    sampler = None
    if case.path == "reference":
        dataset = _Reference(store, case.pixels != "none")
        loader = lambda: torch.utils.data.DataLoader(dataset, batch_size=batch_size, drop_last=True, **common)  # noqa: E731
        codec = get_codec("fp32")
    elif case.layout == "zarr":
        dataset = CachedViewDataset(store, cfg, rows, pixels=case.pixels != "none")
        sampler = EpochSampler(len(dataset), 0)
        loader = lambda: torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **common)  # noqa: E731
        codec = get_codec(case.codec)
    else:
        jpeg_device = str(device) if case.pixels == "jpeg-device" else None
        dataset = StreamingViewDataset(store, cfg, rows, jpeg_device=jpeg_device, pixels=case.pixels != "none")
        loader = lambda: torch.utils.data.DataLoader(dataset, batch_size=None, **common)  # noqa: E731
        codec = get_codec(case.codec)

    def consume(batch: dict) -> int:
        # What the step does before the student. On a GPU that is the device's work (copies, nvJPEG,
        # dequantisation); on a CPU it would be the training process's, and the rates here are the
        # loader core's: so the CPU run moves the bytes only (device-side costs: see device_costs).
        if device.type == "cuda":
            if case.pixels != "none":
                batch_pixels(batch, device)
            device_targets(batch, codec, device)
            batch["attn"].to(device, non_blocking=True)
            torch.cuda.synchronize()
        return len(batch["clip_id"])

    def set_epoch(epoch: int) -> None:
        dataset.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)

    return set_epoch, loader, consume


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


class _count_tar_reads:
    """Counts the bytes ``cache.wds_stream`` reads from tar files while active (``with ... as n: n[0]``)."""

    def __enter__(self) -> list[int]:
        from umt_distill.cache import wds_stream

        self.module, self.real, count = wds_stream, wds_stream._open, [0]

        class Counting:
            def __init__(self, f) -> None:
                self.f = f

            def read(self, n: int = -1) -> bytes:
                data = self.f.read(n)
                count[0] += len(data)
                return data

            def __getattr__(self, name: str):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc) -> None:
                self.f.close()

        wds_stream._open = lambda url: Counting(self.real(url))
        return count

    def __exit__(self, *exc) -> None:
        self.module._open = self.real


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def epoch_bytes(store: Path, case: LoaderCase, epoch: int) -> int:
    """Bytes of the samples an epoch trains on (wds), or of the records it reads (zarr)."""
    from umt_distill.cache.stores import read_index

    index = read_index(store)
    if case.layout == "wds":
        return sum(s["groups"][epoch % VIEWS]["nbytes"] for s in index["shards"])
    return sum(s["nbytes"] for s in index["shards"]) // VIEWS  # one of the V views of every record


def _written(case: LoaderCase) -> tuple:
    """What a case's store holds: cases that differ only in how they read share one store."""
    return (case.shape, case.codec, case.mode, case.frames, case.layout, case.compressor)


def measure_rate(case: LoaderCase, store: Path, manifest: str, batch_size: int, passes: int, workers: int,
                 cache: str) -> float:
    """Median clip-views/s over ``passes`` epochs with ``workers`` workers, page cache ``cold`` or ``warm``."""
    set_epoch, loader, consume = make_loader(case, store, manifest, batch_size, workers=workers)
    rates = []
    for p in range(passes):
        set_epoch(p)
        if cache == "cold":
            evict_page_cache(store)  # "remote": a URL, fetched over the network every epoch
        n, t = 0, None
        for batch in loader():  # steady state: the clock starts at the first batch (worker start-up excluded)
            if t is None:
                t = time.perf_counter()
            else:
                n += consume(batch)
        if t is None or n == 0:
            raise RuntimeError(f"{store}: fewer than two batches per epoch; use more --clips")
        rates.append(n / (time.perf_counter() - t))
    return float(np.median(rates))


def measure(case: LoaderCase, store: Path, manifest: str, batch_size: int, passes: int) -> dict[str, Any]:
    """Clip-views/s of one worker (cold and warm page cache) and bytes read per epoch."""
    out: dict[str, Any] = {"workers": 1}
    for cache in ("cold", "warm"):
        out[f"{cache}_clip_views_per_s"] = measure_rate(case, store, manifest, batch_size, passes, 1, cache)
    # Bytes read from the store in one epoch, in-process: for the fast wds path, every byte the shard
    # files returned; otherwise (zarr, webdataset's reader) the process's read() syscalls (rchar, which
    # also counts the small JSON files and any video files).
    set_epoch, loader0, consume0 = make_loader(case, store, manifest, batch_size, workers=0)
    set_epoch(0)
    device_seconds = 0.0
    with _count_tar_reads() as tar_bytes:
        before, n = _rchar(), 0
        for batch in loader0():
            n += consume0(batch)
            device_seconds += _device_work_on_cpu(case, batch)
        read = _rchar() - before
    if case.layout in ("wds", "wds-v1") and case.path == "fast" and not case.pixels.startswith("video"):
        read = tar_bytes[0]
    used = epoch_bytes(store, case, 0)
    out.update(clip_views=n, mb_read_per_clip_view=read / n / 1e6, mb_trained_per_clip_view=used / n / 1e6,
               read_amplification=read / used, device_ms_per_clip_view_on_cpu=device_seconds / n * 1e3)
    return out


def _device_work_on_cpu(case: LoaderCase, batch: dict) -> float:
    """Seconds the step's device-side input work (JPEG decode of shipped bytes, dequantisation) takes
    when the device is this CPU: the cost a GPU takes over, or a CPU-only run adds to its step."""
    from umt_distill.cache.codecs import get_codec
    from umt_distill.cache.datasets import batch_pixels
    from umt_distill.cache.datasets import device_targets

    cpu = torch.device("cpu")
    t = time.perf_counter()
    if "frames_jpeg" in batch:
        batch_pixels(batch, cpu)
    device_targets(batch, get_codec("fp32" if case.path == "reference" else case.codec), cpu)
    return time.perf_counter() - t


def profile(case: LoaderCase, store: Path, manifest: str, batch_size: int, top: int = 8) -> list[str]:
    """Top functions by own time of one epoch in-process (what a worker spends its core on)."""
    set_epoch, loader, consume = make_loader(case, store, manifest, batch_size, workers=0)
    set_epoch(1)
    for batch in loader():  # warm-up: first-call imports and allocations stay out of the profile
        consume(batch)
    set_epoch(0)
    prof = cProfile.Profile()
    prof.enable()
    for batch in loader():
        consume(batch)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.strip().startswith("ncalls"))
    return [" ".join(ln.split()) for ln in lines[start : start + top + 1]]


def derive(rate: float, mb_per_clip_view: float, student_rates: dict[str, float]) -> dict[str, Any]:
    """CPU cores and storage GB/s one GPU needs at each student rate."""
    return {name: {"student_clip_views_per_s": r, "cpu_cores": r / rate, "storage_gb_per_s": r * mb_per_clip_view / 1e3}
            for name, r in student_rates.items()}


# --------------------------------------------------------------------------------------------------
# the section


def run_loader(work: Path, cases: list[LoaderCase], student_rates: dict[str, float], clips: int = 64,
               batch_size: int = 8, passes: int = 2, profile_cases: tuple[LoaderCase, ...] = (),
               all_workers: int | None = None) -> dict[str, Any]:
    """The ``loader`` section: one row per case, the headline, and profiles.

    Args:
        all_workers: Also measure the headline row with this many workers (a node's aggregate rate).
    """
    from benchmarks.common import write_corpus
    from umt_distill.data.corpus import read_corpus

    work.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(work / "videos", min(clips, 12), clips, 120, 240, 320)
    rows = read_corpus(corpus["manifest"])
    stores: dict[tuple, Path] = {}
    results = []
    for case in cases:
        # one store per (what is written); path and pixel source reuse it where the bytes are the same
        written = _written(case)
        if written not in stores:
            log(f"loader: writing {written}")
            stores[written] = build_store(case, work / f"store{len(stores)}", rows, clips, clips_per_shard=8)
        log(f"loader: {case.label()}")
        try:
            row = {**asdict(case), **measure(case, stores[written], corpus["manifest"], batch_size, passes)}
        except Exception as e:  # e.g. a video backend that cannot load here: say so in the table
            row = {**asdict(case), "error": f"{type(e).__name__}: {e}"}
        if "cold_clip_views_per_s" in row:
            row["per_gpu"] = derive(row["cold_clip_views_per_s"], row["mb_read_per_clip_view"], student_rates)
        results.append(row)
    if all_workers and all_workers > 1:
        written = _written(HEADLINE)
        if written in stores:
            log(f"loader: {HEADLINE.label()} with {all_workers} workers")
            rate = measure_rate(HEADLINE, stores[written], corpus["manifest"], batch_size, passes, all_workers, "cold")
            results.append({**asdict(HEADLINE), "workers": all_workers, "cold_clip_views_per_s": rate,
                            "per_core_clip_views_per_s": rate / all_workers})
    profiles = {}
    for case in profile_cases:
        written = _written(case)
        if written in stores:
            profiles[case.label()] = profile(case, stores[written], corpus["manifest"], batch_size)
    headline = {}
    for name, case in (("headline", HEADLINE), ("targets_only", TARGETS_ONLY)):
        row = next((r for r in results if LoaderCase(**{k: r[k] for k in asdict(case)}) == case and "error" not in r
                    and r.get("workers", 1) == 1), None)
        if row is not None:
            headline[name] = row
    out = {"settings": {"T": T, "N": N, "size": SIZE, "views": VIEWS, "mask_ratio": MASK_RATIO, "clips": clips,
                        "batch_size": batch_size, "passes": passes, "workers": 1, "torch_threads": 1},
           "student_rates": student_rates, "rows": results, "profiles": profiles}
    if "headline" in headline:
        h = headline["headline"]
        out["headline"] = {"config": HEADLINE.label(), "clip_views_per_s_per_core": h["cold_clip_views_per_s"],
                           "warm_clip_views_per_s_per_core": h["warm_clip_views_per_s"],
                           "read_amplification": h["read_amplification"], "mb_per_clip_view": h["mb_read_per_clip_view"],
                           "targets_only_clip_views_per_s_per_core": headline.get("targets_only", {}).get("cold_clip_views_per_s")}
    return out


# --------------------------------------------------------------------------------------------------
# object storage: the same loader reading from a local S3 server (moto, 127.0.0.1), beside local disk

OBJECT_STORAGE_CASES = (HEADLINE, TARGETS_ONLY, LoaderCase(pixels="none", layout="zarr"))


def zarr_epoch_chunk_bytes(store: Path, case: LoaderCase, epoch: int) -> int:
    """Bytes of the zarr chunks an epoch decodes: each clip's epoch view, the arrays training reads."""
    from umt_distill.cache.stores import CacheReader
    from umt_distill.data.views import epoch_view

    reader = CacheReader(store)
    total = 0
    for name in reader.shards:
        zshard = reader._zarr_shard(name)
        zshard.check_indexes()
        for row, (clip, view) in enumerate(zshard.records):
            if view != epoch_view(0, clip, epoch, VIEWS):
                continue
            for array in zshard.arrays:
                if array != "pooled" and (case.pixels != "none" or not array.startswith("frames")):
                    total += int(zshard.chunk_ranges[array][row][1])
    return total


def measure_object_storage(case: LoaderCase, store: Path, url: str, manifest: str, batch_size: int,
                           passes: int) -> dict[str, Any]:
    """One case from local disk (page cache cold and warm) and from ``url``, in the same run: clip-views/s
    of one worker; then one in-process epoch from ``url`` counting what ``umt_distill.storage`` fetched:
    bytes fetched / bytes the epoch uses, requests per clip-view and MB per request, and the read-ahead's
    peak of bytes held."""
    from umt_distill import storage

    out: dict[str, Any] = {"label": case.label(), "layout": case.layout, "pixels": case.pixels}
    out["disk_cold_clip_views_per_s"] = measure_rate(case, store, manifest, batch_size, passes, 1, "cold")
    out["disk_warm_clip_views_per_s"] = measure_rate(case, store, manifest, batch_size, passes, 1, "warm")
    out["s3_clip_views_per_s"] = measure_rate(case, url, manifest, batch_size, passes, 1, "remote")
    set_epoch, loader0, consume0 = make_loader(case, url, manifest, batch_size, workers=0)
    set_epoch(0)
    storage.STATS.reset()
    n = sum(consume0(batch) for batch in loader0())
    fetched, requests = storage.STATS.bytes, storage.STATS.requests
    used = epoch_bytes(store, case, 0) if case.layout != "zarr" else zarr_epoch_chunk_bytes(store, case, 0)
    out.update(clip_views=n, fetched_over_used=fetched / used, requests_per_clip_view=requests / n,
               mb_per_request=fetched / requests / 1e6, mb_fetched_per_clip_view=fetched / n / 1e6,
               read_ahead_peak_mb=storage.STATS.read_ahead_peak / 1e6, requests=requests, fetched_bytes=fetched,
               used_bytes=used)
    return out


def run_object_storage(work: Path, cases: tuple[LoaderCase, ...], clips: int = 64, batch_size: int = 8,
                       passes: int = 2) -> dict[str, Any]:
    """The ``object_storage`` rows: each case's store uploaded to a moto S3 server on 127.0.0.1 (found by
    the loader through ``AWS_ENDPOINT_URL``, as on a cluster) and read beside its local copy."""
    import os

    from benchmarks.common import write_corpus
    from umt_distill import storage
    from umt_distill.data.corpus import read_corpus
    from umt_distill.testing.servers import start_s3_server, upload_folder

    work.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(work / "videos", min(clips, 12), clips, 120, 240, 320)
    rows = read_corpus(corpus["manifest"])
    server = start_s3_server("bench")
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    results = []
    try:
        for i, case in enumerate(cases):
            store = build_store(case, work / f"os-store{i}", rows, clips, clips_per_shard=8)
            url = upload_folder(store, server.url(f"store{i}"))
            log(f"object storage: {case.label()} from {url}")
            try:
                results.append(measure_object_storage(case, store, url, corpus["manifest"], batch_size, passes))
            except Exception as e:  # noqa: BLE001 - a row that cannot run says why in the table
                results.append({"label": case.label(), "error": f"{type(e).__name__}: {e}"})
    finally:
        server.stop()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    s = storage.settings()
    return {"server": "moto S3 on 127.0.0.1 (loopback)", "block_mb": s.block_bytes / 2**20,
            "read_ahead": s.read_ahead, "rows": results}


def object_storage_table(section: dict[str, Any]) -> str:
    head = ("| case | disk cold clip-views/s | disk warm | S3 | fetched / used | requests / clip-view "
            "| MB / request | read-ahead peak MB |")
    lines = [head, "|" + "---|" * 8]
    for r in section["rows"]:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['error'][:80]} |" + " |" * 6)
            continue
        lines.append(f"| {r['label']} | {r['disk_cold_clip_views_per_s']:.1f} | {r['disk_warm_clip_views_per_s']:.1f} "
                     f"| {r['s3_clip_views_per_s']:.1f} | {r['fetched_over_used']:.3f} | "
                     f"{r['requests_per_clip_view']:.3f} | {r['mb_per_request']:.2f} | {r['read_ahead_peak_mb']:.1f} |")
    return "\n".join(lines)


def table(section: dict[str, Any]) -> str:
    """The rows as a markdown table."""
    lines = ["| targets | pixels | layout | path | compressor | MB read / clip-view | amplification | clip-views/s cold "
             "| warm | device ms / clip-view (on CPU) | cores/GPU @700 | GB/s/GPU @700 |", "|" + "---|" * 12]
    for r in section["rows"]:
        head = f"| {r['shape']} {r['codec']}/{r['mode']} | {r['pixels']} | {r['layout']} | {r['path']} | {r['compressor']} "
        if "error" in r:
            lines.append(head + f"| {r['error'][:60]} |" + " |" * 7)
            continue
        if r.get("workers", 1) > 1:
            lines.append(head + f"| {r['workers']} workers: {r['cold_clip_views_per_s']:.1f} clip-views/s, "
                         f"{r['per_core_clip_views_per_s']:.1f} per worker |" + " |" * 7)
            continue
        a100 = r["per_gpu"].get("a100_compute", next(iter(r["per_gpu"].values())))
        lines.append(head + f"| {r['mb_read_per_clip_view']:.3f} | {r['read_amplification']:.2f} | "
                     f"{r['cold_clip_views_per_s']:.1f} | {r['warm_clip_views_per_s']:.1f} | "
                     f"{r['device_ms_per_clip_view_on_cpu']:.2f} | {a100['cpu_cores']:.1f} | "
                     f"{a100['storage_gb_per_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks.common import scratch_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="four rows only (smoke)")
    p.add_argument("--clips", type=int, default=64, help="clips per store (x2 views); one epoch reads one view each")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--passes", type=int, default=2, help="timed epochs per row and cache state (median)")
    p.add_argument("--student-rate", type=float, action="append", default=None,
                   help="clip-views/s one GPU consumes (repeatable); default: the three yardsticks")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--work", type=Path, default=None, help="keep the stores here (default: a temp dir, removed)")
    p.add_argument("--no-object-storage", action="store_true",
                   help="skip the rows read from a local S3 server (moto) beside local disk")
    args = p.parse_args(argv)
    rates = {f"custom_{r:g}": r for r in args.student_rate} if args.student_rate else dict(YARDSTICKS)
    torch.set_num_threads(1)
    grid = default_grid(args.quick)
    prof = (HEADLINE, LoaderCase(pixels="raw", path="reference", layout="wds-v1", compressor="zstd"))

    def go(work: Path) -> dict[str, Any]:
        section = run_loader(work, grid, rates, args.clips, args.batch_size, args.passes, prof)
        if not args.no_object_storage:
            section["object_storage"] = run_object_storage(work / "object-storage", OBJECT_STORAGE_CASES,
                                                           args.clips, args.batch_size, args.passes)
        return section

    if args.work:
        section = go(args.work)
    else:
        with scratch_dir("bench_loader_") as tmp:
            section = go(tmp)
    print(table(section))
    if "object_storage" in section:
        print("\nobject storage (" + section["object_storage"]["server"] + "):\n" + object_storage_table(section["object_storage"]))
    for label, lines in section["profiles"].items():
        print(f"\nprofile ({label}):\n  " + "\n  ".join(lines))
    if "headline" in section:
        print("\nheadline:", json.dumps(section["headline"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(section, indent=1))
    return section


if __name__ == "__main__":
    from benchmarks.bench_loader import main as package_main  # see bench_step.py

    package_main()
