"""Optimizer parameter groups and per-iteration schedules (shared by every stage)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn


def param_groups(
    model: nn.Module,
    weight_decay: float,
    skip: Iterable[str] = (),
    lr_scale: Callable[[str], float] | None = None,
) -> list[dict]:
    """AdamW groups: no weight decay for 1-D parameters, biases and the names in ``skip``.

    Args:
        model: Only parameters with ``requires_grad`` are grouped (a frozen teacher never is).
        weight_decay: Decay of the decayed group.
        skip: Parameter names (or name suffixes) without decay, e.g. ``model.no_weight_decay()``.
        lr_scale: Optional name → LR multiplier (layer-wise decay in fine-tuning); groups are split by it.

    Returns:
        Groups with ``params``, ``weight_decay``, ``lr_scale`` and ``names`` (for tests and logs).
    """
    skip = tuple(skip)
    groups: dict[tuple[bool, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias") or any(name == s or name.endswith("." + s) for s in skip)
        scale = lr_scale(name) if lr_scale else 1.0
        key = (no_decay, scale)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return list(groups.values())


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
                skip: Iterable[str] = (), lr_scale: Callable[[str], float] | None = None) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay, skip, lr_scale)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def cosine_schedule(
    base: float, final: float, total_iters: int, warmup_iters: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Per-iteration values: linear warmup from ``warmup_start`` to ``base``, then half-cosine to ``final``.

    The warmup excludes its end point (iteration ``warmup_iters`` is the first at ``base``), as in UMT.
    """
    warmup_iters = min(warmup_iters, total_iters)
    warm = np.linspace(warmup_start, base, warmup_iters, endpoint=False) if warmup_iters else np.zeros(0)
    rest = total_iters - warmup_iters
    i = np.arange(rest)
    cos = final + 0.5 * (base - final) * (1 + np.cos(math.pi * i / max(rest, 1)))
    return np.concatenate([warm, cos]).astype(np.float64)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write this iteration's LR into every group (times the group's ``lr_scale``)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def scaled_lrs(lr: float, min_lr: float, warmup_lr: float, total_batch: int, scale: bool) -> tuple[float, float, float]:
    """UMT's rule: learning rates are given per 256 samples."""
    factor = total_batch / 256 if scale else 1.0
    return lr * factor, min_lr * factor, warmup_lr * factor


def amp_setup(amp: str, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler]:
    """Autocast dtype (None = fp32) and grad scaler of a loop: AMP runs on CUDA only; fp16 needs the scaler."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp) if device.type == "cuda" else None
    return dtype, torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def lr_schedule(optim, total_batch: int, total_steps: int, steps_per_epoch: int) -> tuple[float, np.ndarray]:
    """The peak LR (scaled by ``total_batch``/256 when ``optim.scale_lr``) and the per-step cosine schedule
    with linear warmup over ``optim.warmup_epochs`` of a recipe's ``optim`` section."""
    lr, min_lr, warmup_lr = scaled_lrs(optim.lr, optim.min_lr, optim.warmup_lr, total_batch, optim.scale_lr)
    return lr, cosine_schedule(lr, min_lr, total_steps, int(optim.warmup_epochs * steps_per_epoch), warmup_lr)
