"""Pixel reconstruction: VideoMAE, VideoMAE V2 dual masking, and UMT Table 1's UTA + pixel.

One explicit loop (``train``), sharing stage 1's tested parts (data, optimizer groups, LR schedule,
checkpoints and resume, DDP, registered masks). Per step: encoder mask (``mask``: tube in VideoMAE) →
decoder plan (``videomae.decoder_mask``: every invisible token, or V2's running cell) → encoder on the
visible tokens, decoder on [visible ; mask tokens] → MSE on per-patch normalised pixels of the tokens
that count; with ``videomae.target=uta+pixel`` plus UTA (2 − 2·cos) on the visible tokens against the
teacher (cached or online), ``uta_weight · UTA + pixel_weight · pixel``.

Masks are drawn per sample from (seed, step, place in the global batch), so a run on W processes is
the same run as on one process with W times the batch.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from umt_distill.cache.spec import read_spec
from umt_distill.config import Recipe
from umt_distill.data.pixels import normalize_video
from umt_distill.losses.pixel import pixel_loss
from umt_distill.losses.uta import uta_loss
from umt_distill.stages.parts import build_data, check_store_matches
from umt_distill.stages.videomae_parts import (
    StepPlan,
    build_model,
    check_videomae_recipe,
    global_sample_index,
    step_plan,
    teacher_tokens,
)
from umt_distill.teachers.build import build_teacher
from umt_distill.training import distributed as du
from umt_distill.training.checkpoint import find_resume_checkpoint
from umt_distill.training.loop import (
    NonFiniteLossError,
    epoch_batches,
    micro_step,
    open_run,
    optimizer_step,
    step_budget,
)
from umt_distill.training.optim import amp_setup, build_adamw, set_lr


def train(cfg: Recipe, resume: str | Path | None = None) -> dict:
    """Run pixel-reconstruction pretraining as the recipe says; returns the last step's metrics."""
    check_videomae_recipe(cfg)
    env = du.init_distributed()
    device = du.resolve_device(cfg.train.device, env)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    v = cfg.videomae
    uta = v.target == "uta+pixel"
    # Pixels come from the videos, or (train.pixels_from=store) from a cache store's view frames, as in stage 1.
    from_store = uta or cfg.train.pixels_from == "store"
    teacher, teacher_dim = None, None
    if from_store and cfg.teacher.mode == "cached":
        spec = read_spec(cfg.cache.store)
        check_store_matches(spec, cfg)
        teacher_dim = spec["teacher"]["D"]
    elif uta:
        teacher = build_teacher(cfg, device)  # frozen; never wrapped, never in the optimizer
        teacher_dim = teacher.embed_dim
    core = build_model(cfg, teacher_dim).to(device)
    dataset, sampler, make_loader, clips_per_rank = build_data(cfg, env, targets=from_store)
    B, A, W = cfg.train.batch_size, cfg.train.accum_steps, env.world_size
    budget = step_budget(cfg, clips_per_rank, W)
    o = cfg.optim
    optimizer = build_adamw(core, budget.lr, o.weight_decay, o.betas, o.eps, skip=core.no_weight_decay())
    model = du.wrap_ddp(core, env, device)
    ckpt = find_resume_checkpoint(cfg.train.output_dir, resume)
    run, step = open_run(cfg, "videomae", env, core, optimizer, ckpt, budget.total_steps)
    amp_dtype, scaler = amp_setup(cfg.train.amp, device)
    last: dict = {}
    while step < budget.total_steps:
        epoch, done_in_epoch = budget.position(step)
        batches = epoch_batches(dataset, sampler, make_loader, epoch, done_in_epoch * A, B)
        t_data = time.perf_counter()
        for _ in range(budget.steps_left_in_epoch(step)):
            set_lr(optimizer, float(budget.lrs[step]))
            model.train()
            sums = dict.fromkeys(("loss", "loss_pixel", "loss_uta"), 0.0)  # this rank's, / accum
            n_tokens, n_decoded, data_time, t_step = 0, 0, 0.0, time.perf_counter()
            for micro in range(A):
                batch = next(batches)
                data_time += time.perf_counter() - t_data
                pixels = batch["pixels"].to(device, non_blocking=True)  # [B, T, 3, H, W] uint8
                first = [global_sample_index(env.rank, W, micro, B, j) for j in range(pixels.shape[0])]
                tokens, attn = teacher_tokens(cfg, batch, pixels, teacher, device) if uta else (None, None)
                plan = step_plan(cfg, pixels, tokens, attn, step, first, core.patch_size, device)
                with micro_step(model, micro, A, amp_dtype, device):
                    pred, align = model(normalize_video(pixels), plan.visible_idx, plan.decode_idx)
                    pix, uta_l = _losses(pred, align, plan)
                    loss = v.pixel_weight * pix + (v.uta_weight * uta_l if uta else 0.0)
                    scaler.scale(loss / A).backward()
                for k, x in zip(sums, (loss, pix, uta_l)):  # sync point: .item() per loss and micro-batch
                    sums[k] += x.item() / A
                n_tokens += plan.visible_idx.numel()
                n_decoded += int(plan.weight.sum().item())
                t_data = time.perf_counter()
            if not uta:
                del sums["loss_uta"]
            losses = du.mean_over_ranks(sums, device)
            grad_norm = optimizer_step(losses["loss"], step, core, optimizer, scaler, o.grad_clip, run.out_dir)
            step += 1
            step_time = time.perf_counter() - t_step
            last = {"step": step, "epoch": epoch, **losses, "lr": float(budget.lrs[step - 1]), "grad_norm": grad_norm,
                    "step_time": step_time, "data_time": data_time, "tokens_per_s": n_tokens * W / step_time,
                    "reconstructed_tokens": n_decoded * W}
            run.log_step(last)
            run.checkpoint_if_due(step, epoch, core, optimizer)
    run.close()
    return last


def _losses(pred: torch.Tensor, align: torch.Tensor | None, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel loss, and UTA on the visible tokens (0 without alignment heads)."""
    pix = pixel_loss(pred, plan.pixel_targets, plan.weight)
    if align is None:
        return pix, torch.zeros((), device=pix.device)
    return pix, uta_loss(align.float(), plan.uta_targets)[0]


__all__ = ["train", "NonFiniteLossError"]
