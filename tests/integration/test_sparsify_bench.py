"""The ``smaug`` benchmark section at smoke size: every key the results JSON promises (numbers meaningless)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # ~10 s idle; the suite smoke runs it too


def test_smaug_section_writes_its_keys(tmp_path) -> None:
    from benchmarks.bench_smaug import smaug_section

    res = smaug_section("smoke", tmp_path, "cpu", 1)
    assert res["token_speedup_keep_0.5"] > 0
    rows = res["step_cost"]["rows"]
    third = res["step_cost"]["L_over_3"]
    grid = {(r["keep"], r["after_block"]) for r in rows if r["source"] == "teacher" and not r["fuse"]}
    assert grid == {(k, ell) for k in (1.0, 0.75, 0.5) for ell in (0, third)}
    assert all(r["ms_per_step"] > 0 and r["saved_mb"] > 0 for r in rows)
    dense = next(r for r in rows if r["keep"] == 1.0 and r["after_block"] == 0)
    half = next(r for r in rows if r["keep"] == 0.5 and r["after_block"] == 0 and r["source"] == "teacher")
    assert half["saved_mb"] < dense["saved_mb"]  # fewer tokens, fewer saved activations
    recall = res["toy"]["object_token_recall"]["keep_0.5"]
    assert set(recall) == {"teacher", "student_l1", "random"}  # the tiny student: 4 blocks, L/3 = 1
    assert all(0 <= v <= 1 for v in recall.values())
    deltas = res["toy"]["probe_delta_vs_keep_1"]
    assert all(len(d["per_seed"]) == res["settings"]["seeds"] and d["std"] >= 0 for d in deltas.values())
    assert "frame_selection" in res or "frame_precision" in res
