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

import math
import time
from pathlib import Path

import torch

from umt_distill.config import Recipe, recipe_to_yaml
from umt_distill.data.pixels import normalize_video
from umt_distill.training import distributed as du
from umt_distill.training.checkpoint import find_resume_checkpoint, resume_training, rng_state, save_checkpoint
from umt_distill.training.metrics import MetricsLogger
from umt_distill.training.optim import amp_setup, build_adamw, lr_schedule, set_lr
from umt_distill.training.progress import StepProgress
from umt_distill.stages.parts import build_data, check_store_matches
from umt_distill.training.loop import NonFiniteLossError
from umt_distill.stages.videomae_parts import build_model, check_videomae_recipe, global_sample_index, step_plan, teacher_tokens


def train(cfg: Recipe, resume: str | Path | None = None) -> dict:
    """Run pixel-reconstruction pretraining as the recipe says; returns the last step's metrics."""
    check_videomae_recipe(cfg)
    env = du.init_distributed()
    device = du.resolve_device(cfg.train.device, env)
    out_dir = Path(cfg.train.output_dir)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    v = cfg.videomae
    uta = v.target == "uta+pixel"
    # Pixels come from the videos, or (train.pixels_from=store) from a cache store's view frames, as in stage 1.
    from_store = uta or cfg.train.pixels_from == "store"
    teacher, teacher_dim = None, None
    if from_store and cfg.teacher.mode == "cached":
        from umt_distill.cache.spec import read_spec

        spec = read_spec(cfg.cache.store)
        check_store_matches(spec, cfg)
        teacher_dim = spec["teacher"]["D"]
    elif uta:
        from umt_distill.teachers.build import build_teacher

        teacher = build_teacher(cfg, device)  # frozen; never wrapped, never in the optimizer
        teacher_dim = teacher.embed_dim
    core = build_model(cfg, teacher_dim).to(device)
    dataset, sampler, make_loader, clips_per_rank = build_data(cfg, env, targets=from_store)
    B, A, W = cfg.train.batch_size, cfg.train.accum_steps, env.world_size
    steps_per_epoch = clips_per_rank // (B * A)
    if steps_per_epoch == 0:
        raise ValueError(f"{clips_per_rank} clips per rank are fewer than one step of {B} x {A}")
    total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    lr, lrs = lr_schedule(cfg.optim, B * A * W, total_steps, steps_per_epoch)
    o = cfg.optim
    optimizer = build_adamw(core, lr, o.weight_decay, o.betas, o.eps, skip=core.no_weight_decay())
    model = du.wrap_ddp(core, env, device)

    step, metrics = 0, MetricsLogger(out_dir, env.is_main, cfg.train.tensorboard)
    ckpt = find_resume_checkpoint(out_dir, resume)
    if ckpt is not None:
        step = resume_training(ckpt, core, optimizer, metrics, env.is_main)
    progress = StepProgress("videomae", total_steps, start=step, enabled=env.is_main)
    amp_dtype, scaler = amp_setup(cfg.train.amp, device)
    recipe_yaml = recipe_to_yaml(cfg)
    last: dict = {}
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        dataset.set_epoch(epoch)
        consumed = done_in_epoch * A  # batches of this epoch already trained on
        if sampler is not None:
            sampler.set_epoch(epoch, start=consumed * B)
        batches = iter(make_loader())
        if sampler is None:  # a stream cannot seek: read past what was consumed before the restart
            for _ in range(consumed):
                next(batches)
        t_data = time.perf_counter()
        for _ in range(steps_per_epoch - done_in_epoch):
            if step >= total_steps:
                break
            set_lr(optimizer, float(lrs[step]))
            model.train()
            sums = torch.zeros(3, dtype=torch.float64)  # loss, pixel, uta (this rank, / accum)
            n_tokens, n_decoded, data_time, t_step = 0, 0, 0.0, time.perf_counter()
            for micro in range(A):
                batch = next(batches)
                data_time += time.perf_counter() - t_data
                pixels = batch["pixels"].to(device, non_blocking=True)  # [B, T, 3, H, W] uint8
                first = [global_sample_index(env.rank, W, micro, B, j) for j in range(pixels.shape[0])]
                tokens, attn = teacher_tokens(cfg, batch, pixels, teacher, device) if uta else (None, None)
                plan = step_plan(cfg, pixels, tokens, attn, step, first, core.patch_size, device)
                sync = micro == A - 1
                with model.no_sync() if (env.distributed and not sync) else _null(), \
                        torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    pred, align = model(normalize_video(pixels), plan.visible_idx, plan.decode_idx)
                    pix, uta_l = _losses(pred, align, plan)
                    loss = v.pixel_weight * pix + (v.uta_weight * uta_l if uta else 0.0)
                    scaler.scale(loss / A).backward()
                sums += torch.tensor([loss.item(), pix.item(), uta_l.item()], dtype=torch.float64) / A  # sync point
                n_tokens += plan.visible_idx.numel()
                n_decoded += int(plan.weight.sum().item())
                t_data = time.perf_counter()
            sums = _mean_over_ranks(sums, env, device)
            if not math.isfinite(float(sums[0])):
                raise NonFiniteLossError(f"loss is {float(sums[0])} at step {step + 1}; the last good checkpoint is kept in {out_dir}")
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.optim.grad_clip or float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_time = time.perf_counter() - t_step
            last = {"step": step, "epoch": epoch, "loss": float(sums[0]), "loss_pixel": float(sums[1]),
                    **({"loss_uta": float(sums[2])} if uta else {}), "lr": float(lrs[step - 1]),
                    "grad_norm": float(grad_norm), "step_time": step_time, "data_time": data_time,
                    "tokens_per_s": n_tokens * W / step_time, "reconstructed_tokens": n_decoded * W}
            if step % cfg.train.log_every == 0 or step == total_steps:
                metrics.log(last)
            progress.update(step, loss=last["loss"])
            if step % cfg.train.ckpt_every == 0 or step == total_steps:
                state = {"optimizer": optimizer.state_dict(), "step": step, "epoch": epoch, "rng": rng_state()}
                if env.is_main:
                    save_checkpoint(out_dir, step, core, state, recipe_yaml)
                du.barrier()
    metrics.close()
    return last


def _losses(pred: torch.Tensor, align: torch.Tensor | None, plan) -> tuple[torch.Tensor, torch.Tensor]:
    from umt_distill.losses import uta_loss
    from umt_distill.losses_pixel import pixel_loss

    pix = pixel_loss(pred, plan.pixel_targets, plan.weight)
    if align is None:
        return pix, torch.zeros((), device=pix.device)
    return pix, uta_loss(align.float(), plan.uta_targets)[0]


def _mean_over_ranks(values: torch.Tensor, env: du.DistEnv, device: torch.device) -> torch.Tensor:
    """The logged losses are the global batch's, not rank 0's (one small collective per step)."""
    if not env.distributed:
        return values
    import torch.distributed as dist

    out = values.to(device)
    dist.all_reduce(out)
    return out.cpu() / env.world_size


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


__all__ = ["train", "NonFiniteLossError"]
