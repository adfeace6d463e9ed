"""``umt-distill quickstart``: the whole UMT loop at toy scale on a CPU, offline, in minutes.

1. **World** — toy MP4 clips of patterned discs that move or change size (``data/toyworld.py``):
   appearance is visible in any frame, motion only across frames.
2. **Teacher** — a tiny open_clip image CLIP trained on still images with appearance-only captions
   (``teachers/tiny_clip.py``): like a web CLIP, it knows what things look like, not how they move.
3. **Cache** — ``cache-teacher`` over K augmented views of every training clip (skipped with
   ``teacher.mode=online``, where the teacher runs at every training step instead).
4. **Distil** — stage 1 (``stages/stage1.py``): the tiny video student aligns its unmasked tokens
   with the teacher's, under semantic masks.
5. **Evaluate** — linear and kNN probes on frozen features (``evaluation/probe.py``) for appearance
   and motion: the teacher (frame-averaged embedding), the distilled student, and the same student
   with its initial random weights (the control).
6. **Fine-tune** — the distilled student, the control and the image teacher (its tower per frame)
   fine-tuned on the motion labels with one recipe, then tested (``quickstart_finetune.py``).
7. **Stage 2** — video-text pretraining on the training captions (which name appearance and motion)
   from the stage-1 student, then zero-shot retrieval on the test split against the teacher's own
   image-text model, frame-averaged (``quickstart_stage2.py``, ``recipes/quickstart/stage2.yaml``).
8. **Report** — tables in the terminal, ``report.md``, ``results.json`` and PNG plots.

Every step that finished before is reused on a re-run, and the output says so. Settings: the recipe
``recipes/quickstart/stage1.yaml`` (any ``key=value`` override) plus the quickstart's own
``quickstart.world.*``, ``quickstart.clip.*``, ``quickstart.finetune.*`` and ``quickstart.*`` keys
(:class:`QuickstartSettings`; ``quickstart.stage2_epochs`` for stage 2).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from umt_distill.config import Recipe, RecipeError, load_recipe, parse_override, recipe_to_yaml
from umt_distill.data.toyworld import WorldSettings, appearance_caption, read_labels, sample_images, write_world
from umt_distill.quickstart_finetune import FinetuneSettings
from umt_distill.teachers.tiny_clip import ClipTrainSettings, train_tiny_clip

RECIPE = "quickstart/stage1"
DONE_FILE = "quickstart_done.json"  # a finished stage-1 run: its recipe and teacher
STARTED_FILE = "quickstart_started.json"  # a started one: resumed only with the same recipe and teacher
NUM_STEPS = 7  # numbered steps printed while running (the report is not one)


@dataclass(frozen=True)
class QuickstartSettings:
    """What the quickstart itself decides (the stage-1 settings are the recipe's).

    Attributes:
        world: The toy world (``quickstart.world.clips=240``).
        clip: Training of the tiny image CLIP (``quickstart.clip.steps=300``).
        finetune: Fine-tuning on the motion labels (``quickstart.finetune.steps=400``).
        stage2_epochs: Epochs of stage 2 (0 = the epochs of ``recipes/quickstart/stage2.yaml``).
        clip_images: Still images in the tiny CLIP's image–caption corpus.
        clip_eval_images: Held-out stills for its zero-shot accuracy.
        knn_k: Neighbours of the kNN probe.
        threads: torch CPU threads. The models are so small that one op's work does not pay for
            splitting it: measured here, a stage-1 step of the tiny student took 81 ms on 1 thread and
            900 ms on 2 while another process used the second core (threads spin-wait for each other).
    """

    world: WorldSettings = WorldSettings()
    clip: ClipTrainSettings = ClipTrainSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    stage2_epochs: int = 0
    clip_images: int = 6000
    clip_eval_images: int = 500
    knn_k: int = 10
    threads: int = 1


def parse_settings(overrides: Sequence[str], clips: int | None = None) -> tuple[QuickstartSettings, list[str]]:
    """Split overrides into quickstart settings (``quickstart.*``) and recipe overrides (the rest).

    Raises:
        RecipeError: An unknown ``quickstart.*`` key (naming the closest valid one) or a wrong type.
    """
    settings, recipe_overrides = QuickstartSettings(), []
    if clips is not None:
        settings = dataclasses.replace(settings, world=dataclasses.replace(settings.world, clips=clips))
    for text in overrides:
        path, value = parse_override(text)
        if path[0] != "quickstart":
            recipe_overrides.append(text)
            continue
        settings = _set_field(settings, path[1:], value, "quickstart")
    return settings, recipe_overrides


def _set_field(obj, path: list[str], value, prefix: str):
    names = [f.name for f in dataclasses.fields(obj)]
    if not path or path[0] not in names:
        key = ".".join([prefix, *path])
        close = difflib.get_close_matches(path[0] if path else "", names, n=1)
        hint = f" (did you mean '{prefix}.{close[0]}'?)" if close else f" (valid: {', '.join(names)})"
        raise RecipeError(f"unknown key {key!r}{hint}")
    name, current = path[0], getattr(obj, path[0])
    key = f"{prefix}.{name}"
    if dataclasses.is_dataclass(current):
        return dataclasses.replace(obj, **{name: _set_field(current, path[1:], value, key)})
    if len(path) > 1:
        raise RecipeError(f"{key} is not a section")
    def number(v) -> bool:  # YAML ints are fine for floats; booleans and strings are never numbers
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if isinstance(current, tuple):
        if not isinstance(value, list) or len(value) != len(current) or not all(map(number, value)):
            raise RecipeError(f"{key}: expected a list of {len(current)} numbers, got {value!r}")
        value = tuple(float(v) for v in value)
    elif not number(value) or (isinstance(current, int) and not isinstance(value, int)):
        raise RecipeError(f"{key}: expected {type(current).__name__}, got {value!r}")
    return dataclasses.replace(obj, **{name: type(current)(value)})


@dataclass
class StepLog:
    """What each pipeline step did: ``(name, "done" | "reused", seconds, detail)``."""

    steps: list[tuple[str, str, float, str]] = field(default_factory=list)

    def add(self, name: str, reused: bool, seconds: float, detail: str = "") -> None:
        self.steps.append((name, "reused" if reused else "done", round(seconds, 1), detail))


# --------------------------------------------------------------------------------------------------
# the steps


def build_teacher_weights(folder: Path, settings: QuickstartSettings, console: Console) -> dict:
    """Train (or reuse) the tiny image CLIP on toy stills with appearance-only captions."""
    rng = np.random.default_rng([settings.world.seed, 7])  # the image corpus; held-out stills use [seed, 8]
    images, names = sample_images(settings.clip_images, settings.world, rng)
    eval_images, eval_names = sample_images(settings.clip_eval_images, settings.world, np.random.default_rng([settings.world.seed, 8]))
    return train_tiny_clip(
        folder, images, [appearance_caption(n) for n in names], settings.clip,
        eval_frames=eval_images, eval_captions=[appearance_caption(n) for n in eval_names],
        log=lambda line: console.print(f"  [dim]{line}[/]", highlight=False),
    )


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


def ensure_cache(cfg: Recipe, console: Console) -> tuple[bool, dict]:
    """Cache the teacher over the training clips, or reuse a finished store made the same way.

    A store left by another teacher or other settings lives inside the quickstart's own output, so it
    is rebuilt (with a message) rather than refused.
    """
    from umt_distill.cache.pipeline import build_spec, build_teacher, cache_teacher
    from umt_distill.cache.spec import SpecMismatchError, check_spec, read_spec
    from umt_distill.data.corpus import corpus_digest, read_corpus

    store = Path(cfg.cache.store)
    if (store / "spec.json").exists():
        rows = read_corpus(cfg.corpus.source, cfg.corpus.root)
        wanted = build_spec(cfg, build_teacher(cfg, torch.device("cpu")), rows, corpus_digest(rows))
        stored = read_spec(store)
        try:
            check_spec(stored, wanted, f"cache {store}")
        except SpecMismatchError as e:
            console.print(f"  [yellow]{e}[/]\n  rebuilding the cache", highlight=False)
            shutil.rmtree(store)
        else:
            if stored.get("status") == "complete":
                return True, stored.get("counts", {})
    summary = cache_teacher(cfg, progress=True)
    return False, summary


def ensure_trained(cfg: Recipe, teacher_sha256: str, console: Console) -> tuple[bool, Path]:
    """Run stage 1, resume an interrupted run, or reuse a finished one (same recipe, same teacher weights)."""
    from umt_distill.stages.stage1 import train

    run = Path(cfg.train.output_dir)
    identity = {"recipe": recipe_to_yaml(cfg), "teacher_sha256": teacher_sha256}
    reused, _ = ensure_run(run, identity, lambda: train(cfg), console, "stage 1")
    return reused, run


def ensure_run(run: Path, identity: dict, train: Callable[[], dict], console: Console, label: str) -> tuple[bool, dict]:
    """Train into ``run``, resume an interrupted run, or reuse a finished one with the same ``identity``.

    Args:
        run: The run folder (``train`` writes its checkpoints and metrics.jsonl there).
        identity: JSON-able; everything that makes two runs the same (recipe, initial weights ...).
        train: Trains (resuming from ``run``'s checkpoints) and returns JSON-able final metrics.
        console: Messages and a progress line labelled ``label``.

    Returns:
        (reused, what ``train`` returned: kept in the done marker, so a reused run returns it too).
    """
    marker, started = run / DONE_FILE, run / STARTED_FILE
    if marker.exists():
        done = json.loads(marker.read_text())
        if _same(done, identity):
            return True, done.get("last", {})
    if run.exists() and not (started.exists() and _same(json.loads(started.read_text()), identity)):
        # Another recipe or teacher (or a run from before this marker existed): a resume would mix them.
        console.print(f"  [yellow]{run} holds a run of another recipe or teacher; training again[/]")
        shutil.rmtree(run)
    elif started.exists():
        console.print("  [green]resuming the interrupted training run[/]")
    run.mkdir(parents=True, exist_ok=True)
    started.write_text(json.dumps(identity), encoding="utf-8")
    with _TrainingProgress(run / "metrics.jsonl", console, label):
        last = train()
    marker.write_text(json.dumps({**identity, "last": last}), encoding="utf-8")
    return False, last


def _same(found: dict, identity: dict) -> bool:
    return {k: found.get(k) for k in identity} == identity


class _TrainingProgress:
    """Shows step and loss while a training loop runs, by following its metrics.jsonl (the loop stays untouched)."""

    def __init__(self, metrics: Path, console: Console, label: str = "stage 1") -> None:
        self.metrics, self.console, self.label, self.stop = metrics, console, label, threading.Event()

    def __enter__(self):
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(SpinnerColumn(), TextColumn(f"[bold]{self.label}[/] {{task.description}}"), TimeElapsedColumn(),
                                 console=self.console, transient=True)
        self.task = self.progress.add_task("starting")
        self.progress.start()
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()
        return self

    def _follow(self) -> None:
        while not self.stop.wait(0.5):
            try:
                lines = self.metrics.read_text(encoding="utf-8").splitlines()
                last = json.loads(lines[-1]) if lines else None
            except (OSError, json.JSONDecodeError, IndexError):
                continue
            if last and "loss" in last:
                self.progress.update(self.task, description=f"step {last['step']}  loss {last['loss']:.4f}")

    def __exit__(self, *exc) -> bool:
        self.stop.set()
        self.thread.join()
        self.progress.stop()
        return False


# --------------------------------------------------------------------------------------------------
# evaluation


def evaluate(cfg: Recipe, world: dict, runs: dict[str, Path], settings: QuickstartSettings) -> dict:
    """Probe appearance and motion on frozen features of the teacher, each distilled student and the control.

    Returns:
        ``{"models": {name: {"appearance": {...}, "motion": {...}}}, "num_clips": {...}}``; each task
        holds ``linear`` and ``knn`` probe results (test split; ridge chosen on val).
    """
    from umt_distill.cache.pipeline import build_teacher
    from umt_distill.data.corpus import read_corpus
    from umt_distill.evaluation.probe import (
        decode_eval_views, knn_probe, linear_probe, order_sensitivity, student_features, teacher_features,
    )
    from umt_distill.training.checkpoint import latest_checkpoint, load_checkpoint
    from umt_distill.training.stage_parts import build_student

    labels = read_labels(world["labels"])["clips"]
    splits = {s: read_corpus(world["splits"][s]) for s in ("train", "val", "test")}
    pixels = {s: decode_eval_views(rows, cfg.views.num_frames, cfg.views.size, cfg.corpus.video_backend) for s, rows in splits.items()}
    pixels["test_reversed"] = pixels["test"].flip(1)  # the test clips played backwards
    targets = {task: {s: np.array([labels[r.id][f"{task}_label"] for r in rows]) for s, rows in splits.items()}
               for task in ("appearance", "motion")}

    teacher = build_teacher(cfg, torch.device("cpu"))
    features = {"teacher (image CLIP)": {s: teacher_features(teacher, p) for s, p in pixels.items()}}
    for mode, run in runs.items():
        student = build_student(cfg, teacher.embed_dim)
        load_checkpoint(latest_checkpoint(run), student)
        features[f"student, distilled ({mode})"] = {s: student_features(student, p) for s, p in pixels.items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # exactly the weights stage 1 started from
        control = build_student(cfg, teacher.embed_dim)
    features["student, random init (control)"] = {s: student_features(control, p) for s, p in pixels.items()}

    results: dict = {"models": {}, "num_clips": {s: len(r) for s, r in splits.items()}}
    for name, feats in features.items():
        results["models"][name] = {
            task: {
                "linear": linear_probe(feats["train"], y["train"], feats["test"], y["test"], feats["val"], y["val"]).to_dict(),
                "knn": knn_probe(feats["train"], y["train"], feats["test"], y["test"], k=settings.knn_k).to_dict(),
            }
            for task, y in targets.items()
        }
        results["models"][name]["order_sensitivity"] = order_sensitivity(feats["test"], feats["test_reversed"])
    results["_example"] = {"pixels": pixels["test"][:1], "teacher": teacher, "clip_id": splits["test"][0].id}
    results["_test_pixels"] = pixels["test"]  # stage 2's retrieval test reuses the decoded test views
    return results


# --------------------------------------------------------------------------------------------------
# the command


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
    from umt_distill.evaluation.quickstart_report import print_table, write_report

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

    t = time.perf_counter()
    console.print(f"[bold]5/{NUM_STEPS} probes[/] on frozen features (train → fit, val → ridge strength, test → accuracy)")
    # Both teacher modes are reported when both have finished runs on this world and teacher.
    runs = {m: output / "runs" / f"stage1-{m}" for m in ("cached", "online")}
    runs = {m: r for m, r in runs.items() if (r / DONE_FILE).exists() and _same_world(r, cfg, teacher["weights_sha256"])}
    results = evaluate(cfg, world, runs, settings)
    log.add("probes", False, time.perf_counter() - t)

    # ---- fine-tuning on the motion labels (quickstart_finetune.py); reuses finished runs of the same init
    from umt_distill.quickstart_finetune import run_finetune

    t = time.perf_counter()
    console.print(f"[bold]6/{NUM_STEPS} fine-tune[/] on the motion labels ({settings.finetune.steps} steps per model; "
                  "train split → fit, test split → top-1)")
    results["finetune"] = run_finetune(output, cfg, world, teacher, runs, settings.finetune, console)
    log.add("fine-tune", results["finetune"]["reused"], time.perf_counter() - t, f"{len(results['finetune']['models'])} models")

    # ---- stage 2 on the toy captions and zero-shot retrieval (quickstart_stage2.py), from this mode's stage-1 run
    from umt_distill.quickstart_stage2 import run_stage2_retrieval

    t = time.perf_counter()
    console.print(f"[bold]7/{NUM_STEPS} stage 2[/] on the training captions, then zero-shot retrieval on the test "
                  "split (student vs the teacher's own image-text model)")
    stage2 = [f"train.epochs={settings.stage2_epochs}"] if settings.stage2_epochs else []
    results["retrieval"] = run_stage2_retrieval(output, cfg, world, teacher, run, console, overrides=stage2,
                                                test_pixels=results.get("_test_pixels"))
    log.add("stage 2 + retrieval", results["retrieval"]["reused"], time.perf_counter() - t,
            f"{results['retrieval']['num_texts']} captions")
    results.pop("_test_pixels", None)

    results.update(
        failures=failures, total_seconds=round(time.perf_counter() - t_start, 1), steps=log.steps,
        runs={m: str(r) for m, r in runs.items()},
        teacher={k: teacher[k] for k in ("zero_shot_accuracy", "final_loss", "seconds", "weights", "weights_sha256")},
        settings={"world": settings.world.to_json(), "clip": dataclasses.asdict(settings.clip),
                  "finetune": dataclasses.asdict(settings.finetune), "stage2_epochs": settings.stage2_epochs,
                  "clip_images": settings.clip_images, "knn_k": settings.knn_k},
        mode=cfg.teacher.mode,
    )
    write_report(output, cfg, results)
    print_table(console, results)
    return results


def _same_world(run: Path, cfg: Recipe, teacher_sha256: str) -> bool:
    """A finished run of the other teacher mode counts only if it trained on the same clips and teacher."""
    import yaml

    done = json.loads((run / DONE_FILE).read_text())
    other = yaml.safe_load(done["recipe"])
    return other["corpus"]["source"] == cfg.corpus.source and done.get("teacher_sha256") == teacher_sha256


def _said(console: Console, reused: bool, what: str) -> None:
    if reused:
        console.print(f"  [green]reusing the finished {what}[/]")
