"""Quickstart step 7: stage 2 on the toy captions, then zero-shot retrieval -- does video-text training
teach the student motion words?

After stage 1 (``quickstart/stage1.py``), :func:`run_stage2_retrieval`

1. **caches** the same tiny CLIP over the training clips on *unflipped* views (``<output>/cache-stage2``;
   why not the stage-1 store: ``recipes/quickstart/stage2.yaml``), or reuses that store;
2. **trains stage 2** (``stages/stage2.py``: UTA + VTC + VTM + MLM) on the training captions, which name
   appearance and motion (``"a red ringed disc moving left"``), from the finished stage-1 weights — or
   reuses a finished run of the same recipe, stage-1 weights, teacher and world;
3. **evaluates zero-shot retrieval** on the test split (``quickstart/zero_shot.py``: how a hit is
   counted, and the teacher's own image-text model as the baseline).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console

from umt_distill.config import Recipe, RecipeError, load_recipe, recipe_to_yaml
from umt_distill.models.checkpoints import weights_file
from umt_distill.quickstart.cache import ensure_cache
from umt_distill.quickstart.reuse import ensure_run
from umt_distill.quickstart.zero_shot import K_TEST, evaluate_zero_shot
from umt_distill.stages.stage2 import train

RECIPE = "quickstart/stage2"


def run_stage2_retrieval(output: str | Path, cfg_stage1: Recipe, world: dict, teacher: dict, stage1_run: str | Path,
                         console: Console | None = None, overrides: Sequence[str] = (), k_test: int = K_TEST,
                         test_pixels: torch.Tensor | None = None) -> dict:
    """Stage 2 on the toy training captions, then zero-shot retrieval on the test split (see the module doc).

    Args:
        output: The quickstart's output folder (``cache-stage2`` and ``runs/stage2-<teacher mode>`` go there).
        cfg_stage1: The stage-1 recipe that was run (paths, teacher, student and views are taken from it).
        world: :func:`~umt_distill.quickstart.world.write_world`'s result (``splits``, ``labels``).
        teacher: :func:`~umt_distill.quickstart.tiny_clip.train_tiny_clip`'s summary (``weights``,
            ``weights_sha256``).
        stage1_run: The finished stage-1 run folder (the vision encoder starts from its latest checkpoint).
        console: Progress goes here.
        overrides: ``key=value`` overrides of ``recipes/quickstart/stage2.yaml``.
        k_test: Candidates per query re-ranked by the matching head.
        test_pixels: The test clips' ``eval_center`` views, uint8 [N, T, 3, H, W] in test-manifest order,
            if the caller decoded them already (the probes do); decoded here otherwise.

    Returns:
        ``rows`` (metrics by model, percent: ``t2v_r1/r5/r10``, ``v2t_r1/r5/r10``, ``r_mean``, medians
        and mean ranks, ``motion_given_appearance`` and per motion), ``headline`` (the student row and
        the teacher row to compare), ``rule``, ``motion_rule``, ``num_videos``, ``num_texts``,
        ``k_test``, ``reused`` (the training run), ``cache_reused``, ``run``, ``train`` (last logged
        metrics), and ``seconds`` (total) with ``seconds_parts``.
    """
    console = console or Console()
    output = Path(output)
    t_start = time.perf_counter()
    cfg = make_stage2_recipe(output, cfg_stage1, stage1_run, overrides)
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    cache_reused = None
    if cfg.teacher.mode == "cached":
        console.print(f"  caching the teacher on unflipped views ({cfg.cache.num_views} per clip) → {cfg.cache.store}")
        cache_reused, _ = ensure_cache(cfg, console)
        if cache_reused:
            console.print("  [green]reusing the finished stage-2 cache[/]")
    seconds["cache"] = time.perf_counter() - t

    t = time.perf_counter()
    identity = run_identity(cfg, world, teacher, stage1_run)
    losses = " + ".join(k.upper() for k, w in cfg.stage2.weights.items() if w > 0)
    console.print(f"  stage 2 ({losses}, {cfg.train.epochs} epochs) → {cfg.train.output_dir}")
    reused, run, last = ensure_stage2(cfg, identity, console)
    if reused:
        console.print("  [green]reusing the finished stage-2 run[/]")
    seconds["train"] = time.perf_counter() - t

    t = time.perf_counter()
    result = evaluate_zero_shot(cfg, run, world, k_test, test_pixels)
    seconds["retrieval"] = time.perf_counter() - t
    result.update(reused=reused, cache_reused=cache_reused, run=str(run), recipe=RECIPE, losses=losses,
                  tubelet=cfg.stage2.tubelet_size or 1,
                  train={k: last.get(k) for k in ("step", "epoch", "loss", "loss_uta", "loss_vtc", "loss_vtm", "loss_mlm", "temp")},
                  seconds=round(time.perf_counter() - t_start, 1), seconds_parts={k: round(v, 1) for k, v in seconds.items()})
    return result


def stage2_retrieval_job(output: Path, cfg_stage1: Recipe, world: dict, teacher: dict, stage1_run: Path,
                         overrides: Sequence[str], test_pixels: torch.Tensor | None, console: Console) -> dict:
    """:func:`run_stage2_retrieval` as a job of the quickstart's pool (``quickstart/pool.py``)."""
    return run_stage2_retrieval(output, cfg_stage1, world, teacher, stage1_run, console, overrides=overrides,
                                test_pixels=test_pixels)


# --------------------------------------------------------------------------------------------------
# the recipe and the run


def make_stage2_recipe(output: Path, cfg_stage1: Recipe, stage1_run: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """``recipes/quickstart/stage2.yaml`` with the stage-1 run's paths, teacher mode, frames and size; overrides come last.

    Raises:
        RecipeError: The teacher, student, frames or size differ from stage 1's (naming the key): the
            vision encoder is initialised from stage 1 and UTA must align it to the same teacher.
    """
    s1 = cfg_stage1
    taken = {"corpus.source": s1.corpus.source, "corpus.video_backend": s1.corpus.video_backend,
             "teacher.pretrained": s1.teacher.pretrained, "teacher.model_config_path": s1.teacher.model_config_path,
             "teacher.mode": s1.teacher.mode, "views.num_frames": s1.views.num_frames, "views.size": s1.views.size,
             "cache.store": (Path(output) / "cache-stage2").resolve(),
             "stage2.init_vision": Path(stage1_run).resolve(),
             "train.output_dir": (Path(output) / "runs" / f"stage2-{s1.teacher.mode}").resolve()}  # one run per teacher mode
    cfg = load_recipe(RECIPE, [*(f"{k}={v}" for k, v in taken.items() if v is not None), *overrides])
    differ = [f"{section}.{k}: stage 2 has {v!r}, stage 1 has {getattr(getattr(s1, section), k)!r}"
              for section in ("teacher", "student") for k, v in getattr(cfg, section).model_dump().items()
              if v != getattr(getattr(s1, section), k)]
    differ += [f"views.{k}: stage 2 has {getattr(cfg.views, k)!r}, stage 1 has {getattr(s1.views, k)!r}"
               for k in ("num_frames", "size") if getattr(cfg.views, k) != getattr(s1.views, k)]
    if differ:
        raise RecipeError("the quickstart's stage 2 must use stage 1's teacher, student and frames:\n  " + "\n  ".join(differ))
    return cfg


def run_identity(cfg: Recipe, world: dict, teacher: dict, stage1_run: str | Path) -> dict:
    """What a finished stage-2 run must share to be reused: recipe, stage-1 weights, teacher weights, world."""
    stage1 = hashlib.sha256(weights_file(stage1_run).read_bytes()).hexdigest()
    world_json = Path(world["labels"]).parent / "world.json"
    return {"recipe": recipe_to_yaml(cfg), "stage1_weights_sha256": stage1, "teacher_sha256": teacher["weights_sha256"],
            "world": json.loads(world_json.read_text(encoding="utf-8"))}


def ensure_stage2(cfg: Recipe, identity: dict, console: Console) -> tuple[bool, Path, dict]:
    """Train stage 2, resume an interrupted run of the same identity, or reuse a finished one
    (``quickstart/reuse.py``).

    Returns:
        (reused, run folder, last logged metrics).
    """
    run = Path(cfg.train.output_dir)
    reused, last = ensure_run(run, identity, lambda: train(cfg), console, "stage 2")
    return reused, run, last


__all__ = ["run_stage2_retrieval", "stage2_retrieval_job", "make_stage2_recipe", "run_identity", "ensure_stage2", "RECIPE"]
