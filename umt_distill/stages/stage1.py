"""Stage 1: video-only Unmasked Token Alignment (UTA), from cached targets or an online teacher.

One explicit loop (``train``); every part it calls is a tested library function. Per step:
targets (cached, or the teacher run on the same pixels) → mask from the teacher's attention →
student on the visible tokens → mean over layers, batch and tokens of 2 − 2·cos.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from umt_distill.cache.spec import SpecMismatchError, read_spec
from umt_distill.config import Recipe, recipe_to_yaml
from umt_distill.data.pixels import normalize_video
from umt_distill.cache.datasets import batch_pixels
from umt_distill.training import distributed as du
from umt_distill.training.checkpoint import find_resume_checkpoint, resume_training, rng_state, save_checkpoint
from umt_distill.training.metrics import MetricsLogger
from umt_distill.training.optim import amp_setup, build_adamw, lr_schedule, set_lr
from umt_distill.training.progress import StepProgress
from umt_distill.stages.parts import build_data, build_student, check_store_matches, mask_generator, step_targets
from umt_distill.training.loop import NonFiniteLossError


def train(cfg: Recipe, resume: str | Path | None = None) -> dict:
    """Run stage 1 as the recipe says; returns the final metrics. Resumes from ``train.output_dir``."""
    env = du.init_distributed()
    device = du.resolve_device(cfg.train.device, env)
    out_dir = Path(cfg.train.output_dir)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank

    teacher, spec = None, None
    if cfg.teacher.mode == "cached":
        spec = read_spec(cfg.cache.store)
        check_store_matches(spec, cfg)
        teacher_dim = spec["teacher"]["D"]
    else:
        from umt_distill.teachers.build import build_teacher

        teacher = build_teacher(cfg, device)  # frozen; never wrapped, never in the optimizer
        teacher_dim = teacher.embed_dim
    student = build_student(cfg, teacher_dim).to(device)
    dataset, sampler, make_loader, clips_per_rank = build_data(cfg, env)
    steps_per_epoch = clips_per_rank // (cfg.train.batch_size * cfg.train.accum_steps)
    if steps_per_epoch == 0:
        raise ValueError(f"{clips_per_rank} clips per rank are fewer than one step of {cfg.train.batch_size} x {cfg.train.accum_steps}")
    total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    total_batch = cfg.train.batch_size * cfg.train.accum_steps * env.world_size
    lr, lrs = lr_schedule(cfg.optim, total_batch, total_steps, steps_per_epoch)
    o = cfg.optim
    optimizer = build_adamw(student, lr, o.weight_decay, o.betas, o.eps, skip=student.no_weight_decay())
    model = du.wrap_ddp(student, env, device)

    step, metrics = 0, MetricsLogger(out_dir, env.is_main, cfg.train.tensorboard)
    ckpt = find_resume_checkpoint(out_dir, resume)
    if ckpt is not None:
        step = resume_training(ckpt, student, optimizer, metrics, env.is_main)
    progress = StepProgress("stage1", total_steps, start=step, enabled=env.is_main)
    amp_dtype, scaler = amp_setup(cfg.train.amp, device)
    recipe_yaml = recipe_to_yaml(cfg)
    last: dict = {}
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        dataset.set_epoch(epoch)
        consumed = done_in_epoch * cfg.train.accum_steps  # batches of this epoch already trained on
        if sampler is not None:
            sampler.set_epoch(epoch, start=consumed * cfg.train.batch_size)
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
            gen = mask_generator(cfg.seed, step, env.rank)
            loss_sum, layer_sum, n_tokens, data_time, t_step = 0.0, None, 0, 0.0, time.perf_counter()
            for micro in range(cfg.train.accum_steps):
                batch = next(batches)
                data_time += time.perf_counter() - t_data
                pixels = batch_pixels(batch, device)  # [B, T, 3, H, W] uint8
                # Cached or online targets at the visible positions, and the mask that chose them.
                targets, visible_idx = step_targets(cfg, batch, pixels, teacher, gen, device)  # [K, B, L, D], [B, L]
                sync = micro == cfg.train.accum_steps - 1
                with model.no_sync() if (env.distributed and not sync) else _null(), \
                        torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    preds = model(normalize_video(pixels), visible_idx)  # [K, B, L, D], unit norm
                    loss, per_layer = _uta(preds, targets)
                    scaler.scale(loss / cfg.train.accum_steps).backward()
                loss_sum += loss.item() / cfg.train.accum_steps  # sync point: one .item() per micro-batch
                per_layer = per_layer.detach() / cfg.train.accum_steps
                layer_sum = per_layer if layer_sum is None else layer_sum + per_layer
                n_tokens += visible_idx.numel()
                t_data = time.perf_counter()
            if not math.isfinite(loss_sum):
                raise NonFiniteLossError(f"loss is {loss_sum} at step {step + 1}; the last good checkpoint is kept in {out_dir}")
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip or float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_time = time.perf_counter() - t_step
            last = {"step": step, "epoch": epoch, "loss": loss_sum, "lr": float(lrs[step - 1]), "grad_norm": float(grad_norm),
                    **{f"loss_layer{k}": float(v) for k, v in enumerate(layer_sum.tolist())},
                    "step_time": step_time, "data_time": data_time, "tokens_per_s": n_tokens * env.world_size / step_time}
            if step % cfg.train.log_every == 0 or step == total_steps:
                metrics.log(last)
            progress.update(step, loss=loss_sum)
            if step % cfg.train.ckpt_every == 0 or step == total_steps:
                state = {"optimizer": optimizer.state_dict(), "step": step, "epoch": epoch, "rng": rng_state()}
                if env.is_main:
                    save_checkpoint(out_dir, step, student, state, recipe_yaml)
                du.barrier()
    metrics.close()
    return last


def _uta(preds: torch.Tensor, targets: torch.Tensor):
    from umt_distill.losses import uta_loss

    return uta_loss(preds.float(), targets)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


__all__ = ["train", "NonFiniteLossError", "SpecMismatchError"]
