"""Stage 1: video-only Unmasked Token Alignment (UTA), from cached targets or an online teacher.

One explicit loop (``train``); every part it calls is a tested library function. Per step:
targets (cached, or the teacher run on the same pixels) → mask from the teacher's attention →
student on the visible tokens (with ``sparsify``: the blocks after ℓ on each frame's top-ρ of them, and
the targets sliced to those) → mean over layers, batch and tokens of 2 − 2·cos.

The data is the global sample stream of ``data.samplers``: the order, each sample's view and its mask are
functions of (seed, epoch, global position) only, the checkpoint records the position consumed, and a run
resumes at any world size and number of loader workers with the same sequence (``ledger.jsonl`` lists
every rank's samples per step; ``training.loop.SampleClock`` says how steps and the LR follow samples).
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
from umt_distill.stages.parts import build_elastic_data as build_data
from umt_distill.stages.parts import (
    build_student,
    check_store_matches,
    sample_mask_generators,
    sparse_scores,
    sparse_spec,
    step_targets_attn,
)
from umt_distill.teachers.build import build_teacher
from umt_distill.training import distributed as du
from umt_distill.training.checkpoint import find_resume_checkpoint
from umt_distill.training.loop import (
    NonFiniteLossError,
    micro_step,
    open_run,
    optimizer_step,
    sample_clock,
    stream_batches,
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
    dataset, sampler, make_loader, epoch_samples = build_data(cfg, env)
    B, A = cfg.train.batch_size, cfg.train.accum_steps
    clock = sample_clock(cfg, epoch_samples, env.world_size)  # steps and LR follow the samples consumed
    o = cfg.optim
    optimizer = build_adamw(student, clock.lr, o.weight_decay, o.betas, o.eps, skip=student.no_weight_decay())
    model = du.wrap_ddp(student, env, device)
    ckpt = find_resume_checkpoint(cfg.train.output_dir, resume)
    run, step = open_run(cfg, "stage1", env, student, optimizer, ckpt, clock=clock)  # run.position: global
    amp_dtype, scaler = amp_setup(cfg.train.amp, device)
    last: dict = {}
    batches = stream_batches(dataset, sampler, make_loader, run.position, run.end, epoch_samples, B, env.world_size)
    t_data = time.perf_counter()
    while step < run.total_steps:  # one loader for the rest of the run (steps may straddle epochs)
        epoch, lr = clock.epoch(run.position), clock.lr_at(run.position, run.run_samples)
        set_lr(optimizer, lr)
        model.train()
        loss_sum, layer_sum, n_tokens, data_time, t_step = 0.0, None, 0, 0.0, time.perf_counter()
        consumed: list = []  # (epoch, clip, view) of this rank's samples, for the ledger
        for micro in range(A):
            batch = next(batches)
            data_time += time.perf_counter() - t_data
            epochs = batch["epoch"].tolist() if "epoch" in batch else [epoch] * len(batch["clip_id"])
            consumed += zip(epochs, batch["clip_id"], batch["view_index"].tolist())
            gen = sample_mask_generators(cfg.seed, epochs, list(batch["clip_id"]))  # a sample's mask: (seed, epoch, clip)
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
        run.advance(step, consumed)  # ledger.jsonl; the position moves by one global batch
        step_time = time.perf_counter() - t_step
        last = {"step": step, "epoch": epoch, **losses, "lr": lr, "grad_norm": grad_norm,
                "step_time": step_time, "data_time": data_time, "tokens_per_s": n_tokens * env.world_size / step_time}
        run.log_step(last)
        run.checkpoint_if_due(step, epoch, student, optimizer)
    run.close()
    return last


__all__ = ["NonFiniteLossError", "SpecMismatchError", "train"]
