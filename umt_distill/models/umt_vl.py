"""The stage-2 model: the video student, a BERT text encoder with fusion layers, and the heads.

Attribute names equal the state-dict prefixes of UMT's stage-2 model (UMT code @4fb4049:
multi_modality/models/umt.py):
``vision_encoder.{encoder,clip_decoder,pool_norm}``, ``text_encoder.{bert,cls}``, ``vision_proj``,
``text_proj``, ``itm_head`` and ``temp``. The frozen teacher is never part of this module: an official
file's ``clip_teacher.*`` is set aside by :func:`load_umt_vl_checkpoint`.

This module must not import ``torch.distributed``: the losses live in ``umt_distill.losses.vl`` and the
cross-rank gather they are given in ``umt_distill.training.distributed``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from umt_distill.models.checkpoints import (
    load_exact,
    read_state_dict,
    unwrap_state_dict,
)
from umt_distill.models.text import BertTextEncoder, drop_tied_and_buffers
from umt_distill.models.vit import LN_EPS, UMTStudent

TEMP_INIT = 0.07
TEMP_RANGE = (0.001, 0.5)


@dataclass
class VisionOutput:
    """What the vision encoder gives the stage-2 losses for one batch."""

    aligned: Tensor | None  # [K, B, L_vis, D] unit-norm UTA predictions (None without alignment)
    tokens: Tensor  # [B, L_vis, C] final-norm tokens: what the text fusion layers attend to
    pooled: Tensor  # [B, T', C] pool_norm of the token mean (T' = 1, or T with keep_temporal)


class VisionEncoder(nn.Module):
    """``vision_encoder``: the stage-1 student's ``encoder`` and ``clip_decoder`` plus ``pool_norm``.

    Args:
        student: A built (and possibly stage-1-initialised) :class:`UMTStudent`; its modules are reused.
    """

    def __init__(self, student: UMTStudent) -> None:
        super().__init__()
        self.encoder = student.encoder
        self.clip_decoder = student.clip_decoder
        self.return_index = list(student.return_index)
        self.pool_norm = nn.LayerNorm(student.embed_dim, eps=LN_EPS)

    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    def forward(self, x: Tensor, visible_idx: Tensor | None = None, align: bool = True,
                keep_temporal: bool = False) -> VisionOutput:
        """One pass over the visible tokens giving the UTA predictions, the tokens and the pooled feature.

        Args:
            x: float [B, 3, T, H, W] normalised pixels (T = 1 for images).
            visible_idx: long [B, L_vis] sorted token indices (None = all tokens, e.g. evaluation).
            align: Also return the K aligned predictions (the UTA loss).
            keep_temporal: Pool per frame ([B, T, C]; needs all tokens) instead of over all tokens ([B, 1, C]).
                UMT keeps frames apart only without a mask (``keep_temporal``, multi_modality/models/umt.py).
        """
        tokens, pos = self.encoder.embed(x, visible_idx)  # [B, L, C], [B or 1, L, C]
        take = sorted(set(self.return_index) | {self.encoder.depth - 1}) if align else [self.encoder.depth - 1]
        feats = dict(zip(take, self.encoder.run_blocks(tokens, take, norm=True)))  # final norm on each
        last = feats[self.encoder.depth - 1]  # [B, L, C]
        aligned = None
        if align:
            pos = pos.to(last.dtype)  # UMT re-adds the position table before the heads (clip_pos_embed)
            aligned = torch.stack([head(feats[i] + pos) for head, i in zip(self.clip_decoder, self.return_index)])
        if keep_temporal:
            if visible_idx is not None:
                raise ValueError("keep_temporal pools per frame and needs all tokens (visible_idx=None)")
            T = x.shape[2] // self.encoder.patch_embed.tubelet_size
            pooled = self.pool_norm(last.view(last.shape[0], T, -1, last.shape[-1]).mean(2))  # [B, T, C]
        else:
            pooled = self.pool_norm(last.mean(1, keepdim=True))  # [B, 1, C]
        return VisionOutput(aligned, last, pooled)


class UMTVisionLanguage(nn.Module):
    """UMT's stage-2 model (without the teacher).

    Args:
        student: The video student (its encoder and alignment heads become ``vision_encoder``).
        text_encoder: A :class:`BertTextEncoder` whose ``encoder_width`` equals the student's width.
        embed_dim: Width of the contrastive space (B/16: 512, L/16: 768).
        temp_init: Initial contrastive temperature (UMT: 0.07).
    """

    def __init__(self, student: UMTStudent, text_encoder: BertTextEncoder, embed_dim: int = 512,
                 temp_init: float = TEMP_INIT) -> None:
        super().__init__()
        if text_encoder.encoder_width != student.embed_dim:
            raise ValueError(f"text encoder cross-attends to width {text_encoder.encoder_width}, "
                             f"the vision encoder is {student.embed_dim} wide")
        self.vision_encoder = VisionEncoder(student)
        self.text_encoder = text_encoder
        text_dim = text_encoder.hidden_size
        self.vision_proj = nn.Linear(student.embed_dim, embed_dim)
        self.text_proj = nn.Linear(text_dim, embed_dim)
        self.itm_head = nn.Linear(text_dim, 2)
        self.temp = nn.Parameter(torch.tensor(float(temp_init)))
        # UMT: these heads keep PyTorch's default init; pool_norm is (1, 0).

    @property
    def embed_dim(self) -> int:
        return self.vision_proj.out_features

    def clamp_temp(self) -> None:
        """Keep the temperature in UMT's range [0.001, 0.5] (called before every use)."""
        with torch.no_grad():
            self.temp.clamp_(*TEMP_RANGE)

    def vision_embedding(self, pooled: Tensor) -> Tensor:
        """[B, T', C] pooled vision features → unit-norm [B, T', E]."""
        return F.normalize(self.vision_proj(pooled), dim=-1)

    def text_embedding(self, text_hidden: Tensor) -> Tensor:
        """[B, L, H] text-mode output → unit-norm CLS embedding [B, E]."""
        return F.normalize(self.text_proj(text_hidden[:, 0]), dim=-1)

    def match_logits(self, text_hidden: Tensor, text_mask: Tensor, vision_tokens: Tensor) -> Tensor:
        """Matching head on the fusion CLS: [B, L, H] text, [B, N_v, C] vision → [B, 2] (index 1 = match)."""
        fused = self.text_encoder.forward_fusion(text_hidden, text_mask, vision_tokens)
        return self.itm_head(fused[:, 0])

    def no_weight_decay(self) -> set[str]:
        """Full names without weight decay: every 1-D parameter and the 0-d temperature."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1}


# --------------------------------------------------------------------------------------------------
# official stage-2 checkpoints

_TEACHER_PREFIX = "clip_teacher."


def load_umt_vl_checkpoint(model: UMTVisionLanguage, path_or_state_dict: str | Path | Mapping[str, object]) -> dict:
    """Load an official UMT stage-2 checkpoint (multi_modality/tasks/pretrain.py), or our own stage-2 weights, strictly.

    Set aside, by rule and never silently: ``clip_teacher.*`` (the frozen teacher is not part of the
    student model), the ``position_ids`` buffer (checked to be 0..n−1), and the MLM decoder weight/bias
    (checked to be tied to the word embeddings / ``cls.predictions.bias``). Every other key must match
    the model exactly in name and shape.

    Returns:
        ``{"source", "loaded", "teacher_keys"}`` for logs.

    Raises:
        CheckpointMismatchError: missing, unexpected or mis-shaped keys (all listed).
    """
    if isinstance(path_or_state_dict, Mapping):
        source, raw = "<state dict>", path_or_state_dict
    else:
        source, raw = str(path_or_state_dict), read_state_dict(path_or_state_dict)
    state = unwrap_state_dict(raw, source)
    teacher = [k for k in state if k.startswith(_TEACHER_PREFIX)]
    state = {k: v for k, v in state.items() if not k.startswith(_TEACHER_PREFIX)}
    state = drop_tied_and_buffers(state, source, prefix="text_encoder.")
    return {"source": source, "loaded": load_exact(model, state, source), "teacher_keys": len(teacher)}
