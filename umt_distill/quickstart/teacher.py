"""Quickstart step 2: the tiny image CLIP teacher, trained on toy stills with appearance-only captions.

Like a web CLIP, it knows what things look like, not how they move (``tiny_clip.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console

from umt_distill.quickstart.settings import QuickstartSettings
from umt_distill.quickstart.tiny_clip import train_tiny_clip
from umt_distill.quickstart.world import appearance_caption, sample_images


def build_teacher_weights(folder: Path, settings: QuickstartSettings, console: Console) -> dict:
    """Train (or reuse) the tiny image CLIP on toy stills with appearance-only captions.

    Returns:
        ``train_tiny_clip``'s summary (``weights``, ``model_config``, ``weights_sha256``,
        ``zero_shot_accuracy``, ``reused`` ...).
    """
    rng = np.random.default_rng([settings.world.seed, 7])  # the image corpus; held-out stills use [seed, 8]
    images, names = sample_images(settings.clip_images, settings.world, rng)
    eval_images, eval_names = sample_images(settings.clip_eval_images, settings.world, np.random.default_rng([settings.world.seed, 8]))
    return train_tiny_clip(
        folder, images, [appearance_caption(n) for n in names], settings.clip,
        eval_frames=eval_images, eval_captions=[appearance_caption(n) for n in eval_names],
        log=lambda line: console.print(f"  [dim]{line}[/]", highlight=False),
    )
