"""Stage 2's vision pass with token sparsification (beside ``umt_vl``, which imports ``vit``, which imports
``sparsify``: this module sits above all three)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from umt_distill.masking import gather_visible
from umt_distill.models.sparsify import SparseSpec, at_kept, per_frame_count
from umt_distill.models.umt_vl import VisionOutput


def sparse_vision_forward(vision_encoder: nn.Module, x: Tensor, visible_idx: Tensor | None, spec: SparseSpec,
                          scores: Tensor | None = None, align: bool = True):
    """Stage 2's vision pass (``umt_vl.VisionEncoder``) with token sparsification.

    The UTA predictions are at the kept tokens; ``tokens`` (what the text fusion layers attend to) and the
    pooled feature cover the kept tokens plus, with ``spec.fuse``, each frame's fused token.

    Args:
        vision_encoder: A :class:`~umt_distill.models.umt_vl.VisionEncoder`.
        x: float [B, 3, T, H, W]; visible_idx: long [B, L_vis] (same count per frame) or None (all tokens).
        scores: float [B, T', n] teacher attention at the visible tokens (``source=teacher``).

    Returns:
        (``VisionOutput`` with aligned [K, B, T'·k, D] or None, tokens [B, T'·k (+T'), C], pooled [B, 1, C];
        kept positions long [B, T'·k] into the visible sequence).
    """
    enc = vision_encoder.encoder
    tokens, pos_table = enc.embed(x, visible_idx)  # [B, L, C]
    _, _, T, H, W = x.shape
    t, h, w = enc.patch_embed.grid(T, H, W)
    per_frame_count(visible_idx, t, h * w)
    last_block = enc.depth - 1
    take = sorted(set(vision_encoder.return_index) | {last_block}) if align else [last_block]
    outs, kept, pruned = enc.run_blocks_sparse(tokens, take, True, spec, t, scores)
    feats = dict(zip(take, zip(outs, pruned)))
    last = feats[last_block][0]  # [B, T'·k (+T'), C]
    aligned = None
    if align:
        pos_k = gather_visible(pos_table.expand(tokens.shape[0], -1, -1), kept).to(last.dtype)  # [B, T'·k, C]
        aligned = torch.stack([head(at_kept(feats[i][0], kept, feats[i][1]) + pos_k)
                               for head, i in zip(vision_encoder.clip_decoder, vision_encoder.return_index)])
    pooled = vision_encoder.pool_norm(last.mean(1, keepdim=True))  # [B, 1, C]
    return VisionOutput(aligned, last, pooled), kept
