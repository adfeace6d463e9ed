"""The training stages, by name: what ``train.stage`` may say, and what ``umt-distill train``, ``eval``
and ``ls`` read.

:data:`STAGES` is a plain list, one :class:`Stage` per loop: its name, a one-line description, the
module that holds its ``train(cfg, resume=None)`` and whether that module also has
``evaluate(cfg, checkpoint)``. The modules are named, not imported: importing this package costs
nothing (no torch), and a stage's module is imported only when its ``train`` or ``evaluate`` is called.

    stage = get_stage(cfg.train.stage)
    stage.train(cfg, resume=None)

A new stage is one more line here plus its module; ``umt_distill.config.STAGE_NAMES`` (recipes are
validated below this layer) repeats the names, and tests/unit/stages/test_stage_registry.py keeps the two equal
and checks each module against its line.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class StageError(ValueError):
    """An unknown stage, or a stage asked for a function it does not have."""


@dataclass(frozen=True)
class Stage:
    """One training loop that ``train.stage`` can name."""

    name: str
    description: str
    """One line, shown by ``umt-distill ls`` and ``umt-distill train --help``."""
    module: str
    """Import path of the module that defines ``train`` (and ``evaluate``, if any)."""
    has_evaluate: bool = False
    """Whether ``umt-distill eval`` can evaluate this stage's models (the module defines ``evaluate``)."""
    reads_store: bool = False
    """Whether the stage trains on a teacher store (``cache.store``) in cached mode; ``umt-distill train``
    then takes the store's settings from its spec (``stages.store_recipe``)."""

    def function(self, name: str) -> Callable[..., Any]:
        """Import the stage's module now and return its function ``name``."""
        return getattr(importlib.import_module(self.module), name)

    def train(self, cfg: Any, resume: Any = None) -> Any:
        """Run the stage's ``train(cfg, resume=resume)``."""
        return self.function("train")(cfg, resume=resume)

    def evaluate(self, cfg: Any, checkpoint: Any) -> Any:
        """Run the stage's ``evaluate(cfg, checkpoint)``; a stage without one raises :class:`StageError`."""
        if not self.has_evaluate:
            raise StageError(f"train.stage={self.name} has no evaluation; `umt-distill eval` evaluates "
                             f"{', '.join(s.name for s in STAGES if s.has_evaluate)} recipes")
        return self.function("evaluate")(cfg, checkpoint)


STAGES: list[Stage] = [
    Stage("stage1", "UMT stage 1: video-only unmasked token alignment to the CLIP teacher (cached or online)",
          "umt_distill.stages.stage1", reads_store=True),
    Stage("stage2", "UMT stage 2: video-text pretraining, UTA + VTC + VTM + MLM with image-text co-training",
          "umt_distill.stages.stage2", reads_store=True),
    Stage("finetune", "action-recognition fine-tuning; eval: multi-view top-1/5 and per-class accuracy",
          "umt_distill.stages.finetune", has_evaluate=True),
    Stage("retrieval", "video-text retrieval fine-tuning; eval: R@1/5/10 both ways (UMT's protocol)",
          "umt_distill.stages.retrieval", has_evaluate=True),
    Stage("videomae", "pixel reconstruction: VideoMAE, VideoMAE V2 dual masking, UTA + pixel (UMT Table 1)",
          "umt_distill.stages.videomae", reads_store=True),
    Stage("qa", "open-ended video QA: answer decoder from the fusion layers; eval: answer-list ranking, exact match",
          "umt_distill.stages.qa", has_evaluate=True),
]


def stage_names() -> list[str]:
    """The names of all stages, in registry order."""
    return [s.name for s in STAGES]


def get_stage(name: str) -> Stage:
    """The stage called ``name``; an unknown name raises :class:`StageError` naming the closest ones."""
    for stage in STAGES:
        if stage.name == name:
            return stage
    close = difflib.get_close_matches(str(name), stage_names(), n=2, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise StageError(f"unknown stage {name!r}.{hint} Known: {', '.join(stage_names())}")
