"""The benchmark suite: what caching the teacher buys, measured side by side in one run.

    .venv/bin/python -m benchmarks.run                          # CPU preset (~15 min on 2 cores)
    .venv/bin/python -m benchmarks.run --grid full              # every size x T x mask ratio (hours on a CPU)
    .venv/bin/python -m benchmarks.run --preset gpu             # CUDA, batch 32, full grid
    .venv/bin/python -m benchmarks.run --preset gpu-quick       # one GPU, <= 8 min: headline step + loader
    .venv/bin/python -m benchmarks.run --preset gpu-quick --device cpu --reduced   # the same at toy size (smoke)
    .venv/bin/python -m benchmarks.run --sections step --sizes base,large --frames 8 --ratios 0.8

Run it as a module from the repository root (``python -m`` puts the current directory first on
``sys.path``, so ``benchmarks.*`` and ``umt_distill`` import). Writes ``<out>/<machine>-<date>.json``,
``<machine>-<date>.md`` and ``<machine>-<date>-*.png`` (``--out`` defaults to ``benchmarks/results``).
See ``benchmarks/README.md`` for what each number means.

Sections (``--sections``, all by default):
  step     student-only vs cached vs online step time and peak memory (bench_step.py)
  storage  bytes per clip-view and fidelity per codec x mode on the random-weights headline teacher (shapes,
           bytes) and on the quickstart's trained tiny CLIP (per-layer cosine, loss, downstream probe);
           UMT-B/L and K710 projection (bench_cache.py, storage_trained.py)
  input    decode decord vs PyAV vs torchcodec; Zarr vs WebDataset target reads vs the student's rate (bench_input.py)
  cache    cache-teacher vs teacher forward-only frames/s by batch size (bench_cache.py)
  loader   the stage-1 input path per CPU core: pixel source x targets x layout, fast vs reference
           path, MB read per clip-view, read amplification, cores and GB/s per GPU (bench_loader.py)
  table1   UMT Table 1: UTA (cached, online) vs pixel reconstruction (VideoMAE, V2 dual masking) vs UTA + pixel,
           B/16 step time and peak memory (bench_table1.py); needs no store
  smaug    SMAUG's token sparsification: stage-1 step time and memory at keep 1/0.75/0.5 x after-block 0/L/3,
           object-token recall and probe deltas on a toy world (bench_smaug.py), plus frame selection
           (smaug_frames.py, when present); needs no store
The headline configuration's store (its teacher, T=8, fp32) is always built: storage and the cached
step read it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.bench_step import SIZES, StepSettings, rows_needed, store_overrides
from benchmarks.common import (
    BENCH_DIR,
    clean_dir,
    load_average,
    log,
    machine_info,
    machine_slug,
    now_iso,
    today,
    write_corpus,
)

HEADLINE = {"size": "base", "frames": 8, "mask_ratio": 0.8}
ALL_SECTIONS = ("step", "storage", "input", "cache", "table1", "loader", "smaug")

# Presets: everything a run needs besides the flags. "grid" lists (size, T, ratio) configurations.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "device": "cpu", "teacher_precision": "fp32", "amp": "bf16", "loop_workers": 1,
        # Per size: batch, warm-up steps, measured steps.
        "plan": {"tiny": (4, 2, 6), "small": (2, 2, 6), "base": (2, 2, 6), "large": (1, 1, 6)},
        # Tiny ops gain nothing from a second intra-op thread, and on a shared machine a descheduled
        # OpenMP thread stalls every small op of a step: tiny runs one thread, larger sizes all cores.
        "threads": {"tiny": 1},
        "headline_size": "base",
        # On 2 idle CPU cores one UMT-B/16 step at batch 2 takes ~3 s and the CLIP-B/16 forward ~4 s more:
        # the default grid is the headline row plus every T x ratio at tiny size.
        "grid": [("base", 8, 0.8)] + [("tiny", t, r) for t in (8, 16) for r in (0.5, 0.8, 0.9)],
        "full_grid": {"sizes": ("tiny", "small", "base"), "frames": (8, 16), "ratios": (0.5, 0.8, 0.9)},
        "videos": 4, "video_frames": 300, "video_size": (240, 320),
        "ref_cache_batch": 2, "cache_workers": 1,
        "cache_sweep": {"size": "tiny", "batch_sizes": (1, 4, 16), "clips": 16},
        "decode_clips": 32, "decode_workers": (1, os.cpu_count() or 2),
        "read_records": 24, "read_workers": (0, 1, 2), "storage_loss_batch": 2,
        # The trained teacher: a short stage 1 (epochs) per codec x mode at toy size, one core.
        "trained": {"downstream_epochs": 10, "loss_batch": 8},
        "isolate": True, "forward_min_seconds": 1.0,
        "table1": {"batch_size": 2, "warmup": 1, "steps": 3, "size": 224},
        "loader": {"grid": "default", "clips": 64, "batch_size": 8, "passes": 2, "all_workers": None},
        "smaug": "quick",
    },
    "gpu": {
        "device": "cuda", "teacher_precision": "fp16", "amp": "bf16", "loop_workers": 8,
        "plan": {"tiny": (64, 5, 20), "small": (32, 5, 20), "base": (32, 5, 20), "large": (16, 5, 20)},
        "headline_size": "base",
        "grid": None,  # the full grid
        "full_grid": {"sizes": ("tiny", "small", "base"), "frames": (8, 16), "ratios": (0.5, 0.8, 0.9)},
        "videos": 32, "video_frames": 300, "video_size": (240, 320),
        "ref_cache_batch": 32, "cache_workers": 8,
        "cache_sweep": {"size": "base", "batch_sizes": (8, 16, 32, 64), "clips": 256},
        "decode_clips": 256, "decode_workers": (1, min(8, os.cpu_count() or 8)),
        "read_records": 512, "read_workers": (0, 1, 2, 8), "storage_loss_batch": 8,
        "trained": {"downstream_epochs": 40, "loss_batch": 8},
        "isolate": True, "forward_min_seconds": 5.0,
        "table1": {"batch_size": 32, "warmup": 3, "steps": 10, "size": 224},
        "loader": {"grid": "default", "clips": 128, "batch_size": 32, "passes": 3, "all_workers": os.cpu_count()},
        "smaug": "full",
    },
    # One GPU in <= 8 minutes: the headline step (UMT-B/16 + CLIP-B/16, bf16, batch 32, T=8, 80 %) and
    # the loader section, plus the headline loader row with as many workers as there are cores.
    "gpu-quick": {
        "device": "cuda", "teacher_precision": "fp16", "amp": "bf16", "loop_workers": 8,
        "plan": {"base": (32, 3, 10)}, "headline_size": "base", "sections": ("step", "loader"),
        "grid": [("base", 8, 0.8)],
        "full_grid": {"sizes": ("base",), "frames": (8,), "ratios": (0.8,)},
        "videos": 16, "video_frames": 300, "video_size": (240, 320),
        "ref_cache_batch": 32, "cache_workers": 8,
        "cache_sweep": {"size": "base", "batch_sizes": (), "clips": 0},
        "decode_clips": 0, "decode_workers": (1,), "read_records": 0, "read_workers": (1,), "storage_loss_batch": 8,
        "isolate": True, "forward_min_seconds": 2.0,
        "loader": {"grid": "quick", "clips": 96, "batch_size": 32, "passes": 2, "all_workers": os.cpu_count()},
        "table1": {"batch_size": 32, "warmup": 3, "steps": 10, "size": 224},
        "trained": {"downstream_epochs": 40, "loss_batch": 8},
    },
    # Everything once at the tiniest size: the smoke test's settings (seconds, numbers meaningless).
    "smoke": {
        "device": "cpu", "teacher_precision": "fp32", "amp": "none", "loop_workers": 0,
        "plan": {"tiny": (1, 1, 1)}, "headline_size": "tiny",
        "grid": [("tiny", 8, 0.8)],
        "full_grid": {"sizes": ("tiny",), "frames": (8,), "ratios": (0.8,)},
        "videos": 2, "video_frames": 24, "video_size": (64, 96),
        "ref_cache_batch": 2, "cache_workers": 0,
        "cache_sweep": {"size": "tiny", "batch_sizes": (), "clips": 2},  # the reference store is the cache point
        "decode_clips": 2, "decode_workers": (1,),
        "read_records": 2, "read_workers": (0, 1), "storage_loss_batch": 1,
        "trained": None,  # a minute of tiny-CLIP training alone: `--trained` runs it anyway
        # In-process: a forked measurement server would import torch + open_clip again (~10 s on 2 cores).
        "isolate": False, "forward_min_seconds": 0.0,
        "table1": {"batch_size": 1, "warmup": 1, "steps": 1, "size": 32, "rows": ("pixel", "pixel_dual"),
                   "student": "umt_test_tiny"},
        "loader": {"grid": "quick", "clips": 6, "batch_size": 2, "passes": 1, "all_workers": 2,
                   "object_storage": False},  # its own tests cover it (tests/integration/test_object_storage_read.py)
        "smaug": "smoke",
    },
}


def build_grid(preset: dict, args) -> list[tuple[str, int, float]]:
    full = preset["full_grid"]
    if args.sizes or args.frames or args.ratios or args.grid == "full" or preset["grid"] is None:
        sizes = args.sizes.split(",") if args.sizes else full["sizes"]
        frames = [int(x) for x in args.frames.split(",")] if args.frames else full["frames"]
        ratios = [float(x) for x in args.ratios.split(",")] if args.ratios else full["ratios"]
        return [(s, t, r) for s in sizes for t in frames for r in ratios]
    return list(preset["grid"])


def settings_for(preset: dict, size: str, args) -> StepSettings:
    # A size the preset has no plan for (e.g. --sizes large with the smoke preset) takes its first plan.
    batch, warmup, steps = preset["plan"].get(size) or next(iter(preset["plan"].values()))
    return StepSettings(
        device=preset["device"], batch_size=args.batch_size or batch,
        warmup=args.warmup if args.warmup is not None else warmup,
        steps=args.steps or steps, interleave=not args.sequential, workers=preset["loop_workers"],
        threads=args.threads or preset.get("threads", {}).get(size) or os.cpu_count() or 1,
        amp=preset["amp"], teacher_precision=preset["teacher_precision"], backend=args.backend, codec=args.codec,
    )


class Suite:
    """One run: the shared corpus and stores, the results so far, and where things go."""

    def __init__(self, preset: dict, args, work: Path) -> None:
        self.preset, self.args, self.work = preset, args, work
        self.results: dict[str, Any] = {"sections": {}, "omitted": []}
        self.corpus_dir = work / "videos"
        self.corpus: dict[str, Any] | None = None
        self.step_stores: dict[tuple[str, int], str] = {}
        self.headline = {**HEADLINE, "size": preset["headline_size"]}

    def manifest(self, rows: int) -> str:
        p = self.preset
        info = write_corpus(self.corpus_dir, p["videos"], rows, p["video_frames"], *p["video_size"])
        self.corpus = {k: v for k, v in info.items() if k not in ("manifest", "rows")}
        return info["manifest"]

    def timed(self, name: str, fn, *args):
        log(f"section {name} ...")
        t, load = time.perf_counter(), load_average()
        out = fn(*args)
        self.results["sections"][name] = {"seconds": round(time.perf_counter() - t, 1), "load_start": load,
                                          "load_end": load_average()}
        return out

    # -- reference store (headline teacher, T=8, fp32, full) and the headline cache-write point --------
    def reference(self) -> dict[str, Any]:
        from benchmarks.bench_cache import cache_write_point

        size = self.preset["headline_size"]
        s = settings_for(self.preset, size, self.args)
        self.ref_manifest = self.manifest(rows_needed(s))
        self.ref_store = str(clean_dir(self.work / "ref") / "store")
        overrides = store_overrides(size, 8, self.ref_manifest, self.ref_store, s, "fp32", 1, self.preset["cache_workers"])
        point = cache_write_point(SIZES[size]["recipe"], overrides, s.device, self.preset["ref_cache_batch"],
                                  min_seconds=self.preset["forward_min_seconds"])
        return {**point, "role": "reference store of the storage and step sections"}

    def storage(self) -> dict[str, Any]:
        from benchmarks.bench_cache import smallest_faithful_summary, storage_fidelity
        from umt_distill.config import load_recipe

        size = self.preset["headline_size"]
        s = settings_for(self.preset, size, self.args)
        cfg = load_recipe(SIZES[size]["recipe"], store_overrides(size, 8, self.ref_manifest, self.ref_store, s, "fp32", 1, 0))
        out = storage_fidelity(Path(self.ref_store), clean_dir(self.work / "codecs"), cfg, SIZES[size]["student"], s.device,
                               loss_batch=self.preset["storage_loss_batch"], mask_ratio=self.headline["mask_ratio"])
        # The headline step reads the recipe codec's full-mode store: the same records, re-encoded.
        self.step_stores[(size, 8)] = str(self.work / "codecs" / f"{self.args.codec}_full")
        trained = self.preset.get("trained") or ({"downstream_epochs": 1, "loss_batch": 2} if self.args.trained else None)
        if self.args.trained is False:
            trained = None
        if trained:
            from benchmarks.storage_trained import storage_trained

            epochs = self.args.downstream_epochs if self.args.downstream_epochs is not None else trained["downstream_epochs"]
            out["trained"] = storage_trained(self.work / "trained", self.args.quickstart_dir, downstream_epochs=epochs,
                                             loss_batch=trained["loss_batch"])
        out["smallest_faithful"] = smallest_faithful_summary(out)
        return out

    def store_for(self, size: str, frames: int, s: StepSettings) -> tuple[str, str]:
        """(manifest, store) of a step configuration: one store per size and T, shared by the ratios."""
        from umt_distill.cache.pipeline import cache_teacher
        from umt_distill.config import load_recipe

        manifest = self.manifest(rows_needed(s))
        key = (size, frames)
        if key in self.step_stores and size == self.preset["headline_size"] and frames == 8:
            return self.ref_manifest, self.step_stores[key]
        if key not in self.step_stores:
            store = str(clean_dir(self.work / f"step_{size}_T{frames}") / "store")
            log(f"step: caching {size} T={frames} ({rows_needed(s)} clips)")
            cache_teacher(load_recipe(SIZES[size]["recipe"], store_overrides(
                size, frames, manifest, store, s, s.codec, self.preset["ref_cache_batch"], self.preset["cache_workers"])),
                progress=False)
            self.step_stores[key] = store
        return manifest, self.step_stores[key]

    def step(self, grid: list[tuple[str, int, float]]) -> list[dict[str, Any]]:
        from benchmarks.bench_step import bench_config

        rows = []
        for size, frames, ratio in grid:
            s = settings_for(self.preset, size, self.args)
            manifest, store = self.store_for(size, frames, s)
            row = bench_config(size, frames, ratio, manifest, store, self.work / "runs", s, isolate=self.preset["isolate"])
            row["settings"] = asdict(s)
            rows.append(row)
            self.save_partial("step", rows)
        return rows

    def input(self) -> dict[str, Any]:
        from benchmarks.bench_input import DECODE_BACKENDS, bench_reads, decode_throughput

        p = self.preset
        manifest = self.manifest(p["decode_clips"])
        decode = []
        for backend in DECODE_BACKENDS:
            for w in p["decode_workers"]:
                log(f"decode: {backend} workers={w}")
                decode.append(decode_throughput(manifest, backend, w, self.headline["frames"]))
        reads = []
        work = clean_dir(self.work / "reads")
        head = self.preset["headline_size"]
        reads += bench_reads(Path(self.ref_store), work, SIZES[head]["teacher"], list(p["read_workers"]), self.args.codec,
                             p["read_records"])
        for (size, frames), store in self.step_stores.items():  # other target shapes the step section cached
            if SIZES[size]["teacher"] != SIZES[head]["teacher"] and frames == 8:
                reads += bench_reads(Path(store), work, SIZES[size]["teacher"], list(p["read_workers"]), self.args.codec,
                                     p["read_records"])
        return {"decode": decode, "reads": reads}

    def cache(self) -> list[dict[str, Any]]:
        from benchmarks.bench_cache import cache_write_point

        # The headline teacher with the recipes' codec (the reference store above is fp32, which nobody
        # caches with: its larger records cost the writer more of the cores the teacher runs on).
        head = self.preset["headline_size"]
        s = settings_for(self.preset, head, self.args)
        bs = self.preset["ref_cache_batch"]
        log(f"cache write: {head} batch {bs} {self.args.codec}")
        store = str(clean_dir(self.work / "cache_head") / "store")
        points = [cache_write_point(SIZES[head]["recipe"], store_overrides(head, 8, self.ref_manifest, store, s, self.args.codec, bs,
                                                                           self.preset["cache_workers"]),
                                    s.device, bs, min_seconds=self.preset["forward_min_seconds"])]
        shutil.rmtree(Path(store).parent, ignore_errors=True)
        sweep = self.preset["cache_sweep"]
        size = sweep["size"]
        s = settings_for(self.preset, size, self.args)
        manifest = self.manifest(sweep["clips"])
        for bs in sweep["batch_sizes"]:
            log(f"cache write: {size} batch {bs}")
            store = str(clean_dir(self.work / f"cache_bs{bs}") / "store")
            overrides = store_overrides(size, 8, manifest, store, s, self.args.codec, bs, self.preset["cache_workers"])
            points.append(cache_write_point(SIZES[size]["recipe"], overrides, s.device, bs,
                                            min_seconds=self.preset["forward_min_seconds"]))
            shutil.rmtree(Path(store).parent, ignore_errors=True)
        return points

    def table1(self) -> dict[str, Any]:
        from benchmarks.bench_table1 import Table1Settings, table1

        t = dict(self.preset["table1"])
        s = Table1Settings(device=self.preset["device"], batch_size=self.args.batch_size or t.pop("batch_size"),
                           threads=self.args.threads or os.cpu_count() or 1, amp=self.preset["amp"],
                           isolate=self.preset["isolate"], **{k: v for k, v in t.items() if k != "batch_size"})
        return table1(s)

    def loader(self) -> dict[str, Any]:
        from benchmarks.bench_loader import HEADLINE as LOADER_HEADLINE
        from benchmarks.bench_loader import YARDSTICKS, LoaderCase, default_grid, run_loader

        lp = self.preset["loader"]
        rates = {f"custom_{r:g}": r for r in self.args.student_rate} if self.args.student_rate else dict(YARDSTICKS)
        profiles = (LOADER_HEADLINE, LoaderCase(pixels="raw", path="reference", layout="wds-v1", compressor="zstd"))
        section = run_loader(clean_dir(self.work / "loader"), default_grid(lp["grid"] == "quick"), rates, lp["clips"],
                             lp["batch_size"], lp["passes"], profiles, all_workers=lp["all_workers"])
        if lp.get("object_storage", True):  # the same cases read from a local S3 server, beside local disk
            from benchmarks.bench_loader import OBJECT_STORAGE_CASES, run_object_storage

            section["object_storage"] = run_object_storage(clean_dir(self.work / "loader-object-storage"),
                                                           OBJECT_STORAGE_CASES, lp["clips"], lp["batch_size"],
                                                           lp["passes"])
        return section

    def smaug(self) -> dict[str, Any]:
        from benchmarks.bench_smaug import smaug_section

        # One thread on a CPU: on a shared 2-core machine a second thread's stalls dominate the step (docs/smaug.md).
        cpu = self.preset["device"] == "cpu"
        return smaug_section(self.preset.get("smaug", "quick"), clean_dir(self.work / "smaug"), self.preset["device"],
                             self.args.threads or (1 if cpu else os.cpu_count() or 1))

    def save_partial(self, key: str, value: Any) -> None:
        """Keep what is measured so far (a crash or Ctrl-C late in a long GPU run loses nothing)."""
        self.results[key] = value
        (self.work / "partial.json").write_text(json.dumps(self.results, indent=1, default=str))


def run_suite(args) -> dict[str, Path]:
    """Run the sections ``args`` asks for and write JSON, markdown and charts; returns their paths."""
    from benchmarks.report import headline, write_report

    preset = dict(PRESETS[args.preset])
    if args.reduced:  # the preset's sections and structure at the smoke preset's sizes
        preset.update({k: v for k, v in PRESETS["smoke"].items() if k not in ("sections",)})
    if args.device:
        preset["device"] = args.device
    t0, started, load_start = time.perf_counter(), now_iso(), load_average()
    sections = args.sections.split(",") if args.sections else list(preset.get("sections", ALL_SECTIONS))
    unknown = sorted(set(sections) - set(ALL_SECTIONS))
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {list(ALL_SECTIONS)}")
    grid = build_grid(preset, args)
    work = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix="umt_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    info = machine_info(preset["device"])
    suite = Suite(preset, args, work)
    try:
        if set(sections) - {"table1", "loader", "smaug"}:  # every other section reads the reference store
            suite.results["cache_reference"] = suite.timed("reference", suite.reference)
        if "storage" in sections or "step" in sections:
            suite.results["storage"] = suite.timed("storage", suite.storage)
        if "step" in sections:
            suite.results["step"] = suite.timed("step", suite.step, grid)
        if "input" in sections:
            suite.results["input"] = suite.timed("input", suite.input)
        if "cache" in sections:
            suite.results["cache_write"] = [suite.results["cache_reference"]] + suite.timed("cache", suite.cache)
        if "table1" in sections:
            suite.results["table1"] = suite.timed("table1", suite.table1)
        if "loader" in sections:
            suite.results["loader"] = suite.timed("loader", suite.loader)
        if "smaug" in sections:
            suite.results["smaug"] = suite.timed("smaug", suite.smaug)
    finally:
        if not args.keep_tmp and not args.tmp:
            shutil.rmtree(work, ignore_errors=True)
    full = preset["full_grid"]
    full_grid = [(s, t, r) for s in full["sizes"] for t in full["frames"] for r in full["ratios"]]
    suite.results["omitted"] = [list(c) for c in full_grid if c not in grid] if "step" in sections else []
    results = {
        "meta": {
            "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.run", *sys.argv[1:]])
                       if args.command is None else args.command,
            "preset": args.preset, "sections": sections, "started": started, "finished": now_iso(),
            "wall_seconds": round(time.perf_counter() - t0, 1), "load_start": load_start, "load_end": load_average(),
            "machine": info, "grid": [list(c) for c in grid], "headline_config": suite.headline,
            "teacher_weights": "random (offline): same architecture and cost as the pretrained teacher",
        },
        "corpus": suite.corpus,
        **{k: v for k, v in suite.results.items() if k != "partial"},
    }
    results["headline"] = headline(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.machine or machine_slug(info)}-{today()}"
    return write_report(results, out, stem)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=list(PRESETS), help="sizes, batch, steps, corpus (default cpu)")
    p.add_argument("--device", default=None, help="override the preset's device (cpu, cuda, cuda:1)")
    p.add_argument("--grid", default="default", choices=["default", "full"],
                   help="step configurations: the preset's subset or every size x T x ratio")
    p.add_argument("--sizes", default=None, help="comma list from " + ",".join(SIZES) + " (implies a full grid over them)")
    p.add_argument("--frames", default=None, help="comma list of T, e.g. 8,16")
    p.add_argument("--ratios", default=None, help="comma list of mask ratios, e.g. 0.5,0.8,0.9")
    p.add_argument("--batch-size", type=int, default=None, help="step batch size for every size")
    p.add_argument("--steps", type=int, default=None, help="measured steps per mode")
    p.add_argument("--sequential", action="store_true",
                   help="run the step modes one after the other instead of step by step side by side "
                        "(three processes at once may not fit on one GPU)")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured steps first")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of each step measurement (default: all cores; the cpu preset runs tiny on 1)")
    p.add_argument("--backend", default="decord", choices=["decord", "pyav", "torchcodec"], help="video decoder of the loops")
    p.add_argument("--codec", default="fp16", help="codec of the stores the cached loop and reads use")
    p.add_argument("--trained", default=None, action=argparse.BooleanOptionalAction,
                   help="storage on the trained tiny CLIP too (default: the preset's choice; smoke skips it)")
    p.add_argument("--quickstart-dir", type=Path, default=None,
                   help="read the toy world and trained tiny CLIP from this `umt-distill quickstart` output")
    p.add_argument("--downstream-epochs", type=int, default=None,
                   help="stage-1 epochs per codec x mode on the trained teacher (0 = no downstream probe)")
    p.add_argument("--sections", default=None, help="comma list from " + ",".join(ALL_SECTIONS)
                   + " (default: the preset's, all for cpu/gpu)")
    p.add_argument("--reduced", action="store_true", help="run the preset at the smoke preset's sizes (CPU smoke test)")
    p.add_argument("--student-rate", type=float, action="append", default=None,
                   help="loader section: clip-views/s one GPU consumes (repeatable; default: the three yardsticks)")
    p.add_argument("--out", default=str(BENCH_DIR / "results"), help="where JSON, markdown and PNGs go")
    p.add_argument("--machine", default=None, help="label in file names (default: from CPU/GPU model)")
    p.add_argument("--tmp", default=None, help="work directory (kept); default a temporary one (removed)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary work directory")
    p.add_argument("--command", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    args = parse_args(argv)
    paths = run_suite(args)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return paths


if __name__ == "__main__":
    from benchmarks.run import main as package_main  # see bench_step.py: children import by package name

    package_main()
