"""UTA loss (fast vs reference), gather of visible targets, and one training step per mask type."""

from __future__ import annotations

import pytest
import torch

from umt_distill.losses.uta import uta_loss, uta_loss_reference
from umt_distill.masking import gather_visible, visible_mask
from umt_distill.models.vit import create_student
from umt_distill.registry import MASKS


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_matches_reference_loop():
    student, teacher = _randn(3, 2, 7, 16, seed=1), _randn(3, 2, 7, 16, seed=2) * 5
    loss, per_layer = uta_loss(student, teacher)
    ref_loss, ref_per_layer = uta_loss_reference(student, teacher)
    assert per_layer.shape == (3,)
    assert abs(loss.item() - ref_loss.item()) <= 1e-6
    assert torch.allclose(per_layer, ref_per_layer, atol=1e-6, rtol=0)


def test_known_values_and_scale_invariance():
    x = _randn(2, 3, 5, 8)
    assert uta_loss(x, x)[0].item() == pytest.approx(0.0, abs=1e-6)
    assert uta_loss(x, -x)[0].item() == pytest.approx(4.0, abs=1e-6)
    y = _randn(2, 3, 5, 8, seed=4)
    assert uta_loss(x * 3.0, y * 0.01)[0].item() == pytest.approx(uta_loss(x, y)[0].item(), abs=1e-6)
    # Layers are averaged, not summed.
    per_layer = uta_loss(torch.stack([x[0], x[0]]), torch.stack([x[0], -x[0]]))[1]
    assert per_layer.tolist() == pytest.approx([0.0, 4.0], abs=1e-6)
    assert uta_loss(torch.stack([x[0], x[0]]), torch.stack([x[0], -x[0]]))[0].item() == pytest.approx(2.0)


def test_low_precision_inputs_give_float32_loss():
    s, t = _randn(2, 2, 4, 8), _randn(2, 2, 4, 8, seed=3)
    loss, per_layer = uta_loss(s.bfloat16(), t.half())
    assert loss.dtype == torch.float32 and per_layer.dtype == torch.float32
    assert loss.item() == pytest.approx(uta_loss(s, t)[0].item(), abs=2e-2)


def test_gradient_reaches_student_only():
    s = _randn(2, 2, 4, 8).requires_grad_()
    t = _randn(2, 2, 4, 8, seed=1).requires_grad_()
    uta_loss(s, t)[0].backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert t.grad is None


def test_shape_mismatch_fails():
    with pytest.raises(ValueError, match="matching"):
        uta_loss(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="matching"):
        uta_loss(torch.zeros(1, 3, 4), torch.zeros(1, 3, 4))


def test_gather_visible_layouts():
    K, B, TN, D = 3, 2, 10, 4
    targets = _randn(K, B, TN, D)
    vis = torch.tensor([[0, 2, 9], [1, 5, 6]])
    out = gather_visible(targets, vis)
    assert out.shape == (K, B, 3, D)
    for k in range(K):
        for b in range(B):
            assert torch.equal(out[k, b], targets[k, b, vis[b]])
    attn = _randn(B, TN)
    assert torch.equal(gather_visible(attn, vis), torch.stack([attn[b, vis[b]] for b in range(B)]))
    per_token = _randn(B, TN, D)
    assert torch.equal(gather_visible(per_token, vis)[1], per_token[1, vis[1]])
    # An explicit token dim: [B, T·N, D] read as token_dim=1 even though it is 3-D.
    assert torch.equal(gather_visible(per_token, vis, token_dim=1), gather_visible(per_token, vis))
    # The batch must sit just before the token dim: [B, K, T·N, D] is refused, not mis-gathered.
    with pytest.raises(ValueError, match="batch"):
        gather_visible(targets.transpose(0, 1), vis)


def test_gather_then_loss_equals_masked_loss():
    # Gathering targets at the visible tokens equals selecting them with the boolean mask.
    K, B, TN, D = 2, 2, 12, 8
    targets, preds = _randn(K, B, TN, D), _randn(K, B, 4, D, seed=9)
    vis = MASKS.get("random")(B, 3, 4, 2 / 3, torch.Generator().manual_seed(0))
    mask = visible_mask(vis, TN)  # [B, T·N]
    selected = targets[:, mask].view(K, B, 4, D)  # UMT's targets[~mask] indexing, True = visible here
    assert torch.equal(gather_visible(targets, vis), selected)
    assert uta_loss(preds, gather_visible(targets, vis))[0] == uta_loss(preds, selected)[0]


@pytest.mark.parametrize("mask_type", ["random", "tube", "semantic"])
def test_one_training_step(mask_type):
    torch.manual_seed(0)
    model = create_student("umt_test_tiny", drop_path_rate=0.1).train()
    B, T, H, W, K, D = 2, 4, 64, 64, 2, 32
    N = (H // 16) * (W // 16)
    gen = torch.Generator().manual_seed(1)
    video = torch.randn(B, 3, T, H, W, generator=gen)
    teacher_tokens = torch.randn(K, B, T * N, D, generator=gen)  # [K, B, T·N, D]
    attn = torch.rand(B, T, N, generator=gen).softmax(-1)  # [B, T, N]
    vis = MASKS.get(mask_type)(B, T, N, 0.75, gen, attn=attn)  # [B, L_vis]
    targets = gather_visible(teacher_tokens, vis)  # [K, B, L_vis, D]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(3):
        loss, per_layer = uta_loss(model(video, vis), targets)
        assert torch.isfinite(loss) and per_layer.shape == (K,)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert losses[-1] < losses[0]
