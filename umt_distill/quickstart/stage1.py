"""Quickstart step 4: stage 1 (``stages/stage1.py``) -- the tiny video student aligns its unmasked tokens
with the teacher's under semantic masks; the recipe is ``recipes/quickstart/stage1.yaml``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import yaml
from rich.console import Console

from umt_distill.config import Recipe, load_recipe, recipe_to_yaml
from umt_distill.quickstart.reuse import DONE_FILE, ensure_run
from umt_distill.stages.stage1 import train

RECIPE = "quickstart/stage1"
TEACHER_MODES = ("cached", "online")


def make_recipe(output: Path, world: dict, teacher: dict, recipe_overrides: Sequence[str]) -> Recipe:
    """The quickstart recipe with its paths pointing into ``output``; user overrides come last."""
    base = load_recipe(RECIPE, list(recipe_overrides))
    mode = base.teacher.mode
    paths = [
        f"corpus.source={world['splits']['train'].resolve()}",
        f"teacher.pretrained={teacher['weights']}",
        f"teacher.model_config_path={teacher['model_config']}",
        f"cache.store={(output / 'cache').resolve()}",
        f"train.output_dir={(output / 'runs' / f'stage1-{mode}').resolve()}",
    ]
    return load_recipe(RECIPE, [*paths, *recipe_overrides])


def ensure_trained(cfg: Recipe, teacher_sha256: str, console: Console) -> tuple[bool, Path]:
    """Run stage 1, resume an interrupted run, or reuse a finished one (same recipe, same teacher weights)."""
    run = Path(cfg.train.output_dir)
    identity = {"recipe": recipe_to_yaml(cfg), "teacher_sha256": teacher_sha256}
    reused, _ = ensure_run(run, identity, lambda: train(cfg), console, "stage 1")
    return reused, run


def finished_runs(output: Path, cfg: Recipe, teacher_sha256: str) -> dict[str, Path]:
    """The finished stage-1 runs of both teacher modes on this world and teacher, by mode (both are reported)."""
    runs = {m: output / "runs" / f"stage1-{m}" for m in TEACHER_MODES}
    return {m: r for m, r in runs.items() if (r / DONE_FILE).exists() and _same_world(r, cfg, teacher_sha256)}


def _same_world(run: Path, cfg: Recipe, teacher_sha256: str) -> bool:
    """A finished run of the other teacher mode counts only if it trained on the same clips and teacher."""
    done = json.loads((run / DONE_FILE).read_text())
    other = yaml.safe_load(done["recipe"])
    return other["corpus"]["source"] == cfg.corpus.source and done.get("teacher_sha256") == teacher_sha256
