"""``umt-distill quickstart``: the run order. Each step is its own module of this package (see ``__init__``)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console

from umt_distill.config import recipe_to_yaml
from umt_distill.quickstart.baselines import PIXEL_RECIPE, ensure_pixel_trained, pixel_recipe
from umt_distill.quickstart.cache import ensure_cache
from umt_distill.quickstart.finetune import run_finetune
from umt_distill.quickstart.names import PIXEL
from umt_distill.quickstart.pool import Job, JobPool
from umt_distill.quickstart.probes import evaluate
from umt_distill.quickstart.qa import run_toy_qa
from umt_distill.quickstart.results_report import print_table, write_report
from umt_distill.quickstart.reuse import StepLog
from umt_distill.quickstart.settings import QuickstartSettings, parse_settings
from umt_distill.quickstart.stage1 import ensure_trained, finished_runs, make_recipe
from umt_distill.quickstart.stage2 import stage2_retrieval_job
from umt_distill.quickstart.teacher import build_teacher_weights
from umt_distill.quickstart.world import write_world

NUM_STEPS = 8  # numbered steps printed while running (the report is not one)


def run_quickstart(output: str | Path, clips: int | None = None, overrides: Sequence[str] = (),
                   console: Console | None = None) -> dict:
    """Run (or resume) the whole toy pipeline into ``output`` and write the report there.

    Args:
        output: Output folder (world, teacher, cache, runs, report).
        clips: Number of toy clips (default: ``QuickstartSettings.world.clips``).
        overrides: ``key=value`` overrides of the recipe (e.g. ``teacher.mode=online``) and of the
            quickstart settings (``quickstart.world.clips=240``, ``quickstart.clip.steps=200``).
        console: Where progress and the table are printed.

    Returns:
        The results (also in ``results.json``), with ``failures``: clips the cache could not read.
    """
    console = console or Console()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    settings, recipe_overrides = parse_settings(overrides, clips)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        return _run(output, settings, recipe_overrides, console)
    finally:
        torch.set_num_threads(threads)


def _run(output: Path, settings: QuickstartSettings, recipe_overrides: list[str], console: Console) -> dict:
    log, t_start = StepLog(), time.perf_counter()

    t = time.perf_counter()
    console.print(f"[bold]1/{NUM_STEPS} toy world[/] ({settings.world.clips} clips) → {output / 'world'}")
    world = write_world(output / "world", settings.world)
    log.add("toy world", world["reused"], time.perf_counter() - t, f"{settings.world.clips} clips")
    _said(console, world["reused"], "videos")

    t = time.perf_counter()
    console.print(f"[bold]2/{NUM_STEPS} tiny image CLIP teacher[/] ({settings.clip_images} stills, {settings.clip.steps} steps) → {output / 'teacher'}")
    teacher = build_teacher_weights(output / "teacher", settings, console)
    log.add("tiny CLIP teacher", teacher["reused"], time.perf_counter() - t, f"zero-shot appearance accuracy {teacher['zero_shot_accuracy']:.2f}")
    _said(console, teacher["reused"], "teacher weights")

    cfg = make_recipe(output, world, teacher, recipe_overrides)
    (output / "recipe.yaml").write_text(recipe_to_yaml(cfg), encoding="utf-8")
    failures = 0
    t = time.perf_counter()
    if cfg.teacher.mode == "cached":
        console.print(f"[bold]3/{NUM_STEPS} cache-teacher[/] ({cfg.cache.num_views} views per clip) → {cfg.cache.store}")
        reused, summary = ensure_cache(cfg, console)
        failures = int(summary.get("failures", 0))
        log.add("cache-teacher", reused, time.perf_counter() - t, f"{summary.get('records', '?')} clip-views")
        _said(console, reused, "cache")
    else:
        console.print(f"[bold]3/{NUM_STEPS} cache-teacher[/]: skipped (teacher.mode=online runs the teacher at every step)")

    t = time.perf_counter()
    console.print(f"[bold]4/{NUM_STEPS} stage 1[/] (teacher.mode={cfg.teacher.mode}) → {cfg.train.output_dir}")
    reused, run = ensure_trained(cfg, teacher["weights_sha256"], console)
    log.add(f"stage 1 ({cfg.teacher.mode})", reused, time.perf_counter() - t)
    _said(console, reused, "training run")

    baselines, baseline_info = {}, None
    if settings.baselines:  # the same student, the same steps, pixel reconstruction instead of UTA
        t = time.perf_counter()
        pixel_cfg = pixel_recipe(output, world, teacher, recipe_overrides, cfg.teacher.mode)
        console.print(f"[bold]4b/{NUM_STEPS} pixel reconstruction[/] (quickstart.baselines=true) → {pixel_cfg.train.output_dir}")
        reused, pixel_run, last = ensure_pixel_trained(pixel_cfg, teacher["weights_sha256"], console)
        seconds = time.perf_counter() - t
        log.add("pixel reconstruction", reused, seconds)
        _said(console, reused, "pixel-reconstruction run")
        baselines[PIXEL] = pixel_run
        baseline_info = {"run": str(pixel_run), "steps": last.get("step"), "final_loss": last.get("loss_pixel"),
                         "seconds": last.get("train_seconds", round(seconds, 1)), "reused": reused,
                         "recipe_overrides": list(PIXEL_RECIPE)}

    t = time.perf_counter()
    console.print(f"[bold]5/{NUM_STEPS} probes[/] on frozen features (train → fit, val → ridge strength, test → accuracy)")
    runs = finished_runs(output, cfg, teacher["weights_sha256"])
    results = evaluate(cfg, world, runs, settings, baselines)
    log.add("probes", False, time.perf_counter() - t)

    # Steps 6 and 7 both start from the finished stage-1 run and share nothing else: side by side
    # (quickstart.finetune.parallel > 1), stage 2 starts first, as the longest job, and the fine-tuning
    # runs take the other slots; one after the other (parallel=1) they run here, in order.
    stage2 = [f"train.epochs={settings.stage2_epochs}"] if settings.stage2_epochs else []
    if settings.stage2_tubelet != 1:
        stage2 += [f"stage2.tubelet_size={settings.stage2_tubelet}", "stage2.loss_weights.uta=0",
                   f"train.output_dir={(output / 'runs' / f'stage2-{cfg.teacher.mode}-tubelet{settings.stage2_tubelet}').resolve()}"]
    test_pixels = results.pop("_test_pixels", None)
    stage2_job = Job("stage 2", stage2_retrieval_job, (output, cfg, world, teacher, run, stage2, test_pixels))
    with JobPool(settings.finetune.parallel, settings.threads, console) as pool:
        ahead = pool.submit(stage2_job) if pool.side_by_side else None

        t = time.perf_counter()  # reuses finished runs of the same init
        console.print(f"[bold]6/{NUM_STEPS} fine-tune[/] on the motion labels ({settings.finetune.steps} steps per model; "
                      "train split → fit, test split → top-1)" + ("; stage 2 runs beside it" if ahead else ""))
        results["finetune"] = run_finetune(output, cfg, world, teacher, runs, settings.finetune, console, baselines, pool)
        if baseline_info is not None:
            results["baselines"] = {**baseline_info, "name": PIXEL}
        log.add("fine-tune", results["finetune"]["reused"], time.perf_counter() - t, f"{len(results['finetune']['models'])} models")

        t = time.perf_counter()  # from this teacher mode's stage-1 run
        console.print(f"[bold]7/{NUM_STEPS} stage 2[/] on the training captions, then zero-shot retrieval on the test "
                      "split (student vs the teacher's own image-text model)")
        done = (ahead or pool.submit(stage2_job)).result()
        done.show(console)
    results["retrieval"] = done.value
    log.add("stage 2 + retrieval", results["retrieval"]["reused"], done.seconds if ahead else time.perf_counter() - t,
            f"{results['retrieval']['num_texts']} captions" + (", beside step 6" if ahead else ""))

    if settings.qa.enabled:  # from the finished stage-2 run
        t = time.perf_counter()
        console.print(f"[bold]8/{NUM_STEPS} toy QA[/] (\"what colour is the disc?\", \"how does the disc move?\"): the stage-2 "
                      f"student and the image teacher fine-tuned {settings.qa.steps} steps each, beside a blind baseline")
        results["qa"] = run_toy_qa(output, world, Path(results["retrieval"]["run"]), settings.qa, test_pixels)
        _said(console, results["qa"]["reused"], "toy QA results")
        log.add("toy QA", results["qa"]["reused"], time.perf_counter() - t, f"{sum(results['qa']['num_questions'].values())} test questions")

    results.update(
        failures=failures, total_seconds=round(time.perf_counter() - t_start, 1), steps=log.steps,
        runs={m: str(r) for m, r in runs.items()},
        teacher={k: teacher[k] for k in ("zero_shot_accuracy", "final_loss", "seconds", "weights", "weights_sha256")},
        settings={"world": settings.world.to_json(), "clip": dataclasses.asdict(settings.clip),
                  "finetune": dataclasses.asdict(settings.finetune), "qa": dataclasses.asdict(settings.qa),
                  "stage2_epochs": settings.stage2_epochs,
                  "stage2_tubelet": settings.stage2_tubelet,
                  "clip_images": settings.clip_images, "knn_k": settings.knn_k},
        mode=cfg.teacher.mode,
    )
    write_report(output, cfg, results)
    print_table(console, results)
    return results


def _said(console: Console, reused: bool, what: str) -> None:
    if reused:
        console.print(f"  [green]reusing the finished {what}[/]")
