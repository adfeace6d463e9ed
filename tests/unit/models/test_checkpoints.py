"""Official UMT checkpoint layouts load strictly; wrong files fail and name the keys.

The expected key layout is written out here from the official code (UMT code @4fb4049: stage 1 =
single_modality/models/modeling_pretrain_umt.py, stage 2 = multi_modality/models/umt.py), independently of the
model code, so a renamed parameter in the model breaks these tests.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from umt_distill.models.checkpoints import (
    CheckpointError,
    CheckpointMismatchError,
    load_umt_checkpoint,
    save_student,
)
from umt_distill.models.vit import create_student

# umt_test_tiny: dim 64, 4 blocks, patch 16, tubelet 1, K = 2 heads onto a 32-d teacher.
TINY = dict(dim=64, depth=4, teacher_dim=32, heads=2, patch=16)


def umt_stage1_layout(dim: int, depth: int, teacher_dim: int, heads: int, patch: int) -> dict[str, tuple]:
    """Key → shape of a UMT stage-1 ``model`` dict (single_modality/models/modeling_pretrain_umt.py), mlp ratio 4,
    tubelet 1."""
    keys: dict[str, tuple] = {
        "encoder.patch_embed.proj.weight": (dim, 3, 1, patch, patch),
        "encoder.patch_embed.proj.bias": (dim,),
    }
    for i in range(depth):
        b = f"encoder.blocks.{i}."
        keys.update({
            b + "norm1.weight": (dim,),
            b + "norm1.bias": (dim,),
            b + "attn.q_bias": (dim,),
            b + "attn.v_bias": (dim,),
            b + "attn.qkv.weight": (3 * dim, dim),
            b + "attn.proj.weight": (dim, dim),
            b + "attn.proj.bias": (dim,),
            b + "norm2.weight": (dim,),
            b + "norm2.bias": (dim,),
            b + "mlp.fc1.weight": (4 * dim, dim),
            b + "mlp.fc1.bias": (4 * dim,),
            b + "mlp.fc2.weight": (dim, 4 * dim),
            b + "mlp.fc2.bias": (dim,),
        })
    keys["encoder.norm.weight"] = (dim,)
    keys["encoder.norm.bias"] = (dim,)
    for k in range(heads):
        keys.update({
            f"clip_decoder.{k}.head.weight": (teacher_dim, dim),
            f"clip_decoder.{k}.head.bias": (teacher_dim,),
            f"clip_decoder.{k}.norm.weight": (teacher_dim,),
            f"clip_decoder.{k}.norm.bias": (teacher_dim,),
        })
    return keys


def official_state(seed: int = 0, **layout) -> dict[str, torch.Tensor]:
    """Random tensors in UMT's exact stage-1 layout."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.02 for k, shape in umt_stage1_layout(**(layout or TINY)).items()}


def _tiny():
    return create_student("umt_test_tiny")


def _assert_loaded(model, state):
    got = model.state_dict()
    for k, v in state.items():
        assert torch.equal(got[k], v), k


# --------------------------------------------------------------------------------------------------
# the model's keys are UMT's keys


def test_tiny_model_has_umt_keys_and_shapes():
    ours = {k: tuple(v.shape) for k, v in _tiny().state_dict().items()}
    assert ours == umt_stage1_layout(**TINY)


def test_base_model_has_umt_keys_and_shapes():
    with torch.device("meta"):
        model = create_student("umt_base_patch16")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = umt_stage1_layout(dim=768, depth=12, teacher_dim=512, heads=6, patch=16)
    assert len(expected) == 184  # 184 tensors in UMT-B/16's stage-1 state dict
    assert ours == expected


# --------------------------------------------------------------------------------------------------
# loading


@pytest.mark.parametrize("wrapper", ["bare", "model", "module"])
def test_loads_official_layout_from_file(tmp_path, wrapper):
    state = official_state()
    if wrapper == "bare":
        obj = state
    elif wrapper == "model":  # SM save_model: {'model', 'optimizer', 'epoch', 'scaler', 'args'}
        obj = {"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 200,
               "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="pretrain_umt_base_patch16_224")}
    else:  # DeepSpeed
        obj = {"module": state, "epoch": 3}
    path = tmp_path / f"{wrapper}.pth"
    torch.save(obj, path)
    model = _tiny()
    report = load_umt_checkpoint(model, path)
    assert report.layout == "stage1" and report.loaded == len(state) and not report.missing
    _assert_loaded(model, state)
    out = model.eval()(torch.randn(1, 3, 2, 32, 32))
    assert torch.isfinite(out).all()


def test_loads_in_memory_and_ddp_prefixed():
    state = official_state(seed=1)
    model = _tiny()
    load_umt_checkpoint(model, {"model": {f"module.{k}": v for k, v in state.items()}})
    _assert_loaded(model, state)


def test_loads_vision_encoder_of_a_stage2_file():
    state = official_state(seed=2)
    stage2 = {f"vision_encoder.{k}": v for k, v in state.items()}
    stage2.update({
        "temp": torch.tensor(0.07),
        "vision_encoder.pool_norm.weight": torch.ones(64),
        "vision_encoder.pool_norm.bias": torch.zeros(64),
        "clip_teacher.conv1.weight": torch.zeros(8, 3, 1, 16, 16),
        "text_encoder.bert.embeddings.word_embeddings.weight": torch.zeros(10, 8),
        "vision_proj.weight": torch.zeros(4, 64),
    })
    model = _tiny()
    assert load_umt_checkpoint(model, {"model": stage2}).layout == "stage2"
    _assert_loaded(model, state)


def test_safetensors_round_trip(tmp_path):
    torch.manual_seed(3)
    src = _tiny().eval()
    path = save_student(src, tmp_path / "student.safetensors")
    dst = create_student("umt_test_tiny").eval()
    load_umt_checkpoint(dst, path)
    x = torch.randn(1, 3, 2, 32, 32)
    assert torch.equal(src(x), dst(x))


# --------------------------------------------------------------------------------------------------
# wrong files fail loudly


def test_missing_keys_are_listed(tmp_path):
    state = {k: v for k, v in official_state().items() if not k.startswith("encoder.blocks.3.")}
    del state["clip_decoder.1.norm.bias"]
    torch.save({"model": state}, tmp_path / "partial.pth")
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        load_umt_checkpoint(model, tmp_path / "partial.pth")
    err = info.value
    assert "partial.pth" in str(err) and "14 missing key(s)" in str(err)
    assert "encoder.blocks.3.attn.q_bias" in err.missing and "clip_decoder.1.norm.bias" in str(err)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing loaded
    # Non-strict loading is explicit and reports what it left out.
    report = load_umt_checkpoint(model, tmp_path / "partial.pth", strict=False)
    assert len(report.missing) == 14 and report.loaded == len(state)


def test_unexpected_keys_are_listed():
    state = official_state()
    state["encoder.blocks.0.attn.qkv.bias"] = torch.zeros(192)  # a fused-bias ViT, not UMT
    state["encoder.pos_embed"] = torch.zeros(1, 8, 64)
    with pytest.raises(CheckpointMismatchError, match="2 unexpected key") as info:
        load_umt_checkpoint(_tiny(), state)
    assert info.value.unexpected == ["encoder.blocks.0.attn.qkv.bias", "encoder.pos_embed"]


def test_shape_mismatch_is_listed_even_when_not_strict():
    state = official_state(dim=64, depth=4, teacher_dim=48, heads=2, patch=16)  # 48-d teacher heads
    for strict in (True, False):
        with pytest.raises(CheckpointMismatchError, match="shape mismatch") as info:
            load_umt_checkpoint(_tiny(), state, strict=strict)
        assert ("clip_decoder.0.head.weight", (48, 64), (32, 64)) in info.value.mismatched


def test_teacher_file_is_not_a_student(tmp_path):
    # A CLIP visual extraction (single_modality/models/extract_clip/extract.ipynb) has no encoder.* keys.
    clip = {"conv1.weight": torch.zeros(8, 3, 16, 16), "class_embedding": torch.zeros(8),
            "transformer.resblocks.0.attn.in_proj_weight": torch.zeros(24, 8), "proj": torch.zeros(8, 4)}
    torch.save(clip, tmp_path / "vit_b16.pth")
    with pytest.raises(CheckpointError, match="no UMT student keys.*conv1.weight"):
        load_umt_checkpoint(_tiny(), tmp_path / "vit_b16.pth")


def test_unreadable_and_unsafe_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_umt_checkpoint(_tiny(), tmp_path / "nope.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_umt_checkpoint(_tiny(), tmp_path / "garbage.pth")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_umt_checkpoint(_tiny(), tmp_path / "garbage.safetensors")
    # Arbitrary pickled objects are refused, not executed.
    torch.save({"model": official_state(), "hook": _Arbitrary()}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match="pickled.pth"):
        load_umt_checkpoint(_tiny(), tmp_path / "pickled.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="dict of tensors"):
        load_umt_checkpoint(_tiny(), tmp_path / "list.pth")


class _Arbitrary:
    pass
