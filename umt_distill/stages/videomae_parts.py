"""Parts of the pixel-reconstruction loop (``stages/videomae.py``): recipe checks, model, per-step plan."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from umt_distill.cache.datasets import device_targets, target_codec
from umt_distill.config import Recipe, RecipeError
from umt_distill.losses.pixel import pixel_targets
from umt_distill.masking import decoder_plan, gather_visible
from umt_distill.models.videomae import build_videomae
from umt_distill.registry import MASKS


@dataclass
class StepPlan:
    """What one micro-batch trains on.

    Attributes:
        visible_idx: long [B, L_vis] tokens the encoder sees.
        decode_idx: long [B, L_dec] tokens the decoder predicts.
        weight: float [B, L_dec] 1 where the prediction counts in the loss.
        pixel_targets: float [B, L_dec, 3·tubelet·p²] at ``decode_idx``.
        uta_targets: float [K, B, L_vis, D] teacher tokens at ``visible_idx`` (UTA + pixel) or None.
    """

    visible_idx: Tensor
    decode_idx: Tensor
    weight: Tensor
    pixel_targets: Tensor
    uta_targets: Tensor | None = None


def check_videomae_recipe(cfg: Recipe) -> None:
    """Refuse combinations the loop cannot train, naming the keys."""
    v = cfg.videomae
    if v.target == "uta+pixel" and v.tubelet_size != 1:
        raise RecipeError(f"videomae.target=uta+pixel needs videomae.tubelet_size=1 (one teacher token per student "
                          f"token, as UMT pretrains), got {v.tubelet_size}")
    if cfg.mask.type == "semantic" and v.target != "uta+pixel":
        raise RecipeError("mask.type=semantic needs the teacher's attention: use mask.type=tube (VideoMAE) or "
                          "videomae.target=uta+pixel")
    if v.target == "uta+pixel" and cfg.teacher.mode == "cached" and cfg.cache.mode != "full":
        raise RecipeError("videomae.target=uta+pixel draws its masks at train time: it needs a cache.mode=full store")
    if cfg.views.num_frames % v.tubelet_size:
        raise RecipeError(f"views.num_frames={cfg.views.num_frames} is not a multiple of videomae.tubelet_size={v.tubelet_size}")
    if v.uta_weight == 0 and v.pixel_weight == 0:
        raise RecipeError("videomae.uta_weight and videomae.pixel_weight are both 0: nothing to train")
    if cfg.sparsify.keep < 1:
        raise RecipeError("sparsify.keep < 1 is not supported by train.stage=videomae (the pixel decoder reads the "
                          "encoder's output at every visible token): use sparsify.keep=1, or stage1/stage2")


def build_model(cfg: Recipe, teacher_dim: int | None):
    """The recipe's :class:`~umt_distill.models.videomae.VideoMAE` (with UTA heads for ``uta+pixel``)."""
    v, s = cfg.videomae, cfg.student
    uta = v.target == "uta+pixel"
    return build_videomae(
        s.name, v.tubelet_size, v.decoder_dim, v.decoder_depth, v.decoder_heads,
        teacher_dim=teacher_dim if uta else None, num_align_layers=cfg.teacher.layers if uta else 0,
        align_interval=s.align_interval, drop_path_rate=s.drop_path_rate, use_checkpoint=s.use_checkpoint,
        checkpoint_num=s.checkpoint_num,
    )


def sample_generator(seed: int, step: int, sample: int) -> torch.Generator:
    """Masks of one sample: a pure function of (seed, step, the sample's place in the global batch).

    Keyed by the global place (not the rank), a 2-process run draws the same masks as 1 process with
    twice the batch, so the two are the same training run.
    """
    digest = hashlib.sha256(f"{seed}:videomae-mask:{step}:{sample}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def global_sample_index(rank: int, world: int, micro: int, batch: int, j: int) -> int:
    """Place of sample ``j`` of micro-batch ``micro`` on ``rank`` within the step's global batch.

    The sampler deals the epoch's order round-robin over ranks (rank r takes items r, r + W, ...), so
    the i-th item a rank trains on in a step is the step's item ``i·W + r``.
    """
    return (micro * batch + j) * world + rank


def teacher_tokens(cfg: Recipe, batch: dict, pixels: Tensor, teacher, device: torch.device) -> tuple[Tensor, Tensor]:
    """UTA + pixel: the teacher's tokens [B, K, T, N, D] and attention [B, T, N], float32 on ``device`` —
    from the online teacher on exactly the student's pixels, or the batch's cached targets (moved in
    their stored dtype and decoded on the device, as stage 1)."""
    if teacher is not None:
        out = teacher(pixels)
        return out.tokens.float(), out.attn.float()
    tokens = device_targets(batch, target_codec(str(cfg.cache.store), cfg.cache.codec), device)
    return tokens, batch["attn"].to(device, non_blocking=True).float()


def step_plan(cfg: Recipe, pixels: Tensor, tokens: Tensor | None, attn: Tensor | None, step: int, first: list[int],
              patch: int, device: torch.device) -> StepPlan:
    """Masks, decoder plan and targets of one micro-batch.

    Args:
        pixels: uint8 [B, T, 3, H, W] on ``device``.
        tokens, attn: UTA + pixel: :func:`teacher_tokens`; pixel only: None.
        first: Global sample index of every sample in the micro-batch (:func:`global_sample_index`).
        patch: The encoder's spatial patch side.
    """

    v = cfg.videomae
    B, T, _, H, W = pixels.shape
    p = patch
    grid = (T // v.tubelet_size, H // p, W // p)
    N = grid[1] * grid[2]
    vis, dec, wts = [], [], []
    for j in range(B):  # per-sample generators: masks do not depend on how the batch is split
        gen = sample_generator(cfg.seed, step, first[j])
        a = attn[j:j + 1] if attn is not None else None
        vj = MASKS.get(cfg.mask.type)(1, grid[0], N, cfg.mask.ratio, gen, attn=a, device=device)  # [1, L_vis]
        dj, wj = decoder_plan(vj, v.decoder_mask, grid[0] * N, grid, v.decoder_mask_ratio, gen)
        vis.append(vj), dec.append(dj), wts.append(wj)
    visible_idx, decode_idx, weight = torch.cat(vis), torch.cat(dec), torch.cat(wts)
    video01 = pixels.permute(0, 2, 1, 3, 4).float().div(255)  # [B, 3, T, H, W] in [0, 1]
    targets = gather_visible(pixel_targets(video01, v.tubelet_size, p, v.norm_target), decode_idx)  # [B, L_dec, P]
    uta_targets = None
    if tokens is not None:
        uta_targets = gather_visible(tokens.flatten(2, 3).transpose(0, 1), visible_idx)  # [K, B, L_vis, D]
    return StepPlan(visible_idx, decode_idx, weight, targets, uta_targets)
