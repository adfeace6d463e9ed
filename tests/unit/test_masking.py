"""Mask samplers: counts, order, determinism, semantic statistics, zero attention."""

from __future__ import annotations

import pytest
import torch

from umt_distill.masking import (
    flatten_frame_indices,
    gather_visible,
    gather_visible_reference,
    num_visible,
    sample_random_mask,
    sample_semantic_mask,
    split_frame_indices,
    visible_mask,
)
from umt_distill.models import vit
from umt_distill.registry import MASKS

MASK_NAMES = ["random", "tube", "semantic"]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _attn(batch: int, frames: int, patches: int, seed: int = 5) -> torch.Tensor:
    return torch.rand(batch, frames, patches, generator=_gen(seed)).softmax(-1)


def _draw(name, batch=3, frames=4, patches=16, ratio=0.75, seed=0, attn=None):
    if attn is None:
        attn = _attn(batch, frames, patches)
    return MASKS.get(name)(batch, frames, patches, ratio, _gen(seed), attn=attn)


def test_registered():
    assert set(MASK_NAMES) <= set(MASKS.names())


@pytest.mark.parametrize("name", MASK_NAMES)
def test_shape_sorted_unique_in_range(name):
    idx = _draw(name)
    expected = {"random": 64 - int(0.75 * 64), "tube": 4 * 4, "semantic": 4 * 4}[name]
    assert idx.dtype == torch.long and idx.shape == (3, expected)
    assert torch.all(idx[:, 1:] > idx[:, :-1])  # strictly increasing: sorted and unique
    assert idx.min() >= 0 and idx.max() < 64


@pytest.mark.parametrize("name", MASK_NAMES)
def test_deterministic_given_generator(name):
    assert torch.equal(_draw(name, seed=11), _draw(name, seed=11))
    assert not torch.equal(_draw(name, seed=11), _draw(name, seed=12))
    g = _gen(3)
    fn = MASKS.get(name)
    attn = _attn(3, 4, 16)
    first, second = fn(3, 4, 16, 0.75, g, attn=attn), fn(3, 4, 16, 0.75, g, attn=attn)
    assert not torch.equal(first, second)  # the generator advances


@pytest.mark.parametrize("name", MASK_NAMES)
def test_one_generator_per_sample_equals_drawing_each_sample_alone(name):
    """A list of generators (stage 1's per-sample masks) is one batched draw that gives each row exactly the
    mask its sample would get drawn alone from its generator (the plain reference: a loop of batches of one)."""
    fn, attn = MASKS.get(name), _attn(5, 4, 16)
    alone = torch.cat([fn(1, 4, 16, 0.75, _gen(100 + i), attn=attn[i : i + 1]) for i in range(5)])
    batched = fn(5, 4, 16, 0.75, [_gen(100 + i) for i in range(5)], attn=attn)
    assert torch.equal(batched, alone)
    with pytest.raises(ValueError, match="one per sample"):
        fn(5, 4, 16, 0.75, [_gen(i) for i in range(4)], attn=attn)


@pytest.mark.parametrize("name", ["tube", "semantic"])
def test_umt_default_forty_per_frame(name):
    # ratio 0.8, N 196: int(156.8) = 156 masked → 40 visible per frame, 320 for 8 frames
    # (UMT code: single_modality/engines/engine_for_pretraining_umt.py).
    assert num_visible(196, 0.8) == 40
    idx = _draw(name, batch=2, frames=8, patches=196, ratio=0.8, attn=_attn(2, 8, 196))
    assert idx.shape == (2, 320)
    per_frame = torch.stack([(idx // 196 == t).sum(1) for t in range(8)], 1)
    assert torch.all(per_frame == 40)


def test_random_count_over_the_clip_and_uniformity():
    idx = MASKS.get("random")(2, 8, 196, 0.8, _gen())
    assert idx.shape == (2, 1568 - int(0.8 * 1568))
    # Every token is kept with probability L_vis / (T·N): check the frequency on a small clip.
    draws = MASKS.get("random")(4000, 2, 4, 0.5, _gen())  # 4 of 8 tokens kept
    freq = visible_mask(draws, 8).float().mean(0)
    assert torch.allclose(freq, torch.full((8,), 0.5), atol=0.04)
    per_frame = (draws < 4).sum(1)
    assert per_frame.min() < per_frame.max()  # not constrained per frame


def test_tube_repeats_one_pattern():
    idx = _draw("tube", batch=5, frames=6, patches=25, ratio=0.6)
    frames = split_frame_indices(idx, 6, 25)  # [B, T, N_vis]
    assert frames.shape == (5, 6, 10)
    assert torch.all(frames == frames[:, :1])
    assert not torch.all(frames[0] == frames[1])  # independent per sample


def test_semantic_keeps_high_attention_tokens():
    # 99.9 % of the attention on 10 of 196 tokens, 40 drawn: those 10 are kept essentially always.
    B, T, N = 16, 4, 196
    attn = torch.full((B, T, N), 0.001 / (N - 10))
    hot = torch.randperm(N, generator=_gen(1))[:10]
    attn[..., hot] = 0.999 / 10
    idx = sample_semantic_mask(B, T, N, 0.8, _gen(), attn=attn)
    kept = split_frame_indices(idx, T, N)  # [B, T, 40]
    hot_kept = torch.isin(kept, hot).sum(-1)  # [B, T]
    assert torch.all(hot_kept == 10)
    # The other 30 picks are spread over the cold tokens, not a fixed set.
    cold_counts = visible_mask(idx.view(B * T, 40) % N, N).sum(0)
    cold_counts[hot] = 0
    assert (cold_counts > 0).sum() > 100


def test_semantic_single_draw_is_categorical():
    # One visible token per frame: the kept index follows attn exactly (Gumbel-max).
    p = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0, 0.0, 0.0])
    n = 20000
    attn = p.expand(n, 1, 8).contiguous()
    idx = sample_semantic_mask(n, 1, 8, 0.875, _gen(), attn=attn)  # 8 − int(7.0) = 1 visible
    freq = torch.bincount(idx[:, 0], minlength=8).float() / n
    assert torch.allclose(freq, p, atol=0.012)


def test_semantic_inclusion_probabilities_without_replacement():
    # Two draws out of four: P(i kept) = p_i + Σ_{j≠i} p_j · p_i / (1 − p_j) (sequential sampling).
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    exact = torch.stack([p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(4) if j != i) for i in range(4)])
    n = 20000
    idx = sample_semantic_mask(n, 1, 4, 0.5, _gen(2), attn=p.expand(n, 1, 4).contiguous())
    freq = visible_mask(idx, 4).float().mean(0)
    assert torch.allclose(freq, exact, atol=0.015)


def test_semantic_zero_attention():
    B, T, N = 400, 2, 8
    attn = torch.zeros(B, T, N)
    attn[:, 0, [1, 4, 6]] = torch.tensor([0.5, 0.3, 0.2])  # frame 0: 3 positive, 5 needed
    attn[:, 1, :6] = 1.0  # frame 1: 6 positive ≥ 5 needed → zeros never drawn
    idx = sample_semantic_mask(B, T, N, 0.4, _gen(), attn=attn)  # 8 − int(3.2) = 5 per frame
    frames = split_frame_indices(idx, T, N)  # [B, 2, 5]
    f0 = visible_mask(frames[:, 0], N)
    assert torch.all(f0[:, [1, 4, 6]])  # every positive token kept
    filler = f0[:, [0, 2, 3, 5, 7]].float().mean(0)  # 2 of the 5 zero tokens, uniformly
    assert torch.allclose(filler, torch.full((5,), 0.4), atol=0.08)
    assert torch.all(frames[:, 1] < 6)
    # All-zero attention: uniform, no crash.
    flat = sample_semantic_mask(300, 1, N, 0.5, _gen(), attn=torch.zeros(300, 1, N))
    freq = visible_mask(flat, N).float().mean(0)
    assert torch.allclose(freq, torch.full((N,), 0.5), atol=0.1)
    # Extreme dynamic range (subnormal next to 1) still ranks positives before zeros.
    tiny = torch.zeros(1, 1, N)
    tiny[0, 0, :2] = torch.tensor([1.0, 1e-44])
    assert set(sample_semantic_mask(1, 1, N, 0.75, _gen(), attn=tiny).tolist()[0]) == {0, 1}


def test_semantic_rejects_bad_attention():
    with pytest.raises(ValueError, match="needs the teacher attention"):
        sample_semantic_mask(2, 2, 4, 0.5, _gen())
    with pytest.raises(ValueError, match="shape"):
        sample_semantic_mask(2, 2, 4, 0.5, _gen(), attn=torch.rand(2, 4, 2))
    bad = torch.rand(2, 2, 4)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        sample_semantic_mask(2, 2, 4, 0.5, _gen(), attn=bad)
    with pytest.raises(ValueError, match="non-negative"):
        sample_semantic_mask(2, 2, 4, 0.5, _gen(), attn=-torch.rand(2, 2, 4))


@pytest.mark.parametrize("name", MASK_NAMES)
def test_invalid_ratio(name):
    with pytest.raises(ValueError, match="ratio"):
        _draw(name, ratio=1.0)
    with pytest.raises(ValueError, match="ratio"):
        _draw(name, ratio=-0.1)


@pytest.mark.parametrize("name", MASK_NAMES)
def test_ratio_zero_keeps_everything(name):
    assert torch.equal(_draw(name, ratio=0.0), torch.arange(64).expand(3, -1))


@pytest.mark.parametrize("name", MASK_NAMES)
def test_device_argument(name):
    idx = MASKS.get(name)(2, 2, 4, 0.5, _gen(), attn=_attn(2, 2, 4), device="meta")
    assert idx.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_semantic_on_cuda_matches_cpu():
    attn = _attn(2, 4, 16)
    cpu = sample_semantic_mask(2, 4, 16, 0.75, _gen(), attn=attn)
    gpu = sample_semantic_mask(2, 4, 16, 0.75, _gen(), attn=attn.cuda())
    assert gpu.device.type == "cuda" and torch.equal(cpu, gpu.cpu())


def test_visible_mask_and_frame_index_helpers():
    idx = torch.tensor([[0, 3, 5, 6], [1, 2, 4, 7]])
    m = visible_mask(idx, 8)
    assert m.dtype == torch.bool and m.sum().item() == 8
    assert m[0].tolist() == [True, False, False, True, False, True, True, False]
    frames = split_frame_indices(idx, 2, 4)
    assert frames.tolist() == [[[0, 3], [1, 2]], [[1, 2], [0, 3]]]
    assert torch.equal(flatten_frame_indices(frames, 4), idx)
    assert flatten_frame_indices(frames.to(torch.int16), 4).dtype == torch.long
    with pytest.raises(ValueError, match="same number"):
        split_frame_indices(torch.tensor([[0, 1, 2, 5]]), 2, 4)


@pytest.mark.parametrize("shape, token_dim", [((3, 2, 12, 5), None), ((2, 12, 5), None), ((2, 12, 3, 4), 1),
                                              ((4, 2, 12), 2)])
def test_gather_visible_equals_the_plain_reference(shape, token_dim) -> None:
    g = torch.Generator().manual_seed(0)
    targets = torch.randn(shape, generator=g)
    batch = shape[(token_dim or (2 if len(shape) == 4 else 1)) - 1]
    visible_idx = sample_random_mask(batch, 3, 4, 0.5, g)  # [B, 6] of 12 tokens
    assert torch.equal(gather_visible(targets, visible_idx, token_dim),
                       gather_visible_reference(targets, visible_idx, token_dim))


def test_the_models_gather_tokens_with_the_same_function() -> None:
    from umt_distill.models import classifier, videomae

    assert vit.gather_visible is classifier.gather_visible is videomae.gather_visible is gather_visible
