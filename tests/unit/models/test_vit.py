"""The UMT student ViT: registered sizes, shapes, gradients, PE values, masking-aware forward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from umt_distill.models.vit import (
    UMTStudent,
    count_parameters,
    create_student,
    resolve_block_indices,
    sincos_1d,
)
from umt_distill.registry import STUDENTS

# Tiny input: 4 frames of 64×64 → 4 × 16 = 64 tokens for patch 16.
T, H, W = 4, 64, 64
N = (H // 16) * (W // 16)


def _tiny(**kw) -> UMTStudent:
    torch.manual_seed(0)
    return create_student("umt_test_tiny", **kw)


def _video(batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, T, H, W, generator=g)


def _visible(batch: int, keep: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(T * N, generator=g)[:keep].sort().values for _ in range(batch)])


# --------------------------------------------------------------------------------------------------
# registered sizes (built on the meta device: no memory, no init cost)

SIZES = {  # name: (dim, depth, heads, teacher_dim, K)
    "umt_test_tiny": (64, 4, 4, 32, 2),
    "umt_small_patch16": (384, 12, 6, 512, 6),
    "umt_base_patch16": (768, 12, 12, 512, 6),
    "umt_large_patch16": (1024, 24, 16, 768, 6),
}


def test_registry_lists_all_sizes():
    assert set(SIZES) <= set(STUDENTS.names())


@pytest.mark.parametrize("name", sorted(SIZES))
def test_registered_size_structure(name):
    dim, depth, heads, teacher_dim, k = SIZES[name]
    with torch.device("meta"):
        model = create_student(name)
    enc = model.encoder
    assert enc.embed_dim == dim and len(enc.blocks) == depth
    assert enc.blocks[0].attn.num_heads == heads
    assert enc.patch_embed.proj.weight.shape == (dim, 3, 1, 16, 16)
    assert model.return_index == list(range(depth - k, depth))
    assert model.clip_decoder[0].head.weight.shape == (teacher_dim, dim)
    # Encoder parameters from the ViT formula: patch embed + depth × block + final norm.
    block = 3 * dim * dim + 2 * dim + dim * dim + dim + 2 * 4 * dim * dim + 4 * dim + dim + 4 * dim
    expected = dim * 3 * 16 * 16 + dim + depth * block + 2 * dim
    assert count_parameters(enc) == expected


def test_base_and_large_parameter_counts():
    with torch.device("meta"):
        base = create_student("umt_base_patch16")
        large = create_student("umt_large_patch16")
    assert 85e6 < count_parameters(base.encoder) < 87e6  # ViT-B ≈ 86 M
    assert round(count_parameters(base) / 1e6, 1) == 88.0  # UMT's pretrain_umt_base_patch16_224 + 6 heads
    assert len(base.state_dict()) == 184
    assert 300e6 < count_parameters(large.encoder) < 306e6  # ViT-L ≈ 303 M


def test_overrides_and_unknown_options():
    model = _tiny(teacher_dim=48, num_align_layers=3, drop_path_rate=0.2)
    assert model.return_index == [1, 2, 3] and model.clip_decoder[0].head.out_features == 48
    assert create_student("umt_test_tiny", num_align_layers=2, align_interval=2).return_index == [1, 3]
    with pytest.raises(TypeError, match="techer_dim"):
        create_student("umt_test_tiny", techer_dim=3)
    with pytest.raises(ValueError, match="cannot align"):
        create_student("umt_test_tiny", num_align_layers=3, align_interval=2)


# --------------------------------------------------------------------------------------------------
# position embedding


def test_sincos_matches_formula():
    dim = 64
    table = sincos_1d(1568, dim)
    assert table.shape == (1568, dim) and table.dtype == torch.float32
    for n in (0, 1, 195, 196, 1567):
        for i in (0, 1, 7, 31):
            angle = n / 10000 ** (2 * i / dim)
            assert table[n, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[n, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_pos_embed_is_not_state():
    model = _tiny()
    assert not any("pos" in k for k in model.state_dict())
    assert not list(model.buffers())
    model(_video(1))  # fills the cache; still not state
    assert not any("pos" in k for k in model.state_dict())
    table = model.encoder.pos_embed(T * N, torch.device("cpu"))
    assert torch.equal(table, sincos_1d(T * N, 64))


def test_pos_embed_is_added_at_the_flattened_index():
    # With all block weights zero each block is the identity, so forward_intermediates(norm=False)
    # of block 0 returns patch embedding + PE: the PE must follow the flattened (t, h, w) index.
    model = _tiny()
    x = _video(1)
    with torch.no_grad():
        for p in model.encoder.blocks.parameters():
            p.zero_()
        out = model.forward_intermediates(x, [0])[0]  # [1, T·N, C]
        patches = model.encoder.patch_embed(x)
    assert torch.allclose(out - patches, sincos_1d(T * N, 64)[None], atol=1e-5)


# --------------------------------------------------------------------------------------------------
# forward


def test_tiny_forward_shapes_and_norms():
    model = _tiny()
    x, vis = _video(), _visible(2, 20)
    out = model.forward_align(x, vis)
    assert out.shape == (2, 2, 20, 32)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.norm(dim=-1), torch.ones(2, 2, 20), atol=1e-5)
    assert torch.equal(out, model(x, vis))
    assert model.forward_features(x, vis).shape == (2, 20, 64)
    assert model.forward_features(x).shape == (2, T * N, 64)


def test_small_forward_at_tiny_input():
    torch.manual_seed(0)
    model = create_student("umt_small_patch16", drop_path_rate=0.0).eval()
    x = torch.randn(1, 3, 2, 32, 32)
    with torch.no_grad():
        out = model.forward_align(x, torch.tensor([[0, 3, 5]]))
    assert out.shape == (6, 1, 3, 512) and torch.isfinite(out).all()


def test_all_visible_equals_no_mask():
    model = _tiny().eval()
    x = _video()
    everything = torch.arange(T * N).expand(2, -1)
    assert torch.allclose(model.forward_align(x, None), model.forward_align(x, everything), atol=1e-6)
    assert torch.allclose(model.forward_features(x), model.forward_features(x, everything), atol=1e-6)


def test_output_depends_only_on_visible_patches():
    # Attention runs over the visible tokens only: pixels of masked patches cannot matter.
    model = _tiny().eval()
    x = _video(1)
    vis = torch.tensor([[0, 2, 17, 40, 63]])
    changed = x.clone()
    changed[:, :, 0, 16:32, :] += 5.0  # frame 0, patch row 1 = tokens 4..7, none visible
    assert torch.allclose(model(x, vis), model(changed, vis), atol=1e-6)
    changed[:, :, 0, 0:16, 0:16] += 5.0  # token 0 is visible
    assert not torch.allclose(model(x, vis), model(changed, vis), atol=1e-3)


def test_forward_align_matches_its_definition():
    model = _tiny(num_align_layers=3).eval()
    x, vis = _video(), _visible(2, 10)
    feats = model.forward_intermediates(x, model.return_index, vis, norm=True)
    pos = sincos_1d(T * N, 64)[vis]  # [B, L_vis, C]
    expected = torch.stack(
        [F.normalize(head.norm(head.head(f + pos)), dim=-1) for head, f in zip(model.clip_decoder, feats)]
    )
    assert torch.allclose(model.forward_align(x, vis), expected, atol=1e-6)


def test_forward_intermediates_indices():
    model = _tiny().eval()
    x = _video(1)
    all_blocks = model.forward_intermediates(x)
    assert len(all_blocks) == 4 and all(t.shape == (1, T * N, 64) for t in all_blocks)
    last_two = model.forward_intermediates(x, 2)
    assert torch.equal(last_two[0], all_blocks[2]) and torch.equal(last_two[1], all_blocks[3])
    picked = model.forward_intermediates(x, [-1, 0], norm=True)
    assert torch.allclose(picked[1], model.forward_features(x), atol=1e-6)
    assert torch.allclose(picked[0], model.encoder.norm(all_blocks[0]), atol=1e-6)
    assert resolve_block_indices(12, 6) == [6, 7, 8, 9, 10, 11]
    with pytest.raises(ValueError):
        model.forward_intermediates(x, [4])
    with pytest.raises(ValueError):
        model.forward_intermediates(x, 2, output_fmt="NCHW")


def test_bad_inputs_fail_loudly():
    model = _tiny()
    with pytest.raises(ValueError, match="not divisible"):
        model(torch.randn(1, 3, 2, 40, 32))
    with pytest.raises(ValueError, match="B, 3, T, H, W"):
        model(torch.randn(3, 2, 32, 32))
    with pytest.raises(ValueError, match="visible_idx"):
        model(_video(2), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="visible_idx"):
        model(_video(1), torch.zeros(1, 4, dtype=torch.int32))


# --------------------------------------------------------------------------------------------------
# training paths


def test_every_parameter_gets_a_gradient():
    model = _tiny(drop_path_rate=0.0).train()
    out = model(_video(), _visible(2, 24))
    (out * torch.randn_like(out)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_drop_path_rates_and_randomness():
    model = _tiny(drop_path_rate=0.3)
    rates = [blk.drop_path.p for blk in model.encoder.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    x, vis = _video(8), _visible(8, 16)
    model.train()
    torch.manual_seed(3)
    a = model(x, vis)
    b = model(x, vis)
    assert not torch.allclose(a, b)  # some residual branches dropped differently
    model.eval()
    assert torch.equal(model(x, vis), model(x, vis))


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.3])
def test_activation_checkpointing_matches_plain(drop_path_rate):
    plain = _tiny(drop_path_rate=drop_path_rate).train()
    ckpt = _tiny(drop_path_rate=drop_path_rate, use_checkpoint=True, checkpoint_num=3).train()
    assert ckpt.encoder.checkpoint_num == 3
    assert _tiny(use_checkpoint=True).encoder.checkpoint_num == 4  # 0 → all blocks
    ckpt.load_state_dict(plain.state_dict())
    x, vis = _video(), _visible(2, 24)
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(7)  # recomputation replays the global RNG, so drop-path masks agree
        model(x, vis).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-5), name


def test_no_weight_decay_names():
    model = _tiny()
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert {"encoder.blocks.0.attn.q_bias", "encoder.norm.weight", "clip_decoder.1.head.bias"} <= names
    assert "encoder.blocks.0.attn.qkv.weight" not in names and "clip_decoder.0.head.weight" not in names
    assert names <= set(params)


def test_init_follows_umt():
    model = _tiny()
    blk = model.encoder.blocks[0]
    assert torch.all(blk.attn.q_bias == 0) and torch.all(blk.mlp.fc1.bias == 0)
    assert torch.all(blk.norm1.weight == 1) and torch.all(model.clip_decoder[0].norm.bias == 0)
    bound = math.sqrt(6 / (64 + 256))  # xavier-uniform bound of fc1 [256, 64]
    assert blk.mlp.fc1.weight.abs().max() <= bound
    assert blk.mlp.fc1.weight.abs().max() > 0.9 * bound


def test_model_file_does_not_import_distributed():
    import umt_distill.models.vit as vit

    source = open(vit.__file__).read()
    assert "torch.distributed" not in source.replace("must not import ``torch.distributed``", "")
