"""Small corpora of generated videos with their manifests: what tests and benchmarks train and cache on."""

from __future__ import annotations

import csv
from pathlib import Path

from umt_distill.testing.media import moving_shapes_video, write_video


def write_shapes_corpus(folder: str | Path, num_clips: int, seed: int) -> Path:
    """``num_clips`` PyAV-encoded moving-shape MP4s (12 frames, 80x64, 10 fps; clip i seeded ``seed + i``)
    and their manifest ``m.csv`` (ids ``v<i>``); returns the manifest's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path"])
        for i in range(num_clips):
            write_video(folder / f"v{i}.mp4", moving_shapes_video(12, 64, 80, seed=seed + i), fps=10)
            w.writerow([f"v{i}", f"v{i}.mp4"])
    return folder / "m.csv"


def write_labelled_videos(folder: str | Path, per_class: int, seed: int = 0, num_frames: int = 12,
                          height: int = 48, width: int = 64, name: str = "manifest.csv") -> Path:
    """A labelled toy set for fine-tuning: ``per_class`` H.264 clips of each of 2 classes (moving discs;
    class 1 clips are the negatives of class 0's, so the cue, overall brightness, survives every
    training augmentation) and a CSV manifest (id, path, label); returns the manifest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(per_class):
        for label in (0, 1):
            clip_id = f"{Path(name).stem}-c{label}-{i:03d}"
            frames = moving_shapes_video(num_frames, height, width, seed=seed + 1000 * label + i)
            if label == 1:
                frames = 255 - frames  # negative: bright background, dark disc
            write_video(folder / f"{clip_id}.mp4", frames, fps=10)
            rows.append({"id": clip_id, "path": f"{clip_id}.mp4", "label": label})
    manifest = folder / name
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "path", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest
