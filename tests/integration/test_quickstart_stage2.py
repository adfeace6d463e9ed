"""The quickstart's stage-2 step on a miniature world: training, zero-shot retrieval rows, reuse; the metrics by hand."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console

from umt_distill.config import RecipeError
from umt_distill.quickstart.results_report import retrieval_checks, retrieval_markdown, retrieval_table
from umt_distill.quickstart.zero_shot import (
    CHANCE, STUDENT_ITC, STUDENT_ITM, TEACHER, chance_metrics, class_level_metrics, class_view_metrics,
)
from umt_distill.quickstart.reuse import DONE_FILE
from umt_distill.quickstart.stage2 import make_stage2_recipe, run_stage2_retrieval

# The miniature quickstart of tests/integration/test_quickstart.py, and stage 2 as small.
MINI = [
    "quickstart.world.clips=30", "quickstart.world.num_frames=8",
    "quickstart.clip.steps=3", "quickstart.clip.batch_size=16", "quickstart.clip_images=48", "quickstart.clip_eval_images=16",
    "views.num_frames=4", "cache.num_views=1", "train.epochs=1", "train.batch_size=4", "train.log_every=1",
]
MINI_STAGE2 = ["views.num_frames=4", "cache.num_views=1", "train.epochs=1", "train.batch_size=4", "train.log_every=1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def quiet() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=200), buffer


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> dict:
    """World, tiny CLIP, cache and stage-1 run of the miniature quickstart (its steps, without probes)."""
    from umt_distill.quickstart.world import write_world
    from umt_distill.quickstart.cache import ensure_cache
    from umt_distill.quickstart.settings import parse_settings
    from umt_distill.quickstart.stage1 import ensure_trained, make_recipe
    from umt_distill.quickstart.teacher import build_teacher_weights

    out = tmp_path_factory.mktemp("qs")
    console, _ = quiet()
    settings, recipe_overrides = parse_settings(MINI)
    world = write_world(out / "world", settings.world)
    teacher = build_teacher_weights(out / "teacher", settings, console)
    cfg = make_recipe(out, world, teacher, recipe_overrides)
    ensure_cache(cfg, console)
    _, run = ensure_trained(cfg, teacher["weights_sha256"], console)
    return {"out": out, "cfg": cfg, "world": world, "teacher": teacher, "run": run}


def test_stage2_step_reports_retrieval_rows_and_reuses_the_run(stage1) -> None:
    s = stage1
    console, printed = quiet()
    result = run_stage2_retrieval(s["out"], s["cfg"], s["world"], s["teacher"], s["run"], console, MINI_STAGE2)

    run = s["out"] / "runs" / "stage2-cached"
    for name in (DONE_FILE, "metrics.jsonl", "tokenizer/tokenizer.json"):
        assert (run / name).is_file(), name
    assert (s["out"] / "cache-stage2" / "spec.json").is_file()
    assert json.loads((s["out"] / "cache-stage2" / "spec.json").read_text())["views"]["flip"] is False
    assert result["reused"] is False and result["cache_reused"] is False and result["run"] == str(run)
    assert set(result["rows"]) == {STUDENT_ITC, STUDENT_ITM, TEACHER, CHANCE}
    assert result["headline"]["student"] == STUDENT_ITC and result["headline"]["teacher"] == TEACHER
    test_clips = len(s["world"]["splits"]["test"].read_text().splitlines()) - 1
    assert result["num_videos"] == test_clips and 1 <= result["num_texts"] <= test_clips
    assert "caption equals the query's" in result["rule"] and "chance 1/6" in result["motion_rule"]
    for name, row in result["rows"].items():
        for key in ("t2v_r1", "t2v_r5", "v2t_r1", "v2t_r5", "r_mean", "appearance_top1", "motion_given_appearance"):
            assert 0.0 <= row[key] <= 100.0, (name, key, row[key])
    assert result["rows"][CHANCE]["v2t_r1"] == pytest.approx(100.0 / result["num_texts"])
    assert result["train"]["step"] == 18 // 4 and all(result["seconds_parts"][k] >= 0 for k in ("cache", "train", "retrieval"))
    markdown = retrieval_markdown(result)
    assert "t2v R@1" in markdown and f"**{TEACHER}**" in markdown
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1 and len(table) == 2 + len(result["rows"])  # one column count
    Console(file=io.StringIO()).print(retrieval_table(result))
    checks = retrieval_checks(result)
    assert [c["check"] for c in checks] == ["zero-shot t2v R@1 > teacher's", "zero-shot v2t R@1 > teacher's"]
    assert all(c["noise"] >= 0 and c["clear"] <= c["ok"] for c in checks)

    metrics = (run / "metrics.jsonl").read_text()
    console, printed = quiet()
    again = run_stage2_retrieval(s["out"], s["cfg"], s["world"], s["teacher"], s["run"], console, MINI_STAGE2)
    assert "reusing the finished stage-2 run" in printed.getvalue() and "reusing the finished stage-2 cache" in printed.getvalue()
    assert again["reused"] is True and again["cache_reused"] is True
    assert (run / "metrics.jsonl").read_text() == metrics  # not trained again
    assert again["rows"] == result["rows"]  # the same weights, deterministic evaluation

    console, printed = quiet()
    changed = run_stage2_retrieval(s["out"], s["cfg"], s["world"], s["teacher"], s["run"], console, [*MINI_STAGE2, "optim.lr=0.002"])
    assert "holds a run of another recipe or teacher; training again" in printed.getvalue() and changed["reused"] is False


def test_stage2_recipe_must_keep_stage1_teacher_student_and_frames(stage1) -> None:
    s = stage1
    cfg = make_stage2_recipe(s["out"], s["cfg"], s["run"], MINI_STAGE2)
    assert cfg.teacher == s["cfg"].teacher and cfg.student == s["cfg"].student and cfg.views.flip is False
    assert cfg.stage2.init_vision == str(s["run"].resolve())
    with pytest.raises(RecipeError, match="teacher.layers: stage 2 has 1, stage 1 has 2"):
        make_stage2_recipe(s["out"], s["cfg"], s["run"], [*MINI_STAGE2, "teacher.layers=1"])
    assert make_stage2_recipe(s["out"], s["cfg"], s["run"], []).views.num_frames == 4  # stage 1's frames by default
    with pytest.raises(RecipeError, match="views.num_frames: stage 2 has 8, stage 1 has 4"):
        make_stage2_recipe(s["out"], s["cfg"], s["run"], ["views.num_frames=8"])


def test_teacher_image_side_is_the_open_clip_image_embedding(stage1) -> None:
    """The frame embeddings scored against the text tower are open_clip's own encode_image of those pixels."""
    from umt_distill.teachers.build import build_teacher
    from umt_distill.quickstart.zero_shot import load_clip_text_tower

    cfg = stage1["cfg"]
    pixels = torch.randint(0, 256, (2, 3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    teacher = build_teacher(cfg, torch.device("cpu"))
    model, _ = load_clip_text_tower(cfg)
    with torch.no_grad():
        want = model.encode_image(teacher.preprocess(pixels)).view(2, 3, -1)
    torch.testing.assert_close(teacher(pixels).pooled, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# metrics by hand


def test_class_level_metrics_count_any_clip_with_the_query_caption() -> None:
    # Captions c0, c1; clips v0, v1 have c0, v2 has c1.
    positives = torch.tensor([[True, True, False], [False, False, True]])  # [Nt, Nv]
    t2v = torch.tensor([[0.1, 0.9, 0.5],    # c0: v1 (true) first → rank 1
                        [0.8, 0.2, 0.5]])   # c1: v2 behind v0 → rank 2
    v2t = torch.tensor([[0.2, 0.7],         # v0: c1 above c0 → rank 2
                        [0.6, 0.1],         # v1: rank 1
                        [0.4, 0.4]])        # v2: tie counts against the true caption → rank 2
    m = class_level_metrics(v2t, t2v, positives)
    assert m["t2v_r1"] == 50 and m["t2v_meanr"] == 1.5
    assert m["v2t_r1"] == pytest.approx(100 / 3) and m["v2t_meanr"] == pytest.approx(5 / 3)
    assert m["r_mean"] == pytest.approx((50 + 100 + 100 + 100 / 3 + 100 + 100) / 6)


def test_appearance_and_motion_read_apart_and_chance() -> None:
    # Two appearances × three motions (caption index a·3 + m); clip classes 0 (a0 m0), 4 (a1 m1), 5 (a1 m2).
    scores = torch.tensor([[0.9, 0.1, 0.0, 0.2, 0.3, 0.0],   # appearance right, motion right
                           [0.0, 0.0, 0.0, 0.5, 0.5, 0.1],   # appearance right, motion tied with m0: a miss
                           [0.0, 0.0, 0.9, 0.0, 0.1, 0.3]])  # appearance wrong (0.9 in a0), motion right within a1
    m = class_view_metrics(scores, torch.tensor([0, 4, 5]), 3)
    assert m["appearance_top1"] == pytest.approx(200 / 3)
    assert m["motion_given_appearance"] == pytest.approx(200 / 3)
    assert m["motion_given_appearance_per_motion"] == {"moving left": 100.0, "moving right": 0.0, "moving up": 100.0}
    positives = torch.tensor([[True, True, False, False], [False, False, True, False], [False, False, False, True]])
    c = chance_metrics(positives, 16, 6)
    assert c["t2v_r1"] == pytest.approx(100 * (2 / 4 + 1 / 4 + 1 / 4) / 3)
    assert c["v2t_r1"] == pytest.approx(100 / 3) and c["v2t_r5"] == 100
    assert c["appearance_top1"] == pytest.approx(100 / 16) and c["motion_given_appearance"] == pytest.approx(100 / 6)


def test_stage2_with_a_tubelet2_encoder_trains_without_uta(stage1) -> None:
    """quickstart.stage2_tubelet=2: the stage-1 kernel inflated, UTA off, its own run folder."""
    s = stage1
    run = s["out"] / "runs" / "stage2-cached-tubelet2"
    console, _ = quiet()
    result = run_stage2_retrieval(s["out"], s["cfg"], s["world"], s["teacher"], s["run"], console,
                                  [*MINI_STAGE2, "stage2.tubelet_size=2", "stage2.loss_weights.uta=0", f"train.output_dir={run}"])
    assert result["tubelet"] == 2 and result["losses"] == "VTC + VTM + MLM" and result["run"] == str(run)
    assert (run / DONE_FILE).is_file() and "loss_uta" not in json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "tubelet-2 vision encoder" in retrieval_markdown(result)
    for row in result["rows"].values():
        assert 0.0 <= row["motion_given_appearance"] <= 100.0
