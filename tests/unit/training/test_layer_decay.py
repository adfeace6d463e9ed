"""Layer-wise LR decay: exact scale per block in the AdamW groups (UMT code: LayerDecayValueAssigner in
single_modality/optim_factory.py @4fb4049)."""

from __future__ import annotations

import pytest

from umt_distill.models.classifier import create_classifier
from umt_distill.training.layer_decay import layer_decay_lr_scale, layer_id, layer_scales
from umt_distill.training.optim import build_adamw, param_groups, set_lr


def _scale_of(groups: list[dict]) -> dict[str, float]:
    return {name: g["lr_scale"] for g in groups for name in g["names"]}


def test_groups_of_a_tiny_model_have_the_exact_scale_per_block():
    model = create_classifier("umt_test_tiny", 3)  # depth L = 4
    ld = 0.5
    groups = param_groups(model, 0.05, skip=model.no_weight_decay(), lr_scale=layer_decay_lr_scale(ld, model.depth))
    scale = _scale_of(groups)
    assert set(scale) == {n for n, _ in model.named_parameters()}
    # stem ld^(L+1), block i ld^(L-i), after the blocks 1: written out for L = 4
    expected_by_prefix = {"patch_embed.": 0.5**5, "blocks.0.": 0.5**4, "blocks.1.": 0.5**3, "blocks.2.": 0.5**2,
                          "blocks.3.": 0.5**1, "fc_norm.": 1.0, "head.": 1.0}
    for name, s in scale.items():
        prefix = next(p for p in expected_by_prefix if name.startswith(p))
        assert s == expected_by_prefix[prefix], name
    # groups split by (decay, scale): 6 distinct scales x {decay, no decay}
    assert len(groups) == 12
    for g in groups:
        assert g["weight_decay"] == (0.0 if all(p.ndim <= 1 for p in g["params"]) else 0.05)
    assert scale["blocks.2.attn.q_bias"] == 0.25 and scale["blocks.2.attn.qkv.weight"] == 0.25


def test_optimizer_lr_follows_the_scale():
    model = create_classifier("umt_test_tiny", 3)
    opt = build_adamw(model, 1e-3, 0.05, (0.9, 0.999), 1e-8, skip=model.no_weight_decay(),
                      lr_scale=layer_decay_lr_scale(0.75, model.depth))
    set_lr(opt, 2e-3)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(2e-3 * g["lr_scale"])
    head = next(g for g in opt.param_groups if "head.weight" in g["names"])
    stem = next(g for g in opt.param_groups if "patch_embed.proj.weight" in g["names"])
    assert head["lr"] == pytest.approx(2e-3) and stem["lr"] == pytest.approx(2e-3 * 0.75**5)
    assert head["betas"] == (0.9, 0.999)


def test_umt_b16_values():
    scales = layer_scales(0.75, 12)
    assert len(scales) == 14 and scales[-1] == 1.0 and scales[0] == pytest.approx(0.75**13)
    assert layer_id("blocks.11.mlp.fc1.weight", 12) == 12 and layer_id("pos_embed", 12) == 0
    assert layer_id("module.blocks.0.norm1.weight", 12) == 1 and layer_id("cls_token", 12) == 0


def test_open_clip_tower_names():
    assert layer_id("visual.conv1.weight", 4) == 0
    assert layer_id("visual.positional_embedding", 4) == 0 and layer_id("visual.ln_pre.weight", 4) == 0
    assert layer_id("visual.transformer.resblocks.2.attn.in_proj_weight", 4) == 3
    assert layer_id("visual.ln_post.weight", 4) == 5 and layer_id("visual.proj", 4) == 5


def test_bad_values_fail():
    with pytest.raises(ValueError, match="layer decay"):
        layer_scales(1.5, 4)
    with pytest.raises(ValueError, match="block 7"):
        layer_id("blocks.7.norm1.weight", 4)


def test_frozen_parameters_are_not_grouped():
    model = create_classifier("umt_test_tiny", 3)
    model.patch_embed.requires_grad_(False)
    names = {n for g in param_groups(model, 0.05, lr_scale=layer_decay_lr_scale(0.75, 4)) for n in g["names"]}
    assert not any(n.startswith("patch_embed.") for n in names)
