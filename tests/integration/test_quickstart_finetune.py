"""The quickstart's fine-tuning step: its recipe, the control's initial weights, reuse, and the reading of
its numbers. The step itself runs end to end in tests/integration/test_quickstart.py (miniature quickstart)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from umt_distill.config import RecipeError, load_recipe
from umt_distill.quickstart.world import MOTIONS
from umt_distill.quickstart.finetune import axis_accuracy, finetune_recipe, write_initial_student
from umt_distill.quickstart.names import CONTROL, IMAGE_TEACHER
from umt_distill.quickstart.results_report import finetune_markdown as markdown
from umt_distill.quickstart.results_report import finetune_reading as reading
from umt_distill.quickstart.reuse import DONE_FILE, STARTED_FILE, ensure_run
from umt_distill.quickstart.settings import FinetuneSettings, parse_settings


def _stage1(tmp_path: Path, *extra: str):
    """The quickstart's stage-1 recipe with a test teacher (random weights: nothing is trained here)."""
    return load_recipe("quickstart/stage1", ["teacher.name=umt-test-tiny", "teacher.pretrained=null",
                                             f"corpus.source={tmp_path / 'train.csv'}", *extra])


def _world(tmp_path: Path) -> dict:
    return {"splits": {s: tmp_path / f"{s}.csv" for s in ("train", "val", "test")}, "manifest": tmp_path / "manifest.csv"}


def quiet() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=200), buffer


def test_motion_recipe_has_no_flip_and_stage1_geometry(tmp_path) -> None:
    cfg = _stage1(tmp_path, "views.num_frames=6", "views.size=48", "seed=3")
    init = tmp_path / "ckpt"
    ft = finetune_recipe(cfg, _world(tmp_path), tmp_path / "run", "student", init, FinetuneSettings(steps=7), tmp_path / "m.txt")
    f = ft.finetune
    assert load_recipe("finetune/tiny").finetune.flip, "the base recipe flips; the motion recipe must turn it off"
    assert f.flip is False  # a flip would swap "moving left" and "moving right"
    assert f.num_classes == len(MOTIONS) and f.backbone == "student" and f.init == str(init)
    assert (f.num_frames, f.size, f.pretrain_num_frames, f.pretrain_size) == (6, 48, 6, 48)
    assert f.train_source == str((tmp_path / "train.csv").resolve()) and f.test_source == str((tmp_path / "test.csv").resolve())
    assert f.val_source is None and f.test_num_crops == 1
    assert ft.train.max_steps == 7 and ft.seed == 3 and ft.student.name == cfg.student.name
    baseline = finetune_recipe(cfg, _world(tmp_path), tmp_path / "run", "image_teacher", None, FinetuneSettings(steps=7), tmp_path / "m.txt")
    assert baseline.finetune.init is None and baseline.finetune.flip is False
    assert (baseline.teacher.name, baseline.teacher.pretrained, baseline.teacher.normalize) == \
        (cfg.teacher.name, cfg.teacher.pretrained, cfg.teacher.normalize)
    # identical settings for every model: only backbone and init differ
    a, b = ft.model_dump(), baseline.model_dump()
    assert {k for k in a["finetune"] if a["finetune"][k] != b["finetune"][k]} == {"backbone", "init"}
    assert {k for k in a if a[k] != b[k]} == {"finetune"}


def test_control_starts_from_the_weights_stage1_started_from(tmp_path) -> None:
    from umt_distill.teachers.build import build_teacher
    from umt_distill.stages.finetune import build_classifier
    from umt_distill.stages.parts import build_student

    cfg = _stage1(tmp_path)
    ckpt = write_initial_student(tmp_path / "init", cfg)
    dim = build_teacher(cfg, torch.device("cpu")).embed_dim
    torch.manual_seed(cfg.seed)  # as stage1.train does before building its student
    start = build_student(cfg, dim).state_dict()
    stored = load_file(str(ckpt / "model.safetensors"))
    assert stored.keys() == start.keys() and all(torch.equal(stored[k], start[k]) for k in start)
    before = (ckpt / "model.safetensors").stat().st_mtime_ns
    assert write_initial_student(tmp_path / "init", cfg) == ckpt
    assert (ckpt / "model.safetensors").stat().st_mtime_ns == before  # unchanged: kept
    ft = finetune_recipe(cfg, _world(tmp_path), tmp_path / "run", "student", ckpt, FinetuneSettings(), tmp_path / "m.txt")
    model, report = build_classifier(ft)
    assert report.layout == "stage1" and torch.equal(model.blocks[1].mlp.fc1.weight, start["encoder.blocks.1.mlp.fc1.weight"])
    assert model.pretrain_grid == (cfg.views.num_frames, cfg.views.size // 16, cfg.views.size // 16)
    other = write_initial_student(tmp_path / "init", _stage1(tmp_path, "seed=1"))  # another start: rewritten
    key = "encoder.blocks.1.mlp.fc1.weight"
    assert not torch.equal(load_file(str(other / "model.safetensors"))[key], start[key])


def test_a_finished_run_is_reused_only_with_the_same_identity(tmp_path) -> None:
    run, calls = tmp_path / "run", []

    def train() -> dict:
        calls.append(1)
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
        return {"top1": 0.5 + len(calls)}

    identity = {"recipe": "a", "init_sha256": "x"}
    console, printed = quiet()
    assert ensure_run(run, identity, train, console, "fine-tune") == (False, {"top1": 1.5})
    assert ensure_run(run, identity, train, console, "fine-tune") == (True, {"top1": 1.5}) and len(calls) == 1
    # another initial checkpoint (e.g. stage 1 trained again): the old run is removed, not resumed
    (run / "stale").write_text("")
    assert ensure_run(run, {**identity, "init_sha256": "y"}, train, console, "fine-tune") == (False, {"top1": 2.5})
    assert "holds a run of another recipe or teacher" in printed.getvalue() and not (run / "stale").exists()
    # an interrupted run of the same identity is resumed (its folder kept)
    (run / DONE_FILE).unlink()
    (run / "keep").write_text("")
    console, printed = quiet()
    assert ensure_run(run, {**identity, "init_sha256": "y"}, train, console, "fine-tune") == (False, {"top1": 3.5})
    assert "resuming the interrupted training run" in printed.getvalue() and (run / "keep").exists()
    assert json.loads((run / STARTED_FILE).read_text()) == {**identity, "init_sha256": "y"}


def test_axis_accuracy_ignores_direction() -> None:
    cm = np.zeros((6, 6), dtype=int)
    cm[0, 1] = cm[1, 0] = 5  # left <-> right swapped: wrong class, right axis
    cm[2, 2] = 4  # up correct
    cm[4, 0] = 6  # growing called left: wrong axis
    assert axis_accuracy(cm) == pytest.approx(14 / 20)
    assert axis_accuracy(np.zeros((6, 6))) == 0.0


def _finetune(student: float, control: float, teacher: float, teacher_axis: float, n: int = 96) -> dict:
    def m(top1: float, axis: float) -> dict:
        return {"top1": top1, "top5": 1.0, "mean_class_accuracy": top1, "axis_accuracy": axis, "reused": False, "seconds": 1.0}

    return {"models": {"student, distilled (cached)": m(student, 1.0), CONTROL: m(control, 0.9), IMAGE_TEACHER: m(teacher, teacher_axis)},
            "num_clips": {"train": 288, "test": n}, "views_per_clip": 2, "settings": {"steps": 300, "batch_size": 4},
            "recipe": "finetune/tiny", "recipe_overrides": ["finetune.flip=false"], "reused": False}


def test_reading_states_what_the_numbers_support() -> None:
    clear = " ".join(reading(_finetune(student=0.9, control=0.6, teacher=0.5, teacher_axis=0.98)))
    assert "beats its image teacher" in clear and "distillation helped" in clear and "not the direction" in clear
    close = " ".join(reading(_finetune(student=0.55, control=0.52, teacher=0.5, teacher_axis=0.7)))
    assert "does not clearly beat its image teacher" in close and "no clear difference" in close
    assert "beats its image teacher on motion" not in close and "helped" not in close
    worse = " ".join(reading(_finetune(student=0.2, control=0.6, teacher=0.5, teacher_axis=0.6)))
    assert "clearly below its image teacher" in worse and "clearly worse than random weights" in worse
    assert "No model is clearly above chance" not in worse
    # all at chance: said first, and no "beats" or "helped" from noise below chance
    at_chance = _finetune(student=0.2, control=0.1, teacher=0.05, teacher_axis=0.3)
    chance = " ".join(reading(at_chance))
    assert "No model is clearly above chance" in chance and "beats" not in chance and "helped" not in chance
    assert "Classes predicted" not in chance  # runs finished before the field existed
    at_chance["models"][CONTROL]["predicted_classes"] = 1
    assert f"Classes predicted on the test clips (of 6): {CONTROL} 1 -- a model that predicts one class" \
        in " ".join(reading(at_chance))
    section = "\n".join(markdown(_finetune(0.9, 0.6, 0.5, 0.98)))
    assert "## Fine-tuned on the motion labels" in section and f"| {IMAGE_TEACHER} | per frame | 0.500 |" in section
    assert "finetune.flip=false" in section and "| chance | | 0.167 | 0.167 | 0.333 |" in section


def test_finetune_settings_are_quickstart_settings() -> None:
    settings, rest = parse_settings(["quickstart.finetune.steps=5", "quickstart.finetune.test_clips=1", "train.epochs=1"])
    assert (settings.finetune.steps, settings.finetune.test_clips, rest) == (5, 1, ["train.epochs=1"])
    with pytest.raises(RecipeError, match="quickstart.finetune.step"):
        parse_settings(["quickstart.finetune.step=5"])
    with pytest.raises(RecipeError, match="quickstart.finetune.steps: expected int"):
        parse_settings(["quickstart.finetune.steps=0.5"])


def test_plan_compares_like_with_like_and_adds_the_umt_exact_row(tmp_path) -> None:
    from umt_distill.quickstart.finetune import model_plan
    from umt_distill.quickstart.names import distilled, umt_exact
    from umt_distill.training.checkpoint import save_checkpoint
    from umt_distill.stages.parts import build_student

    cfg = _stage1(tmp_path)
    run = tmp_path / "runs" / "stage1-cached"
    save_checkpoint(run, 1, build_student(cfg, 32), {"step": 1}, "")
    plan = model_plan(tmp_path, cfg, {"cached": run}, FinetuneSettings(tubelet_size=2))
    assert {k: (m.tubelet, m.role) for k, m in plan.items()} == {
        distilled("cached"): (2, "distilled"), CONTROL: (2, "control"), IMAGE_TEACHER: (None, "image_teacher"),
        umt_exact("cached"): (1, "umt_exact")}
    recipes = {k: finetune_recipe(cfg, _world(tmp_path), tmp_path / "r", m.backbone, m.init, FinetuneSettings(),
                                  tmp_path / "m.txt", tubelet=m.tubelet).model_dump()["finetune"] for k, m in plan.items()}
    a, b = recipes[distilled("cached")], recipes[CONTROL]
    assert {k for k in a if a[k] != b[k]} == {"init"} and a["tubelet_size"] == 2 and a["sampling"] == "segment"
    assert recipes[IMAGE_TEACHER]["tubelet_size"] is None and recipes[umt_exact("cached")]["tubelet_size"] == 1
    assert umt_exact("cached") not in model_plan(tmp_path, cfg, {"cached": run}, FinetuneSettings(umt_exact=False))
    assert umt_exact("cached") not in model_plan(tmp_path, cfg, {"cached": run}, FinetuneSettings(tubelet_size=1))


def test_seeds_are_averaged_and_their_spread_enters_the_noise() -> None:
    from umt_distill.quickstart.finetune import combine_seeds
    from umt_distill.quickstart.results_report import model_error, standard_error

    runs = [{"top1": t, "top5": 1.0, "mean_class_accuracy": t, "axis_accuracy": 0.9, "predicted_classes": 6,
             "num_videos": 96, "run": f"r{i}"} for i, t in enumerate((0.9, 0.8, 0.7))]
    m = combine_seeds(runs)
    assert m["top1"] == pytest.approx(0.8) and m["top1_std"] == pytest.approx(0.1) and m["seeds"] == 3
    assert m["top1_seeds"] == [0.9, 0.8, 0.7] and m["run"] == "r0" and len(m["per_seed"]) == 3
    assert model_error(m, 96) == pytest.approx(math.sqrt(0.01 / 3 + 0.8 * 0.2 / 96))
    assert model_error({"top1": 0.5}, 96) == pytest.approx(standard_error(0.5, 96))  # one seed: binomial only
    assert combine_seeds(runs[:1])["top1_std"] == 0.0
    # a gap that one seed's binomial noise would call clear is not clear when the seeds disagree
    spread = _finetune(student=0.6, control=0.4, teacher=0.1, teacher_axis=0.3)
    spread["settings"]["seeds"] = 3
    for name, std in (("student, distilled (cached)", 0.25), (CONTROL, 0.25)):
        spread["models"][name].update(seeds=3, top1_std=std)
    assert "distillation helped" in " ".join(reading(_finetune(student=0.6, control=0.4, teacher=0.1, teacher_axis=0.3)))
    text = " ".join(reading(spread))
    assert "no clear difference" in text and "3 fine-tuning seeds" in text


def test_reading_reports_the_umt_exact_row_as_it_comes_out() -> None:
    from umt_distill.quickstart.names import umt_exact

    result = _finetune(student=0.9, control=0.5, teacher=0.1, teacher_axis=0.3)
    result["models"][umt_exact("cached")] = {**result["models"][CONTROL], "top1": 0.2, "role": "umt_exact", "tubelet": 1}
    result["models"]["student, distilled (cached)"]["tubelet"] = 2
    text = " ".join(reading(result))
    assert f"{umt_exact('cached')}: top-1 0.200, not clearly above chance" in text
    assert "(tubelet 2) is +0.700 above it" in text and "distillation helped" in text
    assert text.count("beats its image teacher") == 1  # the UMT-exact row is not a headline comparison
