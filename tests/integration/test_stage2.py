"""Stage 2 on real stores of generated captioned videos and images: steps per source, resume, loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from umt_distill.cache.pipeline import cache_teacher
from umt_distill.config import load_recipe
from umt_distill.training.metrics import read_metrics


pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_VIDEOS, NUM_IMAGES = 6, 4
DIRECTIONS = ["left", "right", "up", "down"]
COLOURS = ["red", "green", "blue", "yellow", "white", "purple"]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    """A video and an image manifest with captions (JSONL, several captions per item)."""
    from PIL import Image

    from umt_distill.testing.media import moving_shapes_video, write_video

    root = tmp_path_factory.mktemp("s2data")
    rows = []
    for i in range(NUM_VIDEOS):
        write_video(root / f"v{i}.mp4", moving_shapes_video(8, 64, 80, seed=200 + i), fps=8)
        caps = [f"a {COLOURS[i]} disc moves {DIRECTIONS[i % 4]}", f"{COLOURS[i]} ball going {DIRECTIONS[i % 4]}"]
        rows.append({"id": f"v{i}", "path": f"v{i}.mp4", "captions": caps})
    (root / "videos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = []
    for i in range(NUM_IMAGES):
        pixels = np.random.default_rng(i).integers(0, 256, (48, 72, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"i{i}.png")
        rows.append({"id": f"i{i}", "path": f"i{i}.png", "captions": f"a photo of {COLOURS[i]} noise"})
    (root / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"video": root / "videos.jsonl", "image": root / "images.jsonl"}


@pytest.fixture(scope="module")
def stores(corpora, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("s2stores")
    out = {"video": root / "video", "image": root / "image"}
    # fp32 targets, so cached and online runs agree exactly.
    cache_teacher(load_recipe("stage2/tiny", [f"corpus.source={corpora['video']}", f"cache.store={out['video']}",
                                              "cache.codec=fp32"]), progress=False)
    # Images are 1-frame videos with their own targets.
    cache_teacher(load_recipe("stage2/tiny", [f"corpus.source={corpora['image']}", f"cache.store={out['image']}",
                                              "cache.codec=fp32", "views.num_frames=1"]), progress=False)
    return out


def _overrides(corpora, stores, out: Path, *extra: str) -> list[str]:
    return [f"corpus.source={corpora['video']}", f"cache.store={stores['video']}",
            f"stage2.image_corpus={corpora['image']}", f"stage2.image_store={stores['image']}",
            "cache.codec=fp32", f"train.output_dir={out}", "train.batch_size=2", *extra]


@pytest.mark.parametrize("source", ["video", "image"])
def test_steps_with_one_source(corpora, stores, tmp_path, source) -> None:
    """Video-text only and image-text only (mixed runs: the resume test below)."""
    from umt_distill.stages.stage2 import train

    cfg = load_recipe("stage2/tiny", _overrides(corpora, stores, tmp_path / "run", f"stage2.sources=[{source}]",
                                                "train.max_steps=2", "train.ckpt_every=2"))
    train(cfg)
    logged = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [(m["step"], m["source"]) for m in logged] == [(1, source), (2, source)]
    for m in logged:
        assert all(np.isfinite(m[k]) for k in ("loss", "loss_uta", "loss_vtc", "loss_vtm", "loss_mlm")), m
        assert 0.001 <= m["temp"] <= 0.5
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "model.safetensors").exists()
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").exists()


def test_mixing_resume_mid_epoch_and_online_teacher_repeat_the_run(corpora, stores, tmp_path) -> None:
    """Epoch = 3 video steps + 2 image steps (batch 2), shuffled; resuming from step 3 reproduces steps 4-6,
    and so does the teacher run online on the same views (fp32 store: identical targets)."""
    from umt_distill.stages.stage2 import train

    run = tmp_path / "run"
    cfg = load_recipe("stage2/tiny", _overrides(corpora, stores, run, "train.max_steps=6", "train.ckpt_every=3"))
    train(cfg)
    first = read_metrics(run / "metrics.jsonl")
    epoch0 = [m["source"] for m in first if m["epoch"] == 0]
    assert sorted(epoch0) == ["image"] * 2 + ["video"] * 3
    # Back to the step-3 checkpoint (mid-epoch) and train again: identical losses and sources.
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    (run / "checkpoints" / "latest").write_text("step-00000003\n")
    train(cfg)
    again = read_metrics(run / "metrics.jsonl")
    key = lambda ms: [(m["step"], m["source"], m["loss"], m["loss_vtm"], m["loss_mlm"]) for m in ms]  # noqa: E731
    assert key(again) == key(first)
    online = tmp_path / "online"
    train(load_recipe("stage2/tiny", _overrides(corpora, stores, online, "train.max_steps=6", "train.ckpt_every=6",
                                                "teacher.mode=online")))
    assert key(read_metrics(online / "metrics.jsonl")) == key(first)


def test_store_and_caption_problems_are_named(corpora, stores, tmp_path) -> None:
    from umt_distill.cache.spec import SpecMismatchError
    from umt_distill.data.vl import CaptionError
    from umt_distill.stages.stage2 import train

    # The image store given as the video store: 1 cached frame where the recipe asks for 4.
    cfg = load_recipe("stage2/tiny", _overrides(corpora, stores, tmp_path / "a", f"cache.store={stores['image']}",
                                                f"corpus.source={corpora['image']}", "stage2.sources=[video]"))
    with pytest.raises(SpecMismatchError, match="views.num_frames"):
        train(cfg)
    bare = tmp_path / "nocaps.jsonl"
    bare.write_text("".join(json.dumps({"id": f"v{i}", "path": str(corpora["video"].parent / f"v{i}.mp4")}) + "\n"
                            for i in range(NUM_VIDEOS)))
    cfg = load_recipe("stage2/tiny", _overrides(corpora, stores, tmp_path / "b", f"corpus.source={bare}"))
    with pytest.raises(CaptionError, match="nocaps.jsonl.*'v0'"):
        train(cfg)
    cfg = load_recipe("stage2/tiny", _overrides(corpora, stores, tmp_path / "c", "stage2.image_store=''"))
    with pytest.raises(ValueError, match="stage2.image_store"):
        train(cfg)


def _tiny_model(corpora, stores, tmp_path, *extra: str):
    from umt_distill.stages.stage2 import build_model

    cfg = load_recipe("stage2/tiny", _overrides(corpora, stores, tmp_path / "m", *extra))
    torch.manual_seed(0)
    return build_model(cfg, teacher_dim=32, vocab_size=50)


def _official_stage2_keys(layers: int, fusion: int, heads: int) -> dict[str, tuple[int, ...]]:
    """UMT's stage-2 key layout (UMT code @4fb4049: multi_modality/models/umt.py), written out independently
    of our modules.

    Sizes of the tiny test parts: vision 64 (4 blocks, K=2 heads onto a 32-d teacher), BERT 64 wide,
    MLP 256, vocabulary 50, 64 positions, contrastive width 32.
    """
    C, H, V, E, D = 64, 64, 50, 32, 32
    keys: dict[str, tuple[int, ...]] = {"temp": ()}
    v = "vision_encoder."
    keys |= {v + "encoder.patch_embed.proj.weight": (C, 3, 1, 16, 16), v + "encoder.patch_embed.proj.bias": (C,)}
    for i in range(4):
        b = f"{v}encoder.blocks.{i}."
        keys |= {b + "norm1.weight": (C,), b + "norm1.bias": (C,), b + "attn.q_bias": (C,), b + "attn.v_bias": (C,),
                 b + "attn.qkv.weight": (3 * C, C), b + "attn.proj.weight": (C, C), b + "attn.proj.bias": (C,),
                 b + "norm2.weight": (C,), b + "norm2.bias": (C,), b + "mlp.fc1.weight": (4 * C, C),
                 b + "mlp.fc1.bias": (4 * C,), b + "mlp.fc2.weight": (C, 4 * C), b + "mlp.fc2.bias": (C,)}
    keys |= {v + "encoder.norm.weight": (C,), v + "encoder.norm.bias": (C,), v + "pool_norm.weight": (C,),
             v + "pool_norm.bias": (C,)}
    for k in range(heads):
        keys |= {f"{v}clip_decoder.{k}.head.weight": (D, C), f"{v}clip_decoder.{k}.head.bias": (D,),
                 f"{v}clip_decoder.{k}.norm.weight": (D,), f"{v}clip_decoder.{k}.norm.bias": (D,)}
    t = "text_encoder.bert."
    keys |= {t + "embeddings.position_ids": (1, 64), t + "embeddings.word_embeddings.weight": (V, H),
             t + "embeddings.position_embeddings.weight": (64, H), t + "embeddings.token_type_embeddings.weight": (2, H),
             t + "embeddings.LayerNorm.weight": (H,), t + "embeddings.LayerNorm.bias": (H,)}
    for layer in range(layers):
        p = f"{t}encoder.layer.{layer}."
        blocks = ["attention"] + (["crossattention"] if layer >= fusion else [])
        for blk in blocks:
            kv = C if blk == "crossattention" else H
            keys |= {f"{p}{blk}.self.query.weight": (H, H), f"{p}{blk}.self.query.bias": (H,),
                     f"{p}{blk}.self.key.weight": (H, kv), f"{p}{blk}.self.key.bias": (H,),
                     f"{p}{blk}.self.value.weight": (H, kv), f"{p}{blk}.self.value.bias": (H,),
                     f"{p}{blk}.output.dense.weight": (H, H), f"{p}{blk}.output.dense.bias": (H,),
                     f"{p}{blk}.output.LayerNorm.weight": (H,), f"{p}{blk}.output.LayerNorm.bias": (H,)}
        keys |= {p + "intermediate.dense.weight": (256, H), p + "intermediate.dense.bias": (256,),
                 p + "output.dense.weight": (H, 256), p + "output.dense.bias": (H,),
                 p + "output.LayerNorm.weight": (H,), p + "output.LayerNorm.bias": (H,)}
    c = "text_encoder.cls.predictions."
    keys |= {c + "bias": (V,), c + "transform.dense.weight": (H, H), c + "transform.dense.bias": (H,),
             c + "transform.LayerNorm.weight": (H,), c + "transform.LayerNorm.bias": (H,),
             c + "decoder.weight": (V, H), c + "decoder.bias": (V,)}
    keys |= {"vision_proj.weight": (E, C), "vision_proj.bias": (E,), "text_proj.weight": (E, H),
             "text_proj.bias": (E,), "itm_head.weight": (2, H), "itm_head.bias": (2,)}
    return keys


def test_official_stage2_layout_loads_strictly_apart_from_the_teacher(corpora, stores, tmp_path) -> None:
    from umt_distill.models.checkpoints import CheckpointMismatchError
    from umt_distill.models.umt_vl import load_umt_vl_checkpoint

    model = _tiny_model(corpora, stores, tmp_path)
    g = torch.Generator().manual_seed(5)
    state = {k: torch.randn(shape, generator=g) for k, shape in _official_stage2_keys(4, 2, 2).items()}
    state["text_encoder.bert.embeddings.position_ids"] = torch.arange(64)[None]
    state["text_encoder.cls.predictions.decoder.weight"] = state["text_encoder.bert.embeddings.word_embeddings.weight"]
    state["text_encoder.cls.predictions.decoder.bias"] = state["text_encoder.cls.predictions.bias"]
    state["clip_teacher.conv1.weight"] = torch.zeros(8, 3, 1, 16, 16)  # teacher keys: set aside
    path = tmp_path / "ckpt_latest.pth"
    torch.save({"model": state, "epoch": 9, "global_step": 1000}, path)
    report = load_umt_vl_checkpoint(model, path)
    assert report["teacher_keys"] == 1
    loaded = model.state_dict()
    for k, v in state.items():
        if k in loaded:
            assert torch.equal(loaded[k], v), k
    assert model.temp.item() == state["temp"].item()
    missing = {k: v for k, v in state.items() if k != "itm_head.bias"}
    with pytest.raises(CheckpointMismatchError, match="itm_head.bias"):
        load_umt_vl_checkpoint(model, missing)
    with pytest.raises(CheckpointMismatchError, match="text_encoder.bert.pooler.dense.weight"):
        load_umt_vl_checkpoint(model, {**state, "text_encoder.bert.pooler.dense.weight": torch.zeros(64, 64)})


def test_init_from_stage1_and_stage2_checkpoints(corpora, stores, tmp_path) -> None:
    from umt_distill.models.checkpoints import save_student
    from umt_distill.models.vit import create_student
    from umt_distill.training.checkpoint import save_checkpoint

    torch.manual_seed(123)
    stage1 = create_student("umt_test_tiny", drop_path_rate=0.0)
    save_student(stage1, tmp_path / "stage1.safetensors")
    save_checkpoint(tmp_path / "stage1_run", 7, stage1, {"step": 7}, "")  # a stage-1 run folder works too
    for init in (tmp_path / "stage1.safetensors", tmp_path / "stage1_run"):
        model = _tiny_model(corpora, stores, tmp_path, f"stage2.init_vision={init}")
        ours = model.vision_encoder.state_dict()
        for k, v in stage1.state_dict().items():
            assert torch.equal(ours[k], v), k
        assert set(ours) - set(stage1.state_dict()) == {"pool_norm.weight", "pool_norm.bias"}
    # A whole stage-2 model from one of our stage-2 run folders (shifted: not the fresh init).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    save_checkpoint(tmp_path / "stage2_run", 3, model, {"step": 3}, "")
    again = _tiny_model(corpora, stores, tmp_path, f"stage2.init={tmp_path / 'stage2_run'}")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


def test_objective_gives_every_trainable_parameter_a_gradient(corpora, stores, tmp_path) -> None:
    from umt_distill.stages.stage2_parts import Stage2Objective, freeze_unused

    for weights in ({"uta": 1, "vtc": 1, "vtm": 1, "mlm": 1}, {"uta": 0, "vtc": 1, "vtm": 0, "mlm": 0}):
        model = _tiny_model(corpora, stores, tmp_path)
        frozen = freeze_unused(model, weights)
        assert bool(frozen) == (weights["vtm"] == 0)
        objective = Stage2Objective(model, weights, 0.5, {"pad": 0, "cls": 2, "mask": 4})
        B, gen = 3, torch.Generator().manual_seed(0)
        pixels = torch.randn(B, 3, 4, 64, 64)
        visible = torch.stack([torch.randperm(64, generator=gen)[:32].sort().values for _ in range(B)])
        targets = torch.randn(2, B, 32, 32)
        ids = torch.randint(5, 50, (B, 10), generator=gen)
        ids[:, 0] = 2
        out = objective(pixels, visible if weights["uta"] else None, targets, ids, torch.ones_like(ids),
                        torch.tensor([7, 8, 9]), gen)
        assert set(out) == {"loss"} | {k for k, w in weights.items() if w}
        out["loss"].backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert missing == [], missing
        assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)


@pytest.mark.slow
def test_sixty_mixed_steps_reduce_the_losses(corpora, stores, tmp_path) -> None:
    from umt_distill.stages.stage2 import train

    run = tmp_path / "run"
    train(load_recipe("stage2/tiny", _overrides(corpora, stores, run, "train.max_steps=60", "train.ckpt_every=100")))
    logged = read_metrics(run / "metrics.jsonl")
    mean = lambda ms, k: sum(m[k] for m in ms) / len(ms)  # noqa: E731
    for k in ("loss", "loss_uta", "loss_vtc", "loss_mlm"):
        assert mean(logged[-10:], k) < mean(logged[:10], k), (k, mean(logged[:10], k), mean(logged[-10:], k))


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_two_processes(corpora, stores, tmp_path) -> None:
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "umt_distill",
         "train", "stage2/tiny", *_overrides(corpora, stores, out, "train.max_steps=5", "train.ckpt_every=5")],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(m["loss"]) for m in logged)
    assert proc.stderr.count("stage2 step 5/5") == 1  # live progress, rank 0 only
    assert (out / "checkpoints" / "step-00000005" / "model.safetensors").exists()
