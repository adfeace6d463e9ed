"""docs/scale.md is the scale-plan generator's output for the committed results files, and the generator's
numbers follow its inputs (a changed measurement changes the page, nothing is typed in)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.scale_plan import COMMITTED, generate, main

REPO = Path(__file__).resolve().parents[2]
COMMAND = "python -m benchmarks.scale_plan " + " ".join(COMMITTED)


def test_the_doc_in_the_repo_is_the_generators_output() -> None:
    text = generate([REPO / f for f in COMMITTED], COMMAND)
    assert (REPO / "docs" / "scale.md").read_text(encoding="utf-8") == text, \
        f"docs/scale.md is stale: run `{COMMAND} --out docs/scale.md`"


def test_the_cli_writes_the_page(tmp_path: Path, capsys) -> None:
    main([str(REPO / f) for f in COMMITTED])
    assert capsys.readouterr().out.startswith("# Scale plan")
    main([*(str(REPO / f) for f in COMMITTED), "--out", str(tmp_path / "scale.md")])
    assert "## Store size" in (tmp_path / "scale.md").read_text()


def test_a_slower_loader_needs_more_cores_and_larger_targets_a_larger_store(tmp_path: Path) -> None:
    files = []
    for f in COMMITTED:
        doc = json.loads((REPO / f).read_text())
        for row in (doc.get("loader") or {}).get("rows", []):
            row["cold_clip_views_per_s"] /= 2
        for row in (doc.get("storage") or {}).get("projection", []):
            row["disk_mb_per_clip_view"] *= 2
        files.append(tmp_path / Path(f).name)
        files[-1].write_text(json.dumps(doc))
    before = generate([REPO / f for f in COMMITTED], COMMAND)
    after = generate(files, COMMAND)

    def cell(text: str, start: str, column: int, part: int = 0) -> float:
        line = next(line for line in text.splitlines() if line.startswith(start))
        return float(line.split("|")[column].split(", ")[part].replace(",", ""))

    # int8 visible, targets only, UMT-B: cores per GPU at UMT's own rate (column 7: "MB/s, cores")
    row = "| B/16 | int8 visible | none | none |"
    assert cell(after, row, 7, 1) == pytest.approx(2 * cell(before, row, 7, 1), rel=0.01)
    # fp32 full store without frames, UMT-B (column 3)
    assert cell(after, "| fp32 | full |", 3) == pytest.approx(2 * cell(before, "| fp32 | full |", 3), rel=0.01)
