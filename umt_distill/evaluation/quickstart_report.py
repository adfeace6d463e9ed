"""The quickstart's report: terminal table, ``report.md``, ``results.json`` and PNG plots.

Kept apart from the pipeline (``umt_distill/quickstart.py``) so that file reads as the sequence of
steps; everything here only formats numbers the pipeline measured.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from umt_distill.config import Recipe
from umt_distill.data.toyworld import MOTIONS, appearance_classes

TEACHER = "teacher (image CLIP)"
CONTROL = "student, random init (control)"
PLOTS = ("loss.png", "accuracy.png", "semantic_mask.png")
# The bar for "the method works at toy scale" (UMT's claim, Table 3, in miniature).
MOTION_MARGIN = 0.20
APPEARANCE_FRACTION = 0.9


def checks(results: dict) -> list[dict]:
    """The pass/fail criteria for every distilled student (linear-probe test accuracy)."""
    models = results["models"]
    acc = {name: {task: m[task]["linear"]["accuracy"] for task in ("appearance", "motion")} for name, m in models.items()}
    out = []
    for name in (n for n in acc if n.startswith("student, distilled")):
        s, t, r = acc[name], acc[TEACHER], acc[CONTROL]
        out += [
            {"model": name, "check": f"motion ≥ teacher + {MOTION_MARGIN:.2f}", "value": f"{s['motion']:.3f} vs {t['motion'] + MOTION_MARGIN:.3f}",
             "ok": s["motion"] >= t["motion"] + MOTION_MARGIN},
            {"model": name, "check": f"appearance ≥ {APPEARANCE_FRACTION} × teacher", "value": f"{s['appearance']:.3f} vs {APPEARANCE_FRACTION * t['appearance']:.3f}",
             "ok": s["appearance"] >= APPEARANCE_FRACTION * t["appearance"]},
            {"model": name, "check": "appearance > random-init control", "value": f"{s['appearance']:.3f} vs {r['appearance']:.3f}",
             "ok": s["appearance"] > r["appearance"]},
            {"model": name, "check": "motion > random-init control", "value": f"{s['motion']:.3f} vs {r['motion']:.3f}",
             "ok": s["motion"] > r["motion"]},
        ]
    return out


def print_table(console: Console, results: dict) -> None:
    """The accuracy table and the checks, for a human at the terminal."""
    chance = {"appearance": 1 / len(appearance_classes()), "motion": 1 / len(MOTIONS)}
    n = results["num_clips"]
    table = Table(title=f"frozen-feature probes, test accuracy ({n['test']} clips; fit on {n['train']}, ridge chosen on {n['val']})")
    table.add_column("model")
    for col in ("appearance (linear)", "motion (linear)", "appearance (kNN)", "motion (kNN)", "order sensitivity"):
        table.add_column(col, justify="right")
    for name, m in results["models"].items():
        table.add_row(name, *(f"{m[task][probe]['accuracy']:.3f}" for probe in ("linear", "knn") for task in ("appearance", "motion")),
                      f"{m['order_sensitivity']:.3f}")
    table.add_row("[dim]chance[/]", *(f"[dim]{chance[task]:.3f}[/]" for _ in range(2) for task in ("appearance", "motion")), "")
    console.print(table)
    for c in checks(results):
        mark = "[green]✓[/]" if c["ok"] else "[red]✗[/]"
        console.print(f"{mark} {c['model']}: {c['check']} ({c['value']})", highlight=False)
    if "finetune" in results:
        from umt_distill import quickstart_finetune

        quickstart_finetune.print_table(console, results["finetune"])
    if "retrieval" in results:
        from umt_distill import quickstart_stage2

        console.print(quickstart_stage2.retrieval_table(results["retrieval"]))
        for line in quickstart_stage2.retrieval_reading(results["retrieval"]):
            console.print(line, highlight=False)
    steps = ", ".join(f"{name} {status} {sec:.0f} s" for name, status, sec, _ in results["steps"])
    console.print(f"[dim]{steps}; total {results['total_seconds']:.0f} s[/]", highlight=False)


# --------------------------------------------------------------------------------------------------
# files


def write_report(output: Path, cfg: Recipe, results: dict) -> None:
    """``results.json``, the three plots and ``report.md`` into ``output``."""
    example = results.pop("_example", None)
    results["checks"] = checks(results)
    plot_loss(output / "loss.png", {m: Path(r) for m, r in results["runs"].items()})
    plot_accuracy(output / "accuracy.png", results)
    if example is not None:
        plot_semantic_mask(output / "semantic_mask.png", example["pixels"], example["teacher"], cfg, example["clip_id"])
    (output / "results.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    (output / "report.md").write_text(render_markdown(cfg, results), encoding="utf-8")


def render_markdown(cfg: Recipe, results: dict) -> str:
    n, w = results["num_clips"], results["settings"]["world"]
    lines = [
        "# umt-distill quickstart report",
        "",
        f"Toy world: {w['clips']} clips of {w['num_frames']} frames at {w['size']} px "
        f"({n['train']} train / {n['val']} val / {n['test']} test); {len(appearance_classes())} appearance classes "
        f"(colour × pattern), {len(MOTIONS)} motion classes ({', '.join(MOTIONS)}).",
        f"Teacher: tiny open_clip image CLIP trained on {results['settings']['clip_images']} stills with appearance-only "
        f"captions (zero-shot appearance accuracy on held-out stills: {results['teacher']['zero_shot_accuracy']:.3f}).",
        f"Student: `{cfg.student.name}` distilled for stage 1 ({cfg.train.epochs} epochs, batch {cfg.train.batch_size}, "
        f"{cfg.mask.type} mask ratio {cfg.mask.ratio}, K={cfg.teacher.layers} aligned layers, {cfg.views.num_frames} frames); "
        f"runs: {', '.join(f'{m} ({r})' for m, r in results['runs'].items())}.",
        "",
        "## Test accuracy of probes on frozen features",
        "",
        "Linear: ridge classifier on standardised features (ridge strength chosen on val). kNN: cosine, "
        f"k={results['settings']['knn_k']}. Teacher feature: its image embedding averaged over the frames; "
        "student feature: final-norm tokens of the full clip, mean-pooled; control: the same student with the "
        "random weights distillation started from.",
        "",
        "| model | appearance (linear) | motion (linear) | appearance (kNN) | motion (kNN) | order sensitivity |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in results["models"].items():
        cells = [f"{m[task][probe]['accuracy']:.3f}" for probe in ("linear", "knn") for task in ("appearance", "motion")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {m['order_sensitivity']:.3f} |")
    lines.append(f"| chance | {1 / len(appearance_classes()):.3f} | {1 / len(MOTIONS):.3f} | "
                 f"{1 / len(appearance_classes()):.3f} | {1 / len(MOTIONS):.3f} | |")
    lines += ["", "Order sensitivity: how far a clip's feature moves when the clip is played backwards, relative "
              "to how far clips' features lie from their mean (0: the feature cannot tell a clip from its reversal). "
              "Every motion class has its time reversal among the classes (left/right, up/down, growing/shrinking)."]
    lines += ["", "## Checks (linear probe)", ""]
    lines += [f"- {'PASS' if c['ok'] else 'FAIL'} — {c['model']}: {c['check']} ({c['value']})" for c in results["checks"]]
    if len(results["runs"]) > 1:
        lines += ["", "Both teacher modes were run: `cached` trained from the stored targets, `online` ran the teacher "
                  "at every step on the same views."]
    if "finetune" in results:
        from umt_distill import quickstart_finetune

        lines += ["", *quickstart_finetune.markdown(results["finetune"])]
    if "retrieval" in results:
        from umt_distill import quickstart_stage2

        lines += ["", quickstart_stage2.retrieval_markdown(results["retrieval"])]
    lines += ["", "## Closing note", "", *closing_note(results)]
    lines += ["", "## Steps", "", "| step | status | seconds | note |", "|---|---|---:|---|"]
    lines += [f"| {name} | {status} | {sec:.1f} | {note} |" for name, status, sec, note in results["steps"]]
    lines += ["", f"Total: {results['total_seconds']:.1f} s.", "", "## Plots", "",
              "- `loss.png` — stage-1 alignment loss per step.",
              "- `accuracy.png` — the probes' table as bars" + (", and the fine-tuned models' motion top-1."
                                                                if "finetune" in results else "."),
              "- `semantic_mask.png` — a test clip: frames, the teacher's CLS attention, and a semantic mask "
              f"(ratio {cfg.mask.ratio}) drawn from it (hidden tokens greyed).",
              "", "![loss](loss.png)", "", "![accuracy](accuracy.png)", "", "![semantic mask](semantic_mask.png)", ""]
    return "\n".join(lines)


def closing_note(results: dict) -> list[str]:
    """What the run reached and, where it fell short of the bar, why -- from the numbers of this run."""
    models = results["models"]
    teacher, control = models[TEACHER], models[CONTROL]
    notes, motion_short = [], []
    for name in (n for n in models if n.startswith("student, distilled")):
        s = models[name]
        ok = {c["check"]: c["ok"] for c in results["checks"] if c["model"] == name}
        notes.append(f"- **{name}**: appearance {s['appearance']['linear']['accuracy']:.3f} (teacher "
                     f"{teacher['appearance']['linear']['accuracy']:.3f}, random init {control['appearance']['linear']['accuracy']:.3f}); "
                     f"motion {s['motion']['linear']['accuracy']:.3f} (teacher {teacher['motion']['linear']['accuracy']:.3f}, "
                     f"random init {control['motion']['linear']['accuracy']:.3f}, chance {1 / len(MOTIONS):.3f}); order sensitivity "
                     f"{s['order_sensitivity']:.3f} (random init {control['order_sensitivity']:.3f}, teacher {teacher['order_sensitivity']:.3f}).")
        if all(ok.values()):
            notes.append("  Every check passes: the student inherits the teacher's appearance knowledge, and its clip "
                         "feature also separates motions that the teacher's frame average cannot.")
            continue
        if ok[f"appearance ≥ {APPEARANCE_FRACTION} × teacher"] and ok["appearance > random-init control"]:
            notes.append("  Appearance transferred: the student reads it out of its own video features nearly as well "
                         "as the teacher, and better than the same network untrained.")
        if not ok[f"motion ≥ teacher + {MOTION_MARGIN:.2f}"] or not ok["motion > random-init control"]:
            motion_short.append(name)
    if motion_short:
        less = all(models[n]["order_sensitivity"] < control["order_sensitivity"] for n in motion_short)
        notes += [
            "",
            "Motion did not reach the bar. Every motion class here is the time reversal of another (left/right, "
            "up/down, growing/shrinking), so a clip feature separates them only if it changes when the clip is "
            "played backwards. The teacher's frame average cannot change at all. Stage 1 trains the student's "
            "last blocks to reproduce, token by token, the teacher's features of *that* frame; a student whose final "
            "tokens held only those would have a mean-pooled feature that, like the teacher's, is the same for a "
            "clip and its reversal. Order can enter the pooled feature only through what the student computes beyond its "
            "targets" + (", and in this run distillation left less of it than the untrained network has (order "
                         "sensitivity above)." if less else "; in this run too little of it for a linear probe."),
            "",
            "UMT reports its temporal gains over the CLIP teacher for *fine-tuned* students (action recognition), "
            "where labels train the order-aware tokens; "
            + ("the section \"Fine-tuned on the motion labels\" above tests that in miniature." if "finetune" in results
               else "this quickstart measures frozen features, which is the harder test at toy scale."),
        ]
    return notes


# --------------------------------------------------------------------------------------------------
# plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_loss(path: Path, runs: dict[str, Path]) -> None:
    from umt_distill.training.metrics import read_metrics

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
        from umt_distill import quickstart_finetune

        fig, (ax, ax_ft) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [7, 5]})
        quickstart_finetune.draw_bars(ax_ft, results["finetune"], {**colours, quickstart_finetune.IMAGE_TEACHER: colours[TEACHER]})
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
    from umt_distill.registry import MASKS, load_all_parts

    load_all_parts()
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
