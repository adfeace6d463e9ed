"""Quickstart step 4b (``quickstart.baselines=true``): the same student trained by pixel reconstruction.

The alternative a UMT user weighs is VideoMAE: no teacher, the student reconstructs normalised pixels of
the tokens it did not see through a light decoder (``stages/videomae.py``). This step trains the very
student of stage 1 (``umt_test_tiny``, tubelet 1, the same initial encoder weights, views, batch, epochs
and optimizer) that way instead of by UTA, then the probes (step 5) and the fine-tuning (step 6) report
it beside the distilled student and the control. What differs from stage 1 is in :data:`PIXEL_RECIPE`.
Off by default: it adds a pretraining run, its probes and its fine-tuning runs to the quickstart's time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from safetensors.torch import load_file

from umt_distill.config import Recipe, recipe_to_yaml
from umt_distill.models.checkpoints import latest_checkpoint
from umt_distill.quickstart.reuse import ensure_run
from umt_distill.quickstart.stage1 import make_recipe
from umt_distill.stages.videomae import train

# Stage 1's recipe, changed into pixel reconstruction. Tube masking (VideoMAE's) at 0.75: of 16 tokens a
# frame 4 stay visible (VideoMAE's 0.9 would leave 1 of 16 here); a decoder half the student's width
# (VideoMAE B/16: 384 of 768) and 2 blocks; targets normalised per patch, every invisible token decoded.
PIXEL_RECIPE: tuple[str, ...] = (
    "train.stage=videomae", "videomae.target=pixel", "videomae.tubelet_size=1",
    "mask.type=tube", "mask.ratio=0.75",
    "videomae.decoder_dim=32", "videomae.decoder_depth=2", "videomae.decoder_heads=4",
    "videomae.decoder_mask=none", "videomae.norm_target=true",
)


def pixel_recipe(output: Path, world: dict, teacher: dict, recipe_overrides: Sequence[str], mode: str) -> Recipe:
    """Stage 1's quickstart recipe (paths into ``output``) turned into pixel reconstruction."""
    run = (output / "runs" / f"pixel-{mode}").resolve()
    return make_recipe(output, world, teacher, [*recipe_overrides, *PIXEL_RECIPE, f"train.output_dir={run}"])


def ensure_pixel_trained(cfg: Recipe, teacher_sha256: str, console: Console) -> tuple[bool, Path, dict]:
    """Train the pixel-reconstruction student, resume it, or reuse a finished run of the same recipe."""
    run = Path(cfg.train.output_dir)
    identity = {"recipe": recipe_to_yaml(cfg), "teacher_sha256": teacher_sha256}

    def timed() -> dict:  # the training time travels with the run, so a reused run reports it too
        t = time.perf_counter()
        return {**train(cfg), "train_seconds": round(time.perf_counter() - t, 1)}

    reused, last = ensure_run(run, identity, timed, console, "pixel reconstruction")
    return reused, run, last


def load_encoder(student, run: Path) -> None:
    """Put the encoder of a pixel-reconstruction run into a stage-1 student (its heads stay unused).

    Raises:
        RuntimeError: the run's encoder does not match the student's (every key, every shape).
    """
    ckpt = latest_checkpoint(run)
    state = {k: v for k, v in load_file(str(ckpt / "model.safetensors")).items() if k.startswith("encoder.")}
    expected = {k: v for k, v in student.state_dict().items() if k.startswith("encoder.")}
    bad = sorted(set(state) ^ set(expected)) + [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if bad:
        raise RuntimeError(f"{ckpt}: the encoder does not match the student: {bad[:8]}")
    student.load_state_dict(state, strict=False)  # exactly the encoder keys (checked above)


def baselines_markdown(results: dict) -> list[str]:
    """``report.md``'s side-by-side section: UTA vs pixel reconstruction, same student and steps."""
    b = results["baselines"]
    models, ft = results["models"], results.get("finetune", {}).get("models", {})
    rows = [n for n in models if n.startswith("student")]
    lines = ["## Pixel reconstruction vs UTA (same student, same steps)", "",
             f"The student of stage 1 trained for the same {b['steps']} steps by VideoMAE-style pixel reconstruction "
             f"(`{' '.join(b['recipe_overrides'])}`; run `{b['run']}`, trained in {b['seconds']:.0f} s, final pixel loss "
             f"{b['final_loss']:.4f}) instead of distilled. Frozen features: the probes above; fine-tuned: step 6.", "",
             "| student | appearance (linear) | motion (linear) | appearance (kNN) | motion (kNN) | fine-tuned motion top-1 |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in rows:
        m = models[name]
        cells = [f"{m[task][probe]['accuracy']:.3f}" for probe in ("linear", "knn") for task in ("appearance", "motion")]
        top1 = ft.get(name, {}).get("top1")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'' if top1 is None else f'{top1:.3f}'} |")
    return lines


__all__ = ["PIXEL_RECIPE", "pixel_recipe", "ensure_pixel_trained", "load_encoder", "baselines_markdown"]
