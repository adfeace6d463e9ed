"""The UMT student: a plain video ViT that sees only the unmasked tokens, plus K alignment heads.

Architecture follows UMT stage 1 (UMT code @4fb4049: single_modality/models/modeling_pretrain_umt.py): Conv3d
tubelet patch embedding, no CLS token, a fixed 1-D sine-cosine position embedding over the flattened (t, h, w)
token index, pre-norm blocks with BEiT-style attention (``q_bias``/``v_bias``, no k bias), joint space-time
attention over the visible tokens, and ``clip_decoder.{k}`` heads (Linear → LayerNorm → L2) on the last K
blocks. Parameter names equal UMT's stage-1 keys so official checkpoints load strictly.

This module must not import ``torch.distributed``: DDP/FSDP are applied by the training package.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# Token gathering has one implementation, beside the masks that produce the indices; the models here
# and in models.videomae / models.classifier call it by this name: [B, L, C] × [B, L_vis] → [B, L_vis, C].
from umt_distill.masking import gather_visible
from umt_distill.models.sparsify import (
    SparseSpec,
    at_kept,
    per_frame_count,
    prune,
    student_scores,
)
from umt_distill.registry import STUDENTS

LN_EPS = 1e-6


def sincos_1d(n_positions: int, dim: int) -> Tensor:
    """The fixed 1-D sine-cosine table ``PE[n, 2i] = sin(n / 10000^(2i/d))``, ``PE[n, 2i+1] = cos(...)``.

    Sine and cosine are interleaved over channels (not concatenated), as in UMT/VideoMAE. Computed in
    float64 and returned as float32 so long tables keep full precision.

    Args:
        n_positions: Number of positions (flattened tokens, ``T·H·W``).
        dim: Embedding width; must be even.

    Returns:
        float32 [n_positions, dim].
    """
    if dim % 2:
        raise ValueError(f"sincos_1d: dim must be even, got {dim}")
    position = torch.arange(n_positions, dtype=torch.float64)[:, None]  # [n, 1]
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # [d/2]
    angle = position * inv_freq  # [n, d/2]
    table = torch.empty(n_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle)
    return table.float()


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``p`` (train only).

    Uses the global torch RNG on purpose (like dropout): activation checkpointing replays the global RNG
    state during recomputation, which a private generator would not get; the training checkpoint saves
    the global RNG state, so runs stay reproducible.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # [B, 1, 1]
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PatchEmbed(nn.Module):
    """Tubelet embedding: Conv3d with kernel = stride = (tubelet, p, p), flattened in (t, h, w) order."""

    def __init__(self, patch_size: int, tubelet_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.tubelet_size = tubelet_size
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)

    def grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Token grid (T', H', W') for an input of that size; fails instead of silently cropping."""
        p, t = self.patch_size, self.tubelet_size
        if height % p or width % p or num_frames % t:
            raise ValueError(
                f"input T×H×W = {num_frames}×{height}×{width} is not divisible by the "
                f"tubelet×patch size {t}×{p}×{p}"
            )
        return num_frames // t, height // p, width // p

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # [B, C, T', H', W']
        return x.flatten(2).transpose(1, 2)  # [B, T'·H'·W', C]


class Attention(nn.Module):
    """Multi-head self-attention with BEiT-style biases: q and v learn a bias, k's bias is fixed at 0."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, L, C = x.shape
        # The k bias stays a constant zero (not a parameter), matching the official key layout.
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])  # [3C]
        qkv = F.linear(x, self.qkv.weight, bias)  # [B, L, 3C]
        q, k, v = qkv.view(B, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # [B, heads, L, C/heads]; scale = head_dim^-0.5
        return self.proj(x.transpose(1, 2).reshape(B, L, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """The UMT video ViT backbone (``encoder`` in UMT checkpoints).

    Args:
        embed_dim: Token width C.
        depth: Number of blocks.
        num_heads: Attention heads.
        patch_size: Spatial patch side.
        tubelet_size: Frames per token (UMT pretraining uses 1).
        in_chans: Input channels.
        mlp_ratio: MLP hidden width / C.
        drop_path_rate: Stochastic depth of the last block; increases linearly from 0 over depth.
        use_checkpoint: Recompute activations of the first ``checkpoint_num`` blocks in backward.
        checkpoint_num: Blocks to checkpoint; 0 with ``use_checkpoint`` means all blocks.
    """

    def __init__(
        self,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        patch_size: int = 16,
        tubelet_size: int = 1,
        in_chans: int = 3,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        use_checkpoint: bool = False,
        checkpoint_num: int = 0,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.depth = depth
        self.patch_embed = PatchEmbed(patch_size, tubelet_size, in_chans, embed_dim)
        # Linear 0 → drop_path_rate over depth (plain Python so construction also works on "meta").
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.checkpoint_num = (checkpoint_num or depth) if use_checkpoint else 0
        # The PE is a function of the token count, not a parameter: cached per (count, device).
        self._pos_cache: dict[tuple[int, str], Tensor] = {}
        self.apply(_init_weights)

    def pos_embed(self, num_tokens: int, device: torch.device) -> Tensor:
        """float32 [num_tokens, C] sine-cosine table on ``device`` (cached)."""
        key = (num_tokens, str(device))
        table = self._pos_cache.get(key)
        if table is None:
            table = sincos_1d(num_tokens, self.embed_dim).to(device)
            self._pos_cache[key] = table
        return table

    def embed(self, x: Tensor, visible_idx: Tensor | None) -> tuple[Tensor, Tensor]:
        """Patch-embed, add the PE, keep the visible tokens.

        Returns:
            tokens [B, L, C] and the position table gathered the same way [B or 1, L, C] (float32).
        """
        if x.ndim != 5:
            raise ValueError(f"student input must be [B, 3, T, H, W], got shape {tuple(x.shape)}")
        B, _, T, H, W = x.shape
        t, h, w = self.patch_embed.grid(T, H, W)
        tokens = self.patch_embed(x)  # [B, T'·H'·W', C]
        pos = self.pos_embed(t * h * w, tokens.device)[None]  # [1, T'·H'·W', C]
        tokens = tokens + pos.to(tokens.dtype)
        if visible_idx is not None:
            _check_visible_idx(visible_idx, B, t * h * w)
            tokens = gather_visible(tokens, visible_idx)  # [B, L_vis, C]
            pos = gather_visible(pos.expand(B, -1, -1), visible_idx)  # [B, L_vis, C]
        return tokens, pos

    def _run_block(self, i: int, x: Tensor) -> Tensor:
        blk = self.blocks[i]
        if i < self.checkpoint_num and self.training and torch.is_grad_enabled():
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def forward_features(self, x: Tensor, visible_idx: Tensor | None = None) -> Tensor:
        """Final-norm tokens.

        Args:
            x: float [B, 3, T, H, W] (normalised pixels).
            visible_idx: long [B, L_vis] sorted indices into the flattened (t, h, w) tokens; None = all.

        Returns:
            [B, L, C] with L = L_vis or T'·H'·W'.
        """
        tokens, _ = self.embed(x, visible_idx)
        return self.run_blocks(tokens, [self.depth - 1], norm=True)[0]

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        visible_idx: Tensor | None = None,
        norm: bool = False,
        output_fmt: str = "NLC",
    ) -> list[Tensor]:
        """Block outputs, timm-style: ``indices`` = last n blocks (int), explicit (negatives from end),
        or all (None). Returned in ascending block order; stops after the deepest requested block.

        Returns:
            List of [B, L, C] (``norm=True`` applies the shared final ``norm``).
        """
        if output_fmt != "NLC":
            raise ValueError(f"output_fmt {output_fmt!r}: masked token sets only support 'NLC'")
        take = resolve_block_indices(self.depth, indices)
        tokens, _ = self.embed(x, visible_idx)
        return self.run_blocks(tokens, take, norm)

    def run_blocks(self, tokens: Tensor, take: Sequence[int], norm: bool) -> list[Tensor]:
        """Run blocks 0..max(take) on embedded tokens [B, L, C]; return the outputs of blocks ``take``."""
        out = []
        for i in range(max(take) + 1):
            tokens = self._run_block(i, tokens)
            if i in take:
                out.append(self.norm(tokens) if norm else tokens)
        return out

    def run_blocks_sparse(self, tokens: Tensor, take: Sequence[int], norm: bool, spec: SparseSpec, num_frames: int,
                          scores: Tensor | None = None) -> tuple[list[Tensor], Tensor, list[bool]]:
        """:meth:`run_blocks` with token sparsification before block ``spec.after_block``.

        Args:
            tokens: [B, T'·n, C] embedded visible tokens, frame-major with n per frame.
            spec: What to keep (:class:`~umt_distill.models.sparsify.SparseSpec`).
            num_frames: T' (token frames).
            scores: [B, T', n] teacher attention at the visible tokens (``source=teacher``); None for
                ``source=student`` (ranked by block ℓ's own attention).

        Returns:
            (outputs of blocks ``take``, kept positions long [B, T'·k] into the visible sequence, and per
            output whether it came after the pruning: then its first T'·k tokens are the kept ones).
        """
        if not 0 <= spec.after_block <= max(take):
            raise ValueError(f"sparsify.after_block={spec.after_block} must be a block that runs (0..{max(take)})")
        out, pruned, pos = [], [], None
        for i in range(max(take) + 1):
            if i == spec.after_block:
                ranks = student_scores(self.blocks[i], tokens, num_frames) if spec.source == "student" else scores
                if ranks is None:
                    raise ValueError("sparsify.source=teacher needs the teacher's attention scores")
                tokens, pos = prune(tokens, ranks, spec)  # [B, T'·k (+T'), C]
            tokens = self._run_block(i, tokens)
            if i in take:
                out.append(self.norm(tokens) if norm else tokens)
                pruned.append(pos is not None)
        return out, pos, pruned

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) of parameters excluded from weight decay: biases and norms."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1}


class UMTStudent(nn.Module):
    """UMT stage-1 student: ``encoder`` backbone plus K ``clip_decoder`` alignment heads.

    Head k aligns block ``return_index[k]`` with the teacher's k-th returned layer (ascending order).

    Args:
        teacher_dim: Width D of the teacher's projected tokens (CLIP-B/16: 512, L/14: 768).
        num_align_layers: K, the number of aligned (last) blocks and heads.
        align_interval: Spacing between aligned student blocks (UMT's ``clip_student_return_interval``).
        **encoder_kwargs: Passed to :class:`VisionTransformer`.
    """

    def __init__(
        self,
        teacher_dim: int = 512,
        num_align_layers: int = 6,
        align_interval: float = 1.0,
        **encoder_kwargs: Any,
    ) -> None:
        super().__init__()
        self.encoder = VisionTransformer(**encoder_kwargs)
        depth, dim = self.encoder.depth, self.encoder.embed_dim
        self.return_index = sorted(depth - 1 - int(i * align_interval) for i in range(num_align_layers))
        if len(set(self.return_index)) != num_align_layers or self.return_index[0] < 0:
            raise ValueError(
                f"cannot align {num_align_layers} layers with interval {align_interval} "
                f"in a {depth}-block student (indices {self.return_index})"
            )
        self.teacher_dim = teacher_dim
        self.clip_decoder = nn.ModuleList(AlignHead(dim, teacher_dim) for _ in range(num_align_layers))
        self.clip_decoder.apply(_init_weights)

    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    @property
    def num_align_layers(self) -> int:
        return len(self.clip_decoder)

    def forward_features(self, x: Tensor, visible_idx: Tensor | None = None) -> Tensor:
        """See :meth:`VisionTransformer.forward_features`."""
        return self.encoder.forward_features(x, visible_idx)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        visible_idx: Tensor | None = None,
        norm: bool = False,
        output_fmt: str = "NLC",
    ) -> list[Tensor]:
        """See :meth:`VisionTransformer.forward_intermediates`."""
        return self.encoder.forward_intermediates(x, indices, visible_idx, norm, output_fmt)

    def forward_align(self, x: Tensor, visible_idx: Tensor | None = None) -> Tensor:
        """Aligned, L2-normalised predictions of the teacher's tokens at the visible positions.

        Args:
            x: float [B, 3, T, H, W].
            visible_idx: long [B, L_vis] sorted flattened token indices; None = all tokens.

        Returns:
            [K, B, L_vis, D_teacher], unit norm along the last dim.
        """
        tokens, pos = self.encoder.embed(x, visible_idx)
        # The shared final norm is applied to every aligned block's output: K × [B, L, C].
        feats = self.encoder.run_blocks(tokens, self.return_index, norm=True)
        # UMT re-adds the same sine-cosine table ("clip_pos_embed") before the heads
        # (modeling_pretrain_umt.py).
        pos = pos.to(feats[0].dtype)
        return torch.stack([head(f + pos) for head, f in zip(self.clip_decoder, feats)])

    def forward_align_sparse(self, x: Tensor, visible_idx: Tensor | None, spec: SparseSpec,
                             scores: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`forward_align` with token sparsification (docs/smaug.md): predictions at the kept tokens.

        Args:
            x: float [B, 3, T, H, W].
            visible_idx: long [B, L_vis] with the same count n in every frame (tube, semantic); None = all.
            spec: What to keep.
            scores: float [B, T', n] teacher attention at the visible tokens (``source=teacher``).

        Returns:
            (predictions [K, B, T'·k, D] unit norm, kept positions long [B, T'·k] into the visible
            sequence: the UTA targets are ``gather_visible(targets, pos)``).
        """
        tokens, pos_table = self.encoder.embed(x, visible_idx)
        _, _, T, H, W = x.shape
        t, h, w = self.encoder.patch_embed.grid(T, H, W)
        per_frame_count(visible_idx, t, h * w)
        feats, kept, pruned = self.encoder.run_blocks_sparse(tokens, self.return_index, True, spec, t, scores)
        pos_table = gather_visible(pos_table.expand(tokens.shape[0], -1, -1), kept).to(feats[0].dtype)  # [B, T'·k, C]
        return torch.stack([head(at_kept(f, kept, p) + pos_table)
                            for head, f, p in zip(self.clip_decoder, feats, pruned)]), kept

    def forward(self, x: Tensor, visible_idx: Tensor | None = None, sparse: SparseSpec | None = None,
                scores: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """The stage-1 training output: :meth:`forward_align`, or with ``sparse``
        :meth:`forward_align_sparse` (then a (predictions, kept positions) pair)."""
        if sparse is None:
            return self.forward_align(x, visible_idx)
        return self.forward_align_sparse(x, visible_idx, sparse, scores)

    def no_weight_decay(self) -> set[str]:
        """Full names of parameters without weight decay: every 1-D parameter (biases, norms, q/v bias).

        UMT's name list (pos_embed, cls_token, ...) names tensors this model does not have as parameters.
        """
        return {n for n, p in self.named_parameters() if p.ndim <= 1}


class AlignHead(nn.Module):
    """One ``clip_decoder.{k}``: Linear(C → D) → LayerNorm(D) → L2 normalisation."""

    def __init__(self, dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.head = nn.Linear(dim, teacher_dim)
        self.norm = nn.LayerNorm(teacher_dim, eps=LN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.norm(self.head(x)), dim=-1)


def resolve_block_indices(depth: int, indices: int | Sequence[int] | None) -> list[int]:
    """timm convention: None → all blocks, int n → last n, sequence → those (negatives from the end)."""
    if indices is None:
        indices = depth
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise ValueError(f"last-n indices {indices} out of range 1..{depth}")
        return list(range(depth - indices, depth))
    take = []
    for i in indices:
        j = depth + i if i < 0 else i
        if not 0 <= j < depth:
            raise ValueError(f"block index {i} out of range for depth {depth}")
        take.append(j)
    if not take:
        raise ValueError("no block indices requested")
    return sorted(set(take))


def _check_visible_idx(visible_idx: Tensor, batch: int, num_tokens: int) -> None:
    if visible_idx.dtype != torch.long or visible_idx.ndim != 2 or visible_idx.shape[0] != batch:
        raise ValueError(
            f"visible_idx must be int64 [B={batch}, L_vis], got {visible_idx.dtype} {tuple(visible_idx.shape)}"
        )
    if visible_idx.shape[1] > num_tokens:
        raise ValueError(f"visible_idx has {visible_idx.shape[1]} tokens but the input has {num_tokens}")


def _init_weights(m: nn.Module) -> None:
    # UMT stage 1: xavier-uniform Linear weights, zero biases, LayerNorm (1, 0). The Conv3d keeps
    # PyTorch's default init, and q_bias/v_bias start at zero.
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------------
# registered sizes


def _build(defaults: dict[str, Any], overrides: dict[str, Any]) -> UMTStudent:
    allowed = set(inspect.signature(VisionTransformer.__init__).parameters) | set(
        inspect.signature(UMTStudent.__init__).parameters
    )
    allowed -= {"self", "encoder_kwargs"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise TypeError(f"unknown student option(s) {unknown}; valid: {sorted(allowed)}")
    return UMTStudent(**{**defaults, **overrides})


@STUDENTS.register("umt_test_tiny")
def umt_test_tiny(**overrides: Any) -> UMTStudent:
    """Tiny test student: C 64, 4 blocks, 4 heads, patch 16, K=2 heads onto a 32-d teacher."""
    return _build(
        dict(embed_dim=64, depth=4, num_heads=4, patch_size=16, teacher_dim=32, num_align_layers=2),
        overrides,
    )


@STUDENTS.register("umt_small_patch16")
def umt_small_patch16(**overrides: Any) -> UMTStudent:
    """UMT-S/16: C 384, 12 blocks, 6 heads; K=6 heads onto a 512-d (CLIP-B/16) teacher."""
    return _build(
        dict(embed_dim=384, depth=12, num_heads=6, teacher_dim=512, num_align_layers=6, drop_path_rate=0.1),
        overrides,
    )


@STUDENTS.register("umt_base_patch16")
def umt_base_patch16(**overrides: Any) -> UMTStudent:
    """UMT-B/16: C 768, 12 blocks, 12 heads; K=6 heads onto CLIP-B/16 (512-d); drop path 0.1."""
    return _build(
        dict(embed_dim=768, depth=12, num_heads=12, teacher_dim=512, num_align_layers=6, drop_path_rate=0.1),
        overrides,
    )


@STUDENTS.register("umt_large_patch16")
def umt_large_patch16(**overrides: Any) -> UMTStudent:
    """UMT-L/16: C 1024, 24 blocks, 16 heads; K=6 heads onto CLIP-L/14 (768-d); drop path 0.2."""
    return _build(
        dict(embed_dim=1024, depth=24, num_heads=16, teacher_dim=768, num_align_layers=6, drop_path_rate=0.2),
        overrides,
    )


def create_student(name: str, **overrides: Any) -> UMTStudent:
    """Build a registered student by name; ``overrides`` replace the size's defaults (unknown keys fail).

    Example: ``create_student("umt_base_patch16", drop_path_rate=0.0, use_checkpoint=True)``.
    """
    return STUDENTS.get(name)(**overrides)


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters (works on the meta device)."""
    return sum(math.prod(p.shape) for p in module.parameters())
