"""A labelled toy video set for fine-tuning tests: moving discs; class 1 clips are the negatives of class 0's.

The cue (overall brightness) survives every training augmentation (crops, flips, erasing), so a tiny
randomly initialised student learns it within a few dozen steps on a CPU.
"""

from __future__ import annotations

import csv
from pathlib import Path


def write_labelled_videos(folder: Path, per_class: int, seed: int = 0, num_frames: int = 12,
                          height: int = 48, width: int = 64, name: str = "manifest.csv") -> Path:
    """``per_class`` H.264 clips of each class and a CSV manifest (id, path, label); returns the manifest."""
    from umt_distill.testing.media import moving_shapes_video, write_video

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
