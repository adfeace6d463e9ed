"""Quickstart step 6: student vs image teacher on the toy motion labels, fine-tuned.

Frozen-feature probes (``quickstart/probes.py``) cannot show UMT's temporal claim at toy scale: every
motion class is the time reversal of another, and a mean-pooled frozen feature barely changes when a
clip is played backwards. UMT's claim is about *fine-tuned* students (Table 3: the student beats its
CLIP teacher on temporal tasks). This step fine-tunes, with one recipe and identical settings,

- every finished distilled student (the stage-1 run of each teacher mode the probes report),
- the same student architecture from the random weights stage 1 started from (the control: with the
  same seed, data order and head, the only difference to the distilled run is the distillation), and
- the image-teacher baseline: the tiny CLIP's image tower on every frame, frame embeddings averaged,
  a linear head (``finetune.backbone=image_teacher``), starting from the quickstart teacher's weights,

on the motion labels of the train split, and tests each on the test split with several temporal views
per clip (``stages/finetune.py``: ``train`` then its multi-view test). Nothing is chosen on val.

The recipe is ``recipes/finetune/tiny.yaml`` with the quickstart's geometry (frames, size and the
pretraining grid of stage 1) and :data:`MOTION_RECIPE` (why each setting differs from UMT's is said
there). A finished run is reused only when its recipe, its initial weights, the teacher weights and
the world are the same (``quickstart/reuse.py``). Settings: ``quickstart.finetune.*``
(:class:`~umt_distill.quickstart.settings.FinetuneSettings`). Its table, ``report.md`` section and
reading are in ``results_report.py``, its bars in ``plots.py``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from concurrent.futures import as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from safetensors.torch import load_file

from umt_distill.config import Recipe, load_recipe, recipe_to_yaml
from umt_distill.data.corpus import read_corpus
from umt_distill.models.checkpoints import latest_checkpoint
from umt_distill.quickstart.names import CONTROL, IMAGE_TEACHER, distilled, umt_exact
from umt_distill.quickstart.pool import Job, JobPool
from umt_distill.quickstart.reuse import ensure_run, finished_run
from umt_distill.quickstart.settings import FinetuneSettings
from umt_distill.quickstart.world import MOTIONS
from umt_distill.stages.finetune import train
from umt_distill.stages.parts import build_student
from umt_distill.teachers.build import build_teacher
from umt_distill.training.checkpoint import save_checkpoint

FINETUNE_RECIPE = "finetune/tiny"
INIT_RUN = "stage1-init"  # the control's initial weights, in stage-1 checkpoint format, under runs/
# Pairs of motions that are each other's time reversal: the axis of change, without its direction.
AXES: dict[str, tuple[str, str]] = {
    "horizontal": ("moving left", "moving right"),
    "vertical": ("moving up", "moving down"),
    "size": ("growing", "shrinking"),
}
# How fine-tuning on the motion labels departs from UMT's Kinetics recipe (finetune/tiny); the same for
# every model of the step. Measured at full quickstart scale (288 training clips, 300 steps, 1 thread + 1
# loader worker): with UMT's augmentation (flip off) a step took 0.19 s, data-bound on RandAugment, and
# every model stayed at chance with the loss at ln 6; without it a step took 0.065 s (minutes later, on
# a machine other jobs shared, so the ratio is rough). At a budget of
# minutes the steps are worth more than the regularisers of a 30-epoch Kinetics schedule.
MOTION_RECIPE: tuple[str, ...] = (
    # A horizontal flip turns "moving left" into "moving right": off, as UMT has it for SSv2.
    "finetune.flip=false",
    # Crops within the range of stage 1's views (side 0.66..1 of the frame): UMT's smallest crop, 8 % of
    # the area, is 18 px of a 64-px frame -- smaller than the disc, and often beside it.
    "finetune.train_scale=[0.44,1.0]",
    # CutMix labels a pasted box by its area, but a single small object is either in it or not. Mixup,
    # RandAugment and random erasing regularise long schedules; this one is a few epochs.
    "finetune.cutmix=0", "finetune.mixup=0", "finetune.randaug=null", "finetune.reprob=0",
    # One frame per equal segment (TSN), as UMT samples Something-Something, its motion benchmark; its
    # test views are evenly spaced (segment starts, then midpoints), where sparse test views are not.
    "finetune.sampling=segment",
    # The 288 toy clips (57 MB of frames) are decoded once instead of every epoch (about 17 here).
    "finetune.preload=true",
    # Toy frames are square, so UMT's 3 crops along the long side would be one crop 3 times.
    "finetune.test_num_crops=1",
    "finetune.val_source=null",
)


# --------------------------------------------------------------------------------------------------
# the step


@dataclass(frozen=True)
class FinetunedModel:
    """One model of the step: what it starts from and with which patch embedding.

    Attributes:
        backbone: ``student`` or ``image_teacher``.
        init: The checkpoint it starts from (None: the teacher's weights, for the image teacher).
        tubelet: Frames per token of the student (None: the image teacher embeds each frame).
        role: ``distilled`` | ``control`` | ``image_teacher`` (the comparison, one recipe) or
            ``umt_exact`` (the distilled student at UMT's tubelet 1, reported as it comes out).
    """

    backbone: str
    init: Path | None
    tubelet: int | None
    role: str


def run_finetune(output: Path, cfg: Recipe, world: dict, teacher: dict, runs: dict[str, Path],
                 settings: FinetuneSettings, console: Console, baselines: dict[str, Path] | None = None,
                 pool: JobPool | None = None) -> dict:
    """Fine-tune the distilled students, the control and the image teacher on motion; test each.

    Every model is fine-tuned ``settings.seeds`` times (fine-tuning seeds ``cfg.seed + i``: data order,
    augmentation, head; the stage-1 run and the control's start stay fixed) and reported as the mean,
    with each seed's numbers in ``per_seed``.

    Args:
        output: The quickstart's output folder (runs go to ``runs/finetune-*``).
        cfg: The quickstart's stage-1 recipe (geometry, teacher, seed).
        world: ``write_world``'s result.
        teacher: The tiny CLIP's summary (``weights_sha256``).
        runs: Finished stage-1 runs by teacher mode (those the probes report).
        settings: Steps, batch, tubelet, seeds, test views.
        console: Progress and reuse messages.
        baselines: Pixel-reconstruction runs by model name (``quickstart.baselines=true``), fine-tuned
            like the distilled students.
        pool: Where the runs are trained (the quickstart shares one with stage 2); None: a pool of
            ``settings.parallel`` of this step's own.

    Returns:
        ``{"models": {name: {top1, top1_std, top1_seeds, mean_class_accuracy, axis_accuracy, tubelet, role,
        per_seed, ...}}, "reused": bool, "num_clips", "views_per_clip", "settings", "recipe_overrides"}`` —
        the ``finetune`` section of ``results.json``.
    """
    label_map = output / "runs" / "motion_classes.txt"
    label_map.parent.mkdir(parents=True, exist_ok=True)
    label_map.write_text("\n".join(MOTIONS) + "\n", encoding="utf-8")
    plan = model_plan(output, cfg, runs, settings, baselines)
    world_settings = json.loads((Path(world["manifest"]).parent / "world.json").read_text())

    jobs: list[FinetuneJob] = []
    for name, m in plan.items():
        console.print(f"  {name} ← {'teacher weights' if m.init is None else m.init}"
                      + (f", tubelet {m.tubelet}" if m.tubelet else ""), highlight=False)
        for i in range(settings.seeds):
            run = output / "runs" / (f"finetune-{_slug(name)}" + (f"-seed{i}" if i else ""))
            ft = finetune_recipe(cfg, world, run, m.backbone, m.init, settings, label_map, tubelet=m.tubelet, seed=cfg.seed + i)
            identity = {
                "recipe": recipe_to_yaml(ft),
                # the weights the run starts from: the stage-1 checkpoint (student) or the teacher (baseline)
                "init_sha256": _sha256(m.init / "model.safetensors") if m.init is not None else None,
                "teacher_sha256": teacher["weights_sha256"],
                "world": world_settings,
            }
            label = f"fine-tune: {name}" + (f", seed {i + 1}/{settings.seeds}" if settings.seeds > 1 else "")
            jobs.append(FinetuneJob(name, run, ft, identity, label))
    if pool is None:
        with JobPool(settings.parallel, torch.get_num_threads(), console) as own:
            done = run_jobs(jobs, own, console)
    else:
        done = run_jobs(jobs, pool, console)

    models, all_reused = {}, True
    for name, m in plan.items():
        per_seed = [{**done[j.run][1], "reused": done[j.run][0], "run": str(j.run), "seed": j.recipe.seed,
                     "seconds": done[j.run][2]} for j in jobs if j.name == name]
        reused = all(r["reused"] for r in per_seed)
        if reused:
            console.print(f"  [green]reusing the finished fine-tuning run ({name})[/]", highlight=False)
        all_reused &= reused
        models[name] = {**combine_seeds(per_seed), "reused": reused, "init": None if m.init is None else str(m.init),
                        "tubelet": m.tubelet, "role": m.role, "seconds": round(sum(r["seconds"] for r in per_seed), 1)}
    first = next(iter(models.values()))
    return {
        "models": models, "reused": all_reused,
        "num_clips": {"train": _count_rows(world["splits"]["train"]), "test": first["num_videos"]},
        "views_per_clip": first["num_views"],
        "settings": asdict(settings), "recipe": FINETUNE_RECIPE, "recipe_overrides": list(MOTION_RECIPE),
    }


@dataclass(frozen=True)
class FinetuneJob:
    """One fine-tuning run: model ``name``, its folder, recipe, reuse identity and progress label."""

    name: str
    run: Path
    recipe: Recipe
    identity: dict
    label: str

    @property
    def tag(self) -> str:
        """The label without its step: the model (and seed), as the pool's progress lines show it."""
        return self.label.removeprefix("fine-tune: ")


def run_jobs(jobs: list[FinetuneJob], pool: JobPool, console: Console) -> dict[Path, tuple[bool, dict, float]]:
    """Train (or reuse) every job, ``pool.parallel`` at a time (``quickstart/pool.py``).

    Finished runs are reused here, without starting a process for them.

    Returns:
        By run folder: (reused, the run's final metrics, seconds it took).
    """
    out: dict[Path, tuple[bool, dict, float]] = {}
    for job in jobs:
        last = finished_run(job.run, job.identity)
        if last is not None:
            out[job.run] = (True, last, 0.0)
    jobs = [job for job in jobs if job.run not in out]
    if pool.side_by_side and jobs:
        console.print(f"  {len(jobs)} runs to train, {pool.parallel} at a time (one process each)", highlight=False)
    futures = {pool.submit(Job(job.tag, train_job, (job.run, job.identity, job.recipe, job.label))): job for job in jobs}
    for future in as_completed(futures):  # a job that ran in this process is done already
        job, done = futures[future], future.result()
        (reused, last), seconds = done.value, done.seconds
        out[job.run] = (reused, last, seconds)
        if pool.side_by_side:  # what the worker printed is dropped: these lines say what it did
            console.print(f"  {'reused' if reused else 'finished'}: {job.tag}" + ("" if reused else f" ({seconds:.0f} s)"),
                          highlight=False)
    return out


def train_job(run: Path, identity: dict, recipe: Recipe, label: str, console: Console) -> tuple[bool, dict]:
    """One fine-tuning run as a pool job: train it (or resume / reuse it), then test it (``ensure_run``)."""
    return ensure_run(run, identity, lambda: _train_and_score(train, recipe), console, label)


def model_plan(output: Path, cfg: Recipe, runs: dict[str, Path], settings: FinetuneSettings,
               baselines: dict[str, Path] | None = None) -> dict[str, FinetunedModel]:
    """The models of the step, by name: distilled students, control and image teacher on one recipe
    (the students at ``settings.tubelet_size``), then the UMT-exact tubelet-1 rows (``settings.umt_exact``)."""
    t = settings.tubelet_size
    plan = {distilled(mode): FinetunedModel("student", latest_checkpoint(run), t, "distilled") for mode, run in runs.items()}
    plan.update({name: FinetunedModel("student", latest_checkpoint(run), t, "pixel") for name, run in (baselines or {}).items()})
    plan[CONTROL] = FinetunedModel("student", write_initial_student(output / "runs" / INIT_RUN, cfg), t, "control")
    plan[IMAGE_TEACHER] = FinetunedModel("image_teacher", None, None, "image_teacher")
    if settings.umt_exact and t != 1:
        plan.update({umt_exact(mode): FinetunedModel("student", latest_checkpoint(run), 1, "umt_exact")
                     for mode, run in runs.items()})
    return plan


def combine_seeds(per_seed: list[dict]) -> dict:
    """One model's seeds: mean ``top1`` / ``mean_class_accuracy`` / ``axis_accuracy``, ``top1_std`` (sample
    standard deviation over seeds; 0 for one seed), ``top1_seeds``; the rest from the first seed."""
    out = {**per_seed[0]}
    for key in ("top1", "top5", "mean_class_accuracy", "axis_accuracy"):
        out[key] = float(np.mean([r[key] for r in per_seed]))
    top1 = [r["top1"] for r in per_seed]
    out.update(top1_seeds=top1, top1_std=float(np.std(top1, ddof=1)) if len(top1) > 1 else 0.0,
               seeds=len(per_seed), per_seed=per_seed)
    return out


def finetune_recipe(cfg: Recipe, world: dict, run: Path, backbone: str, init: Path | None,
                    settings: FinetuneSettings, label_map: Path, tubelet: int | None = None,
                    seed: int | None = None) -> Recipe:
    """``finetune/tiny`` on the toy motion labels with stage 1's geometry and teacher.

    Args:
        tubelet: ``finetune.tubelet_size`` (None: the init's; the image teacher takes None).
        seed: The fine-tuning seed (default: stage 1's).
    """
    t, v = cfg.teacher, cfg.views

    def value(x) -> str:  # an override's YAML value: None is null, not the string "None"
        return "null" if x is None else str(x)

    return load_recipe(FINETUNE_RECIPE, [
        f"seed={cfg.seed if seed is None else seed}",
        f"corpus.video_backend={cfg.corpus.video_backend}",
        f"student.name={cfg.student.name}",
        # the image-teacher baseline starts from the quickstart's tiny CLIP
        f"teacher.name={t.name}", f"teacher.pretrained={value(t.pretrained)}",
        f"teacher.model_config_path={value(t.model_config_path)}", f"teacher.normalize={t.normalize}",
        f"finetune.backbone={backbone}", f"finetune.init={value(init)}",
        f"finetune.train_source={Path(world['splits']['train']).resolve()}",
        f"finetune.test_source={Path(world['splits']['test']).resolve()}",
        f"finetune.label_map={label_map.resolve()}", f"finetune.num_classes={len(MOTIONS)}",
        # stage 1's clips: no interpolation of the position table
        f"finetune.num_frames={v.num_frames}", f"finetune.size={v.size}",
        f"finetune.pretrain_num_frames={v.num_frames}", f"finetune.pretrain_size={v.size}",
        f"finetune.tubelet_size={value(tubelet)}",
        f"finetune.test_num_clips={settings.test_clips}",
        f"train.max_steps={settings.steps}", f"train.batch_size={settings.batch_size}",
        f"train.num_workers={settings.workers}", f"train.output_dir={run.resolve()}",
        f"train.log_every={max(1, min(10, settings.steps))}", f"train.ckpt_every={max(1, settings.steps // 2)}",
        *MOTION_RECIPE,
    ])


def write_initial_student(folder: Path, cfg: Recipe) -> Path:
    """The weights stage 1 started from, as a stage-1 checkpoint (the control's init); kept if unchanged.

    Returns:
        The checkpoint folder.
    """
    teacher_dim = build_teacher(cfg, torch.device("cpu")).embed_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # as stage1.train: exactly the weights it started from
        student = build_student(cfg, teacher_dim)
    ckpt = latest_checkpoint(folder) if folder.exists() else None
    if ckpt is not None:
        stored, state = load_file(str(ckpt / "model.safetensors")), student.state_dict()
        if stored.keys() == state.keys() and all(torch.equal(stored[k], state[k]) for k in state):
            return ckpt
        shutil.rmtree(folder)
    return save_checkpoint(folder, 0, student, {"step": 0}, recipe_to_yaml(cfg))


def _train_and_score(train, ft: Recipe) -> dict:
    """Fine-tune and test; the JSON-able test metrics plus the axis accuracy of the final test."""
    t = time.perf_counter()
    last = train(ft)
    confusion = np.load(Path(ft.train.output_dir) / "eval" / "final" / "confusion.npy")
    return {
        "top1": float(last["test_top1"]), "top5": float(last["test_top5"]),
        "mean_class_accuracy": float(last["test_mean_class_accuracy"]), "axis_accuracy": axis_accuracy(confusion),
        "predicted_classes": int((confusion.sum(axis=0) > 0).sum()),  # columns: predicted class
        "num_videos": int(last["test_num_videos"]), "num_views": int(last["test_num_views"]),
        "final_train_loss": last.get("loss"), "train_seconds": round(time.perf_counter() - t, 1),
    }


def axis_accuracy(confusion: np.ndarray) -> float:
    """Fraction of clips whose predicted motion is on the right axis (:data:`AXES`), direction aside."""
    hits = sum(confusion[np.ix_(idx, idx)].sum() for idx in
               ([MOTIONS.index(a), MOTIONS.index(b)] for a, b in AXES.values()))
    return float(hits / max(confusion.sum(), 1))


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _slug(name: str) -> str:
    """``student, distilled (cached)`` → ``student-distilled-cached``."""
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def _count_rows(manifest: str | Path) -> int:
    return len(read_corpus(str(manifest)))


__all__ = ["run_finetune", "run_jobs", "train_job", "model_plan", "combine_seeds", "FinetunedModel", "finetune_recipe", "write_initial_student", "axis_accuracy", "MOTION_RECIPE", "AXES",
           "FINETUNE_RECIPE", "INIT_RUN"]
