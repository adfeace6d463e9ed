"""Live progress (training/progress.py): plain lines off a terminal, a rich bar on one, nothing off rank 0."""

from __future__ import annotations

import io

from umt_distill.training.progress import StepProgress, format_duration, progress_line, track


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_first_last_and_periodic() -> None:
    out = io.StringIO()
    progress = StepProgress("stage1", 5, stream=out, every_s=3600)
    for step in range(1, 6):
        progress.update(step, loss=1.0 / step)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines  # the first and the last step; the period is an hour
    assert lines[0].startswith("stage1 step 1/5 (20.0%) loss 1 | ") and "steps/s ETA" in lines[0]
    assert lines[1].startswith("stage1 step 5/5 (100.0%) loss 0.2 | ") and lines[1].endswith("ETA 0:00")
    every = io.StringIO()
    progress = StepProgress("eval", 4, stream=every, every_s=0.0, unit="batches")
    for step in range(1, 5):
        progress.update(step)
    assert [line.split(" |")[0] for line in every.getvalue().splitlines()] == [f"eval step {i}/4 ({25 * i:.1f}%)" for i in range(1, 5)]
    assert "batches/s" in every.getvalue()


def test_resumed_run_counts_from_its_start_and_closes_at_the_end() -> None:
    out = io.StringIO()
    progress = StepProgress("stage2", 10, start=8, stream=out, every_s=3600)
    progress.update(9, loss=0.5)
    progress.update(10, loss=0.4)
    progress.update(10, loss=0.3)  # after the end: closed, nothing more
    lines = out.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["stage2 step 9/10", "stage2 step 10/10"]
    done = io.StringIO()
    StepProgress("stage1", 10, start=10, stream=done).update(10)  # nothing left to do: silent
    assert done.getvalue() == ""


def test_disabled_on_other_ranks() -> None:
    out = _Tty()
    progress = StepProgress("stage1", 3, enabled=False, stream=out)
    for step in range(1, 4):
        progress.update(step, loss=1.0)
    assert out.getvalue() == ""


def test_rich_bar_at_a_terminal() -> None:
    out = _Tty()
    progress = StepProgress("finetune", 3, stream=out)
    for step in range(1, 4):
        progress.update(step, loss=0.25)
    text = out.getvalue()
    assert "finetune" in text and "3/3" in text and "loss 0.25" in text and "steps/s" in text
    assert "finetune step" not in text  # no plain lines at a terminal


def test_track_yields_everything_and_reports() -> None:
    out = io.StringIO()
    assert list(track(iter(range(7)), "eval videos", 7, stream=out)) == list(range(7))
    assert out.getvalue().splitlines()[-1].startswith("eval videos step 7/7 (100.0%)")


def test_formatting() -> None:
    assert format_duration(59.4) == "0:59" and format_duration(3725) == "1:02:05" and format_duration(float("inf")) == "?"
    assert progress_line("x", 0, 10, 0.0, {}) == "x step 0/10 (0.0%) | 0 steps/s ETA ?"
