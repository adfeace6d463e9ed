"""Unmasked-token alignment (UTA) loss.

UMT stage 1 (UMT code @4fb4049: single_modality/engines/engine_for_pretraining_umt.py): for each aligned layer
pair, ``2 − 2·cos(s, t)`` between the student's head output and the teacher's token at the same visible
position, averaged over layers, batch and tokens (layers are averaged, not summed). Equals the squared
distance of unit vectors. The teacher's targets at the visible tokens come from
:func:`umt_distill.masking.gather_visible`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def uta_loss(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """UTA loss between aligned student outputs and teacher targets.

    Both inputs are L2-normalised here, in float32, so the student may pass normalised or raw outputs
    and the teacher's cached (unnormalised, possibly fp16-decoded) tokens can be used directly. The
    teacher side is detached: targets are constants.

    Args:
        student: [K, B, L, D] predictions at the visible tokens.
        teacher: [K, B, L, D] teacher tokens at the same positions.

    Returns:
        (loss, per_layer): the float32 scalar mean over K, B and L, and the per-layer means [K].
    """
    if student.shape != teacher.shape or student.ndim != 4:
        raise ValueError(
            f"uta_loss expects matching [K, B, L, D] tensors, got student {tuple(student.shape)} "
            f"and teacher {tuple(teacher.shape)}"
        )
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.detach().float(), dim=-1)
    cos = (s * t).sum(-1)  # [K, B, L]
    per_layer = (2.0 - 2.0 * cos).mean(dim=(1, 2))  # [K]
    return per_layer.mean(), per_layer


def uta_loss_reference(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Plain-loop version of :func:`uta_loss` (one token pair at a time), kept for the parity test."""
    K, B, L, _ = student.shape
    per_layer = []
    for k in range(K):
        total = torch.zeros((), dtype=torch.float64)
        for b in range(B):
            for i in range(L):
                s = student[k, b, i].double()
                t = teacher[k, b, i].double()
                s = s / s.norm().clamp_min(1e-12)
                t = t / t.norm().clamp_min(1e-12)
                total = total + (2.0 - 2.0 * torch.dot(s, t))
        per_layer.append(total / (B * L))
    per_layer_t = torch.stack(per_layer).float()
    return per_layer_t.mean(), per_layer_t
