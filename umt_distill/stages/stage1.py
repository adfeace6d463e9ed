"""Stage 1: video-only Unmasked Token Alignment (UTA), from cached targets or an online teacher.

One explicit loop (``train``); every part it calls is a tested library function. Per step:
targets (cached, or the teacher run on the same pixels) → mask from the teacher's attention →
student on the visible tokens (with ``sparsify``: the blocks after ℓ on each frame's top-ρ of them, and
the targets sliced to those) → mean over layers, batch and tokens of 2 − 2·cos.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from umt_distill.cache.datasets import batch_pixels
from umt_distill.cache.spec import SpecMismatchError, read_spec
from umt_distill.config import Recipe
from umt_distill.data.pixels import normalize_video
from umt_distill.losses.uta import uta_loss
from umt_distill.masking import gather_visible
from umt_distill.stages.parts import (
    build_data,
    build_student,
    check_store_matches,
    mask_generator,
    sparse_scores,
    sparse_spec,
    step_targets_attn,
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
    """Run stage 1 as the recipe says; returns the final metrics. Resumes from ``train.output_dir``."""
    env = du.init_distributed()
    device = du.resolve_device(cfg.train.device, env)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank

    teacher = None
    if cfg.teacher.mode == "cached":
        spec = read_spec(cfg.cache.store)
        check_store_matches(spec, cfg)
        teacher_dim = spec["teacher"]["D"]
    else:
        teacher = build_teacher(cfg, device)  # frozen; never wrapped, never in the optimizer
        teacher_dim = teacher.embed_dim
    student = build_student(cfg, teacher_dim).to(device)
    sparse = sparse_spec(cfg, student.encoder.depth)  # None: every visible token in every block
    dataset, sampler, make_loader, clips_per_rank = build_data(cfg, env)
    B, A = cfg.train.batch_size, cfg.train.accum_steps
    budget = step_budget(cfg, clips_per_rank, env.world_size)
    o = cfg.optim
    optimizer = build_adamw(student, budget.lr, o.weight_decay, o.betas, o.eps, skip=student.no_weight_decay())
    model = du.wrap_ddp(student, env, device)
    ckpt = find_resume_checkpoint(cfg.train.output_dir, resume)
    run, step = open_run(cfg, "stage1", env, student, optimizer, ckpt, budget.total_steps)
    amp_dtype, scaler = amp_setup(cfg.train.amp, device)
    last: dict = {}
    while step < budget.total_steps:
        epoch, done_in_epoch = budget.position(step)
        batches = epoch_batches(dataset, sampler, make_loader, epoch, done_in_epoch * A, B)
        t_data = time.perf_counter()
        for _ in range(budget.steps_left_in_epoch(step)):
            set_lr(optimizer, float(budget.lrs[step]))
            model.train()
            gen = mask_generator(cfg.seed, step, env.rank)
            loss_sum, layer_sum, n_tokens, data_time, t_step = 0.0, None, 0, 0.0, time.perf_counter()
            for micro in range(A):
                batch = next(batches)
                data_time += time.perf_counter() - t_data
                pixels = batch_pixels(batch, device)  # [B, T, 3, H, W] uint8
                # Cached or online targets at the visible positions, and the mask that chose them.
                targets, visible_idx, attn = step_targets_attn(cfg, batch, pixels, teacher, gen, device)  # [K, B, L, D], [B, L]
                scores = sparse_scores(sparse, attn, visible_idx)  # [B, T, n] or None
                with micro_step(model, micro, A, amp_dtype, device):
                    if sparse is None:
                        preds = model(normalize_video(pixels), visible_idx)  # [K, B, L, D], unit norm
                    else:  # the blocks after sparsify.after_block see each frame's top tokens only
                        preds, kept = model(normalize_video(pixels), visible_idx, sparse, scores)  # [K, B, L_keep, D]
                        targets = gather_visible(targets, kept)  # the teacher's tokens at the kept positions
                    loss, per_layer = uta_loss(preds.float(), targets)
                    scaler.scale(loss / A).backward()
                loss_sum += loss.item() / A  # sync point: one .item() per micro-batch
                per_layer = per_layer.detach() / A
                layer_sum = per_layer if layer_sum is None else layer_sum + per_layer
                n_tokens += visible_idx.numel()
                t_data = time.perf_counter()
            losses = du.mean_over_ranks({"loss": loss_sum, **{f"loss_layer{k}": v for k, v in enumerate(layer_sum.tolist())}},
                                        device)
            grad_norm = optimizer_step(losses["loss"], step, student, optimizer, scaler, o.grad_clip, run.out_dir)
            step += 1
            step_time = time.perf_counter() - t_step
            last = {"step": step, "epoch": epoch, **losses, "lr": float(budget.lrs[step - 1]), "grad_norm": grad_norm,
                    "step_time": step_time, "data_time": data_time, "tokens_per_s": n_tokens * env.world_size / step_time}
            run.log_step(last)
            run.checkpoint_if_due(step, epoch, student, optimizer)
    run.close()
    return last


__all__ = ["NonFiniteLossError", "SpecMismatchError", "train"]
