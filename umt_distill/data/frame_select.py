"""Frame selection for stage 2 (SMAUG, arXiv 2211.11446 §3.3): which k of a view's T frames a step trains on.

A view keeps all T frames in the batch; selection restricts the *visible tokens* to the kept frames
(:func:`restrict_to_frames`): the student then embeds tokens ``(t, n)`` with their original flat index
``t·N + n``, so the kept frames keep their temporal positional embeddings, and the cached targets are
gathered at the same indices, so they are the teacher's tokens of exactly those frames. The step's
mask (semantic or tube: the same count in every frame) is kept on the kept frames, so their tokens are
masked with the recipe's ratio. Only the blocks' work shrinks (k/T of the tokens); the patch embedding
still runs on all T frames, which is cheap. Evaluation never selects: it sees every frame.

Rankers: :func:`topk_frames` (by a score per frame, e.g. the cached CLIP frame-caption cosine),
:func:`uniform_frames`, :func:`random_frames`; plain references for the parity tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def segment_bounds(T: int, k: int) -> list[tuple[int, int]]:
    """T frames in k consecutive segments ``[floor(i·T/k), floor((i+1)·T/k))`` (each non-empty for k ≤ T)."""
    return [(i * T // k, (i + 1) * T // k) for i in range(k)]


def _check_k(T: int, k: int) -> None:
    if not 1 <= k <= T:
        raise ValueError(f"frame_select.keep_frames={k}: must be between 1 and the view's {T} frames")


def topk_frames(scores: Tensor, k: int, per_segment: bool = False) -> Tensor:
    """The k best frames of each row, ascending in time.

    Args:
        scores: float [B, T], higher = more relevant.
        k: Frames kept.
        per_segment: At most one per temporal segment (:func:`segment_bounds`): the best of each segment.

    Returns:
        long [B, k], sorted ascending. Ties go to the earlier frame.
    """
    T = scores.shape[1]
    _check_k(T, k)
    if per_segment:
        picks = [lo + scores[:, lo:hi].argmax(1) for lo, hi in segment_bounds(T, k)]  # argmax: first of ties
        return torch.stack(picks, 1)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]  # stable: earlier first on ties
    return order.sort(dim=1).values


def topk_frames_reference(scores: Sequence[Sequence[float]], k: int, per_segment: bool = False) -> list[list[int]]:
    """Plain reference of :func:`topk_frames` (lists, no torch)."""
    out = []
    for row in scores:
        row = [float(x) for x in row]
        T = len(row)
        if per_segment:
            picks = []
            for lo, hi in segment_bounds(T, k):
                best = lo
                for t in range(lo, hi):
                    if row[t] > row[best]:
                        best = t
                picks.append(best)
            out.append(picks)
        else:
            ranked = sorted(range(T), key=lambda t: (-row[t], t))
            out.append(sorted(ranked[:k]))
    return out


def uniform_frames(B: int, T: int, k: int, device: torch.device | str = "cpu") -> Tensor:
    """k evenly spaced frames (the middle of each of k segments), long [B, k]."""
    _check_k(T, k)
    idx = torch.tensor([(2 * i + 1) * T // (2 * k) for i in range(k)], device=device)
    return idx.expand(B, k).clone()


def random_frames(B: int, T: int, k: int, generator: torch.Generator, device: torch.device | str = "cpu") -> Tensor:
    """k distinct frames per row drawn uniformly (from ``generator``), ascending, long [B, k]."""
    _check_k(T, k)
    noise = torch.rand(B, T, generator=generator, device=generator.device)
    return noise.argsort(dim=1)[:, :k].sort(dim=1).values.to(device)


def frame_indicator(frames: Tensor, T: int) -> Tensor:
    """float [B, T] with 1 at the kept frames."""
    out = torch.zeros(frames.shape[0], T, device=frames.device)
    return out.scatter_(1, frames, 1.0)


def frame_tokens(frames: Tensor, N: int) -> Tensor:
    """Every token of the kept frames (no mask, e.g. stage 2 without UTA): long [B, k·N] ascending."""
    return (frames[:, :, None] * N + torch.arange(N, device=frames.device)).flatten(1)


def restrict_to_frames(frames: Tensor, visible_idx: Tensor | None, targets: Tensor | None,
                       N: int) -> tuple[Tensor, Tensor | None]:
    """The step's visible tokens and targets, restricted to the kept frames.

    The mask was drawn over all T frames with the same count in every frame (semantic, tube, or a mask
    cached with the store), so its tokens in the kept frames are a mask of those frames with the
    recipe's ratio, drawn exactly as it would have been without selection (k = T changes nothing).

    Args:
        frames: long [B, k] kept frames, ascending.
        visible_idx: long [B, L] sorted flat ``t·N + n`` indices (None: every token visible).
        targets: [K, B, L, D] the teacher's tokens at ``visible_idx`` (None without UTA).
        N: Tokens per frame.

    Returns:
        (visible_idx [B, L'], targets [K, B, L', D] or None), L' = L·k/T.

    Raises:
        ValueError: The mask's count differs between the kept frames of two samples (a ``random`` mask).
    """
    if visible_idx is None:
        return frame_tokens(frames, N), None
    B = visible_idx.shape[0]
    frame_of = torch.div(visible_idx, N, rounding_mode="floor")  # [B, L]
    keep = (frame_of[:, :, None] == frames[:, None, :]).any(-1)  # [B, L]
    counts = keep.sum(1)
    if bool((counts != counts[0]).any()):
        raise ValueError("frame selection needs a mask with the same number of visible tokens in every frame "
                         "(mask.type semantic or tube); the step's mask differs between frames")
    visible = visible_idx[keep].view(B, -1)
    if targets is None:
        return visible, None
    K, D = targets.shape[0], targets.shape[-1]
    return visible, targets[:, keep].view(K, B, -1, D)


def restrict_to_frames_reference(frames: Tensor, visible_idx: Tensor, targets: Tensor, N: int) -> tuple[list, list]:
    """Plain reference of :func:`restrict_to_frames`: per sample, the (index, target) pairs whose frame is kept."""
    vis_out, tgt_out = [], []
    for b in range(visible_idx.shape[0]):
        kept = {int(t) for t in frames[b]}
        cols = [j for j in range(visible_idx.shape[1]) if int(visible_idx[b, j]) // N in kept]
        vis_out.append([int(visible_idx[b, j]) for j in cols])
        tgt_out.append(targets[:, b, cols])
    return vis_out, tgt_out
