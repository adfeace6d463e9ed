"""Fine-tuning on generated labelled videos: data pieces, Mixup box, the loop, resume, evaluation, init."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from umt_distill.testing.corpora import write_labelled_videos

from umt_distill.config import load_recipe, recipe_to_yaml  # noqa: E402
from umt_distill.data.classification import (  # noqa: E402
    LabelError,
    VideoMixup,
    build_rand_augment,
    rand_augment_clip,
    random_resized_crop_box,
    read_labelled_corpus,
    seeded_global_rngs,
    segment_test_indices,
    sparse_test_indices,
    sparse_train_indices,
    eval_crop_boxes,
)
from umt_distill.training.metrics import read_metrics  # noqa: E402

# --------------------------------------------------------------------------------------------------
# frame sampling and crops (UMT code: single_modality/datasets/kinetics_sparse.py), by hand


def test_sparse_sampling_matches_hand_computed_frames():
    # 33 frames, T = 4: segment size s = 32 / 4 = 8
    assert sparse_test_indices(33, 4, clip=0, num_clips=1) == [4, 12, 20, 28]  # + int(8 / 2 * 1)
    assert sparse_test_indices(33, 4, clip=2, num_clips=4) == [4, 12, 20, 28]  # + int(8 / 5 * 3) = 4
    assert sparse_test_indices(33, 4, clip=3, num_clips=4) == [6, 14, 22, 30]  # + int(8 / 5 * 4) = 6
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx = sparse_train_indices(33, 4, g)
        assert all(8 * i <= f <= 8 * (i + 1) for i, f in enumerate(idx))
    # shorter than T: frames repeat; s = 0.25 and np.round rounds halves to even (round(0.5) = 0, round(1.5) = 2)
    assert sparse_test_indices(3, 8, 0, 1) == [0, 0, 0, 1, 1, 1, 2, 2]


def test_segment_sampling_for_ssv2():
    # 40 frames, T = 4: tick 10; two test views = segment starts, then midpoints
    assert segment_test_indices(40, 4, 0, 2) == [0, 10, 20, 30]
    assert segment_test_indices(40, 4, 1, 2) == [5, 15, 25, 35]
    assert segment_test_indices(40, 4, 0, 1) == [5, 15, 25, 35]


def test_test_crops_span_the_long_side():
    # 64x48 frame -> short side 48 resized to 32, long side 42; 3 crops at 0, 5, 10 resized px
    assert eval_crop_boxes(64, 48, 32, 3) == [(0, 0, 48, 48), (8, 0, 48, 48), (15, 0, 48, 48)]
    assert eval_crop_boxes(64, 48, 32, 1) == [(8, 0, 48, 48)]
    assert eval_crop_boxes(48, 64, 32, 2) == [(0, 0, 48, 48), (0, 15, 48, 48)]  # portrait: along the height


def test_random_resized_crop_is_seeded_and_inside():
    boxes = [random_resized_crop_box(64, 48, (0.08, 1.0), (0.75, 1.3333), torch.Generator().manual_seed(s)) for s in range(50)]
    assert boxes == [random_resized_crop_box(64, 48, (0.08, 1.0), (0.75, 1.3333), torch.Generator().manual_seed(s))
                     for s in range(50)]
    for x0, y0, w, h in boxes:
        assert 0 <= x0 and 0 <= y0 and x0 + w <= 64 and y0 + h <= 48 and w > 0 and h > 0
    assert len(set(boxes)) > 40


# --------------------------------------------------------------------------------------------------
# clip-consistent augmentation


def test_rand_augment_applies_the_same_ops_to_every_frame():
    from umt_distill.testing.media import moving_shapes_video

    transform = build_rand_augment("rand-m7-n4-mstd0.5-inc1", 32)
    clip = moving_shapes_video(2, 40, 48, seed=3)  # two different frames
    py_state, np_state = random.getstate(), np.random.get_state()
    changed = 0
    for seed in range(6):
        out = rand_augment_clip(transform, clip, seed)
        # each frame got exactly what a clip of only that frame gets: the draw depends on the seed alone
        for t in range(2):
            alone = rand_augment_clip(transform, np.stack([clip[t], clip[t]]), seed)
            assert np.array_equal(out[t], alone[0]) and np.array_equal(alone[0], alone[1])
        changed += not np.array_equal(out, clip)
    assert changed >= 4  # the transform does something
    assert random.getstate() == py_state and np.array_equal(np.random.get_state()[1], np_state[1])


def test_seeded_global_rngs_restores_the_callers_streams():
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    with seeded_global_rngs(123):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)
    with seeded_global_rngs(123):
        assert torch.equal(torch.rand(3), inside)


def _video_batch(B: int = 4, C: int = 3, T: int = 5, H: int = 16, W: int = 20) -> torch.Tensor:
    """Every (clip, channel, frame) a distinct constant image, so mixed pixels reveal their source."""
    values = torch.arange(B * C * T, dtype=torch.float32).view(B, C, T, 1, 1) + 1
    return values.expand(B, C, T, H, W).clone()


def test_cutmix_uses_one_box_for_all_frames_and_channels():
    mix = VideoMixup(num_classes=4, mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, label_smoothing=0.0)
    labels = torch.tensor([0, 1, 2, 3])
    boxes = 0
    for seed in range(8):
        x = _video_batch()
        orig = x.clone()
        mixed, targets = mix(x, labels, seed)
        assert mixed is x  # in place, like timm
        partner = orig.flip(0)
        assert torch.all((mixed == orig) | (mixed == partner))  # every pixel comes from one of the two clips
        taken = mixed == partner  # [B, C, T, H, W]
        box = taken[0, 0, 0]  # [H, W]
        assert torch.equal(taken, box.expand_as(taken)), "the box differs across clips, channels or frames"
        if box.any():
            boxes += 1
            rows, cols = box.any(1).nonzero().squeeze(1), box.any(0).nonzero().squeeze(1)
            assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # a rectangle
        lam = 1 - box.float().mean().item()  # corrected lambda: the kept area
        expected = lam * torch.eye(4)[labels] + (1 - lam) * torch.eye(4)[labels.flip(0)]
        assert torch.allclose(targets, expected, atol=1e-6)
    assert boxes >= 6


def test_mixup_uses_one_lambda_for_all_frames_and_smooths_labels():
    mix = VideoMixup(num_classes=4, mixup_alpha=0.8, cutmix_alpha=0.0, prob=1.0, label_smoothing=0.1)
    x = _video_batch()
    orig = x.clone()
    mixed, targets = mix(x, torch.tensor([0, 1, 2, 3]), seed=5)
    lam = (mixed - orig.flip(0)) / (orig - orig.flip(0))  # per element; the same everywhere
    assert torch.allclose(lam, lam.flatten()[0].expand_as(lam))
    assert torch.allclose(targets.sum(1), torch.ones(4)) and targets.min() >= 0.1 / 4 - 1e-6
    with pytest.raises(ValueError, match="even batch"):
        mix(_video_batch(B=3), torch.tensor([0, 1, 2]), seed=0)


# --------------------------------------------------------------------------------------------------
# labels


def test_labels_must_resolve(tmp_path):
    (tmp_path / "names.csv").write_text("id,path,label\na,a.mp4,jump\nb,b.mp4,run\n")
    with pytest.raises(LabelError, match="names.csv: clip 'a'.*finetune.label_map"):
        read_labelled_corpus(str(tmp_path / "names.csv"), None, 2)
    (tmp_path / "classes.txt").write_text("run\njump\n")
    _, labels = read_labelled_corpus(str(tmp_path / "names.csv"), None, 2, str(tmp_path / "classes.txt"))
    assert labels == [1, 0]
    (tmp_path / "ints.csv").write_text("id,path,label\na,a.mp4,5\n")
    with pytest.raises(LabelError, match="label 5 is outside"):
        read_labelled_corpus(str(tmp_path / "ints.csv"), None, 2)
    (tmp_path / "none.csv").write_text("id,path\na,a.mp4\n")
    with pytest.raises(LabelError, match="no label"):
        read_labelled_corpus(str(tmp_path / "none.csv"), None, 2)


# --------------------------------------------------------------------------------------------------
# the loop on real videos


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ftvideos")
    return {"train": write_labelled_videos(folder, 8, name="train.csv"),
            "test": write_labelled_videos(folder, 4, seed=500, name="test.csv")}


def _cfg(toy, out: Path, *extra: str):
    return load_recipe("finetune/tiny", [f"finetune.train_source={toy['train']}", f"train.output_dir={out}", *extra])


# Augmentations off so a few dozen steps learn the toy cue; every augmentation runs in the resume test.
PLAIN = ("finetune.randaug=null", "finetune.mixup=0", "finetune.cutmix=0", "finetune.reprob=0", "optim.lr=2.0e-3")


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory) -> dict:
    from umt_distill.stages.finetune import build_classifier, evaluate_model, train
    from umt_distill.training.distributed import DistEnv

    out = tmp_path_factory.mktemp("ftrun") / "run"
    cfg = _cfg(toy, out, *PLAIN, "train.epochs=3", f"finetune.val_source={toy['test']}", f"finetune.test_source={toy['test']}")
    torch.manual_seed(cfg.seed)  # the initial model train() starts from
    model, _ = build_classifier(cfg)
    before = evaluate_model(model, cfg, str(toy["test"]), DistEnv(), torch.device("cpu"), 2, 3)[0]
    result = train(cfg)
    return {"cfg": cfg, "out": out, "before": before, "result": result}


def test_fine_tuning_improves_test_accuracy(trained):
    before, result, out = trained["before"], trained["result"], trained["out"]
    assert result["test_top1"] == 1.0 > before.top1, (before.top1, result)
    logged = read_metrics(out / "metrics.jsonl")
    train_steps = [m for m in logged if "loss" in m]
    assert [m["step"] for m in train_steps] == list(range(1, 13))  # 16 videos / 4 per step x 3 epochs
    assert sum(m["loss"] for m in train_steps[-3:]) < sum(m["loss"] for m in train_steps[:3])
    val = [m for m in logged if "val_top1" in m]
    assert [m["step"] for m in val] == [4, 8] and all(m["val_num_views"] == 1 for m in val)
    test = [m for m in logged if "test_top1" in m]
    assert test[-1]["test_num_views"] == 6 and test[-1]["test_num_videos"] == 8
    for name in ("metrics.json", "predictions.jsonl", "confusion.png", "confusion.npy"):
        assert (out / "eval" / "final" / name).exists(), name


def test_evaluate_reproduces_the_final_test(trained):
    from umt_distill.stages.finetune import evaluate

    summary = evaluate(trained["cfg"], trained["out"])
    assert summary["top1"] == trained["result"]["test_top1"] and summary["num_views"] == 6
    assert summary["top5"] == trained["result"]["test_top5"]
    assert (Path(summary["output"]) / "confusion.png").exists()


def test_eval_of_a_run_folder_uses_its_own_recipe_and_writes_into_it(trained, tmp_path):
    import json

    run = tmp_path / "moved_run"  # another folder than the recipe's train.output_dir
    shutil.copytree(trained["out"] / "checkpoints", run / "checkpoints")
    done = subprocess.run([sys.executable, "-m", "umt_distill", "eval", str(run)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["top1"] == trained["result"]["test_top1"] and summary["num_views"] == 6
    assert Path(summary["output"]) == run / "eval" / "moved_run"
    assert (run / "eval" / "moved_run" / "metrics.json").exists()


def test_eval_of_a_folder_without_a_run_says_what_it_needs(tmp_path):
    done = subprocess.run([sys.executable, "-m", "umt_distill", "eval", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{tmp_path}: not a run folder with a checkpoint; give a run folder, or a recipe and a checkpoint" in done.stderr


def _with_unusable_clips(toy, folder: Path) -> Path:
    """The training manifest plus a clip too short for finetune.num_frames=4 and a file that is no video."""
    from umt_distill.testing.media import moving_shapes_video, write_video

    write_video(folder / "short.mp4", moving_shapes_video(3, 48, 64, seed=9), fps=10)
    (folder / "broken.mp4").write_bytes(b"not a video")
    lines = toy["train"].read_text().splitlines()
    root = toy["train"].parent
    rows = [lines[0]] + [f"{i},{root / p},{label}" for i, p, label in (line.split(",") for line in lines[1:])]
    rows += [f"short,{folder / 'short.mp4'},0", f"broken,{folder / 'broken.mp4'},1"]
    manifest = folder / "with_unusable.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def test_fine_tuning_skips_and_records_unusable_clips_like_caching(toy, tmp_path):
    from umt_distill.stages.finetune import train

    manifest = _with_unusable_clips(toy, tmp_path)
    out = tmp_path / "run"
    train(_cfg(toy, out, *PLAIN, f"finetune.train_source={manifest}", "train.max_steps=2",
               "corpus.max_failed_fraction=0.2"))  # 2 of 18
    failed = {f["id"]: f for f in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}
    assert set(failed) == {"short", "broken"}
    assert failed["short"]["reason"] == "3 frame(s) in its window, fewer than the 4 a clip needs"
    assert failed["broken"]["stage"] == "finetune" and failed["broken"]["path"].endswith("broken.mp4")
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl") if "loss" in m] == [1, 2]


def test_fine_tuning_stops_before_training_past_the_failed_fraction(toy, tmp_path):
    manifest = _with_unusable_clips(toy, tmp_path)
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "umt_distill", "train", "finetune/tiny", f"finetune.train_source={manifest}",
                           f"train.output_dir={out}", "corpus.max_failed_fraction=0.1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert (f"error: {manifest}: 2 of 18 clips cannot be used (11.1%, more than corpus.max_failed_fraction=0.1); "
            "see the reasons in failures.jsonl") in done.stderr
    assert (out / "failures.jsonl").exists() and not (out / "metrics.jsonl").exists()


def test_every_augmentation_runs_and_resume_is_exact(toy, tmp_path):
    """RandAugment, random erasing, Mixup/CutMix, drop path and 2 samples per video; a resume from the
    step-2 checkpoint reproduces steps 3-4 exactly."""
    from umt_distill.stages.finetune import train

    out = tmp_path / "run"
    cfg = _cfg(toy, out, "train.max_steps=4", "train.ckpt_every=2", "train.batch_size=2")
    assert cfg.finetune.randaug and cfg.finetune.mixup and cfg.finetune.reprob and cfg.student.drop_path_rate
    train(cfg)
    first = {m["step"]: m["loss"] for m in read_metrics(out / "metrics.jsonl")}
    assert sorted(first) == [1, 2, 3, 4] and all(np.isfinite(v) for v in first.values())
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    (out / "checkpoints" / "latest").write_text("step-00000002\n")
    train(cfg)
    again = {m["step"]: m["loss"] for m in read_metrics(out / "metrics.jsonl")}
    assert again == first


def _stage1_checkpoint(root: Path, views: list[str] = ()) -> tuple[Path, object]:
    """A stage-1 run directory in our checkpoint format (tiny student, stage1/tiny recipe)."""
    from umt_distill.models.vit import create_student
    from umt_distill.training.checkpoint import save_checkpoint

    torch.manual_seed(7)
    student = create_student("umt_test_tiny")
    save_checkpoint(root, 10, student, {"step": 10}, recipe_to_yaml(load_recipe("stage1/tiny", list(views))))
    return root, student


def test_init_from_a_stage1_run_directory(toy, tmp_path):
    from umt_distill.models.checkpoints import CheckpointError
    from umt_distill.stages.finetune import build_classifier, evaluate

    run, student = _stage1_checkpoint(tmp_path / "s1")
    cfg = _cfg(toy, tmp_path / "ft", f"finetune.init={run}")
    model, report = build_classifier(cfg)
    assert report.layout == "stage1" and report.source.endswith("step-00000010/model.safetensors")
    assert torch.equal(model.blocks[2].attn.qkv.weight, student.encoder.blocks[2].attn.qkv.weight)
    assert model.pretrain_grid == (4, 4, 4)  # stage1/tiny: 4 frames at 64 px, patch 16
    with pytest.raises(ValueError, match="views.num_frames=4.*finetune.pretrain_num_frames=8"):
        build_classifier(_cfg(toy, tmp_path / "ft", f"finetune.init={run}", "finetune.pretrain_num_frames=8"))
    with pytest.raises(CheckpointError, match="no trained head"):
        evaluate(_cfg(toy, tmp_path / "ft", f"finetune.test_source={toy['test']}"), run)


def test_image_teacher_baseline_and_student_through_the_quickstart_hook(toy, tmp_path):
    from umt_distill.stages.finetune import finetune_toy

    run, _ = _stage1_checkpoint(tmp_path / "s1")
    fast = ["train.max_steps=2", "finetune.test_num_clips=1", "finetune.test_num_crops=1"]
    student = finetune_toy(toy["train"], toy["test"], tmp_path / "student", init=run, overrides=fast)
    baseline = finetune_toy(toy["train"], toy["test"], tmp_path / "teacher", backbone="image_teacher", overrides=fast)
    for result in (student, baseline):
        assert 0.0 <= result["top1"] <= 1.0 and result["top5"] == 1.0
    assert (tmp_path / "teacher" / "checkpoints" / "step-00000002" / "model.safetensors").exists()



@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_two_processes_train_and_gather_the_test(toy, tmp_path):
    """torchrun, 2 CPU processes: DDP steps, then each rank tests half the videos and rank 0 merges them."""
    import os
    import subprocess

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "umt_distill",
         "train", "finetune/tiny", f"finetune.train_source={toy['train']}", f"finetune.test_source={toy['test']}",
         f"train.output_dir={out}", "train.max_steps=3", "train.batch_size=2", "finetune.test_num_clips=1"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in logged if "loss" in m] == [1, 2, 3]
    assert logged[-1]["test_num_videos"] == 8 and logged[-1]["test_num_views"] == 3
    # live progress of training and of the test, rank 0 only
    assert proc.stderr.count("finetune step 3/3") == 1 and proc.stderr.count("eval step 1/") == 1, proc.stderr[-2000:]
