"""The quickstart's terminal tables stay readable at 80 columns: every row on one line, a legend below."""

from __future__ import annotations

import io

from rich.console import Console

from umt_distill.quickstart.names import CONTROL, IMAGE_TEACHER, TEACHER, distilled, umt_exact
from umt_distill.quickstart.results_report import finetune_table, print_table, retrieval_table, short_row
from umt_distill.quickstart.zero_shot import CHANCE, STUDENT_ITC, STUDENT_ITM
from umt_distill.quickstart.zero_shot import TEACHER as RETRIEVAL_TEACHER


def _probe_model(app: float, mot: float) -> dict:
    return {"appearance": {"linear": {"accuracy": app}, "knn": {"accuracy": app - 0.1}},
            "motion": {"linear": {"accuracy": mot}, "knn": {"accuracy": mot - 0.01}}, "order_sensitivity": 0.041}


def _finetune() -> dict:
    def m(top1: float) -> dict:
        return {"top1": top1, "top5": 1.0, "mean_class_accuracy": top1, "axis_accuracy": 0.365, "reused": False,
                "seconds": 61.0, "tubelet": 2}

    return {"models": {distilled("cached"): m(0.135), CONTROL: m(0.125), IMAGE_TEACHER: {**m(0.125), "tubelet": None},
                       umt_exact("cached"): {**m(0.146), "tubelet": 1}},
            "num_clips": {"train": 288, "test": 96}, "views_per_clip": 2, "settings": {"steps": 400, "batch_size": 4},
            "recipe": "finetune/tiny", "recipe_overrides": ["finetune.flip=false"], "reused": False}


def _retrieval() -> dict:
    keys = ("t2v_r1", "t2v_r5", "v2t_r1", "v2t_r5", "r_mean", "appearance_top1", "motion_given_appearance")
    row = dict.fromkeys(keys, 12.5)
    return {"rows": {STUDENT_ITC: row, STUDENT_ITM: row, RETRIEVAL_TEACHER: row, CHANCE: dict.fromkeys(keys, 1.5)},
            "headline": {"student": STUDENT_ITC, "teacher": RETRIEVAL_TEACHER, "why": "both cosine"},
            "num_videos": 96, "num_texts": 66, "k_test": 16}


def _render(draw) -> list[str]:
    buffer = io.StringIO()
    console = Console(file=buffer, width=80, color_system=None)
    draw(console)
    return buffer.getvalue().splitlines()


def _assert_rows_on_one_line(lines: list[str], rows: dict[str, str]) -> None:
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    for name, number in rows.items():
        label = short_row(name)
        assert len(label) <= 15, label
        assert any(line.startswith(f"│ {label} ") and number in line for line in lines), (name, "\n".join(lines))
    text = " ".join(line.strip("│ ") for line in lines)
    for name in rows:  # the legend spells out every short label
        if short_row(name) != name:
            assert f"{short_row(name)} = " in text and name.split(",")[0] in text, (name, text)


def test_probe_table_fits_80_columns() -> None:
    models = {TEACHER: _probe_model(0.719, 0.146), distilled("cached"): _probe_model(0.708, 0.240),
              distilled("online"): _probe_model(0.729, 0.250), CONTROL: _probe_model(0.479, 0.260)}
    results = {"models": models, "num_clips": {"train": 288, "val": 96, "test": 96}, "steps": [], "total_seconds": 1.0}
    lines = _render(lambda c: print_table(c, results))
    _assert_rows_on_one_line(lines, {TEACHER: "0.719", distilled("cached"): "0.708", distilled("online"): "0.729",
                                     CONTROL: "0.479"})
    assert "app lin = appearance, linear probe" in " ".join(line.strip() for line in lines)


def test_finetune_table_fits_80_columns() -> None:
    lines = _render(lambda c: finetune_table(c, _finetune()))
    _assert_rows_on_one_line(lines, {distilled("cached"): "0.135", CONTROL: "0.125", IMAGE_TEACHER: "per frame",
                                     umt_exact("cached"): "0.146"})


def test_retrieval_table_fits_80_columns() -> None:
    lines = _render(lambda c: c.print(retrieval_table(_retrieval())))
    _assert_rows_on_one_line(lines, {STUDENT_ITC: "12.5", STUDENT_ITM: "12.5", RETRIEVAL_TEACHER: "12.5", CHANCE: "1.5"})
