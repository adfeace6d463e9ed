"""PNG charts of one suite run (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODE_COLORS = {"student": "#4c72b0", "cached": "#55a868", "online": "#c44e52"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def _label(r: dict) -> str:
    return f"{r['size']}\nT={r['frames']} {int(round(r['mask_ratio'] * 100))}%"


def step_chart(rows: list[dict], path: Path, machine: str) -> None:
    """Left: median step time per mode (min-max whiskers). Right: online/cached vs its ceiling online/student."""
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows) + 4), 4.5))
    width = 0.27
    for i, mode in enumerate(("student", "cached", "online")):
        xs, med, lo, hi = [], [], [], []
        for j, r in enumerate(rows):
            v = r["modes"].get(mode)
            if v:
                xs.append(j + (i - 1) * width)
                med.append(v["median"])
                lo.append(v["median"] - v["min"])
                hi.append(v["max"] - v["median"])
        ax.bar(xs, med, width, yerr=[lo, hi], capsize=2, label=mode, color=MODE_COLORS[mode])
    ax.set_xticks(range(len(rows)), [_label(r) for r in rows], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("seconds per step (median, min-max)")
    ax.set_title("step time by mode")
    ax.legend(fontsize=8)
    got = [r["ratios"]["online_over_cached"] or 0 for r in rows]
    ceiling = [r["ratios"]["online_over_student"] or 0 for r in rows]
    bx.bar(range(len(rows)), got, 0.5, color=MODE_COLORS["cached"], label="online / cached (measured)")
    bx.scatter(range(len(rows)), ceiling, marker="_", s=400, color="black", zorder=3, label="ceiling: online / student only")
    bx.axhline(2.5, ls="--", color="grey", lw=1, label="goal 2.5× (B/16, T=8, 80%)")
    bx.set_xticks(range(len(rows)), [_label(r) for r in rows], fontsize=8)
    bx.set_ylabel("speed-up of caching (×)")
    bx.set_title("what caching buys")
    bx.legend(fontsize=8)
    fig.suptitle(machine, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def storage_chart(storage: dict, path: Path, machine: str) -> None:
    """Bytes per clip-view against 1 − cosine (log-log); the lossless points sit on the floor line."""
    plt = _plt()
    floor = 1e-9
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, marker in (("full", "o"), ("visible", "s")):
        rs = [r for r in storage["rows"] if r["mode"] == mode]
        x = [r["bytes_per_clip_view"] / 1e6 for r in rs]
        ax.scatter(x, [max(1 - r["mean_cos"], floor) for r in rs], marker=marker, label=f"{mode}: mean", zorder=3)
        ax.scatter(x, [max(1 - r["p1_cos"], floor) for r in rs], marker=marker, facecolors="none", edgecolors="grey",
                   label=f"{mode}: 1st percentile")
        for r, xi in zip(rs, x):
            ax.annotate(r["codec"], (xi, max(1 - r["mean_cos"], floor)), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.axhline(0.01, ls="--", color="grey", lw=1, label="cos = 0.99")
    ax.axvline(1.0, ls=":", color="grey", lw=1, label="1 MB")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("MB per clip-view on disk")
    ax.set_ylabel(f"1 − cosine to fp32 (floor {floor:g} = lossless)")
    ax.set_title(f"storage vs fidelity, targets {storage['reference']['shape_KTND']}")
    ax.legend(fontsize=7)
    fig.suptitle(machine, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


_BACKEND_COLOURS = {"decord": "#4c72b0", "pyav": "#dd8452", "torchcodec": "#c44e52"}


def input_chart(inp: dict, rates: list[dict], path: Path, machine: str) -> None:
    """Left: decode frames/s. Right: target reads clip-views/s with the student's consumption as lines."""
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.5))
    d = inp["decode"]
    ax.bar(range(len(d)), [x["frames_per_s"] for x in d], color=[_BACKEND_COLOURS.get(x["backend"], "#937860") for x in d])
    ax.set_xticks(range(len(d)), [f"{x['backend']}\n{x['workers']} worker(s)" for x in d], fontsize=8)
    ax.set_ylabel("decoded frames/s (8-frame sparse sampling)")
    ax.set_title("video decode")
    r = inp["reads"]
    bx.bar(range(len(r)), [x["records_per_s"] for x in r], color=["#55a868" if x["layout"] == "zarr" else "#8172b2" for x in r])
    bx.set_xticks(range(len(r)), [f"{x['targets']} {x['layout']} w{x['workers']}" for x in r], fontsize=7, rotation=45, ha="right")
    styles = ["--", ":", "-.", (0, (5, 1))]
    for i, rate in enumerate(rates):
        bx.axhline(rate["clips_per_s"], ls=styles[i % len(styles)], color="black", lw=1, label=f"student {rate['size']} consumes")
    bx.set_yscale("log")
    bx.set_ylabel("clip-views/s (cold reads)")
    bx.set_title("target reads: Zarr random vs WebDataset stream")
    if rates:
        bx.legend(fontsize=7)
    fig.suptitle(machine, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def cache_chart(points: list[dict], path: Path, machine: str) -> None:
    """Frames/s by batch size: teacher forward-only vs cache-teacher, one pair of lines per teacher."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    teachers = sorted({p["teacher"] for p in points})
    for t in teachers:
        ps = sorted((p for p in points if p["teacher"] == t), key=lambda p: p["batch_size"])
        bs = [p["batch_size"] for p in ps]
        line = ax.plot(bs, [p.get("teacher_forward_fps") for p in ps], marker="o", label=f"{t} forward only")[0]
        ax.plot(bs, [p["cache_teacher_fps"] for p in ps], marker="s", ls="--", color=line.get_color(), label=f"{t} cache-teacher")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (clip-views per teacher forward)")
    ax.set_ylabel("frames/s")
    ax.set_title("cache write throughput")
    ax.legend(fontsize=8)
    fig.suptitle(machine, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_charts(res: dict[str, Any], out: Path, stem: str) -> dict[str, Path]:
    from benchmarks.derived import student_rates

    mi = res["meta"]["machine"]
    machine = f"{mi['cpu']} ({mi['cores']} cores)" + (f", {mi['gpu']}" if mi.get("gpu") else "") + f" — {res['meta']['started']}"
    paths = {}
    if res.get("step"):
        paths["step_chart"] = out / f"{stem}-step.png"
        step_chart(res["step"], paths["step_chart"], machine)
    if res.get("storage"):
        paths["storage_chart"] = out / f"{stem}-storage.png"
        storage_chart(res["storage"], paths["storage_chart"], machine)
    if res.get("input"):
        paths["input_chart"] = out / f"{stem}-input.png"
        input_chart(res["input"], student_rates(res), paths["input_chart"], machine)
    if res.get("cache_write"):
        paths["cache_chart"] = out / f"{stem}-cache.png"
        cache_chart(res["cache_write"], paths["cache_chart"], machine)
    return paths
