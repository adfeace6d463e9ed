"""Verdicts derived from measured rows, shared by the benchmarks, the report and the charts.

A leaf module: it imports nothing of the suite, so ``bench_cache`` (which prints the report's tables),
``report`` (which draws the charts) and ``charts`` can all use it without importing one another in a
circle.
"""

from __future__ import annotations

# "Faithful" (issue 14): mean cosine to fp32 >= 0.99 and, where a downstream run exists, a linear-probe
# appearance accuracy within 0.01 of the fp32 student's.
FAITHFUL = {"min_cos": 0.99, "max_probe_diff": 0.01}


def smallest_faithful(rows: list[dict], min_cos: float = FAITHFUL["min_cos"], mode: str | None = None,
                      probe: bool = False, max_probe_diff: float = FAITHFUL["max_probe_diff"]) -> dict | None:
    """The codec/mode with the fewest bytes per clip-view whose mean cosine to fp32 is >= ``min_cos``
    (with ``probe``: and whose downstream probe accuracy is within ``max_probe_diff`` of fp32's).

    Bytes are the projected UMT-B/16 ones when the rows have them (``umt_b_mb_per_clip_view``), else
    the measured ones.
    """
    ok = [r for r in rows if r["mean_cos"] >= min_cos and (mode is None or r["mode"] == mode)
          and (not probe or (r.get("probe_diff") is not None and r["probe_diff"] <= max_probe_diff))]
    return min(ok, key=lambda r: r.get("umt_b_mb_per_clip_view", r["bytes_per_clip_view"])) if ok else None


def student_rates(res: dict) -> list[dict]:
    """Clip-views/s the student consumes (student-only mode) per size at T=8 (ratio 0.8 if measured)."""
    out = {}
    for r in res.get("step", []):
        if r["frames"] != 8 or r.get("student_clips_per_s") is None:
            continue
        if r["size"] not in out or r["mask_ratio"] == 0.8:
            out[r["size"]] = {"size": r["size"], "label": r["label"], "mask_ratio": r["mask_ratio"],
                              "clips_per_s": r["student_clips_per_s"]}
    return list(out.values())
