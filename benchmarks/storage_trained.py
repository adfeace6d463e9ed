"""Storage vs fidelity on a *trained* teacher: the quickstart's tiny CLIP on its toy world.

Random-weight teachers have none of the structure of a trained CLIP's tokens (outlier channels, low
effective rank, correlated layers), which flatters or hurts codecs in ways that do not carry over. This
section runs every codec on the tokens of a teacher that has learnt something, and asks whether a
student trained from the codec's targets learns the same thing:

1. world + teacher: the quickstart's toy world and tiny image CLIP (``umt_distill.quickstart``), trained
   here (about a minute on one core) or read from a finished ``umt-distill quickstart`` output folder;
2. reference: ``cache-teacher`` of the training split in fp32, mode full, zarr;
3. fidelity: ``bench_cache.storage_fidelity`` over that store (bytes, per-layer cosine, UTA loss);
4. downstream: a short stage 1 (``recipes/quickstart/stage1.yaml``, fewer epochs) from every codec x
   mode store, same seed, then the quickstart's linear probe of appearance on the frozen student; the
   difference to the fp32 student of the same mode is the codec's effect (goal: <= 0.01). A second fp32
   run with another seed measures how much two equally faithful runs differ anyway.

The tiny CLIP's D is 32 and the quickstart caches K = 2 layers, so ``pca8/16`` keep D/4, D/2 -- the
shares ``pca128/256`` keep of CLIP-B/16's D = 512 -- and ``jpca16/24`` keep 1/4 and 3/8 of K*D = 64, as
``jpca768/1152`` do of UMT-B's 6 x 512. The projection to UMT-B bytes maps ranks by that share; whether
a trained CLIP-B/16 (6 layers, D = 512) keeps the same cosine at the same share is an assumption this
benchmark cannot test offline (no pretrained weights), and the report says so. Downstream runs are
made only for codec x mode rows with mean cosine >= 0.99 (the others are unfaithful already).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import log

TRAINED_CODECS = ("fp32", "fp16", "bf16", "int8", "int4", "pca8", "pca16", "pca16i4", "jpca16", "jpca16i4", "jpca24i4")
RANK_TO_B16 = 512 // 32  # tiny CLIP D = 32 -> CLIP-B/16 D = 512


def world_and_teacher(work: Path, quickstart_dir: Path | None, clip_steps: int | None) -> tuple[dict, dict]:
    """The toy world and the trained tiny CLIP: read from a quickstart output, or made in ``work``."""
    from dataclasses import replace

    from rich.console import Console

    from umt_distill.quickstart.world import write_world
    from umt_distill.quickstart.settings import QuickstartSettings
    from umt_distill.quickstart.teacher import build_teacher_weights

    settings = QuickstartSettings()
    if clip_steps:
        settings = replace(settings, clip=replace(settings.clip, steps=clip_steps))
    base = quickstart_dir if quickstart_dir is not None else work
    world = write_world(base / "world", settings.world)  # reuses a finished world with these settings
    teacher = build_teacher_weights(base / "teacher", settings, Console(stderr=True, quiet=True))
    return world, teacher


def trained_recipe(work: Path, world: dict, teacher: dict, *overrides: str):
    from umt_distill.quickstart.stage1 import make_recipe

    # zarr (random access; every codec reads there) without view frames (the recipe refuses frames in zarr):
    # training re-decodes the toy MP4s, which at 64 px costs little.
    return make_recipe(work, world, teacher, ["cache.layout=zarr", "cache.frames=none", "train.pixels_from=video",
                                              "cache.codec=fp32", "cache.mode=full", f"cache.store={work / 'ref' / 'store'}",
                                              *overrides])


def downstream(work: Path, world: dict, teacher: dict, stores: dict[tuple[str, str], Path], epochs: int,
               mask_ratio: float, noise_seed: int | None = 1) -> dict[str, Any]:
    """Stage 1 from each store for ``epochs`` epochs, then the linear appearance probe (quickstart's)."""
    import torch

    from umt_distill.data.corpus import read_corpus
    from umt_distill.quickstart.world import read_labels
    from umt_distill.evaluation.probe import decode_eval_views, linear_probe, student_features
    from umt_distill.stages.stage1 import train
    from umt_distill.models.checkpoints import latest_checkpoint
    from umt_distill.training.checkpoint import load_checkpoint
    from umt_distill.stages.parts import build_student

    base = trained_recipe(work, world, teacher)
    labels = read_labels(world["labels"])["clips"]
    splits = {s: read_corpus(world["splits"][s]) for s in ("train", "val", "test")}
    pixels = {s: decode_eval_views(rows, base.views.num_frames, base.views.size, base.corpus.video_backend)
              for s, rows in splits.items()}
    y = {s: np.array([labels[r.id]["appearance_label"] for r in rows]) for s, rows in splits.items()}
    runs = [(codec, mode, base.seed) for codec, mode in stores]
    if noise_seed is not None:
        runs += [("fp32", mode, noise_seed) for mode in ("full", "visible") if ("fp32", mode) in stores]
    out: dict[str, Any] = {"epochs": epochs, "test_clips": len(splits["test"]), "runs": []}
    for codec, mode, seed in runs:
        visible = [f"cache.mode=visible", f"cache.mask_ratio={mask_ratio}", "cache.masks_per_view=1"] if mode == "visible" else []
        cfg = trained_recipe(work, world, teacher, f"cache.store={stores[(codec, mode)]}", f"cache.codec={codec}",
                             *visible, f"train.epochs={epochs}", f"seed={seed}", "train.log_every=1000",
                             f"train.output_dir={work / 'runs' / f'{codec}_{mode}_s{seed}'}")
        log(f"storage (trained teacher): stage 1 from {codec}/{mode}, seed {seed}, {epochs} epochs")
        t = time.perf_counter()
        metrics = train(cfg)
        seconds = time.perf_counter() - t
        student = build_student(cfg, int(teacher_dim(stores[(codec, mode)])))
        load_checkpoint(latest_checkpoint(Path(cfg.train.output_dir)), student)
        with torch.no_grad():
            feats = {s: student_features(student, p) for s, p in pixels.items()}
        probe = linear_probe(feats["train"], y["train"], feats["test"], y["test"], feats["val"], y["val"]).to_dict()
        out["runs"].append({"codec": codec, "mode": mode, "seed": seed, "seconds": round(seconds, 1),
                            "final_loss": _final_loss(metrics), "appearance_linear": probe["accuracy"],
                            "student_checkpoint": str(latest_checkpoint(Path(cfg.train.output_dir)))})
    ref = {r["mode"]: r["appearance_linear"] for r in out["runs"] if r["codec"] == "fp32" and r["seed"] == base.seed}
    for r in out["runs"]:
        r["probe_diff"] = abs(r["appearance_linear"] - ref[r["mode"]]) if r["mode"] in ref else None
    return out


def teacher_dim(store: Path) -> int:
    from umt_distill.cache.spec import read_spec

    return int(read_spec(store)["teacher"]["D"])


def _final_loss(metrics: Any) -> float | None:
    if isinstance(metrics, dict):
        for key in ("loss", "train_loss", "uta_loss"):
            if isinstance(metrics.get(key), (int, float)):
                return float(metrics[key])
    return None


def trained_student_losses(rows: list[dict], stores: dict[tuple[str, str], Path], ref_store: Path, cfg,
                           checkpoint: str, loss_batch: int) -> None:
    """Add ``loss_trained`` / ``loss_trained_abs_diff``: the UTA loss of the fp32-trained student (whose
    predictions are close to the targets, so a codec's error shows) with each codec's targets."""
    import torch

    from benchmarks.bench_cache import _targets_at, view_pixels
    from umt_distill.cache.stores import CacheReader
    from umt_distill.data.pixels import normalize_video
    from umt_distill.losses.uta import uta_loss
    from umt_distill.registry import MASKS
    from umt_distill.training.checkpoint import load_checkpoint
    from umt_distill.stages.parts import build_student

    ref_reader = CacheReader(ref_store)
    keys = ref_reader.keys[:loss_batch]
    ref = [ref_reader.get(*k) for k in keys]
    T, N = ref[0].attn.shape
    student = build_student(cfg, ref[0].tokens.shape[-1]).eval()
    load_checkpoint(checkpoint, student)
    pixels = view_pixels(ref, cfg)  # [B, T, 3, H, W]
    attn = torch.from_numpy(np.stack([r.attn for r in ref]))
    vis_full = MASKS.get("semantic")(len(ref), T, N, cfg.mask.ratio, torch.Generator().manual_seed(0), attn=attn)
    cache: dict[str, Any] = {}

    def preds(vis):
        key = str(vis.tolist())
        if key not in cache:
            with torch.no_grad():
                cache[key] = student(normalize_video(pixels), vis).float()  # [K, B, L, D]
        return cache[key]

    base: dict[str, float] = {}
    for row in rows:
        got = [CacheReader(stores[(row["codec"], row["mode"])]).get(*k) for k in keys]
        if row["mode"] == "full":
            vis = vis_full
            targets = _targets_at([g.tokens for g in got], vis, T, N)
            want = _targets_at([r.tokens for r in ref], vis, T, N)
        else:
            v = torch.from_numpy(np.stack([g.visible_idx[0] for g in got]).astype(np.int64))  # [B, T, N_vis]
            vis = (v + torch.arange(T).view(1, T, 1) * N).flatten(1)
            K, D = ref[0].tokens.shape[0], ref[0].tokens.shape[-1]
            targets = torch.from_numpy(np.stack([g.tokens[0].reshape(K, -1, D) for g in got], 1))
            want = _targets_at([r.tokens for r in ref], vis, T, N)
        if row["mode"] not in base:
            base[row["mode"]] = float(uta_loss(preds(vis), want)[0])
        loss = float(uta_loss(preds(vis), targets)[0])
        row.update(loss_trained_fp32=base[row["mode"]], loss_trained=loss, loss_trained_abs_diff=abs(loss - base[row["mode"]]))


def storage_trained(work: Path, quickstart_dir: Path | None = None, clip_steps: int | None = None,
                    downstream_epochs: int = 10, loss_batch: int = 8, codecs=TRAINED_CODECS,
                    modes=("full", "visible"), threads: int = 1) -> dict[str, Any]:
    """The trained-teacher half of the storage section (see the module docstring)."""
    import torch

    from benchmarks.bench_cache import storage_fidelity
    from benchmarks.common import clean_dir
    from umt_distill.cache.pipeline import cache_teacher

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # the quickstart's models are too small to gain from a second thread
    try:
        t = time.perf_counter()
        world, teacher = world_and_teacher(work, quickstart_dir, clip_steps)
        teacher_seconds = time.perf_counter() - t
        cfg = trained_recipe(work, world, teacher)
        clean_dir(work / "ref")
        log("storage (trained teacher): cache-teacher fp32 reference")
        cache_teacher(cfg, progress=False)
        ref_store = Path(cfg.cache.store)
        st = storage_fidelity(ref_store, clean_dir(work / "codecs"), cfg, cfg.student.name, "cpu", loss_batch=loss_batch,
                              mask_ratio=cfg.mask.ratio, codecs=codecs, modes=modes)
        stores = {(r["codec"], r["mode"]): work / "codecs" / f"{r['codec']}_{r['mode']}" for r in st["rows"]}
        if downstream_epochs:
            # A codec below the cosine bar is unfaithful whatever its probe says: no run for it.
            ok = {k: v for k, v in stores.items() if next(r for r in st["rows"] if (r["codec"], r["mode"]) == k)["mean_cos"] >= 0.99}
            st["downstream"] = downstream(work, world, teacher, ok, downstream_epochs, cfg.mask.ratio)
            by = {(r["codec"], r["mode"]): r for r in st["downstream"]["runs"] if r["seed"] == cfg.seed}
            for row in st["rows"]:
                run = by.get((row["codec"], row["mode"]))
                row["appearance_linear"] = run["appearance_linear"] if run else None
                row["probe_diff"] = run["probe_diff"] if run else None
            fp32_full = by.get(("fp32", "full"))
            if fp32_full:
                trained_student_losses(st["rows"], stores, ref_store, cfg, fp32_full["student_checkpoint"], loss_batch)
        st["teacher"] = {"name": cfg.teacher.name, "weights_sha256": teacher.get("weights_sha256"),
                         "zero_shot_accuracy": teacher.get("zero_shot_accuracy"), "reused": teacher.get("reused"),
                         "seconds": round(teacher_seconds, 1), "source": str(quickstart_dir) if quickstart_dir else "trained here"}
        return st
    finally:
        torch.set_num_threads(torch_threads)
