"""Fine-tuning a tubelet-1 checkpoint with a temporal patch embedding (``finetune.tubelet_size``):
the inflation rule, the position table on the new grid, the key shapes, and the refusals."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from umt_distill.config import load_recipe
from umt_distill.models.checkpoints import CheckpointError
from umt_distill.models.classifier import (
    checkpoint_tubelet,
    create_classifier,
    inflate_tubelet,
    load_classifier_weights,
    pretrained_pos_embed,
)
from umt_distill.models.vit import create_student, sincos_1d
from umt_distill.stages.finetune import build_classifier

GRID8 = (8, 4, 4)  # umt_test_tiny (patch 16) on 8 frames of 64 px


def tubelet1_model(seed: int = 0):
    torch.manual_seed(seed)
    return create_classifier("umt_test_tiny", 6, pretrain_grid=GRID8).eval()


def inflated_model(source, tubelet: int = 2):
    model = create_classifier("umt_test_tiny", 6, pretrain_grid=GRID8, tubelet_size=tubelet).eval()
    report = load_classifier_weights(model, source)
    return model, report


def test_the_rule_spreads_the_kernel_evenly() -> None:
    w = torch.randn(8, 3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    big = inflate_tubelet(w, 3)
    assert big.shape == (8, 3, 3, 4, 4)
    for t in range(3):
        torch.testing.assert_close(big[:, :, t], w[:, :, 0] / 3)
    torch.testing.assert_close(big.sum(2, keepdim=True), w)
    with pytest.raises(ValueError, match="only a tubelet-1 kernel"):
        inflate_tubelet(big, 6)


def test_a_static_clip_gives_the_tubelet1_tokens() -> None:
    small = tubelet1_model()
    model, report = inflated_model(small.state_dict())
    assert report.inflated == "patch_embed tubelet 1 → 2 (kernel / 2 on each frame)"
    frame = torch.randn(1, 3, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    static = frame.expand(1, 3, 8, 64, 64)
    with torch.no_grad():
        per_frame = small.patch_embed(static).view(1, 8, 16, -1)  # [1, T, H'·W', C]
        tokens = model.patch_embed(static).view(1, 4, 16, -1)  # [1, T/2, H'·W', C]
    for t in range(4):
        torch.testing.assert_close(tokens[:, t], per_frame[:, 2 * t], rtol=1e-5, atol=1e-5)


def test_any_clip_embeds_as_the_mean_of_each_frame_pair() -> None:
    """Linear kernel + position table resized linearly in time (8 → 4): both are pair means."""
    small = tubelet1_model()
    model, _ = inflated_model(small.state_dict())
    clip = torch.randn(2, 3, 8, 64, 64, generator=torch.Generator().manual_seed(2))  # moving, not static
    with torch.no_grad():
        want = small.embed(clip)[0].view(2, 4, 2, 16, -1).mean(2).flatten(1, 2)  # [B, 4·16, C]
        got = model.embed(clip)[0]  # [B, 4·16, C]
        logits = model(clip)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert logits.shape == (2, 6) and torch.isfinite(logits).all()
    table = sincos_1d(8 * 16, model.embed_dim).view(4, 2, 16, -1).mean(1).flatten(0, 1)
    torch.testing.assert_close(pretrained_pos_embed(model.embed_dim, GRID8, (4, 4, 4)), table, rtol=1e-5, atol=1e-6)


def test_key_shapes_only_the_patch_kernel_grows() -> None:
    small = tubelet1_model()
    model, report = inflated_model(small.state_dict(), tubelet=4)
    before, after = small.state_dict(), model.state_dict()
    assert before.keys() == after.keys()
    assert after["patch_embed.proj.weight"].shape == (64, 3, 4, 16, 16)
    assert before["patch_embed.proj.weight"].shape == (64, 3, 1, 16, 16)
    for key in before:
        if key != "patch_embed.proj.weight":
            assert torch.equal(before[key], after[key]), key
    assert checkpoint_tubelet(after) == 4 and checkpoint_tubelet(before) == 1
    assert report.layout == "finetuned" and report.loaded == len(before)


def _tiny_recipe(tmp_path, *extra: str):
    return load_recipe("finetune/tiny", [f"finetune.train_source={tmp_path / 'train.csv'}", "finetune.num_classes=6",
                                          "finetune.num_frames=8", "finetune.size=64", "finetune.pretrain_num_frames=8",
                                          "finetune.pretrain_size=64", *extra])


def _stage1_file(tmp_path):
    torch.manual_seed(0)
    student = create_student("umt_test_tiny")
    path = tmp_path / "stage1.safetensors"
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(path))
    return path, student.state_dict()


def test_the_recipe_inflates_a_stage1_checkpoint(tmp_path) -> None:
    path, stage1 = _stage1_file(tmp_path)
    model, report = build_classifier(_tiny_recipe(tmp_path, f"finetune.init={path}", "finetune.tubelet_size=2"))
    assert model.patch_embed.tubelet_size == 2 and report.layout == "stage1" and report.inflated
    torch.testing.assert_close(model.patch_embed.proj.weight, inflate_tubelet(stage1["encoder.patch_embed.proj.weight"], 2))
    assert torch.equal(model.blocks[0].attn.qkv.weight, stage1["encoder.blocks.0.attn.qkv.weight"])
    default, report = build_classifier(_tiny_recipe(tmp_path, f"finetune.init={path}"))  # null: the file's tubelet
    assert default.patch_embed.tubelet_size == 1 and report.inflated is None
    control, _ = build_classifier(_tiny_recipe(tmp_path, "finetune.tubelet_size=2"))  # random init, same shape
    assert control.patch_embed.proj.weight.shape == model.patch_embed.proj.weight.shape


def test_a_resumed_run_builds_the_init_files_tubelet(tmp_path) -> None:
    small = tubelet1_model()
    model, _ = inflated_model(small.state_dict())
    path = tmp_path / "finetuned.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    resumed, report = build_classifier(_tiny_recipe(tmp_path, f"finetune.init={path}"), load_init=False)
    assert resumed.patch_embed.tubelet_size == 2 and report is None


def test_impossible_combinations_are_refused(tmp_path) -> None:
    path, _ = _stage1_file(tmp_path)
    with pytest.raises(ValueError, match=r"finetune.tubelet_size=3 does not divide finetune.num_frames=8"):
        build_classifier(_tiny_recipe(tmp_path, f"finetune.init={path}", "finetune.tubelet_size=3"))
    with pytest.raises(ValueError, match="applies to the student; the image teacher"):
        build_classifier(_tiny_recipe(tmp_path, "finetune.backbone=image_teacher", "finetune.tubelet_size=2"))
    two = tmp_path / "t2.safetensors"
    model, _ = inflated_model(tubelet1_model().state_dict())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(two))
    with pytest.raises(ValueError, match="has tubelet 2; finetune.tubelet_size=4 can only inflate a tubelet-1"):
        build_classifier(_tiny_recipe(tmp_path, f"finetune.init={two}", "finetune.tubelet_size=4"))
    with pytest.raises(CheckpointError, match="tubelet 2, the model 4: only a tubelet-1 checkpoint can be inflated"):
        load_classifier_weights(create_classifier("umt_test_tiny", 6, tubelet_size=4), model.state_dict())
    with pytest.raises(CheckpointError, match="tubelet 2, the model 1"):  # shrinking is no inflation either
        load_classifier_weights(create_classifier("umt_test_tiny", 6), model.state_dict())


def test_stage2_inflates_its_vision_encoder_only_without_uta(tmp_path) -> None:
    from umt_distill.config import RecipeError
    from umt_distill.stages.stage2 import build_model

    with pytest.raises(RecipeError, match="set loss_weights.uta=0"):
        load_recipe("stage2/tiny", ["stage2.tubelet_size=2"])
    path, stage1 = _stage1_file(tmp_path)
    cfg = load_recipe("stage2/tiny", ["stage2.tubelet_size=2", "stage2.loss_weights.uta=0", f"stage2.init_vision={path}",
                                      "teacher.layers=2"])
    model = build_model(cfg, 32, 100)
    encoder = model.vision_encoder.encoder
    assert encoder.patch_embed.tubelet_size == 2
    torch.testing.assert_close(encoder.patch_embed.proj.weight, inflate_tubelet(stage1["encoder.patch_embed.proj.weight"], 2))
    assert torch.equal(encoder.blocks[3].mlp.fc2.weight, stage1["encoder.blocks.3.mlp.fc2.weight"])
    plain = build_model(load_recipe("stage2/tiny", [f"stage2.init_vision={path}", "teacher.layers=2"]), 32, 100)
    assert plain.vision_encoder.encoder.patch_embed.tubelet_size == 1  # null: the student's, loaded as is
