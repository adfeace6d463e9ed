"""One policy for clips that cannot be used, shared by caching and training.

A clip is *usable* when its video opens (the probe every backend shares: a demux of every packet) and its
window (the manifest's start/end, else the whole video) holds at least the T frames a view or a clip
needs. An unusable clip is skipped, never replaced by another, and recorded with its reason — caching in
the store's ``failures.jsonl``, training and evaluation in the run's. When more than
``corpus.max_failed_fraction`` of a corpus is unusable, the run stops before training: a wrong
``corpus.root`` or a half-copied dataset fails at once instead of training on what is left.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from umt_distill.data.clipviews import clip_frame_range
from umt_distill.data.corpus import ClipRow
from umt_distill.data.video import open_video
from umt_distill.data.video_base import VideoDecodeError

FAILURES_FILE = "failures.jsonl"


class TooManyFailuresError(ValueError):
    """More of the corpus is unusable than ``corpus.max_failed_fraction`` allows."""


def clip_problem(row: ClipRow, num_frames: int, backend: str) -> str | None:
    """Why ``row`` cannot give ``num_frames`` frames (None when it can). Opens the video, decodes nothing."""
    try:
        with open_video(row.path, backend=backend) as video:
            lo, hi = clip_frame_range(row, video.info) or (0, video.info.num_frames)
    except VideoDecodeError as e:
        return e.reason
    if hi - lo < num_frames:
        return f"{hi - lo} frame(s) in its window, fewer than the {num_frames} a clip needs"
    return None


def screen_clips(rows: Sequence[ClipRow], num_frames: int, backend: str, threads: int = 4) -> tuple[list[int], list[dict]]:
    """The positions of the usable rows, and a failure record ``{"id", "path", "reason"}`` per other row."""
    with ThreadPoolExecutor(max(1, threads)) as pool:  # opening is I/O and demuxing in FFmpeg
        problems = list(pool.map(lambda row: clip_problem(row, num_frames, backend), rows))
    usable = [i for i, p in enumerate(problems) if p is None]
    failed = [{"id": row.id, "path": str(row.path), "reason": p} for row, p in zip(rows, problems) if p is not None]
    return usable, failed


def check_failed_fraction(failed: int, total: int, limit: float, source: str, where: str = FAILURES_FILE,
                          then: str = "") -> None:
    """Raise :class:`TooManyFailuresError` when ``failed`` of ``total`` clips exceed ``limit``.

    Args:
        where: The failures file to read the reasons in.
        then: What the user can do besides fixing the files (e.g. caching's ``--retry-failed``).
    """
    if total and failed / total > limit:
        raise TooManyFailuresError(f"{source}: {failed} of {total} clips cannot be used ({failed / total:.1%}, more "
                                   f"than corpus.max_failed_fraction={limit}); see the reasons in {where}, "
                                   f"check corpus.root and the files{then}, or raise corpus.max_failed_fraction")


def write_failures(folder: str | Path, failed: Sequence[dict], stage: str) -> Path | None:
    """Record the skipped clips in ``folder/failures.jsonl`` (replaced: the list of this run's start)."""
    path = Path(folder) / FAILURES_FILE
    if not failed:
        path.unlink(missing_ok=True)
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({**f, "stage": stage}) + "\n" for f in failed), encoding="utf-8")
    return path
