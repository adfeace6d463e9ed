"""SMAUG's frame selection on the cache, measured at toy scale (docs/smaug.md, "Frame selection").

A toy world generated here where only some frames of each clip show the captioned object: every clip
names one appearance (colour × pattern disc, the quickstart's appearance classes); in half of its T frames,
drawn at random, that disc moves over the clip's background, in the other half a *distractor* disc of
another appearance does. A tiny open_clip CLIP is trained here on single frames with appearance captions
(``quickstart.tiny_clip``) and is the teacher: ``cache-teacher`` embeds each clip's caption with its text
tower and scores every cached view's frames (``cache/captions.py``). Then, all with the package's own
parts:

1. **Frame precision**: of the k = T/2 frames each method keeps, the fraction showing the captioned object,
   over every cached view (ground truth from the world; ``view.frame_indices`` maps view frames to clip
   frames): ``text_guided`` (cached scores), ``learned`` (the selector of a stage-2 run with
   ``frame_select.method=learned``, applied to the same views), ``uniform``, ``random`` (expected 0.5 for
   both, by construction).
2. **Stage 2** (``stages.stage2.train`` on the store, video only) for each method and for no selection
   (k = T), over ≥ 3 seeds: retrieval R@1 on held-out clips seeing *all* T frames (video → text among the
   distinct captions, by the contrastive embeddings; chance = 1 / #captions), ms per step (each run's median
   after its first two steps; the table takes the least disturbed run, :func:`cost_row`), peak resident
   memory of the training process.
3. **Cost table**: plain UMT stage 2 (k = T, no sparsification) vs SMAUG-on-cache (text-guided k = T/2 and
   token sparsification ρ = 0.5 at ℓ = 0, teacher attention): time and memory per step and per epoch, with
   R@1 beside them.

Each training run is a fresh process (peak memory of its own). On a shared CPU, timings carry the load
(``load_start``/``load_end``); ratios within one run of this module are what to compare.

    .venv/bin/python -m benchmarks.smaug_frames --quick     # minutes on 2 CPU cores
    .venv/bin/python -m benchmarks.bench_smaug --quick      # token rows + these rows, the smaug section
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    load_average,
    log,
    peak_memory_mb,
    reset_peak_memory,
    run_isolated,
)

METHODS = ("text_guided", "learned", "uniform", "random")


@dataclass(frozen=True)
class FrameSettings:
    train_clips: int = 96
    test_clips: int = 32
    frames: int = 8  # T; k = T / 2
    clip_steps: int = 600  # tiny CLIP training steps
    stage2_steps: int = 120
    batch_size: int = 8
    seeds: int = 3
    world_seed: int = 0

    @classmethod
    def quick(cls) -> FrameSettings:
        return cls(train_clips=48, test_clips=16, clip_steps=300, stage2_steps=24, seeds=3)


# --------------------------------------------------------------------------------------------------
# the world


def frame_world(num_clips: int, T: int, seed: int, split: str) -> list[dict[str, Any]]:
    """Clips (uint8 [T, H, W, 3]) whose captioned disc shows in T/2 random frames, a distractor in the others.

    Returns:
        One dict per clip: ``id``, ``caption``, ``appearance``, ``frames``, ``shows`` (bool [T]) and
        ``per_frame`` (the caption of the disc each frame shows, to train the CLIP).
    """
    from umt_distill.quickstart.world import (
        _background,
        appearance_caption,
        appearance_classes,
        draw_object,
    )

    classes = appearance_classes()
    rng = np.random.default_rng(seed)
    size, out = 64, []
    for i in range(num_clips):
        a = int(rng.integers(len(classes)))
        b = int((a + rng.integers(1, len(classes))) % len(classes))  # a distractor of another appearance
        shows = np.zeros(T, bool)
        shows[rng.choice(T, T // 2, replace=False)] = True
        background = _background(size, int(rng.integers(1 << 30)))
        start, step = rng.uniform(18, 46, 2), rng.uniform(-2.5, 2.5, 2)
        radius = rng.uniform(10, 13)
        frames = np.empty((T, size, size, 3), np.uint8)
        for t in range(T):
            colour, pattern = classes[a if shows[t] else b].split(" ")[:2]
            centre = tuple(np.clip(start + t * step, radius, size - radius))
            frames[t] = draw_object(background, pattern, colour, centre, radius)
        out.append({"id": f"{split}{i:04d}", "caption": appearance_caption(classes[a]), "appearance": classes[a],
                    "frames": frames, "shows": shows,
                    "per_frame": [appearance_caption(classes[a if s else b]) for s in shows]})
    return out


def write_world(clips: list[dict], folder: Path) -> Path:
    from umt_distill.testing.media import write_video

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for c in clips:
        write_video(folder / f"{c['id']}.mp4", c["frames"], fps=8, options={"crf": "12"})
        lines.append(json.dumps({"id": c["id"], "path": f"{c['id']}.mp4", "captions": [c["caption"]]}))
    (folder / "clips.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "clips.jsonl"


# --------------------------------------------------------------------------------------------------
# runs (each in its own process: peak memory of its own)


def overrides(corpus: Path, store: Path, clip: dict, s: FrameSettings) -> list[str]:
    return [f"corpus.source={corpus}", f"cache.store={store}", "cache.codec=fp16", "cache.frames=raw",
            "cache.clips_per_shard=16", "cache.num_views=2", f"views.num_frames={s.frames}", "views.size=64",
            f"teacher.name={clip['name']}", f"teacher.model_config_path={clip['model_config']}",
            f"teacher.pretrained={clip['weights']}", "stage2.sources=[video]", "train.pixels_from=store",
            f"train.batch_size={s.batch_size}", f"train.max_steps={s.stage2_steps}", "train.epochs=1000",
            "train.log_every=1", f"train.ckpt_every={s.stage2_steps}", "optim.warmup_epochs=0",
            "optim.lr=5e-4"]


def _cache(args: list[str]) -> dict:
    from umt_distill.cache.pipeline import cache_teacher
    from umt_distill.config import load_recipe

    return cache_teacher(load_recipe("stage2/tiny", args), progress=False)


def _train(args: list[str]) -> dict:
    """One stage-2 run; returns its last metrics, per-step times and peak resident memory (MB)."""
    import torch

    from umt_distill.config import load_recipe
    from umt_distill.stages.stage2 import train
    from umt_distill.training.metrics import read_metrics

    torch.set_num_threads(2)
    cfg = load_recipe("stage2/tiny", args)
    base = reset_peak_memory("cpu")
    last = train(cfg)
    peak = peak_memory_mb("cpu")
    steps = [m for m in read_metrics(Path(cfg.train.output_dir) / "metrics.jsonl") if "step_time" in m]
    return {"last": last, "step_times": [m["step_time"] for m in steps], "data_times": [m["data_time"] for m in steps],
            "peak_mb": peak, "base_mb": base}


def _evaluate(args: list[str], run: str, test: list[dict], with_selector: bool, views: dict) -> dict:
    """R@1 of the run's model on the test clips (all T frames), and the learned selector's precision."""
    import torch
    import torch.nn.functional as F

    from umt_distill.config import load_recipe
    from umt_distill.data.frame_select import topk_frames
    from umt_distill.data.pixels import normalize_video
    from umt_distill.evaluation.retrieval import encode_texts
    from umt_distill.models.frame_selector import (
        FrameSelector,
        frame_features,
        load_selector,
    )
    from umt_distill.stages.retrieval import load_vl_model

    torch.set_num_threads(2)
    cfg = load_recipe("stage2/tiny", args)
    model, tokenizer = load_vl_model(cfg, run)
    model.eval()
    captions = sorted({c["caption"] for c in test})
    with torch.no_grad():
        text = encode_texts(model, tokenizer, captions, cfg.text.max_length, torch.device("cpu")).embedding  # [C, E]
        pixels = torch.from_numpy(np.stack([c["frames"] for c in test])).permute(0, 1, 4, 2, 3)  # [N, T, 3, H, W]
        emb = []
        for chunk in pixels.split(16):
            out = model.vision_encoder(normalize_video(chunk), None, align=False, keep_temporal=True)
            emb.append(F.normalize(model.vision_embedding(out.pooled).mean(1), dim=-1))  # [b, E]
        best = (torch.cat(emb) @ text.T).argmax(1)
    truth = torch.tensor([captions.index(c["caption"]) for c in test])
    out = {"r1": float((best == truth).float().mean()), "chance": 1 / len(captions)}
    if with_selector:  # the learned selector on the training store's views (the frames training chose among)
        k = cfg.frame_select.keep_frames
        sel = load_selector(FrameSelector(model.vision_encoder.embed_dim, views["text"].shape[1],
                                          cfg.frame_select.selector_hidden), run).eval()
        with torch.no_grad():
            x = normalize_video(torch.from_numpy(views["pixels"]))
            feats = frame_features(model.vision_encoder.encoder.patch_embed(x), x.shape[2])
            kept = topk_frames(sel(feats, torch.from_numpy(views["text"])), k)
        out["learned_precision"] = float(np.take_along_axis(views["shows"], kept.numpy(), 1).mean())
    return out


# --------------------------------------------------------------------------------------------------
# the rows


def _views(store: Path, shows: dict[str, np.ndarray], captions: dict[str, str]) -> dict[str, np.ndarray]:
    """Every cached view: pixels, which of its frames show the captioned object, its frame scores, its caption."""
    from umt_distill.cache.captions import read_caption_table
    from umt_distill.cache.spec import read_spec
    from umt_distill.cache.stores import CacheReader, read_index

    reader = CacheReader(store)
    table = read_caption_table(store, read_spec(store), [s["name"] for s in read_index(store)["shards"]])
    pix, truth, scores, text = [], [], [], []
    for clip_id, view_index in sorted(reader.keys):
        rec = reader.get(clip_id, view_index)  # the store keeps its frames (cache.frames=raw)
        pix.append(rec.frames)
        truth.append(shows[clip_id][list(rec.view.frame_indices)])
        scores.append(table.scores(clip_id, view_index, captions[clip_id]))
        text.append(table.embedding(clip_id, captions[clip_id]))
    return {"pixels": np.stack(pix), "shows": np.stack(truth), "scores": np.stack(scores), "text": np.stack(text)}


def precision_rows(views: dict, k: int, seeds: int) -> dict[str, float]:
    import torch

    from umt_distill.data.frame_select import random_frames, topk_frames, uniform_frames

    shows = views["shows"]
    n, T = shows.shape

    def precision(kept) -> float:
        return float(np.take_along_axis(shows, np.asarray(kept), 1).mean())

    rand = [precision(random_frames(n, T, k, torch.Generator().manual_seed(s))) for s in range(max(seeds, 3))]
    return {"text_guided": precision(topk_frames(torch.from_numpy(views["scores"]), k)),
            "text_guided_per_segment": precision(topk_frames(torch.from_numpy(views["scores"]), k, per_segment=True)),
            "uniform": precision(uniform_frames(n, T, k)), "random": statistics.fmean(rand)}


def _spread(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def cost_row(step_times: list[list[float]], data_times: list[list[float]], peaks: list[float], r1: list[float],
             epoch_steps: int) -> dict[str, Any]:
    """One method's row over its seeds. ``ms_per_step``: the least of the runs' median step times (steps
    after the first two): runs follow each other on a shared machine, and the least disturbed run is the
    one to compare; every run's median is kept beside it. The step time includes the data time (reading
    the batch), reported apart."""
    med = [statistics.median(t[2:] or t) * 1000 for t in step_times]
    ms = min(med)
    return {"ms_per_step": round(ms, 1), "ms_per_step_runs": [round(m, 1) for m in med],
            "data_ms_per_step": round(statistics.median([statistics.median(d[2:] or d) * 1000 for d in data_times]), 1),
            "s_per_epoch": round(ms * epoch_steps / 1000, 2), "peak_mb": round(statistics.median(peaks), 1),
            "r1": _spread(r1)}


def frame_rows(quick: bool, out_dir) -> dict[str, Any]:
    """The frame-selection rows of the ``smaug`` results section (``benchmarks.bench_smaug`` calls this)."""
    s = FrameSettings.quick() if quick else FrameSettings()
    T, k = s.frames, s.frames // 2
    # scratch outside the repository, one folder per settings: the world, CLIP and store are reused by a re-run
    digest = hashlib.sha256(json.dumps(asdict(s), sort_keys=True).encode()).hexdigest()[:12]
    work = Path(tempfile.gettempdir()) / "umt-smaug-frames" / digest
    load = load_average()
    t0 = time.perf_counter()
    train_clips = frame_world(s.train_clips, T, s.world_seed, "train")
    test_clips = frame_world(s.test_clips, T, s.world_seed + 1, "test")
    corpus = write_world(train_clips, work / "world")
    log(f"smaug frames: world written ({s.train_clips} + {s.test_clips} clips of {T} frames)")

    from umt_distill.quickstart.tiny_clip import ClipTrainSettings, train_tiny_clip

    frames = np.concatenate([c["frames"] for c in train_clips])  # [n·T, H, W, 3]
    per_frame = [cap for c in train_clips for cap in c["per_frame"]]
    clip = train_tiny_clip(work / "clip", frames, per_frame, ClipTrainSettings(steps=s.clip_steps), log=log)
    log(f"smaug frames: tiny CLIP loss {clip['final_loss']:.3f}")
    store = work / "store"
    if not (store / "index.json").exists():
        run_isolated(_cache, overrides(corpus, store, clip, s))
    views = _views(store, {c["id"]: c["shows"] for c in train_clips}, {c["id"]: c["caption"] for c in train_clips})
    precision = precision_rows(views, k, s.seeds)

    base = overrides(corpus, store, clip, s)
    configs: dict[str, list[str]] = {
        "all_frames": [],
        **{m: [f"frame_select.method={m}", f"frame_select.keep_frames={k}"] for m in METHODS},
        "smaug": ["frame_select.method=text_guided", f"frame_select.keep_frames={k}", "sparsify.keep=0.5",
                  "sparsify.after_block=0", "sparsify.source=teacher"],
    }
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for seed in range(s.seeds):
        for name, extra in configs.items():
            out = work / "runs" / f"{name}-{seed}"
            args = [*base, f"seed={seed}", f"train.output_dir={out}", *extra]
            log(f"smaug frames: stage 2 {name} seed {seed}")
            r = run_isolated(_train, args)
            r.update(run_isolated(_evaluate, args, str(out), test_clips, name == "learned", views))
            runs[name].append(r)
    learned = [r["learned_precision"] for r in runs["learned"]]
    precision["learned"] = statistics.fmean(learned)
    epoch_steps = s.train_clips // s.batch_size

    def cost(name: str) -> dict[str, Any]:
        return cost_row([r["step_times"] for r in runs[name]], [r["data_times"] for r in runs[name]],
                        [r["peak_mb"] for r in runs[name]], [r["r1"] for r in runs[name]], epoch_steps)

    table = {name: cost(name) for name in configs}
    rows = {
        "frame_precision": precision,
        "frame_precision_learned_per_seed": learned,
        "frame_stage2": table,
        "frame_stage2_ms_k_T": table["all_frames"]["ms_per_step"],
        "frame_stage2_ms_k_T_half": table["text_guided"]["ms_per_step"],
        "frame_speedup_k_T_half": round(table["all_frames"]["ms_per_step"] / table["text_guided"]["ms_per_step"], 3),
        "frame_cost_table": {
            "plain_umt_stage2": table["all_frames"],
            "smaug_on_cache": table["smaug"],
            "what": f"plain: every frame and token; smaug: text-guided k={k} of T={T} + sparsify keep 0.5 at block 0 "
                    "(teacher attention); per epoch = ms/step x steps per epoch "
                    f"({epoch_steps}); peak_mb = the training process's resident high-water mark",
        },
        "frame_r1_chance": runs["all_frames"][0]["chance"],
        "frame_settings": {**asdict(s), "k": k, "world": "half the frames show the captioned disc, half a distractor"},
        "frame_tiny_clip": {"final_loss": clip.get("final_loss"), "steps": s.clip_steps, "seconds": clip.get("seconds"),
                            "reused": clip.get("reused")},
        "frame_work_dir": str(work),
        "frame_load_start": load, "frame_load_end": load_average(),
        "frame_seconds": round(time.perf_counter() - t0, 1),
    }
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="minutes on 2 CPU cores")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = frame_rows(args.quick, args.out)
    path = args.out / f"smaug-frames-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"smaug": rows}, indent=1))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
