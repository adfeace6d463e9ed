"""The names the quickstart gives its models: keys of ``results.json`` and rows of every table."""

from __future__ import annotations

TEACHER = "teacher (image CLIP)"  # the probes' teacher: its image embedding, frame-averaged
CONTROL = "student, random init (control)"  # the weights stage 1 started from
IMAGE_TEACHER = "image teacher (CLIP per frame)"  # the fine-tuned image-teacher baseline
DISTILLED_PREFIX = "student, distilled"
PIXEL = "student, pixel reconstruction (VideoMAE)"  # quickstart.baselines=true: no teacher, same student and steps


def distilled(mode: str) -> str:
    """The distilled student of one teacher mode: ``student, distilled (cached)``."""
    return f"{DISTILLED_PREFIX} ({mode})"


def umt_exact(mode: str) -> str:
    """The distilled student fine-tuned at UMT's tubelet 1 (the others' tubelet is the step's setting)."""
    return f"{distilled(mode)}, tubelet 1 (UMT-exact)"
