"""VideoMAE: the video ViT encoder on the visible tokens, a light pixel decoder, optional UTA heads.

Architecture as VideoMAE's ``PretrainVisionTransformer`` (VideoMAE code @14ef8d8: modeling_pretrain.py;
VideoMAE V2 adds the decoder mask, VideoMAEv2 code @29eab1e: models/modeling_pretrain.py): the encoder (the same :class:`VisionTransformer` as the UMT student,
usually with tubelet 2) runs on the visible tokens and ends in its final norm; ``encoder_to_decoder``
(Linear without bias) maps them to the decoder width; the decoder sees them plus a learned
``mask_token`` at every position it must predict, each with the 1-D sine-cosine table of the decoder
width added; its blocks, ``norm`` and ``head`` (→ ``3·tubelet·p²`` values) return predictions for those
positions only. Parameter names equal the official pretraining checkpoints' (``encoder.*``,
``decoder.*``, ``encoder_to_decoder.weight``, ``mask_token``), so those files load strictly.

With ``num_align_layers > 0`` the model also carries UMT's ``clip_decoder`` heads on the last K encoder
blocks: UTA + pixel, the combination of UMT's Table 1.

This module must not import ``torch.distributed``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from umt_distill.masking import gather_visible
from umt_distill.models.checkpoints import (
    load_exact,
    read_state_dict,
    unwrap_state_dict,
)
from umt_distill.models.vit import (
    LN_EPS,
    Block,
    VisionTransformer,
    _init_weights,
    create_student,
    sincos_1d,
)


class PixelDecoder(nn.Module):
    """``decoder.*``: blocks → norm → head, applied to [visible tokens ; mask tokens]."""

    def __init__(self, dim: int, depth: int, num_heads: int, out_dim: int, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor, num_predicted: int) -> Tensor:
        """[B, L_vis + L_dec, C_d] → predictions of the last ``num_predicted`` tokens [B, L_dec, out]."""
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, x.shape[1] - num_predicted:]))


class VideoMAE(nn.Module):
    """Masked video autoencoder with an optional UTA branch.

    Args:
        encoder: The backbone (its ``tubelet_size`` fixes the pixel target's shape).
        decoder_dim, decoder_depth, decoder_heads: The light decoder (VideoMAE B/16: 384, 4, 6).
        align_heads: UMT ``clip_decoder`` heads (``AlignHead``) for UTA + pixel, or None.
        return_index: Encoder blocks the align heads read (ascending; the last must be the final block).
        drop_path_rate: Stochastic depth of the decoder (VideoMAE uses the encoder's rate).
    """

    def __init__(self, encoder: VisionTransformer, decoder_dim: int = 384, decoder_depth: int = 4,
                 decoder_heads: int = 6, align_heads: nn.ModuleList | None = None,
                 return_index: list[int] | None = None, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.encoder = encoder
        p, t = encoder.patch_embed.patch_size, encoder.patch_embed.tubelet_size
        self.decoder = PixelDecoder(decoder_dim, decoder_depth, decoder_heads, 3 * t * p * p,
                                    drop_path_rate=drop_path_rate)
        self.decoder.apply(_init_weights)
        self.encoder_to_decoder = nn.Linear(encoder.embed_dim, decoder_dim, bias=False)
        nn.init.xavier_uniform_(self.encoder_to_decoder.weight)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)  # VideoMAE: truncated at ±std
        if align_heads is not None:
            self.clip_decoder = align_heads
            self.return_index = list(return_index or [])
            if not self.return_index or self.return_index[-1] != encoder.depth - 1:
                raise ValueError(f"UTA + pixel: the aligned blocks {self.return_index} must end with the last block")
        else:
            self.clip_decoder, self.return_index = None, [encoder.depth - 1]
        self._pos_cache: dict[tuple[int, str], Tensor] = {}

    @property
    def tubelet_size(self) -> int:
        return self.encoder.patch_embed.tubelet_size

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_embed.patch_size

    def decoder_pos(self, num_tokens: int, device: torch.device) -> Tensor:
        key = (num_tokens, str(device))
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_1d(num_tokens, self.mask_token.shape[-1]).to(device)
        return self._pos_cache[key]

    def forward(self, x: Tensor, visible_idx: Tensor, decode_idx: Tensor) -> tuple[Tensor, Tensor | None]:
        """Pixel predictions at ``decode_idx`` and, with align heads, UTA predictions at ``visible_idx``.

        Args:
            x: float [B, 3, T, H, W] (ImageNet-normalised pixels).
            visible_idx: long [B, L_vis] sorted token indices the encoder sees.
            decode_idx: long [B, L_dec] token indices the decoder predicts.

        Returns:
            pixels [B, L_dec, 3·tubelet·p²] and align [K, B, L_vis, D] (unit norm) or None.
        """
        B, _, T, H, W = x.shape
        total = self.encoder.patch_embed.grid(T, H, W)
        num_tokens = total[0] * total[1] * total[2]
        tokens, pos = self.encoder.embed(x, visible_idx)  # [B, L_vis, C]
        feats = self.encoder.run_blocks(tokens, self.return_index, norm=True)  # list of [B, L_vis, C]
        align = None
        if self.clip_decoder is not None:  # UMT re-adds the encoder table before the heads ("clip_pos_embed")
            p = pos.to(feats[0].dtype)
            align = torch.stack([head(f + p) for head, f in zip(self.clip_decoder, feats)])
        z = self.encoder_to_decoder(feats[-1])  # [B, L_vis, C_d]
        dpos = self.decoder_pos(num_tokens, z.device)[None].expand(B, -1, -1)  # [B, N, C_d]
        vis = z + gather_visible(dpos, visible_idx).to(z.dtype)
        masked = self.mask_token.to(z.dtype) + gather_visible(dpos, decode_idx).to(z.dtype)  # [B, L_dec, C_d]
        return self.decoder(torch.cat([vis, masked], dim=1), decode_idx.shape[1]), align

    def no_weight_decay(self) -> set[str]:
        """1-D parameters (biases, norms, q/v biases) and ``mask_token`` (VideoMAE's list)."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1} | {"mask_token"}


def build_videomae(student_name: str, tubelet_size: int, decoder_dim: int, decoder_depth: int, decoder_heads: int,
                   teacher_dim: int | None = None, num_align_layers: int = 0, **student_kwargs: Any) -> VideoMAE:
    """A :class:`VideoMAE` whose encoder is the registered student ``student_name`` at ``tubelet_size``.

    Args:
        teacher_dim, num_align_layers: With ``num_align_layers > 0``, keep the student's UTA heads.
        **student_kwargs: Student options (drop_path_rate, use_checkpoint, align_interval, ...).
    """
    student = create_student(student_name, tubelet_size=tubelet_size, teacher_dim=teacher_dim or 8,
                             num_align_layers=max(num_align_layers, 1), **student_kwargs)
    heads = student.clip_decoder if num_align_layers > 0 else None
    return VideoMAE(student.encoder, decoder_dim, decoder_depth, decoder_heads, heads,
                    student.return_index if heads is not None else None,
                    drop_path_rate=float(student_kwargs.get("drop_path_rate", 0.0)))


def load_videomae_checkpoint(model: VideoMAE, path: str | Path) -> int:
    """Load an official VideoMAE / VideoMAE V2 pretraining file (or ours) into ``model``, strictly.

    Official files hold ``{"model": {encoder.*, decoder.*, encoder_to_decoder.weight, mask_token}}``;
    the position tables are not stored. Returns the number of tensors loaded.

    Raises:
        CheckpointMismatchError: missing, unexpected or mis-shaped keys (all listed).
    """
    source = str(path)
    state = unwrap_state_dict(read_state_dict(path), source)
    return load_exact(model, state, source)
