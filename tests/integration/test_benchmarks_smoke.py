"""The benchmark suite runs end to end at the tiniest size, so its scripts cannot rot.

Nothing here asserts a timing: the numbers of a smoke run are meaningless. The real suite is run by
hand (``python -m benchmarks.run`` from the repository root, see benchmarks/README.md), never by the
test suite. ``benchmarks`` is a package imported by name: the repository root is on ``sys.path`` under
``python -m pytest`` (and under the editable install), so nothing here or in benchmarks/ edits it.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_suite_smoke_writes_json_markdown_and_charts(tmp_path: Path) -> None:
    from benchmarks.run import main

    paths = main(["--preset", "smoke", "--out", str(tmp_path / "out"), "--tmp", str(tmp_path / "work"),
                  "--machine", "smoke", "--command", "pytest smoke"])

    assert set(paths) == {"json", "markdown", "step_chart", "storage_chart", "input_chart", "cache_chart"}
    for key, path in paths.items():
        assert path.parent == tmp_path / "out" and path.name.startswith("smoke-"), path
        assert path.stat().st_size > 0, key
        if key.endswith("chart"):
            assert path.read_bytes()[:8] == PNG_MAGIC, key

    res = json.loads(paths["json"].read_text())
    step = res["step"]
    assert [(r["size"], r["frames"], r["mask_ratio"]) for r in step] == [("tiny", 8, 0.8)]
    assert set(step[0]["modes"]) == {"student", "cached", "online"}
    for mode in step[0]["modes"].values():
        assert mode["n"] == 1 and mode["median"] > 0 and mode["peak_mb"] > 0
    rows = res["storage"]["rows"]
    # pca64 and up need a teacher wider than the tiny one's D = 32: skipped at this size
    assert {(r["codec"], r["mode"]) for r in rows} == {(c, m) for c in ("fp32", "fp16", "bf16", "int8", "int4") for m in ("full", "visible")}
    assert all(len(r["layer_mean_cos"]) == res["storage"]["reference"]["shape_KTND"][0] for r in rows)
    assert res["storage"]["smallest_faithful"]["random_weights"]["codec"] in {"fp16", "bf16", "int8", "int4"}
    fp32 = next(r for r in rows if (r["codec"], r["mode"]) == ("fp32", "full"))
    assert fp32["mean_cos"] == pytest.approx(1.0) and fp32["loss_abs_diff"] == 0.0  # lossless against itself
    assert {p["model"].split()[0] for p in res["storage"]["projection"]} == {"UMT-B/16", "UMT-L/16"}
    assert {d["backend"] for d in res["input"]["decode"]} == {"decord", "pyav", "torchcodec"}
    assert {(r["layout"], r["workers"]) for r in res["input"]["reads"]} == {(l, w) for l in ("zarr", "wds") for w in (0, 1)}
    assert [p["codec"] for p in res["cache_write"]] == ["fp32", "fp16"] and all(p["cache_teacher_fps"] > 0 and p["teacher_forward_fps"] > 0 for p in res["cache_write"])
    assert {"step", "smallest_faithful", "smallest_faithful_full", "loader"} <= set(res["headline"])
    loader = {(r["pixels"], r["layout"], r["path"], r.get("workers", 1)): r for r in res["loader"]["rows"]}
    assert set(loader) == {("raw", "wds", "fast", 1), ("none", "wds", "fast", 1), ("raw", "wds-v1", "reference", 1),
                           ("video-pyav", "wds", "fast", 1), ("raw", "wds", "fast", 2)}
    fast, ref = loader[("raw", "wds", "fast", 1)], loader[("raw", "wds-v1", "reference", 1)]
    assert fast["read_amplification"] == pytest.approx(1.0)  # one epoch slot per shard: exactly the views used
    assert ref["read_amplification"] > 1.5  # the format-1 order reads all (here 2) views
    assert res["headline"]["loader"]["read_amplification"] == fast["read_amplification"]
    assert set(fast["per_gpu"]) == {"umt_official_a100", "a100_compute", "h100_compute"}
    assert res["loader"]["profiles"] and all(lines for lines in res["loader"]["profiles"].values())
    assert res["meta"]["load_start"] and res["meta"]["load_end"] and res["meta"]["machine"]["cores"]

    from umt_distill.training import loop  # open_run builds the stage-1 loop's metrics logger
    from umt_distill.training.metrics import MetricsLogger

    assert loop.MetricsLogger is MetricsLogger  # the pacing patch is undone after in-process runs

    md = paths["markdown"].read_text()
    for heading in ("## Headline", "## 1. Step cost", "## 2. Storage vs fidelity", "## 3. Input pipeline", "## 4. Cache write",
                    "## 5. Input path per CPU core"):
        assert heading in md
    assert "pytest smoke" in md and "online / cached" in md


def test_run_isolated_returns_results_and_raises_child_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The forkserver path the real suite measures in (a light preload keeps this test fast)."""
    from benchmarks import common

    monkeypatch.setattr(common, "PRELOAD", ["benchmarks.common"])
    monkeypatch.setattr(common, "_CONTEXT", None)
    assert common.run_isolated(common.timing_stats, [3.0, 1.0, 2.0])["median"] == 2.0
    with pytest.raises(RuntimeError, match="timing_stats failed in its child process"):
        common.run_isolated(common.timing_stats, [])


def gated_steps(steps: int) -> list[float]:
    """A paced child: one timestamp per step, each after waiting at the gate."""
    import time

    from benchmarks import common

    stamps = []
    for _ in range(steps):
        common.gate()
        stamps.append(time.monotonic())
    return stamps


def test_run_interleaved_takes_turns_in_mirrored_order(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import common

    monkeypatch.setattr(common, "PRELOAD", ["benchmarks.common"])
    monkeypatch.setattr(common, "_CONTEXT", None)
    runs = {name: common.IsolatedRun(gated_steps, 3) for name in ("a", "b")}
    stamps = common.run_interleaved(runs)
    order = [name for _, name in sorted((t, name) for name, ts in stamps.items() for t in ts)]
    # the first gate is the setup gate; then turns go a b, b a, a b
    assert order == ["a", "b", "b", "a", "a", "b"]


def test_paced_data_time_excludes_the_pause_and_table_prints_goals() -> None:
    from benchmarks.bench_step import _without_waits, step_table

    # step 1 has no pause before it; step i+1 follows the pause after step i
    assert _without_waits([0.5, 10.2, 7.1], [10.0, 7.0, 3.0]) == pytest.approx([0.5, 0.2, 0.1])
    assert _without_waits([0.1, 0.1], []) == [0.1, 0.1]  # an unpaced loop
    mode = {"median": 2.0, "min": 1.5, "max": 2.5, "data_time_median": 0.01, "peak_mb": 100.0}
    result = {"label": "L", "frames": 8, "mask_ratio": 0.8, "modes": {"student": mode, "cached": mode},
              "ratios": {"cached_over_student": 1.0, "online_over_cached": None, "online_over_student": None},
              "settings": {"batch_size": 2, "device": "cpu", "threads": 2, "steps": 6, "warmup": 2, "interleave": True}}
    table = step_table(result)
    assert "| cached | 2.000 | 1.500 | 2.500 | 0.010 | 100 |" in table
    assert "cached / student-only = 1.000 (goal <= 1.05)" in table and "online / cached = n/a" in table


def test_gpu_quick_preset_runs_on_the_cpu_at_reduced_size(tmp_path: Path) -> None:
    from benchmarks.run import main

    paths = main(["--preset", "gpu-quick", "--device", "cpu", "--reduced", "--out", str(tmp_path / "out"),
                  "--tmp", str(tmp_path / "work"), "--machine", "gq", "--command", "pytest gpu-quick"])
    res = json.loads(paths["json"].read_text())
    assert res["meta"]["sections"] == ["step", "loader"] and res["meta"]["preset"] == "gpu-quick"
    assert set(res["step"][0]["modes"]) == {"student", "cached", "online"}
    assert res["headline"]["loader"]["clip_views_per_s_per_core"] > 0


@pytest.mark.slow  # ~10 s idle, 30 s under load; the suite smoke test above runs this section too
def test_table1_section_writes_its_rows_and_ratios(tmp_path: Path) -> None:
    from benchmarks.run import main

    paths = main(["--preset", "smoke", "--sections", "table1", "--out", str(tmp_path / "out"), "--tmp",
                  str(tmp_path / "work"), "--machine", "smoke", "--command", "pytest table1"])
    table1 = json.loads(paths["json"].read_text())["table1"]
    assert set(table1["rows"]) == {"pixel", "pixel_dual"}
    plain, dual = table1["rows"]["pixel"], table1["rows"]["pixel_dual"]
    assert plain["tubelet"] == 2 and plain["step_time"]["median"] > 0 and plain["peak_mb"] > 0
    assert dual["decoded_tokens"] < plain["decoded_tokens"] + plain["visible_tokens"]  # running cell: half of all
    assert table1["ratios"]["dual_over_plain_memory"] is not None and table1["paper"]["uta_over_pixel_memory"] == 0.36
    assert "UMT Table 1" in paths["markdown"].read_text()


def test_suite_runs_as_a_module_from_the_repository_root() -> None:
    """``python -m benchmarks.run`` is the documented entry point; its help names that form."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.run", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--preset" in out.stdout and "python -m benchmarks.run" in out.stdout


def _benchmark_imports() -> dict[str, set[str]]:
    """Module -> the benchmarks modules it imports (at any depth of its code, functions included)."""
    modules = {f"benchmarks.{p.stem}": p for p in (REPO / "benchmarks").glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # from .x import y / from . import x
                    base = ".".join(["benchmarks", *([base] if base else [])])
                names = [base, *(f"{base}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            targets |= {n for n in names if n in modules and n != name}
        graph[name] = targets
    return graph


def test_benchmarks_neither_edit_sys_path_nor_import_in_a_circle() -> None:
    edit = re.compile(r"sys\.path\.(insert|append|extend)\(|sys\.path\s*\+?=[^=]")
    edits = [p.name for p in (REPO / "benchmarks").glob("*.py") if edit.search(p.read_text())]
    assert not edits, f"run as python -m benchmarks.<module> instead of editing sys.path: {edits}"
    graph = _benchmark_imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles among the benchmarks:\n" + "\n".join(cycles)
