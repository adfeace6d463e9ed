"""Pixel reconstruction (VideoMAE / V2 dual masking / UTA + pixel): masks, targets, model, loop, resume, DDP."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from umt_distill.config import RecipeError, load_recipe
from umt_distill.training.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NUM_CLIPS = 8


# --------------------------------------------------------------------------------------------------
# masks and targets


def test_running_cell_matches_the_hand_worked_example() -> None:
    """T'=2, 2×2 grid, ratio 0.5: queue [masked, masked, kept, kept]; token (t, h, w) reads slot
    (2·h + w + t + 1 + phase) mod 4 and is decoded for slots 2, 3.
    Phase 0, frame 0: slots 1, 2, 3, 0 → tokens 1, 2; frame 1: slots 2, 3, 0, 1 → tokens 4, 5.
    Phase 1, frame 0: slots 2, 3, 0, 1 → 0, 1; frame 1: slots 3, 0, 1, 2 → 4, 7.
    Phase 2: frame 0 slots 3, 0, 1, 2 → 0, 3; frame 1 slots 0, 1, 2, 3 → 6, 7.
    Phase 3: frame 0 slots 0, 1, 2, 3 → 2, 3; frame 1 slots 1, 2, 3, 0 → 5, 6."""
    from umt_distill.masking import running_cell_decode_indices, running_cell_pattern

    hand = {0: [1, 2, 4, 5], 1: [0, 1, 4, 7], 2: [0, 3, 6, 7], 3: [2, 3, 5, 6]}
    for phase, expected in hand.items():
        assert running_cell_pattern(2, 2, 2, 0.5, phase).nonzero()[:, 0].tolist() == expected, phase
    drawn = {tuple(running_cell_decode_indices(1, 2, 2, 2, 0.5, torch.Generator().manual_seed(s))[0].tolist())
             for s in range(40)}
    assert drawn == {tuple(v) for v in hand.values()}  # the sampler draws exactly these four phases


def test_running_cell_decodes_each_position_half_the_time_over_four_frames() -> None:
    from umt_distill.masking import running_cell_decode_indices, visible_mask

    T, H, W = 8, 4, 6
    idx = running_cell_decode_indices(5, T, H, W, 0.5, torch.Generator().manual_seed(3))
    assert idx.shape == (5, T * H * W // 2)
    decoded = visible_mask(idx, T * H * W).view(5, T, H * W)
    assert (decoded[:, 0:4].sum(1) == 2).all() and (decoded[:, 4:8].sum(1) == 2).all()
    quarter = running_cell_decode_indices(1, 4, 2, 2, 0.75, torch.Generator().manual_seed(0))
    assert quarter.shape == (1, 4)  # int(4·0.75) = 3 of 4 slots not decoded
    with pytest.raises(ValueError, match="must be even"):
        running_cell_decode_indices(1, 2, 3, 4, 0.5, torch.Generator())
    with pytest.raises(ValueError, match="1, 2 or 3"):
        running_cell_decode_indices(1, 2, 2, 2, 0.1, torch.Generator())


def test_decoder_plan_counts_only_tokens_the_encoder_did_not_see() -> None:
    from umt_distill.masking import decoder_plan, sample_tube_mask, visible_mask

    T, H, W = 4, 4, 4
    gen = torch.Generator().manual_seed(1)
    vis = sample_tube_mask(2, T, H * W, 0.75, gen)  # [2, 16]
    dec, weight = decoder_plan(vis, "none", T * H * W, (T, H, W), 0.5, gen)
    assert dec.shape == (2, 48) and bool((weight == 1).all())
    assert not bool(visible_mask(vis, 64).gather(1, dec).any())
    dec, weight = decoder_plan(vis, "running_cell", T * H * W, (T, H, W), 0.5, gen)
    assert dec.shape == (2, 32)
    seen = visible_mask(vis, 64).gather(1, dec)
    assert torch.equal(weight, (~seen).float())


@pytest.mark.parametrize("tubelet, normalize", [(2, True), (2, False), (1, True)])
def test_pixel_targets_match_the_plain_reference(tubelet, normalize) -> None:
    from umt_distill.losses.pixel import pixel_targets, pixel_targets_reference

    video = torch.rand(2, 3, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    fast = pixel_targets(video, tubelet, 4, normalize)
    ref = pixel_targets_reference(video, tubelet, 4, normalize)
    assert fast.shape == (2, (4 // tubelet) * 2 * 3, tubelet * 4 * 4 * 3)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    if normalize:  # each channel of each patch is standardised
        per_channel = fast.view(2, -1, tubelet * 16, 3)
        torch.testing.assert_close(per_channel.mean(2), torch.zeros_like(per_channel.mean(2)), atol=1e-5, rtol=0)


def test_pixel_loss_is_the_mean_over_counted_tokens() -> None:
    from umt_distill.losses.pixel import pixel_loss

    pred, target = torch.zeros(1, 3, 2), torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]])
    assert pixel_loss(pred, target, torch.ones(1, 3)).item() == pytest.approx((1 + 4 + 9) / 3)
    assert pixel_loss(pred, target, torch.tensor([[1.0, 0.0, 1.0]])).item() == pytest.approx(5.0)


def test_videomae_view_takes_consecutive_frames_at_the_stride() -> None:
    from umt_distill.data.video_base import VideoInfo
    from umt_distill.data.views import sample_view

    info = VideoInfo(num_frames=100, fps=25.0, width=80, height=64)
    view = sample_view("videomae_train", info, 16, 64, 0, "clip", 0, sampling_rate=4)
    f = view.frame_indices
    assert len(f) == 16 and all(b - a == 4 for a, b in zip(f, f[1:])) and f[-1] <= 99 and not view.flip
    short = sample_view("videomae_train", VideoInfo(num_frames=10, fps=25.0, width=80, height=64), 8, 64, 0, "c", 0,
                        sampling_rate=2)
    assert short.frame_indices == (0, 2, 4, 6, 8, 9, 9, 9)  # clamped to the last frame


# --------------------------------------------------------------------------------------------------
# model and checkpoints


def _official_key_names(depth: int, decoder_depth: int) -> set[str]:
    """Parameter names of VideoMAE's PretrainVisionTransformer (qkv_bias=True, init_values=0), written
    out from its module layout: encoder.{patch_embed, blocks, norm}, decoder.{blocks, norm, head},
    encoder_to_decoder (no bias), mask_token."""
    block = ["norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias", "attn.qkv.weight", "attn.proj.weight",
             "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
             "mlp.fc2.bias"]
    keys = {"encoder.patch_embed.proj.weight", "encoder.patch_embed.proj.bias", "encoder.norm.weight",
            "encoder.norm.bias", "decoder.norm.weight", "decoder.norm.bias", "decoder.head.weight",
            "decoder.head.bias", "encoder_to_decoder.weight", "mask_token"}
    keys |= {f"encoder.blocks.{i}.{k}" for i in range(depth) for k in block}
    keys |= {f"decoder.blocks.{i}.{k}" for i in range(decoder_depth) for k in block}
    return keys


def test_b16_model_has_the_official_videomae_keys_and_shapes() -> None:
    from umt_distill.models.videomae import build_videomae

    with torch.device("meta"):
        model = build_videomae("umt_base_patch16", 2, 384, 4, 6, drop_path_rate=0.0)
    state = model.state_dict()
    assert set(state) == _official_key_names(12, 4)
    assert state["encoder.patch_embed.proj.weight"].shape == (768, 3, 2, 16, 16)
    assert state["decoder.head.weight"].shape == (1536, 384)
    assert state["encoder_to_decoder.weight"].shape == (384, 768)
    assert state["mask_token"].shape == (1, 1, 384)


def _tiny_model(**kw):
    from umt_distill.models.videomae import build_videomae

    torch.manual_seed(0)
    return build_videomae("umt_test_tiny", kw.pop("tubelet", 2), 32, 2, 4, drop_path_rate=0.0, **kw)


def test_forward_shapes_and_every_parameter_gets_a_gradient() -> None:
    from umt_distill.masking import decoder_plan, sample_tube_mask

    model = _tiny_model(teacher_dim=16, num_align_layers=2, tubelet=1)
    x = torch.randn(2, 3, 4, 64, 64)
    gen = torch.Generator().manual_seed(0)
    vis = sample_tube_mask(2, 4, 16, 0.75, gen)
    dec, _ = decoder_plan(vis, "running_cell", 64, (4, 4, 4), 0.5, gen)
    pixels, align = model(x, vis, dec)
    assert pixels.shape == (2, 32, 1 * 16 * 16 * 3) and align.shape == (2, 2, 16, 16)
    (pixels.pow(2).mean() + align.sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_official_pretraining_file_loads_into_the_model_and_the_finetuning_classifier(tmp_path) -> None:
    from umt_distill.models.classifier import create_classifier, load_classifier_weights
    from umt_distill.models.videomae import load_videomae_checkpoint

    src = _tiny_model()
    official = {"model": {k: v.clone() for k, v in src.state_dict().items()}, "epoch": 800}  # run_mae_pretraining's layout
    path = tmp_path / "checkpoint-799.pth"
    torch.save(official, path)
    dst = _tiny_model()
    torch.nn.init.zeros_(dst.mask_token)
    assert load_videomae_checkpoint(dst, path) == len(src.state_dict())
    assert torch.equal(dst.mask_token, src.mask_token)
    clf = create_classifier("umt_test_tiny", 5, tubelet_size=2, pretrain_grid=(4, 4, 4))
    report = load_classifier_weights(clf, path)
    assert report.layout == "stage1" and "decoder.head.weight" in report.ignored and "mask_token" in report.ignored
    assert torch.equal(clf.patch_embed.proj.weight, src.encoder.patch_embed.proj.weight)
    assert sorted(report.fresh) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    broken = {"model": {k: v for k, v in official["model"].items() if k != "decoder.head.bias"}}
    torch.save(broken, tmp_path / "broken.pth")
    from umt_distill.models.checkpoints import CheckpointMismatchError

    with pytest.raises(CheckpointMismatchError, match="decoder.head.bias"):
        load_videomae_checkpoint(_tiny_model(), tmp_path / "broken.pth")


# --------------------------------------------------------------------------------------------------
# the loop


@pytest.fixture(scope="module")
def corpus(shapes_corpus) -> Path:
    return shapes_corpus  # 8 clips, seed 200: written once per session (conftest)


def _cfg(corpus: Path, out: Path, *extra: str):
    return load_recipe("videomae/tiny", [f"corpus.source={corpus}", f"train.output_dir={out}", *extra])


def test_training_reduces_the_loss_and_the_checkpoint_finetunes(corpus, tmp_path) -> None:
    from umt_distill.models.classifier import create_classifier, load_classifier_weights
    from umt_distill.stages.videomae import train

    run = tmp_path / "run"
    train(_cfg(corpus, run, "train.max_steps=24", "train.batch_size=4", "videomae.decoder_mask=running_cell"))
    logged = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in logged] == list(range(1, 25))
    losses = [m["loss"] for m in logged]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    assert {"loss_pixel", "lr", "grad_norm", "reconstructed_tokens", "tokens_per_s"} <= set(logged[0])
    # running cell over 4 token frames of 4×4: 32 decoded per clip, ~3/4 of them unseen by the encoder
    assert 0 < logged[0]["reconstructed_tokens"] <= 4 * 32
    clf = create_classifier("umt_test_tiny", 3, tubelet_size=2, pretrain_grid=(4, 4, 4))
    report = load_classifier_weights(clf, run)
    assert report.layout == "stage1" and report.loaded == len([k for k in clf.state_dict() if not k.startswith(("fc_norm", "head"))])


def test_resume_mid_epoch_continues_the_same_run(corpus, tmp_path) -> None:
    from safetensors.torch import load_file

    from umt_distill.stages.videomae import train

    run = tmp_path / "run"
    cfg = _cfg(corpus, run, "train.max_steps=6", "train.batch_size=2", "train.ckpt_every=3")  # 4 steps per epoch
    train(cfg)
    first = {m["step"]: m["loss"] for m in read_metrics(run / "metrics.jsonl")}
    weights = load_file(str(run / "checkpoints" / "step-00000006" / "model.safetensors"))
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    (run / "checkpoints" / "latest").write_text("step-00000003\n")
    train(cfg)
    again = {m["step"]: m["loss"] for m in read_metrics(run / "metrics.jsonl")}
    assert sorted(again) == [1, 2, 3, 4, 5, 6] and again == first
    resumed = load_file(str(run / "checkpoints" / "step-00000006" / "model.safetensors"))
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)


def test_uta_plus_pixel_trains_both_losses_with_the_online_teacher(corpus, tmp_path) -> None:
    from umt_distill.stages.videomae import train

    run = tmp_path / "uta"
    train(_cfg(corpus, run, "videomae.target=uta+pixel", "videomae.tubelet_size=1", "mask.type=semantic",
               "views.policy=umt_train", "views.num_frames=4", "train.max_steps=3", "train.batch_size=2"))
    logged = read_metrics(run / "metrics.jsonl")
    assert all(0 < m["loss_uta"] <= 4 and m["loss_pixel"] > 0 for m in logged)
    assert all(m["loss"] == pytest.approx(m["loss_uta"] + m["loss_pixel"], rel=1e-6) for m in logged)


def test_impossible_combinations_are_refused_naming_the_key(corpus, tmp_path) -> None:
    from umt_distill.stages.videomae import train

    with pytest.raises(RecipeError, match="videomae.tubelet_size=1"):
        train(_cfg(corpus, tmp_path, "videomae.target=uta+pixel"))
    with pytest.raises(RecipeError, match="mask.type=semantic"):
        train(_cfg(corpus, tmp_path, "mask.type=semantic"))
    with pytest.raises(RecipeError, match="views.num_frames=5"):
        train(_cfg(corpus, tmp_path, "views.num_frames=5"))


@pytest.mark.distributed
def test_two_processes_match_one_process_with_twice_the_batch(corpus, tmp_path) -> None:
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [f"corpus.source={corpus}", "train.max_steps=4", "train.ckpt_every=4", "videomae.decoder_mask=running_cell"]
    one = subprocess.run([sys.executable, "-m", "umt_distill", "train", "videomae/tiny", *common,
                          f"train.output_dir={tmp_path / 'one'}", "train.batch_size=2"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "umt_distill", "train", "videomae/tiny", *common,
                          f"train.output_dir={tmp_path / 'two'}", "train.batch_size=1"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = read_metrics(tmp_path / "one" / "metrics.jsonl")
    b = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4), (x, y)
        assert x["reconstructed_tokens"] == y["reconstructed_tokens"]
    wa = load_file(str(tmp_path / "one" / "checkpoints" / "step-00000004" / "model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4, rtol=1e-3) for k in wa)


def test_the_finetuning_loop_builds_a_tubelet_2_classifier_from_a_videomae_run(corpus, tmp_path) -> None:
    """Tubelet and position table come from the checkpoint: pretraining grid 8 frames / 2 = 4 token frames."""
    from umt_distill.models.vit import sincos_1d
    from umt_distill.stages.finetune import build_classifier
    from umt_distill.stages.videomae import train

    run = tmp_path / "run"
    train(_cfg(corpus, run, "train.max_steps=2", "train.batch_size=4"))
    ft = load_recipe("finetune/tiny", [f"finetune.init={run}", "finetune.num_frames=8", "finetune.size=64",
                                       "finetune.pretrain_num_frames=8", "finetune.pretrain_size=64"])
    model, report = build_classifier(ft)
    assert model.patch_embed.tubelet_size == 2 and report.layout == "stage1"
    torch.testing.assert_close(model.pos_table((4, 4, 4), torch.device("cpu")), sincos_1d(64, 64))


def test_uta_plus_pixel_cached_targets_give_the_online_loss(corpus, tmp_path) -> None:
    """UTA + pixel from an fp32 store equals the same step with the teacher run online (same views, masks)."""
    from umt_distill.cache.pipeline import cache_teacher
    from umt_distill.teachers.build import build_teacher
    from umt_distill.data.corpus import read_corpus
    from umt_distill.data.pixels import normalize_video
    from umt_distill.cache.datasets import CachedViewDataset
    from umt_distill.data.clipviews import OnlineViewDataset
    from umt_distill.stages.videomae import _losses
    from umt_distill.stages.videomae_parts import build_model, step_plan, teacher_tokens

    store = tmp_path / "store"
    args = ["videomae.target=uta+pixel", "videomae.tubelet_size=1", "mask.type=semantic", "views.policy=umt_train",
            "views.num_frames=4", "views.flip=true", f"cache.store={store}", "cache.codec=fp32", "cache.num_views=2",
            "cache.num_workers=0", "cache.batch_size=4", "cache.clips_per_shard=4"]
    cfg = _cfg(corpus, tmp_path / "run", *args, "teacher.mode=cached")
    cache_teacher(cfg, progress=False)
    rows = read_corpus(corpus)
    batches = [torch.utils.data.default_collate([ds[i] for i in range(3)])
               for ds in (CachedViewDataset(store, cfg, {r.id: r for r in rows}), OnlineViewDataset(rows, cfg))]
    teacher = build_teacher(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(cfg, teacher.embed_dim)
    losses = []
    for batch, t in zip(batches, (None, teacher)):
        tokens, attn = teacher_tokens(cfg, batch, batch["pixels"], t, torch.device("cpu"))
        plan = step_plan(cfg, batch["pixels"], tokens, attn, 0, [0, 1, 2], 16, torch.device("cpu"))
        with torch.no_grad():
            pred, align = model(normalize_video(batch["pixels"]), plan.visible_idx, plan.decode_idx)
            losses.append([x.item() for x in _losses(pred, align, plan)])
    assert losses[0] == pytest.approx(losses[1], abs=1e-6), losses
