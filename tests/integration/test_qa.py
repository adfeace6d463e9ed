"""Video QA end to end on generated clips: the official-format converter, QA fine-tuning with the best
epoch chosen on val, and `umt-distill eval` reproducing the test accuracy with per-type results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from umt_distill.config import load_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COLOURS = {"red": (230, 40, 40), "green": (40, 210, 60), "blue": (50, 70, 235), "yellow": (235, 225, 40)}
DIRECTIONS = {"left": -1, "right": 1}


def _disc_clip(colour: tuple[int, int, int], direction: int, frames: int = 6, side: int = 32) -> np.ndarray:
    """A disc of one colour crossing a grey frame left or right: uint8 [T, H, W, 3]."""
    video = np.full((frames, side, side, 3), 110, np.uint8)
    ys, xs = np.mgrid[0:side, 0:side]
    for t in range(frames):
        cx = side / 2 + direction * ((t + 0.5) / frames - 0.5) * side * 0.6
        video[t][(xs - cx) ** 2 + (ys - side / 2) ** 2 <= 6**2] = colour
    return video


@pytest.fixture(scope="module")
def qa_world(tmp_path_factory) -> Path:
    """8 clips in UMT's JSON format (two questions each) and its ans2label answer list."""
    from umt_distill.testing.media import write_video

    root = tmp_path_factory.mktemp("qa")
    (root / "videos").mkdir()
    items = []
    for i, (colour, direction) in enumerate(zip(list(COLOURS) * 2, ["left", "right"] * 4)):
        write_video(root / "videos" / f"v{i}.mp4", _disc_clip(COLOURS[colour], DIRECTIONS[direction]), fps=8)
        items.append({"video": f"v{i}.mp4", "question": "what colour is the disc?", "answer": colour,
                      "answer_type": "colour", "question_id": f"{i}c"})
        items.append({"video": f"v{i}.mp4", "question": "which way does it move?", "answer": [direction, direction, "up"],
                      "answer_type": "motion", "question_id": f"{i}m"})
    (root / "official.json").write_text(json.dumps(items))
    labels = [*COLOURS, *DIRECTIONS, "up"]
    (root / "ans2label.json").write_text(json.dumps({a: i for i, a in enumerate(labels)}))
    return root


def test_converter_reads_the_official_files(qa_world) -> None:
    from umt_distill.data.qa import convert_official, read_answer_list, read_qa

    summary = convert_official(qa_world / "official.json", qa_world / "qa.jsonl", video_prefix="videos/",
                               answer_list=qa_world / "ans2label.json")
    assert summary["questions"] == 16 and summary["types"] == {"colour": 8, "motion": 8} and summary["answers"] == 7
    rows = read_qa(qa_world / "qa.jsonl")
    assert rows[1].answers == {"right" if rows[1].video_id.endswith("v1.mp4") else "left": 2, "up": 1}
    assert rows[1].weights()[0][1] == pytest.approx(2 / 3) and Path(rows[0].path).is_file()
    assert read_answer_list(qa_world / "answers.json") == ["red", "green", "blue", "yellow", "left", "right", "up"]


def test_qa_train_and_eval_round_trip(qa_world, tmp_path) -> None:
    """Tiny fine-tuning from a random model: the loss falls, val picks the best epoch, the test is scored
    on it, and `eval` of the run gives the same accuracy and writes per-question predictions."""
    from umt_distill.data.qa import convert_official
    from umt_distill.stages.qa import evaluate, train
    from umt_distill.training.metrics import read_metrics

    qa = qa_world / "qa.jsonl"
    if not qa.exists():
        convert_official(qa_world / "official.json", qa, video_prefix="videos/", answer_list=qa_world / "ans2label.json")
    run = tmp_path / "run"
    over = [f"qa.train_source={qa}", f"qa.val_source={qa}", f"qa.test_source={qa}",
            f"qa.answer_list={qa_world / 'answers.json'}", f"train.output_dir={run}", "train.epochs=6",
            "optim.lr=3e-3", "qa.k_test=3"]
    cfg = load_recipe("qa/tiny", over)
    last = train(cfg)
    logged = read_metrics(run / "metrics.jsonl")
    losses = [m["loss"] for m in logged if "loss" in m]
    vals = [m for m in logged if "val_accuracy" in m]
    assert len(losses) == 24 and len(vals) == 6  # 16 questions / batch 4 = 4 steps per epoch
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.5, losses
    best = max(vals, key=lambda m: m["val_accuracy"])
    assert last["val_accuracy"] == best["val_accuracy"] and last["best_step"] == best["step"]
    assert (run / "best" / "model.safetensors").is_file()
    # val and test are the same file here: the test on the best weights equals the best val accuracy.
    assert last["test_accuracy"] == pytest.approx(best["val_accuracy"])
    assert set(last["test_per_type"]) == {"colour", "motion"} and last["test_k_test"] == 3
    result = evaluate(cfg, run)
    assert result["accuracy"] == pytest.approx(last["test_accuracy"])
    assert result["per_type"] == last["test_per_type"]
    preds = [json.loads(line) for line in (Path(result["output"]) / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 16 and {p["type"] for p in preds} == {"colour", "motion"}
    assert 100.0 * sum(p["correct"] for p in preds) / 16 == pytest.approx(result["accuracy"])
    assert all(p["prediction"] == p["top"][0][0] and len(p["top"]) == 3 for p in preds)
    print(f"QA loss {np.mean(losses[:4]):.3f} -> {np.mean(losses[-4:]):.3f}; accuracy {result['accuracy']:.1f} "
          f"(per type {json.dumps(result['per_type'])})")


def test_qa_trains_from_a_stores_view_frames_without_the_videos(qa_world, tmp_path) -> None:
    """train.pixels_from=store: the stage-1 loader serves the stored view frames; the videos are not read."""
    import shutil

    from umt_distill.cache.pipeline import cache_teacher
    from umt_distill.stages.qa import train

    videos = tmp_path / "videos"
    shutil.copytree(qa_world / "videos", videos)
    clips = tmp_path / "clips.jsonl"
    clips.write_text("".join(json.dumps({"id": f"v{i}", "path": str(videos / f"v{i}.mp4")}) + "\n" for i in range(8)))
    store = tmp_path / "store"
    cache_teacher(load_recipe("stage1/tiny", [f"corpus.source={clips}", f"cache.store={store}", "cache.frames=raw",
                                              "views.size=32"]), progress=False)
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"id": f"q{i}", "video": f"videos/v{i}.mp4", "video_id": f"v{i}",
                                      "question": "what colour is the disc?", "answers": [c]}) + "\n"
                          for i, c in enumerate(list(COLOURS) * 2)))
    (tmp_path / "answers.json").write_text(json.dumps(list(COLOURS)))
    shutil.rmtree(videos)  # from here on, a decode would fail
    cfg = load_recipe("qa/tiny", [f"qa.train_source={qa}", f"qa.answer_list={tmp_path / 'answers.json'}",
                                  f"train.output_dir={tmp_path / 'run'}", "train.pixels_from=store", f"cache.store={store}",
                                  "cache.num_views=2", "train.max_steps=3"])
    last = train(cfg)
    assert last["step"] == 3 and np.isfinite(last["loss"])
    with pytest.raises(Exception, match=r"v\d\.mp4"):  # the same questions from the videos: they are gone
        train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"pixels_from": "video",
                                                                            "output_dir": str(tmp_path / "run2")})}))
