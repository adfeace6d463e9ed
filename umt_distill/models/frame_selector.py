"""SMAUG's learned frame selector (arXiv 2211.11446 §3.3): a small network scores each frame of a view
for the caption, the top k frames are kept, and the selector learns from the stage-2 loss through a
differentiable top-k.

Differentiable top-k: *perturbed optimizers* (Berthet et al., NeurIPS 2020; as used for patch selection by
Cordonnier et al., CVPR 2021), in straight-through form. The forward pass keeps exactly the hard top k of
the scores (so the student sees real frames and the cached targets of those frames match); the backward
pass uses the gradient of the smoothed selection ``E_Z[topk(s + σZ)]``, Z standard normal, estimated from
``samples`` noise draws as ``E[topk(s + σZ) Zᵀ] / σ``. Why not Gumbel-softmax or a soft mixture of frames:
those feed the student blends of frames, for which no cached teacher target exists; the straight-through
form never does, and its gradient is unbiased for the smoothed objective. The gate multiplies each frame's
pixels by ``hard + soft − stop_grad(soft)`` (exactly 1 or 0 in the forward pass).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from umt_distill.masking import gather_visible
from umt_distill.models.sparsify import at_kept
from umt_distill.models.umt_vl import VisionOutput


def topk_indicator(scores: Tensor, k: int) -> Tensor:
    """k-hot float [..., T] of the k largest scores (ties: the earlier frame)."""
    idx = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(scores).scatter_(-1, idx, 1.0)


class _PerturbedTopK(torch.autograd.Function):
    """``E_Z[topk_indicator(s + σZ)]`` [B, T] with the perturbed-optimizer gradient."""

    @staticmethod
    def forward(ctx, scores: Tensor, k: int, sigma: float, noise: Tensor) -> Tensor:
        # noise: [S, B, T] standard normal
        hard = topk_indicator(scores.detach()[None] + sigma * noise, k)  # [S, B, T]
        ctx.save_for_backward(hard, noise)
        ctx.sigma = sigma
        return hard.mean(0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        hard, noise = ctx.saved_tensors
        # d E[Y]/ds = E[Y Zᵀ]/σ: contract the upstream gradient with Y first, then weight the noise
        weight = (hard * grad[None]).sum(-1, keepdim=True)  # [S, B, 1]
        return (weight * noise).mean(0) / ctx.sigma, None, None, None


def perturbed_topk(scores: Tensor, k: int, sigma: float, samples: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Straight-through perturbed top-k.

    Args:
        scores: float [B, T].
        k: Frames kept.
        sigma: Noise scale (larger: smoother, more biased gradient).
        samples: Noise draws S.
        generator: Draws the noise (CPU generator; the noise moves to ``scores``' device).

    Returns:
        (frames long [B, k] ascending, gate float [B, T]: exactly the k-hot of ``frames`` in value,
        carrying the smoothed selection's gradient to ``scores``).
    """
    B, T = scores.shape
    noise = torch.randn(samples, B, T, generator=generator, device=generator.device).to(scores.device, scores.dtype)
    soft = _PerturbedTopK.apply(scores, k, sigma, noise)  # [B, T]
    hard = topk_indicator(scores.detach(), k)
    frames = hard.nonzero()[:, 1].view(B, k)  # ascending within each row
    return frames, hard + soft - soft.detach()


SELECTOR_FILE = "frame_selector.safetensors"


def save_selector(selector: nn.Module, out_dir: str | Path) -> Path:
    """The learned selector's weights at the end of a stage-2 run: ``<output_dir>/frame_selector.safetensors``
    (it is not part of the stage-2 model or its checkpoints, which downstream stages load strictly)."""
    from safetensors.torch import save_file

    path = Path(out_dir) / SELECTOR_FILE
    save_file({k: v.detach().cpu().contiguous() for k, v in selector.state_dict().items()}, str(path))
    return path


def load_selector(selector: nn.Module, out_dir: str | Path) -> nn.Module:
    """Weights written by :func:`save_selector` into ``selector`` (strict)."""
    from safetensors.torch import load_file

    selector.load_state_dict(load_file(str(Path(out_dir) / SELECTOR_FILE)), strict=True)
    return selector


def frame_features(patch_tokens: Tensor, num_frames: int) -> Tensor:
    """Per-frame mean of patch embeddings: [B, T·N, C] → [B, T, C]."""
    B, L, C = patch_tokens.shape
    return patch_tokens.view(B, num_frames, L // num_frames, C).mean(2)


class FrameSelector(nn.Module):
    """Scores frames for a caption: ``w · GELU(V·LN(f_t)) ⊙ (E·e)`` for frame feature ``f_t`` and the caption's
    CLIP text embedding ``e`` (the product makes the ranking depend on the caption).

    Args:
        visual_dim: Width of the frame features (the student's patch embedding).
        text_dim: Width of the text embedding (the teacher's joint space).
        hidden: Hidden width.
    """

    def __init__(self, visual_dim: int, text_dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(visual_dim)
        self.visual = nn.Linear(visual_dim, hidden)
        self.text = nn.Linear(text_dim, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, frames: Tensor, text: Tensor) -> Tensor:
        """frames [B, T, Cv], text [B, Dt] → scores [B, T]."""
        h = F.gelu(self.visual(self.norm(frames))) * self.text(text)[:, None]  # [B, T, H]
        return self.out(h).squeeze(-1)


def sparse_forward_kept(vision_encoder: nn.Module, x: Tensor, visible_idx: Tensor | None, spec, scores: Tensor | None,
                        align: bool, num_frames: int):
    """``models.sparse_vl.sparse_vision_forward`` for a step that keeps ``num_frames`` of ``x``'s T frames.

    The visible tokens (``data.frame_select.restrict_to_frames``) lie in the kept frames only, at their
    original indices (so original positional embeddings), frame-major with the same count per frame; token
    sparsification then ranks within each of the ``num_frames`` kept frames.

    Args:
        x: float [B, 3, T, H, W] (every frame: only the kept frames' tokens are embedded and run).
        visible_idx: long [B, num_frames · n] sorted (never None: restriction gives the kept frames' tokens).
        spec: The ``SparseSpec``; scores: [B, num_frames, n] teacher attention at the visible tokens, or None.

    Returns:
        As ``sparse_vision_forward``.
    """
    enc = vision_encoder.encoder
    tokens, pos_table = enc.embed(x, visible_idx)  # [B, k·n, C]
    last_block = enc.depth - 1
    take = sorted(set(vision_encoder.return_index) | {last_block}) if align else [last_block]
    outs, kept, pruned = enc.run_blocks_sparse(tokens, take, True, spec, num_frames, scores)
    feats = dict(zip(take, zip(outs, pruned)))
    last = feats[last_block][0]
    aligned = None
    if align:
        pos_k = gather_visible(pos_table.expand(tokens.shape[0], -1, -1), kept).to(last.dtype)
        aligned = torch.stack([head(at_kept(feats[i][0], kept, feats[i][1]) + pos_k)
                               for head, i in zip(vision_encoder.clip_decoder, vision_encoder.return_index)])
    pooled = vision_encoder.pool_norm(last.mean(1, keepdim=True))  # [B, 1, C]
    return VisionOutput(aligned, last, pooled), kept
