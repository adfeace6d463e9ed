"""Shared fixtures. Everything is generated locally: tiny open_clip configs, PyAV-encoded videos."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores: keep torch from oversubscribing when tests spawn subprocesses.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach a model hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and with other jobs on a 2-core machine two
    threads wait on each other at every op (steps ~10x slower); one thread keeps the timing stable.
    A test module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_shapes_corpus(folder, num_clips: int, seed: int):
    """``num_clips`` PyAV-encoded moving-shape MP4s (12 frames, 80x64, 10 fps; clip i seeded
    ``seed + i``) and their manifest ``m.csv`` (ids ``v<i>``); returns the manifest's path."""
    import csv

    from umt_distill.testing.media import moving_shapes_video, write_video

    with open(folder / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path"])
        for i in range(num_clips):
            write_video(folder / f"v{i}.mp4", moving_shapes_video(12, 64, 80, seed=seed + i), fps=10)
            w.writerow([f"v{i}", f"v{i}.mp4"])
    return folder / "m.csv"
