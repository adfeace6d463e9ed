"""The quickstart's own settings (``quickstart.*`` overrides); the stage-1 settings are the recipe's."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass

from umt_distill.config import RecipeError, parse_override
from umt_distill.quickstart.tiny_clip import ClipTrainSettings
from umt_distill.quickstart.world import WorldSettings


@dataclass(frozen=True)
class FinetuneSettings:
    """How the quickstart fine-tunes (``quickstart.finetune.steps=400``).

    Attributes:
        steps: Optimizer steps per model (each ``batch_size`` videos × 2 random crops).
        batch_size: Videos per step.
        tubelet_size: Frames per token of the fine-tuned students (distilled and control); the
            tubelet-1 stage-1 weights are inflated to it (``finetune.tubelet_size``).
        umt_exact: Also fine-tune each distilled student at UMT's tubelet 1 (reported as it comes out).
        seeds: Fine-tuning seeds per model; the report gives the mean ± the spread.
        test_clips: Temporal views per test clip (softmax averaged), one crop each.
        workers: DataLoader processes that decode and augment while the model trains (0: the training
            process does it).
        parallel: Runs at a time in steps 6 and 7, each in its own process: the fine-tuning runs, with
            stage 2 beside them (1 = one after the other, in this process).
    """

    # Measured on the full world (one seed, test top-1 of the tubelet-2 distilled student / control):
    # 400 × 8: 0.208 / -; 600 × 8: 0.604 / 0.146; 600 × 8 with one crop per video (finetune.num_sample=1):
    # 0.198 / 0.115; 400 × 8 at lr 3e-3: 0.115. At tubelet 1 and the former 400 × 4, every model was at chance.
    steps: int = 600
    batch_size: int = 8
    tubelet_size: int = 2
    umt_exact: bool = True
    seeds: int = 1
    test_clips: int = 2
    # Measured idle, 2 runs side by side and stage 2 beside them (`umt-distill quickstart --output DIR`, then
    # the same with quickstart.finetune.workers=1 into a fresh DIR; seconds per run in the step-6 lines):
    # with a loader worker each (4+ processes on 2 cores) the four runs took 104/113/137/108 s and the
    # step 326 s; without, 42/41/64/63 s and 156 s.
    workers: int = 0
    parallel: int = 2  # the runs are independent; this machine has 2 cores

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "tubelet_size", "seeds", "test_clips", "parallel"):
            if getattr(self, name) < 1:
                raise RecipeError(f"quickstart.finetune.{name} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise RecipeError(f"quickstart.finetune.workers must be >= 0, got {self.workers}")


@dataclass(frozen=True)
class QASettings:
    """Toy video QA, step 8 (``quickstart.qa.steps=300``; ``quickstart/qa.py``).

    Attributes:
        enabled: Run the step.
        steps: Optimizer steps per QA model (``batch_size`` questions each).
        batch_size: Questions per step.
        lr: Peak learning rate (linear warm-up over the first tenth of the steps, cosine to 1 % after).
        train_video: Fine-tune the student's video encoder too, as UMT does (about 3x the step time here);
            off, both video encoders (student and image teacher) are frozen and the same text side is
            trained over their tokens.
    """

    # Measured on a world whose stage 2 saw 1 epoch (CPU seconds, one thread): a step of the student
    # with its video encoder trained 0.135 s, over frozen tokens 0.043 s. 300 steps at lr 3e-3 (video
    # trained) took the appearance question from 0.22 (blind) to 0.50; 150 at lr 1e-3 left it at 0.18.
    # The default quickstart (480 clips), these defaults: appearance 1.000 (student and image teacher) vs
    # 0.219 blind, motion 0.125 for all three (chance 0.167), 25.8 CPU-s; with train_video=true the
    # student's motion was 0.146, 48.6 CPU-s.
    enabled: bool = True
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    train_video: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise RecipeError(f"quickstart.qa.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class QuickstartSettings:
    """What the quickstart itself decides (the stage-1 settings are the recipe's).

    Attributes:
        world: The toy world (``quickstart.world.clips=240``).
        clip: Training of the tiny image CLIP (``quickstart.clip.steps=300``).
        finetune: Fine-tuning on the motion labels (``quickstart.finetune.steps=400``).
        qa: Toy video QA after stage 2 (``quickstart.qa.steps=300``).
        stage2_epochs: Epochs of stage 2 (0 = the epochs of ``recipes/quickstart/stage2.yaml``).
        stage2_tubelet: Frames per token of the stage-2 vision encoder (1 = UMT's). Above 1 the stage-1
            weights are inflated and UTA is off (a token spans several frames, so it has no one teacher
            token); the run goes to ``runs/stage2-<mode>-tubelet<T>``.
        clip_images: Still images in the tiny CLIP's image–caption corpus.
        clip_eval_images: Held-out stills for its zero-shot accuracy.
        knn_k: Neighbours of the kNN probe.
        baselines: Also train the stage-1 student by pixel reconstruction (VideoMAE) for the same steps
            and report it beside the distilled one in the probes and the fine-tuning (``baselines.py``).
        threads: torch CPU threads. The models are so small that one op's work does not pay for
            splitting it: measured here, a stage-1 step of the tiny student took 81 ms on 1 thread and
            900 ms on 2 while another process used the second core (threads spin-wait for each other).
    """

    world: WorldSettings = WorldSettings()
    clip: ClipTrainSettings = ClipTrainSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    qa: QASettings = QASettings()
    stage2_epochs: int = 0
    stage2_tubelet: int = 1
    clip_images: int = 6000
    clip_eval_images: int = 500
    knn_k: int = 10
    baselines: bool = False
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

    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise RecipeError(f"{key}: expected true or false, got {value!r}")
        return dataclasses.replace(obj, **{name: value})
    if isinstance(current, tuple):
        if not isinstance(value, list) or len(value) != len(current) or not all(map(number, value)):
            raise RecipeError(f"{key}: expected a list of {len(current)} numbers, got {value!r}")
        value = tuple(float(v) for v in value)
    elif not number(value) or (isinstance(current, int) and not isinstance(value, int)):
        raise RecipeError(f"{key}: expected {type(current).__name__}, got {value!r}")
    return dataclasses.replace(obj, **{name: type(current)(value)})
