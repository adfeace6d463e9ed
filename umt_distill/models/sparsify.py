"""Token sparsification (SMAUG, ICCV 2023, arXiv 2211.11446): among each frame's visible tokens keep the
top ρ by attention, so the blocks after ℓ run on fewer tokens; optionally fuse the dropped ones of each
frame into one attention-weighted token (EViT, ICLR 2022, arXiv 2202.07800).

SMAUG has no public code; this follows the paper's description. What ranks the tokens:

- ``teacher``: the teacher's CLS→patch attention ``attn [B, T, N]`` (cached in every store, or the online
  teacher's, which is the same function of the same pixels), read at the visible positions;
- ``student``: the student's own attention in block ℓ: each frame's mean token, projected by that block's
  query weights, attends over the frame's tokens projected by its key weights (the student has no CLS
  token). Computed without gradient, like any discrete choice.

Positions are kept as indices into the *visible* sequence, ``pos [B, T·k]``, sorted; the flat (t, n)
token indices of the kept tokens are ``gather_visible(visible_idx, pos)`` and the teacher targets are
``gather_visible(targets, pos)`` — the one gather the rest of the package uses. Fused tokens (one per
frame) are appended after the kept ones and get no UTA target (they stand for no teacher token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from umt_distill.masking import gather_visible

SOURCES = ("teacher", "student")


@dataclass(frozen=True)
class SparseSpec:
    """What to keep: ``keep`` = ρ of each frame's visible tokens, dropped before block ``after_block``."""

    keep: float
    after_block: int = 0
    source: str = "teacher"
    fuse: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"sparsify.keep must be in (0, 1], got {self.keep}")
        if self.after_block < 0:
            raise ValueError(f"sparsify.after_block must be >= 0, got {self.after_block}")
        if self.source not in SOURCES:
            raise ValueError(f"sparsify.source must be one of {SOURCES}, got {self.source!r}")

    @classmethod
    def from_config(cls, section) -> SparseSpec | None:
        """The recipe's ``sparsify`` section as a spec; None when it is off (``keep`` = 1)."""
        if section.keep >= 1.0:
            return None
        return cls(section.keep, section.after_block, section.source, section.fuse)


def keep_count(n: int, keep: float) -> int:
    """Tokens kept of ``n``: ``max(1, int(ρ·n))`` (the small epsilon keeps 0.7·10 from rounding to 6)."""
    return max(1, min(n, int(keep * n + 1e-9)))


def per_frame_count(visible_idx: Tensor | None, num_frames: int, num_patches: int) -> int:
    """Visible tokens per frame; fails unless every frame of every sample has the same count.

    Args:
        visible_idx: long [B, L_vis] sorted flat (t, n) indices, or None (all ``T·N`` tokens).
    """
    if visible_idx is None:
        return num_patches
    B, L = visible_idx.shape
    n = L // num_frames
    frames = torch.arange(num_frames, device=visible_idx.device).view(1, num_frames, 1)
    if L % num_frames or not bool((visible_idx.view(B, num_frames, n) // num_patches == frames).all()):
        raise ValueError("token sparsification keeps the top tokens of each frame and needs the same number of "
                         "visible tokens in every frame: use mask.type=tube or semantic (not random)")
    return n


def teacher_scores(attn: Tensor, visible_idx: Tensor | None) -> Tensor:
    """The teacher's attention at the visible tokens: [B, T, N] → float32 [B, T, n]."""
    B, T, N = attn.shape
    if visible_idx is None:
        return attn.float()
    return gather_visible(attn.float().reshape(B, T * N), visible_idx).view(B, T, -1)


@torch.no_grad()
def student_scores(block: nn.Module, tokens: Tensor, num_frames: int) -> Tensor:
    """Attention of each frame's mean token over the frame's tokens, in ``block`` (a vit.Block), head-averaged.

    Args:
        tokens: [B, T·n, C] the block's input (frame-major, n tokens per frame).

    Returns:
        float32 [B, T, n], each frame's row sums to 1.
    """
    attn = block.attn
    B, L, C = tokens.shape
    T, n, H = num_frames, L // num_frames, attn.num_heads
    h = block.norm1(tokens).float().view(B, T, n, C)
    weight = attn.qkv.weight.float()  # [3C, C]: rows q; k; v
    q = F.linear(h.mean(2), weight[:C], attn.q_bias.float())  # [B, T, C]
    k = F.linear(h, weight[C:2 * C])  # [B, T, n, C] (k has no bias)
    q = q.view(B, T, H, 1, C // H)
    k = k.view(B, T, n, H, C // H).transpose(2, 3)  # [B, T, H, n, hd]
    logits = (q * (C // H) ** -0.5) @ k.transpose(-1, -2)  # [B, T, H, 1, n]
    return logits.softmax(-1).mean(2)[:, :, 0]  # [B, T, n]


def top_positions(scores: Tensor, k: int) -> Tensor:
    """Positions in the visible sequence of each frame's top-``k`` scores.

    Args:
        scores: [B, T, n].

    Returns:
        long [B, T·k], sorted per row (frame t's positions lie in [t·n, (t+1)·n)).
    """
    _, T, n = scores.shape
    top = scores.topk(k, dim=-1).indices.sort(dim=-1).values  # [B, T, k]
    return (top + torch.arange(T, device=scores.device).view(1, T, 1) * n).flatten(1)


def top_positions_reference(scores: Tensor, k: int) -> list[list[int]]:
    """Plain version of :func:`top_positions` (Python sort per frame), kept for the parity test."""
    B, T, n = scores.shape
    out = []
    for b in range(B):
        row = []
        for t in range(T):
            vals = [float(v) for v in scores[b, t]]
            best = sorted(range(n), key=lambda i: -vals[i])[:k]
            row += sorted(t * n + i for i in best)
        out.append(row)
    return out


def fuse_dropped(tokens: Tensor, scores: Tensor, pos: Tensor) -> Tensor:
    """One token per frame: the mean of its dropped tokens weighted by their scores (EViT).

    Args:
        tokens: [B, T·n, C]; scores: [B, T, n] (non-negative); pos: [B, T·k] the kept positions.

    Returns:
        [B, T, C] (a frame whose scores of the dropped tokens are all 0 averages them uniformly).
    """
    B, T, n = scores.shape
    dropped = torch.ones(B, T * n, dtype=torch.bool, device=tokens.device)
    dropped.scatter_(1, pos, False)
    w = scores.reshape(B, T * n).float().clamp_min(0) * dropped  # [B, T·n]
    w = w.view(B, T, n)
    total = w.sum(-1, keepdim=True)  # [B, T, 1]
    uniform = dropped.view(B, T, n).float()
    w = torch.where(total > 0, w / total.clamp_min(1e-30), uniform / uniform.sum(-1, keepdim=True).clamp_min(1))
    return torch.einsum("btn,btnc->btc", w.to(tokens.dtype), tokens.view(B, T, n, -1))


def fuse_dropped_reference(tokens: Tensor, scores: Tensor, pos: Tensor) -> Tensor:
    """Plain loop version of :func:`fuse_dropped`."""
    B, T, n = scores.shape
    kept = [{int(p) for p in pos[b]} for b in range(B)]
    out = torch.zeros(B, T, tokens.shape[-1], dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            idx = [t * n + i for i in range(n) if t * n + i not in kept[b]]
            w = torch.tensor([max(float(scores[b, t, i - t * n]), 0.0) for i in idx], dtype=torch.float64)
            w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1 / max(len(idx), 1))
            for wi, i in zip(w, idx):
                out[b, t] += wi * tokens[b, i].double()
    return out


def prune(tokens: Tensor, scores: Tensor, spec: SparseSpec) -> tuple[Tensor, Tensor]:
    """Keep each frame's top-ρ tokens (plus one fused token per frame with ``spec.fuse``).

    Args:
        tokens: [B, T·n, C]; scores: [B, T, n].

    Returns:
        (tokens [B, T·k (+ T), C], kept positions long [B, T·k]).
    """
    n = scores.shape[2]
    k = keep_count(n, spec.keep)
    pos = top_positions(scores, k)  # [B, T·k]
    kept = gather_visible(tokens, pos)  # [B, T·k, C]
    if spec.fuse and k < n:
        kept = torch.cat([kept, fuse_dropped(tokens, scores, pos)], dim=1)  # fused tokens last
    return kept, pos


def at_kept(feat: Tensor, pos: Tensor, pruned: bool) -> Tensor:
    """A block output at the kept tokens: the first ``T·k`` after pruning (fused ones follow), else gathered."""
    return feat[:, :pos.shape[1]] if pruned else gather_visible(feat, pos)

