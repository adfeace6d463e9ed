"""The quickstart's plots: ``loss.png``, ``accuracy.png`` (with the fine-tuned models' bars) and
``semantic_mask.png`` (files only, never a window)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from umt_distill.config import Recipe
from umt_distill.quickstart.names import IMAGE_TEACHER, TEACHER
from umt_distill.quickstart.world import MOTIONS, appearance_classes
from umt_distill.registry import MASKS, load_all_parts
from umt_distill.training.metrics import read_metrics

PLOTS = ("loss.png", "accuracy.png", "semantic_mask.png")


def _pyplot():
    # Deferred: the backend must be chosen before pyplot is first imported, and only when a plot is drawn.
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_loss(path: Path, runs: dict[str, Path]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for mode, run in runs.items():
        rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=f"teacher.mode={mode}")
    ax.set_xlabel("step")
    ax.set_ylabel("UTA loss (2 − 2·cos, mean over layers)")
    ax.set_title("stage 1: aligning the student's unmasked tokens with the teacher")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(path: Path, results: dict) -> None:
    plt = _pyplot()
    names = list(results["models"])
    tasks = ("appearance", "motion")
    colours = {name: f"C{i}" for i, name in enumerate(names)}
    if "finetune" in results:  # the fine-tuned models' motion top-1 in a second panel, same colour per model
        fig, (ax, ax_ft) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [7, 5]})
        draw_bars(ax_ft, results["finetune"], {**colours, IMAGE_TEACHER: colours[TEACHER]})
    else:
        fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(names)
    x = np.arange(len(tasks))
    for i, name in enumerate(names):
        values = [results["models"][name][t]["linear"]["accuracy"] for t in tasks]
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=name, color=colours[name])
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    for j, classes in enumerate((len(appearance_classes()), len(MOTIONS))):
        ax.hlines(1 / classes, j - 0.45, j + 0.45, colors="grey", linestyles="dashed", linewidth=1)
    ax.set_xticks(x, [f"{t} ({c} classes)" for t, c in zip(tasks, (len(appearance_classes()), len(MOTIONS)))])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("test accuracy, linear probe")
    ax.set_title("frozen features (dashed: chance)")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def plot_semantic_mask(path: Path, pixels: torch.Tensor, teacher, cfg: Recipe, clip_id: str) -> None:
    """Frames of one clip, the teacher's CLS→patch attention, and one semantic mask drawn from it.

    Args:
        pixels: uint8 [1, T, 3, H, W], the clip's eval view.
    """
    load_all_parts()  # the registry imports the mask samplers on first use
    plt = _pyplot()
    attn = teacher(pixels).attn  # [1, T, N]
    _, T, N = attn.shape
    gh, gw = teacher.grid
    visible = MASKS.get(cfg.mask.type)(1, T, N, cfg.mask.ratio, torch.Generator().manual_seed(cfg.seed), attn=attn)[0]
    shown = torch.zeros(T * N, dtype=torch.bool)
    shown[visible] = True
    shown = shown.view(T, gh, gw)
    frames = pixels[0].permute(0, 2, 3, 1).numpy()  # [T, H, W, 3]
    H, W = frames.shape[1:3]
    cols = list(range(0, T, max(1, T // 4)))[:4]
    fig, axes = plt.subplots(3, len(cols), figsize=(2.2 * len(cols), 6.6), squeeze=False)
    for j, t in enumerate(cols):
        heat = attn[0, t].view(gh, gw).numpy()
        keep = shown[t].numpy().repeat(H // gh, 0).repeat(W // gw, 1)[..., None]  # [H, W, 1]
        masked = np.where(keep, frames[t], (0.25 * frames[t] + 96).astype(np.uint8))
        axes[0, j].imshow(frames[t])
        axes[0, j].set_title(f"frame {t}", fontsize=9)
        axes[1, j].imshow(frames[t])
        axes[1, j].imshow(heat, cmap="magma", alpha=0.6, extent=(0, W, H, 0), interpolation="nearest")
        axes[2, j].imshow(masked)
        for i in range(3):
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
    axes[0, 0].set_ylabel("view")
    axes[1, 0].set_ylabel("teacher CLS attention")
    axes[2, 0].set_ylabel(f"semantic mask {cfg.mask.ratio}")
    fig.suptitle(f"{clip_id}: visible tokens are drawn ∝ attention", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_bars(ax, finetune: dict, colours: dict[str, str] | None = None) -> None:
    """Motion top-1 of each fine-tuned model as bars on ``ax`` (dashed: chance, dotted: the order-blind 0.5).

    Args:
        colours: Colour per model name (the probe plot's, so a model keeps its colour); default: cycle.
    """
    names = list(finetune["models"])
    values = [finetune["models"][n]["top1"] for n in names]
    colours = colours or {}
    bars = ax.bar(range(len(names)), values, color=[colours.get(n, f"C{i}") for i, n in enumerate(names)])
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(1 / len(MOTIONS), color="grey", linestyle="dashed", linewidth=1)
    ax.axhline(0.5, color="grey", linestyle="dotted", linewidth=1)
    ax.set_xticks(range(len(names)), [n.replace(", ", ",\n").replace(" (", "\n(") for n in names], fontsize=7)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("motion top-1, test")
    ax.set_title(f"fine-tuned on motion, {finetune['settings']['steps']} steps (dotted: order-blind ceiling)", fontsize=10)
