"""Pixel-reconstruction targets and loss (VideoMAE / VideoMAE V2).

The target of token (t, h, w) is its tubelet of raw pixels in [0, 1] — ``tubelet × p × p`` pixels of
3 channels — flattened in (frame-in-tubelet, row, column, channel) order, the order of the official
decoder head's outputs. With ``normalize`` every channel of a patch is standardised over its
``tubelet·p·p`` pixels: ``(x − mean) / (std + 1e-6)`` with the unbiased std (VideoMAE code
@14ef8d8: engine_for_pretraining.py, ``normlize_target``). The loss is the squared error averaged over a
token's values, then over the tokens that count (VideoMAE: all reconstructed tokens; V2: those the
encoder did not see).
"""

from __future__ import annotations

import torch
from torch import Tensor

NORM_EPS = 1e-6


def pixel_targets(video: Tensor, tubelet: int, patch: int, normalize: bool = True) -> Tensor:
    """Per-token pixel targets of a whole clip.

    Args:
        video: float [B, 3, T, H, W] in [0, 1] (not ImageNet-normalised).
        tubelet: Frames per token.
        patch: Spatial patch side.
        normalize: Standardise every channel of every patch over its pixels.

    Returns:
        float32 [B, T/tubelet · H/p · W/p, tubelet·p·p·3], tokens in (t, h, w) order.
    """
    B, C, T, H, W = video.shape
    if T % tubelet or H % patch or W % patch:
        raise ValueError(f"video {T}×{H}×{W} is not divisible by the tubelet×patch {tubelet}×{patch}×{patch}")
    x = video.float().reshape(B, C, T // tubelet, tubelet, H // patch, patch, W // patch, patch)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # [B, T', H', W', tubelet, p, p, C]
    x = x.reshape(B, -1, tubelet * patch * patch, C)  # [B, L, P, C]
    if normalize:
        x = (x - x.mean(dim=2, keepdim=True)) / (x.var(dim=2, unbiased=True, keepdim=True).sqrt() + NORM_EPS)
    return x.flatten(2)  # [B, L, P·C]


def pixel_targets_reference(video: Tensor, tubelet: int, patch: int, normalize: bool = True) -> Tensor:
    """Plain loop over tokens and channels: the parity reference of :func:`pixel_targets`."""
    B, C, T, H, W = video.shape
    out = []
    for b in range(B):
        tokens = []
        for t in range(0, T, tubelet):
            for h in range(0, H, patch):
                for w in range(0, W, patch):
                    cube = video[b, :, t:t + tubelet, h:h + patch, w:w + patch].double()  # [C, tubelet, p, p]
                    values = []
                    for c in range(C):
                        v = cube[c].flatten()  # (frame, row, column) order
                        if normalize:
                            v = (v - v.mean()) / (v.std(unbiased=True) + NORM_EPS)
                        values.append(v)
                    tokens.append(torch.stack(values, dim=1).flatten())  # channel fastest
        out.append(torch.stack(tokens))
    return torch.stack(out).float()


def pixel_loss(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Mean squared error per token, averaged over the tokens with weight 1.

    Args:
        pred, target: [B, L_dec, P·C].
        weight: [B, L_dec], 1 for tokens that count, 0 otherwise (at least one must count).

    Returns:
        Scalar float32.
    """
    per_token = (pred.float() - target.float()).pow(2).mean(dim=-1)  # [B, L_dec]
    return (per_token * weight).sum() / weight.sum().clamp(min=1.0)
