"""The quickstart end to end: a miniature run (default suite) and the full run (slow)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from umt_distill.config import RecipeError
from umt_distill.quickstart import parse_settings, run_quickstart
from umt_distill.quickstart.names import CONTROL, IMAGE_TEACHER, umt_exact
from umt_distill.quickstart.reuse import DONE_FILE
from umt_distill.testing.quickstart import MINI

# A miniature world and budget: every step runs for real (MP4s, open_clip training, a WebDataset
# store, stage 1, probes, plots), only smaller.
DISTILLED = "student, distilled (cached)"
UMT_EXACT = umt_exact("cached")  # the distilled student at tubelet 1; the others' tubelet is 2
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def quiet() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=200), buffer


def test_miniature_quickstart_reports_and_reuses_finished_steps(tmp_path) -> None:
    out = tmp_path / "qs"
    console, printed = quiet()
    results = run_quickstart(out, overrides=MINI, console=console)

    for name in ("report.md", "results.json", "recipe.yaml", "world/manifest.csv", "teacher/clip.safetensors",
                 "cache/spec.json", f"runs/stage1-cached/{DONE_FILE}", "runs/stage1-cached/metrics.jsonl"):
        assert (out / name).is_file(), name
    for name in ("loss.png", "accuracy.png", "semantic_mask.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name

    models = results["models"]
    assert set(models) == {"teacher (image CLIP)", "student, distilled (cached)", "student, random init (control)"}
    for model in models.values():
        for task in ("appearance", "motion"):
            assert 0.0 <= model[task]["linear"]["accuracy"] <= 1.0 and 0.0 <= model[task]["knn"]["accuracy"] <= 1.0
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"] == models and len(saved["checks"]) == 4
    assert {c["check"] for c in saved["checks"]} >= {"motion > random-init control", "appearance > random-init control"}
    report = (out / "report.md").read_text()
    assert "| teacher (image CLIP) |" in report and "## Checks" in report and "semantic_mask.png" in report
    assert "teacher (image CLIP)" in printed.getvalue() and "chance" in printed.getvalue()
    assert [s[1] for s in results["steps"]] == ["done"] * 8
    qa = saved["qa"]  # toy QA from the stage-2 run: exact match per question type, beside the blind baseline
    assert {"appearance", "motion", "blind"} <= set(qa) and not results["qa"]["reused"]
    assert all(0.0 <= qa[t][m]["accuracy"] <= 1.0 for t in ("appearance", "motion") for m in qa[t])
    assert "## Toy video QA" in report and "toy QA" in printed.getvalue()

    finetune = results["finetune"]  # fine-tuned on the motion labels, tested on the test split
    assert set(finetune["models"]) == {DISTILLED, CONTROL, IMAGE_TEACHER, UMT_EXACT}
    assert {m: r["tubelet"] for m, r in finetune["models"].items()} == {DISTILLED: 2, CONTROL: 2, IMAGE_TEACHER: None, UMT_EXACT: 1}
    for name, model in finetune["models"].items():
        for key in ("top1", "mean_class_accuracy", "axis_accuracy"):
            assert 0.0 <= model[key] <= 1.0, (name, key)
        assert 1 <= model["predicted_classes"] <= 6
        assert model["num_videos"] == saved["num_clips"]["test"] and not model["reused"]
        assert (out / "runs" / Path(model["run"]).name / DONE_FILE).is_file()
    assert finetune["models"][CONTROL]["init"].startswith(str(out / "runs" / "stage1-init"))
    assert saved["finetune"] == finetune and saved["settings"]["finetune"]["steps"] == 2
    assert "## Fine-tuned on the motion labels" in report and f"| {IMAGE_TEACHER} | per frame | {finetune['models'][IMAGE_TEACHER]['top1']:.3f} |" in report
    assert "fine-tuned on motion labels" in printed.getvalue()

    retrieval = results["retrieval"]  # stage 2 on the training captions, zero-shot retrieval on the test split
    student, teacher = (retrieval["rows"][retrieval["headline"][k]] for k in ("student", "teacher"))
    for row in (student, teacher):
        assert all(0.0 <= row[k] <= 100.0 for k in ("t2v_r1", "v2t_r1", "r_mean", "motion_given_appearance"))
    assert retrieval["num_videos"] == saved["num_clips"]["test"] and not retrieval["reused"]
    assert saved["retrieval"] == retrieval and "_test_pixels" not in saved
    assert (out / "runs" / "stage2-cached" / DONE_FILE).is_file()
    assert "## Zero-shot retrieval on motion captions (stage 2)" in report and "zero-shot retrieval" in printed.getvalue()

    metrics = (out / "runs/stage1-cached/metrics.jsonl").read_text()
    console, printed = quiet()
    again = run_quickstart(out, overrides=MINI, console=console)
    said = printed.getvalue()
    for what in ("videos", "teacher weights", "cache", "training run", *(f"fine-tuning run ({m})" for m in finetune["models"])):
        assert f"reusing the finished {what}" in said, what
    assert [s[1] for s in again["steps"]] == ["reused"] * 4 + ["done", "reused", "reused", "reused"]
    assert "reusing the finished stage-2 run" in said and again["retrieval"]["rows"] == retrieval["rows"]
    assert (out / "runs/stage1-cached/metrics.jsonl").read_text() == metrics  # not trained again
    assert again["models"] == models  # same weights, same deterministic probes
    assert {m: r["top1"] for m, r in again["finetune"]["models"].items()} == {m: r["top1"] for m, r in finetune["models"].items()}

    console, printed = quiet()
    changed = run_quickstart(out, overrides=[*MINI, "train.epochs=2"], console=console)
    assert "holds a run of another recipe or teacher; training again" in printed.getvalue()
    assert [s[1] for s in changed["steps"]] == ["reused", "reused", "reused", "done", "done", "done", "done", "done"]
    # another stage-1 run: its student is fine-tuned again; the control and the image teacher start as before
    assert {m: r["reused"] for m, r in changed["finetune"]["models"].items()} == \
        {DISTILLED: False, CONTROL: True, IMAGE_TEACHER: True, UMT_EXACT: False}


def test_more_seeds_reuse_the_first_and_train_the_rest_in_parallel_processes(tmp_path) -> None:
    out, lean = tmp_path / "qs", [*MINI, "quickstart.finetune.umt_exact=false"]
    first = run_quickstart(out, overrides=lean, console=quiet()[0])["finetune"]
    console, printed = quiet()
    seeds = run_quickstart(out, overrides=[*lean, "quickstart.finetune.seeds=2", "quickstart.finetune.parallel=2"],
                           console=console)["finetune"]
    assert set(seeds["models"]) == {DISTILLED, CONTROL, IMAGE_TEACHER}
    for name, model in seeds["models"].items():
        assert [r["reused"] for r in model["per_seed"]] == [True, False] and model["seeds"] == 2, name
        assert model["top1"] == pytest.approx(sum(model["top1_seeds"]) / 2) and model["top1_std"] >= 0
        assert model["top1_seeds"][0] == first["models"][name]["top1"]
        assert (out / "runs" / Path(model["per_seed"][1]["run"]).name / DONE_FILE).is_file()
    assert "3 runs to train, 2 at a time" in printed.getvalue()  # the finished seed-0 runs start no process
    assert "± " in printed.getvalue() and "2 fine-tuning seeds" in (out / "report.md").read_text()


def test_online_mode_runs_without_a_cache_and_reports_both_runs(tmp_path) -> None:
    out = tmp_path / "qs"
    console, _ = quiet()
    run_quickstart(out, overrides=MINI, console=console)
    console, printed = quiet()
    results = run_quickstart(out, overrides=[*MINI, "teacher.mode=online"], console=console)
    assert "skipped (teacher.mode=online" in printed.getvalue()
    assert set(results["runs"]) == {"cached", "online"}
    assert {"student, distilled (cached)", "student, distilled (online)"} <= set(results["models"])
    assert set(results["finetune"]["models"]) == {DISTILLED, "student, distilled (online)", CONTROL, IMAGE_TEACHER,
                                                  UMT_EXACT, umt_exact("online")}
    assert [results["finetune"]["models"][m]["reused"] for m in (DISTILLED, CONTROL, IMAGE_TEACHER, UMT_EXACT)] == [True] * 4
    assert "Both teacher modes were run" in (out / "report.md").read_text()
    # stage 2 starts from this mode's stage-1 run, in its own folder: the cached mode's run is kept
    assert all((out / "runs" / f"stage2-{m}" / DONE_FILE).is_file() for m in ("cached", "online"))
    assert results["retrieval"]["run"] == str((out / "runs" / "stage2-online").resolve())


def test_quickstart_settings_are_strict() -> None:
    settings, rest = parse_settings(["quickstart.world.clips=60", "quickstart.clip.lr=0.01", "train.epochs=3"], clips=None)
    assert settings.world.clips == 60 and settings.clip.lr == 0.01 and rest == ["train.epochs=3"]
    assert parse_settings([], clips=24)[0].world.clips == 24
    with pytest.raises(RecipeError, match="quickstart.world.clips"):
        parse_settings(["quickstart.world.clip=3"])
    with pytest.raises(RecipeError, match="quickstart.clip.steps: expected int"):
        parse_settings(["quickstart.clip.steps=many"])
    with pytest.raises(RecipeError, match="quickstart.world.scale_range"):
        parse_settings(["quickstart.world.scale_range=0.5"])


@pytest.mark.slow
def test_full_quickstart_meets_the_appearance_bar_and_explains_motion(tmp_path) -> None:
    """The default size. Measured here: the distilled student reaches the teacher's appearance accuracy
    (0.71 vs 0.72; untrained 0.48), but motion is at chance for every model in frozen pooled features.
    The report must say so, and why, instead of claiming the motion result."""
    console, printed = quiet()
    results = run_quickstart(tmp_path / "qs", console=console)
    appearance = [c for c in results["checks"] if c["check"].startswith("appearance")]
    assert appearance and all(c["ok"] for c in appearance), (appearance, printed.getvalue())
    report = (tmp_path / "qs" / "report.md").read_text()
    if not all(c["ok"] for c in results["checks"]):
        assert "Motion did not reach the bar" in report and "FAIL" in report
