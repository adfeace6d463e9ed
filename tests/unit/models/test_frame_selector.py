"""The learned frame selector (models/frame_selector.py): the straight-through perturbed top-k keeps exactly
the hard top k, its gradient is the perturbed-optimizer estimate (checked against a plain loop), and a
selector trained only through it learns to keep the frames a caption names."""

from __future__ import annotations

import pytest
import torch

from umt_distill.data.frame_select import restrict_to_frames
from umt_distill.models.frame_selector import (
    FrameSelector,
    perturbed_topk,
    sparse_forward_kept,
    topk_indicator,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_gate_is_exactly_the_hard_top_k() -> None:
    scores = torch.randn(5, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    frames, gate = perturbed_topk(scores, 3, 0.1, 16, torch.Generator().manual_seed(1))
    assert torch.equal(gate.detach(), topk_indicator(scores.detach(), 3))
    assert torch.equal(frames, scores.detach().topk(3, dim=1).indices.sort(dim=1).values)
    x = torch.randn(5, 8)
    assert torch.equal((x * gate).detach(), x * topk_indicator(scores.detach(), 3))  # forward value untouched


def test_gradient_equals_the_perturbed_estimate_by_hand() -> None:
    B, T, k, sigma, S = 2, 5, 2, 0.5, 7
    scores = torch.randn(B, T, generator=torch.Generator().manual_seed(3), requires_grad=True)
    weights = torch.randn(B, T, generator=torch.Generator().manual_seed(4))
    _, gate = perturbed_topk(scores, k, sigma, S, torch.Generator().manual_seed(5))
    (gate * weights).sum().backward()
    noise = torch.randn(S, B, T, generator=torch.Generator().manual_seed(5))  # the same draws
    want = torch.zeros(B, T)
    for s in range(S):
        for b in range(B):
            chosen = sorted(range(T), key=lambda t: -(float(scores.detach()[b, t]) + sigma * float(noise[s, b, t])))[:k]
            value = sum(float(weights[b, t]) for t in chosen)  # <upstream grad, Y(s + sigma Z)>
            want[b] += value * noise[s, b] / sigma / S
    torch.testing.assert_close(scores.grad, want, rtol=1e-5, atol=1e-6)


def test_a_selector_trained_through_the_top_k_learns_the_captioned_frames() -> None:
    """Frames show one of 4 objects (one-hot features); the caption names one; the only signal is a loss
    that rewards keeping frames of the named object, reached through the gate."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    B, T, k, objects = 32, 8, 2, 4
    selector = FrameSelector(objects, objects, hidden=16)
    opt = torch.optim.Adam(selector.parameters(), lr=5e-2)

    def batch():
        shown = torch.randint(objects, (B, T), generator=gen)
        named = torch.randint(objects, (B,), generator=gen)
        shown[:, :2] = named[:, None]  # at least 2 frames show the named object
        shown = shown[:, torch.randperm(T, generator=gen)]
        return torch.eye(objects)[shown], torch.eye(objects)[named], (shown == named[:, None]).float()

    def precision() -> float:
        feats, text, relevant = batch()
        with torch.no_grad():
            kept = topk_indicator(selector(feats, text), k)
        return float((kept * relevant).sum() / kept.sum())

    before = precision()
    for _ in range(60):
        feats, text, relevant = batch()
        _, gate = perturbed_topk(selector(feats, text), k, 0.5, 16, gen)
        loss = -(gate * relevant).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = precision()
    assert after > 0.9 and after > before + 0.3, (before, after)


@pytest.mark.parametrize("source, fuse", [("teacher", False), ("student", True)])
def test_the_sparse_pass_over_kept_frames_equals_the_plain_sparse_pass(source: str, fuse: bool) -> None:
    """With every frame kept, sparse_forward_kept (frame selection + token sparsification) is exactly
    models.sparse_vl's pass; with 2 of 4 frames it runs on those frames' tokens only."""
    from umt_distill.models.sparse_vl import sparse_vision_forward
    from umt_distill.models.sparsify import SparseSpec
    from umt_distill.models.umt_vl import VisionEncoder
    from umt_distill.models.vit import umt_test_tiny
    from umt_distill.registry import MASKS, load_all_parts

    load_all_parts()
    torch.manual_seed(0)
    enc = VisionEncoder(umt_test_tiny(teacher_dim=32, num_align_layers=2)).eval()
    spec = SparseSpec(keep=0.5, after_block=1, source=source, fuse=fuse)
    gen = torch.Generator().manual_seed(0)
    B, T, N = 2, 4, 16
    x = torch.randn(B, 3, T, 64, 64, generator=gen)
    attn = torch.rand(B, T, N, generator=gen)
    visible = MASKS.get("semantic")(B, T, N, 0.5, gen, attn=attn)  # [B, T * 8]
    scores = None if source == "student" else attn.flatten(1).gather(1, visible).view(B, T, -1)
    with torch.no_grad():
        want, kept_want = sparse_vision_forward(enc, x, visible, spec, scores, True)
        got, kept_got = sparse_forward_kept(enc, x, visible, spec, scores, True, T)
    assert torch.equal(kept_got, kept_want)
    for a, b in ((got.aligned, want.aligned), (got.tokens, want.tokens), (got.pooled, want.pooled)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    frames = torch.tensor([[0, 3], [1, 2]])
    vis, _ = restrict_to_frames(frames, visible, None, N)
    sub = None if scores is None else scores.gather(1, frames[:, :, None].expand(-1, -1, scores.shape[2]))
    with torch.no_grad():
        half, kept = sparse_forward_kept(enc, x, vis, spec, sub, True, 2)
    assert kept.shape == (B, 2 * 4) and half.aligned.shape[2] == 2 * 4  # half of each kept frame's 8 tokens
