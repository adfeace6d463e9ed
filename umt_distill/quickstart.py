"""``umt-distill quickstart``: the whole available loop at toy scale, offline, on a CPU.

Today it generates toy videos, caches a tiny randomly initialised CLIP teacher over K views of each,
verifies a sample of the store against a fresh teacher run, and prints what was stored. Each finished
step is reused on a re-run.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()


def make_toy_corpus(folder: Path, clips: int, seed: int = 0, frames: int = 24, size: int = 64) -> Path:
    """Write ``clips`` H.264 toy videos and a CSV manifest; reuse them if the manifest exists."""
    from umt_distill.data.synthetic import moving_shapes_video, write_video

    manifest = folder / "manifest.csv"
    if manifest.exists():
        console.print(f"[dim]reusing toy videos in {folder}[/]")
        return manifest
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(clips):
        path = folder / f"clip{i:03d}.mp4"
        write_video(path, moving_shapes_video(frames, size, size, seed=seed + i), fps=12)
        rows.append({"id": f"clip{i:03d}", "path": path.name})
    tmp = manifest.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "path"])
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(manifest)
    return manifest


def run_quickstart(output: str | Path, clips: int = 12) -> dict:
    """Run the toy pipeline into ``output``; returns the cache summary."""
    from umt_distill.cache.pipeline import cache_teacher, store_info
    from umt_distill.cache.verify import verify_store
    from umt_distill.config import load_recipe

    output = Path(output)
    t0 = time.perf_counter()
    manifest = make_toy_corpus(output / "videos", clips)
    store = output / "cache"
    cfg = load_recipe("stage1/tiny", [f"corpus.source={manifest}", f"cache.store={store}"])
    if (store / "spec.json").exists() and json.loads((store / "spec.json").read_text()).get("status") == "complete":
        console.print(f"[dim]reusing the finished cache {store}[/]")
        summary = {"failures": json.loads((store / "spec.json").read_text())["counts"]["failures"]}
    else:
        summary = cache_teacher(cfg)
    info = store_info(store)
    report = verify_store(store, sample=4)
    table = Table(title="quickstart: what the teacher cache holds")
    table.add_column("what")
    table.add_column("value")
    table.add_row("clips / views per clip", f"{info['counts']['clips']} / {info['views']['num_views']}")
    table.add_row("records (clip-views)", str(info["counts"]["records"]))
    table.add_row("failed clips", str(info["counts"]["failures"]))
    table.add_row("teacher", f"{info['teacher']['name']} layers {info['teacher']['layer_indices']}")
    table.add_row("codec / layout", f"{info['codec']['name']} + {info['codec']['compressor']} / {info['layout']}")
    table.add_row("bytes per clip-view", str(info["sizes"]["bytes_per_clip_view"]))
    for row in report["fields"]:
        table.add_row(f"verify {row['field']}: min cosine", f"{row['min_cos']:.6f} ({'ok' if row['ok'] else 'MISMATCH'})")
    table.add_row("time", f"{time.perf_counter() - t0:.1f} s")
    console.print(table)
    return summary
