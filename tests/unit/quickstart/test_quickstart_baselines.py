"""``quickstart.baselines=true``: the stage-1 student also trained by pixel reconstruction, reported beside it."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from umt_distill.quickstart import run_quickstart
from umt_distill.quickstart.names import CONTROL, PIXEL
from umt_distill.quickstart.reuse import DONE_FILE
from umt_distill.testing.quickstart import MINI

DISTILLED = "student, distilled (cached)"


@pytest.mark.slow  # a whole miniature quickstart plus the pixel run: 2-3 min idle, 8+ under load
@pytest.mark.timeout(1800)
def test_pixel_reconstruction_baseline_is_probed_and_finetuned_beside_the_distilled_student(tmp_path) -> None:
    out = tmp_path / "qs"
    console = Console(file=io.StringIO(), width=200)
    results = run_quickstart(out, overrides=[*MINI, "quickstart.baselines=true", "quickstart.finetune.umt_exact=false"],
                             console=console)
    run = out / "runs" / "pixel-cached"
    assert (run / DONE_FILE).is_file()
    pixel_steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    stage1_steps = [json.loads(line)["step"] for line in (out / "runs" / "stage1-cached" / "metrics.jsonl").read_text().splitlines()]
    assert pixel_steps[-1] == stage1_steps[-1]  # the same number of steps
    assert {DISTILLED, PIXEL, CONTROL} <= set(results["models"]) and {DISTILLED, PIXEL, CONTROL} <= set(results["finetune"]["models"])
    assert results["finetune"]["models"][PIXEL]["role"] == "pixel" and results["baselines"]["steps"] == pixel_steps[-1]
    report = (out / "report.md").read_text()
    assert "## Pixel reconstruction vs UTA" in report and f"| {PIXEL} |" in report
    again = run_quickstart(out, overrides=[*MINI, "quickstart.baselines=true", "quickstart.finetune.umt_exact=false"],
                           console=console)
    assert again["baselines"]["reused"] and again["models"][PIXEL] == results["models"][PIXEL]
