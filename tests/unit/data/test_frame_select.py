"""Frame selection (data/frame_select.py): the rankers equal plain references, and restricting a step to
the kept frames keeps exactly those frames' tokens, at their original positions, with their targets."""

from __future__ import annotations

import pytest
import torch

from umt_distill.data.frame_select import (
    frame_tokens,
    random_frames,
    restrict_to_frames,
    restrict_to_frames_reference,
    segment_bounds,
    topk_frames,
    topk_frames_reference,
    uniform_frames,
)
from umt_distill.masking import gather_visible
from umt_distill.registry import MASKS, load_all_parts


@pytest.mark.parametrize("per_segment", [False, True])
@pytest.mark.parametrize("T, k", [(8, 4), (8, 3), (6, 6), (5, 1)])
def test_topk_equals_the_plain_reference(T: int, k: int, per_segment: bool) -> None:
    gen = torch.Generator().manual_seed(T * 10 + k)
    scores = torch.randint(0, 4, (16, T), generator=gen).float()  # many ties: the earlier frame wins
    got = topk_frames(scores, k, per_segment)
    assert got.tolist() == topk_frames_reference(scores.tolist(), k, per_segment)
    assert got.shape == (16, k) and bool((got.diff(dim=1) > 0).all())
    if per_segment:  # one frame in each segment
        for i, (lo, hi) in enumerate(segment_bounds(T, k)):
            assert bool(((got[:, i] >= lo) & (got[:, i] < hi)).all())


def test_topk_keeps_the_best_frames() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.0, 0.6]])
    assert topk_frames(scores, 4).tolist() == [[1, 3, 5, 7]]
    assert topk_frames(scores, 2, per_segment=True).tolist() == [[1, 5]]


def test_uniform_and_random_frames() -> None:
    assert uniform_frames(2, 8, 4).tolist() == [[1, 3, 5, 7]] * 2
    assert uniform_frames(1, 8, 8).tolist() == [list(range(8))]
    a = random_frames(64, 8, 3, torch.Generator().manual_seed(0))
    b = random_frames(64, 8, 3, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and bool((a.diff(dim=1) > 0).all()) and a.max() < 8
    assert len({tuple(r) for r in a.tolist()}) > 10  # draws differ between rows
    with pytest.raises(ValueError, match="keep_frames=9"):
        uniform_frames(1, 8, 9)


def _step(T: int = 6, N: int = 9, B: int = 3, K: int = 2, D: int = 4):
    """A semantic mask over all frames and targets whose values name their (sample, layer, frame, patch)."""
    load_all_parts()
    gen = torch.Generator().manual_seed(1)
    attn = torch.rand(B, T, N, generator=gen)
    visible = MASKS.get("semantic")(B, T, N, 0.5, gen, attn=attn)  # [B, T * (N - int(N * 0.5))]
    tokens = torch.zeros(B, K, T, N, D)
    for b in range(B):
        for k in range(K):
            for t in range(T):
                for n in range(N):
                    tokens[b, k, t, n] = torch.tensor([b, k, t, n], dtype=torch.float32)
    targets = gather_visible(tokens.flatten(2, 3).transpose(0, 1), visible)  # [K, B, L, D]
    return visible, targets, tokens


def test_restricted_tokens_and_targets_are_the_kept_frames() -> None:
    T, N = 6, 9
    visible, targets, tokens = _step(T, N)
    frames = torch.tensor([[0, 2, 5], [1, 2, 3], [3, 4, 5]])
    got_vis, got_tgt = restrict_to_frames(frames, visible, targets, N)
    ref_vis, ref_tgt = restrict_to_frames_reference(frames, visible, targets, N)
    assert got_vis.tolist() == ref_vis
    for b in range(3):
        assert torch.equal(got_tgt[:, b], ref_tgt[b])
        # every kept token is in a kept frame, each kept frame keeps its N - int(N/2) visible patches,
        # indices keep their original frame (hence their temporal positional embedding), ascending
        assert sorted({int(v) // N for v in got_vis[b]}) == frames[b].tolist()
        assert got_vis.shape[1] == 3 * (N - N // 2) and bool((got_vis[b].diff() > 0).all())
        # the sliced targets are the teacher's tokens of exactly those frames and patches
        for j, v in enumerate(got_vis[b].tolist()):
            t, n = divmod(v, N)
            assert torch.equal(got_tgt[:, b, j], tokens[b, :, t, n])


def test_keeping_every_frame_changes_nothing_and_no_mask_gives_all_tokens() -> None:
    visible, targets, _ = _step()
    every = torch.arange(6).expand(3, 6)
    vis, tgt = restrict_to_frames(every, visible, targets, 9)
    assert torch.equal(vis, visible) and torch.equal(tgt, targets)
    vis, tgt = restrict_to_frames(torch.tensor([[1, 4]]), None, None, 9)
    assert tgt is None and torch.equal(vis, frame_tokens(torch.tensor([[1, 4]]), 9))
    assert vis.tolist() == [list(range(9, 18)) + list(range(36, 45))]


def test_a_mask_with_unequal_counts_per_frame_is_refused() -> None:
    load_all_parts()
    gen = torch.Generator().manual_seed(0)
    visible = MASKS.get("random")(4, 6, 9, 0.5, gen)
    with pytest.raises(ValueError, match="same number of visible tokens in every frame"):
        restrict_to_frames(torch.tensor([[0, 1]] * 4), visible, None, 9)
