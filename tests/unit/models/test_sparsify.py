"""Token sparsification: the top-ρ choice and the fusion against plain references, the sparse student path
against the dense one, and the UTA targets sliced to the kept tokens."""

from __future__ import annotations

import pytest
import torch

from umt_distill.masking import gather_visible, sample_semantic_mask
from umt_distill.models.sparsify import (
    SparseSpec,
    fuse_dropped,
    fuse_dropped_reference,
    keep_count,
    per_frame_count,
    prune,
    student_scores,
    teacher_scores,
    top_positions,
    top_positions_reference,
)
from umt_distill.models.vit import create_student

B, T, N, RATIO = 2, 4, 16, 0.5  # the tiny student on 64 px: a 4×4 grid, 8 visible tokens per frame


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = create_student("umt_test_tiny").eval()
    x = torch.randn(B, 3, T, 64, 64, generator=g)
    attn = torch.rand(B, T, N, generator=g) + 1e-3
    vis = sample_semantic_mask(B, T, N, RATIO, g, attn=attn)  # [B, T·8]
    return student, x, attn, vis


def test_keep_count() -> None:
    assert [keep_count(40, r) for r in (1.0, 0.75, 0.5, 0.01)] == [40, 30, 20, 1]
    assert keep_count(10, 0.7) == 7


@pytest.mark.parametrize("k", [1, 3, 8])
def test_top_positions_equal_the_plain_reference(k: int) -> None:
    scores = torch.rand(3, 5, 8, generator=torch.Generator().manual_seed(k))
    assert top_positions(scores, k).tolist() == top_positions_reference(scores, k)


def test_fusion_equals_the_plain_reference() -> None:
    g = torch.Generator().manual_seed(1)
    tokens, scores = torch.randn(2, 3 * 6, 5, generator=g), torch.rand(2, 3, 6, generator=g)
    scores[0, 1] = 0.0  # a frame whose dropped tokens all score 0: their plain mean
    pos = top_positions(scores, 2)
    assert torch.allclose(fuse_dropped(tokens, scores, pos).double(), fuse_dropped_reference(tokens, scores, pos), atol=1e-6)
    fused, kept = prune(tokens, scores, SparseSpec(keep=2 / 6, fuse=True))
    assert fused.shape == (2, 3 * 2 + 3, 5) and torch.equal(fused[:, :6], gather_visible(tokens, kept))


def test_random_masks_are_refused() -> None:
    g = torch.Generator().manual_seed(0)
    vis = torch.tensor([[0, 1, 2, 17]])  # frame 0 has 3 visible tokens, frame 1 one
    with pytest.raises(ValueError, match="mask.type=tube or semantic"):
        per_frame_count(vis, 2, 16)
    assert per_frame_count(sample_semantic_mask(2, 4, 16, 0.5, g, attn=torch.rand(2, 4, 16)), 4, 16) == 8


@pytest.mark.parametrize("after_block", [0, 2])
def test_keep_one_is_the_dense_path(after_block: int) -> None:
    student, x, attn, vis = _setup()
    with torch.no_grad():
        dense = student(x, vis)
        for source in ("teacher", "student"):
            sparse, kept = student(x, vis, SparseSpec(1.0, after_block, source), teacher_scores(attn, vis))
            assert torch.equal(kept, torch.arange(vis.shape[1]).expand(B, -1))
            assert torch.allclose(sparse, dense, atol=1e-6)


def test_teacher_ranking_before_block_zero_is_the_smaller_mask() -> None:
    """Dropping before block 0 by the teacher's attention = the dense student on the kept tokens only, and the
    kept tokens are each frame's top-ρ of the visible ones by that attention."""
    student, x, attn, vis = _setup(2)
    spec = SparseSpec(0.5, 0, "teacher")
    with torch.no_grad():
        preds, kept = student(x, vis, spec, teacher_scores(attn, vis))
        kept_idx = gather_visible(vis, kept)  # [B, T·4] flat (t, n) indices
        assert torch.allclose(preds, student(x, kept_idx), atol=1e-6)
    for b in range(B):
        for t in range(T):
            visible = [int(i) - t * N for i in vis[b] if int(i) // N == t]
            expected = sorted(sorted(visible, key=lambda n: -float(attn[b, t, n]))[:4])
            assert [int(i) - t * N for i in kept_idx[b] if int(i) // N == t] == expected


def test_sliced_targets_are_the_teacher_tokens_of_the_kept_tokens() -> None:
    student, x, _attn, vis = _setup(3)
    teacher_tokens = torch.randn(2, B, T * N, 32)  # [K, B, T·N, D]
    targets = gather_visible(teacher_tokens, vis)  # what step_targets returns: [K, B, L_vis, D]
    with torch.no_grad():
        preds, kept = student(x, vis, SparseSpec(0.5, 1, "student", fuse=True))
    sliced = gather_visible(targets, kept)
    assert sliced.shape == preds.shape == (2, B, T * 4, 32)
    assert torch.equal(sliced, gather_visible(teacher_tokens, gather_visible(vis, kept)))


def test_student_scores_equal_explicit_attention() -> None:
    student, x, _, vis = _setup(4)
    block = student.encoder.blocks[1]
    tokens, _ = student.encoder.embed(x, vis)  # [B, T·8, C]
    got = student_scores(block, tokens, T)  # [B, T, 8]
    C, H = tokens.shape[-1], block.attn.num_heads
    W, hd = block.attn.qkv.weight, C // H
    for b in range(B):
        for t in range(T):
            h = block.norm1(tokens[b, t * 8:(t + 1) * 8])  # [8, C]
            q = h.mean(0) @ W[:C].T + block.attn.q_bias
            k = h @ W[C:2 * C].T
            rows = [torch.softmax(k[:, i * hd:(i + 1) * hd] @ q[i * hd:(i + 1) * hd] / hd**0.5, 0) for i in range(H)]
            assert torch.allclose(got[b, t], torch.stack(rows).mean(0), atol=1e-5)


def test_sparse_path_trains_every_parameter_and_after_block_is_checked() -> None:
    student, x, attn, vis = _setup(5)
    preds, _kept = student.train()(x, vis, SparseSpec(0.5, 1, "teacher", fuse=True), teacher_scores(attn, vis))
    preds.sum().backward()
    assert all(p.grad is not None for p in student.parameters())
    with pytest.raises(ValueError, match="after_block"):
        student(x, vis, SparseSpec(0.5, 9, "student"))
