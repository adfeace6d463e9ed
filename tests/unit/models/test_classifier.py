"""VideoClassifier: UMT's fine-tuning keys, strict loading of every official layout, PE adaptation.

The key layouts are written out here from the official code (UMT code @4fb4049: stage 1 =
single_modality/models/modeling_pretrain_umt.py, fine-tuned = single_modality/models/modeling_finetune.py,
stage 2 = multi_modality/models/umt.py), independently of the model code.
"""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from umt_distill.models.checkpoints import CheckpointError, CheckpointMismatchError
from umt_distill.models.classifier import (
    ImageTeacherClassifier,
    create_classifier,
    load_classifier_weights,
    pretrained_pos_embed,
)
from umt_distill.models.vit import create_student, sincos_1d

DIM, DEPTH, PATCH = 64, 4, 16  # umt_test_tiny


def block_keys(prefix: str, dim: int, depth: int) -> dict[str, tuple]:
    keys: dict[str, tuple] = {}
    for i in range(depth):
        b = f"{prefix}blocks.{i}."
        keys.update({
            b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
            b + "attn.q_bias": (dim,), b + "attn.v_bias": (dim,), b + "attn.qkv.weight": (3 * dim, dim),
            b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
            b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
            b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
            b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,),
        })
    return keys


def finetuned_layout(dim: int = DIM, depth: int = DEPTH, classes: int = 5, patch: int = PATCH) -> dict[str, tuple]:
    """Fine-tuned (modeling_finetune.py): no prefix, fc_norm and head, no norm.*."""
    keys = {"patch_embed.proj.weight": (dim, 3, 1, patch, patch), "patch_embed.proj.bias": (dim,)}
    keys.update(block_keys("", dim, depth))
    keys.update({"fc_norm.weight": (dim,), "fc_norm.bias": (dim,), "head.weight": (classes, dim), "head.bias": (classes,)})
    return keys


def stage1_layout(dim: int = DIM, depth: int = DEPTH, teacher_dim: int = 32, heads: int = 2) -> dict[str, tuple]:
    """Stage 1 (modeling_pretrain_umt.py): encoder.* with encoder.norm, plus clip_decoder.{k}."""
    keys = {"encoder.patch_embed.proj.weight": (dim, 3, 1, PATCH, PATCH), "encoder.patch_embed.proj.bias": (dim,)}
    keys.update(block_keys("encoder.", dim, depth))
    keys.update({"encoder.norm.weight": (dim,), "encoder.norm.bias": (dim,)})
    for k in range(heads):
        keys.update({f"clip_decoder.{k}.head.weight": (teacher_dim, dim), f"clip_decoder.{k}.head.bias": (teacher_dim,),
                     f"clip_decoder.{k}.norm.weight": (teacher_dim,), f"clip_decoder.{k}.norm.bias": (teacher_dim,)})
    return keys


def random_state(layout: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.02 for k, shape in layout.items()}


def tiny(classes: int = 5, **kw) -> torch.nn.Module:
    return create_classifier("umt_test_tiny", classes, **kw)


def _equal(model, state: dict, strip: str = "") -> None:
    got = model.state_dict()
    for k, v in state.items():
        assert torch.equal(got[k[len(strip):]], v), k


# --------------------------------------------------------------------------------------------------
# model


def test_keys_are_the_official_finetuned_layout():
    assert {k: tuple(v.shape) for k, v in tiny().state_dict().items()} == finetuned_layout()
    with torch.device("meta"):
        base = create_classifier("umt_base_patch16", 400)
    assert {k: tuple(v.shape) for k, v in base.state_dict().items()} == finetuned_layout(768, 12, 400)


def test_forward_shapes_and_small_head():
    torch.manual_seed(0)
    model = tiny(7, pretrain_grid=(4, 2, 2)).eval()
    assert 1e-5 < model.head.weight.std() < 4e-5  # trunc-normal(0.02) x 0.001
    assert torch.all(model.head.bias == 0) and torch.all(model.fc_norm.weight == 1)
    x = torch.randn(2, 3, 4, 32, 32)
    assert model(x).shape == (2, 7) and model.forward_pooled(x).shape == (2, DIM)
    # Other frame counts and resolutions run through the adapted table.
    assert torch.isfinite(model(torch.randn(1, 3, 8, 48, 48))).all()


def test_pos_embed_equals_pretraining_table_on_the_pretraining_grid():
    assert torch.equal(pretrained_pos_embed(DIM, (4, 2, 2), (4, 2, 2)), sincos_1d(16, DIM))


def test_pos_embed_is_bicubic_in_space_then_linear_in_time():
    t0, h0, dim = 8, 2, DIM
    base = sincos_1d(t0 * h0 * h0, dim).view(t0, h0, h0, dim)
    table = pretrained_pos_embed(dim, (t0, h0, h0), (16, 3, 3)).view(16, 3, 3, dim)
    # spatial: each pretraining frame resized bicubically (align_corners=False) to 3x3
    spatial = F.interpolate(base.permute(0, 3, 1, 2), size=(3, 3), mode="bicubic", align_corners=False)
    spatial = spatial.permute(0, 2, 3, 1)  # [8, 3, 3, C]
    # temporal, by hand: output frame j samples source coordinate (j + 0.5) * 8 / 16 - 0.5, clamped at 0
    for j in (0, 1, 5, 15):
        src = max((j + 0.5) * t0 / 16 - 0.5, 0.0)
        lo = int(src)
        hi = min(lo + 1, t0 - 1)
        w = src - lo
        expected = (1 - w) * spatial[lo] + w * spatial[hi]
        assert torch.allclose(table[j], expected, atol=1e-6), j


# --------------------------------------------------------------------------------------------------
# loading official layouts


@pytest.mark.parametrize("wrapper", ["bare", "model"])
def test_loads_a_stage1_file_and_runs_at_16_frames(tmp_path, wrapper):
    state = random_state(stage1_layout())
    obj = state if wrapper == "bare" else {"model": state, "epoch": 200, "args": argparse.Namespace(lr=1.5e-4)}
    torch.save(obj, tmp_path / "b16_ptk710_f8_res224.pth")
    # pretrained on 8 frames at 32 px (2x2 patches); fine-tuned on 16 frames at 48 px (3x3)
    model = tiny(pretrain_grid=(8, 2, 2))
    head = model.head.weight.clone()
    report = load_classifier_weights(model, tmp_path / "b16_ptk710_f8_res224.pth")
    assert report.layout == "stage1" and report.loaded == len(block_keys("", DIM, DEPTH)) + 2
    assert report.fresh == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert "encoder.norm.weight" in report.ignored and "clip_decoder.1.head.weight" in report.ignored
    _equal(model, {k: v for k, v in state.items() if k.startswith("encoder.") and not k.startswith("encoder.norm.")},
           "encoder.")
    assert torch.equal(model.head.weight, head)
    out = model.eval()(torch.randn(1, 3, 16, 48, 48))
    assert out.shape == (1, 5) and torch.isfinite(out).all()
    assert torch.equal(model.pos_table((16, 3, 3), torch.device("cpu")), pretrained_pos_embed(DIM, (8, 2, 2), (16, 3, 3)))


def test_loads_the_vision_encoder_of_a_stage2_file():
    state = random_state(stage1_layout(), seed=1)
    stage2 = {f"vision_encoder.{k}": v for k, v in state.items()}
    stage2.update({"temp": torch.tensor(0.07), "vision_encoder.pool_norm.weight": torch.ones(DIM),
                   "vision_encoder.pool_norm.bias": torch.zeros(DIM), "clip_teacher.conv1.weight": torch.zeros(8, 3, 1, 16, 16),
                   "text_encoder.bert.embeddings.word_embeddings.weight": torch.zeros(10, 8),
                   "vision_proj.weight": torch.zeros(4, DIM), "itm_head.weight": torch.zeros(2, DIM)})
    model = tiny()
    report = load_classifier_weights(model, {"model": stage2, "global_step": 10})
    assert report.layout == "stage2"
    assert torch.equal(model.blocks[3].mlp.fc2.weight, state["encoder.blocks.3.mlp.fc2.weight"])


def test_loads_our_stage1_student_state():
    torch.manual_seed(4)
    student = create_student("umt_test_tiny")
    state = {k: v.clone() for k, v in student.state_dict().items()}
    model = tiny()
    load_classifier_weights(model, state)
    assert torch.equal(model.patch_embed.proj.weight, student.encoder.patch_embed.proj.weight)
    # (a real stage-1 checkpoint directory with safetensors is loaded in test_finetune)


def test_loads_a_deepspeed_finetuned_file_with_its_16_frame_pos_embed(tmp_path):
    state = random_state(finetuned_layout(classes=5), seed=2)
    # UMT stores pos_embed [1, N, C] for 16 frames: the 8-frame table interpolated in time
    state["pos_embed"] = pretrained_pos_embed(DIM, (8, 2, 2), (16, 2, 2))[None]
    torch.save({"module": state, "epoch": 4, "dp_world_size": 16}, tmp_path / "mp_rank_00_model_states.pt")
    model = tiny(5, pretrain_grid=(8, 2, 2))
    report = load_classifier_weights(model, tmp_path / "mp_rank_00_model_states.pt", grid=(16, 2, 2))
    assert report.layout == "finetuned" and report.fresh == [] and report.ignored == ["pos_embed"]
    _equal(model, {k: v for k, v in state.items() if k != "pos_embed"})
    # A stored table that is not the regenerated one is refused.
    state["pos_embed"] = state["pos_embed"] + 0.01
    with pytest.raises(CheckpointError, match="pos_embed differs"):
        load_classifier_weights(tiny(5, pretrain_grid=(8, 2, 2)), {"module": state}, grid=(16, 2, 2))


def test_k710_head_is_sliced_to_k400_when_asked():
    state = random_state(finetuned_layout(classes=7), seed=3)  # "710" classes, first "400" = 4
    with pytest.raises(CheckpointError, match="finetune.head_slice=4"):
        load_classifier_weights(tiny(4), state)
    model = tiny(4)
    report = load_classifier_weights(model, state, head_slice=4)
    assert report.head_rows == 7
    assert torch.equal(model.head.weight, state["head.weight"][:4]) and torch.equal(model.head.bias, state["head.bias"][:4])
    with pytest.raises(CheckpointError, match="must equal finetune.num_classes"):
        load_classifier_weights(tiny(4), state, head_slice=3)
    with pytest.raises(CheckpointError, match="no classification head"):
        load_classifier_weights(tiny(4), random_state(stage1_layout()), head_slice=4)


def test_drop_head_keeps_fc_norm_and_reinitialises_the_head():
    state = random_state(finetuned_layout(classes=9), seed=5)
    model = tiny(3)
    report = load_classifier_weights(model, state, drop_head=True)
    assert report.fresh == ["head.bias", "head.weight"] and "head.weight" in report.ignored
    assert torch.equal(model.fc_norm.weight, state["fc_norm.weight"])


def test_missing_unexpected_and_misshaped_keys_are_listed():
    state = random_state(stage1_layout())
    del state["encoder.blocks.2.attn.q_bias"]
    state["encoder.blocks.0.attn.qkv.bias"] = torch.zeros(3 * DIM)  # a fused-bias ViT, not UMT
    with pytest.raises(CheckpointMismatchError) as info:
        load_classifier_weights(tiny(), state)
    assert info.value.missing == ["blocks.2.attn.q_bias"] and info.value.unexpected == ["blocks.0.attn.qkv.bias"]
    wide = random_state(finetuned_layout(dim=32, classes=5))
    with pytest.raises(CheckpointMismatchError, match="shape mismatch"):
        load_classifier_weights(tiny(), wide)


def test_a_clip_teacher_file_is_named_as_such(tmp_path):
    clip = {"conv1.weight": torch.zeros(8, 3, 16, 16), "class_embedding": torch.zeros(8),
            "transformer.resblocks.0.attn.in_proj_weight": torch.zeros(24, 8), "proj": torch.zeros(8, 4)}
    torch.save(clip, tmp_path / "vit_b16.pth")
    with pytest.raises(CheckpointError, match="CLIP image tower.*image_teacher"):
        load_classifier_weights(tiny(), tmp_path / "vit_b16.pth")


def test_image_teacher_classifier_averages_frames():
    from umt_distill.teachers.clip import ClipTeacher

    teacher = ClipTeacher("umt-test-tiny", pretrained=None, layers=1, input_size=32, normalize="clip")
    model = ImageTeacherClassifier(teacher.visual, teacher.embed_dim, 3, teacher.mean, teacher.std,
                                   (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).eval()
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "visual.positional_embedding")
    x = torch.randn(2, 3, 4, 32, 32)
    same = x[:, :, :1].expand(-1, -1, 4, -1, -1)
    with torch.no_grad():
        assert model(x).shape == (2, 3)
        # a clip of one repeated frame gives that frame's embedding
        assert torch.allclose(model.forward_pooled(same), model.forward_pooled(x[:, :, :1]), atol=1e-5)


def test_loads_our_stage2_model_state():
    """Contract with stage 2: its model's state dict (vision_encoder.encoder.*) initialises the classifier."""
    from umt_distill.config import load_recipe
    from umt_distill.stages.stage2 import build_model

    cfg = load_recipe("stage2/tiny")
    torch.manual_seed(0)
    state = build_model(cfg, 32, 100).state_dict()
    model = create_classifier(cfg.student.name, 3)
    report = load_classifier_weights(model, state)
    assert report.layout == "stage2" and "clip_decoder.0.head.weight" in report.ignored
    assert torch.equal(model.blocks[1].attn.qkv.weight, state["vision_encoder.encoder.blocks.1.attn.qkv.weight"])
