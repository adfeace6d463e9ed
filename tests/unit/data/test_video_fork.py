"""Decoding in the parent, then in forked DataLoader workers, never deadlocks (PyAV >= 17 made its pixel
conversion multithreaded; those threads do not survive a fork). Each case runs in its own interpreter under
a timeout, so a hang fails the test instead of the suite."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from torch.utils.data import DataLoader, Dataset
    from umt_distill.testing.media import moving_shapes_video, write_video
    from umt_distill.data.video import open_video

    path, backend = sys.argv[1], sys.argv[2]
    write_video(path, moving_shapes_video(16, 64, 80, seed=0), fps=10)  # the parent encodes ...
    with open_video(path, backend=backend) as reader:  # ... and decodes before the workers fork
        first = reader.get_frames([0, 5, 9])

    class Frames(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            with open_video(path, backend=backend) as reader:
                return torch.from_numpy(reader.get_frames([i, i + 4]))

    loader = DataLoader(Frames(), batch_size=None, num_workers=2, multiprocessing_context="fork")
    batches = [b for b in loader]
    assert len(batches) == 8 and batches[0].shape == (2, 64, 80, 3), [b.shape for b in batches]
    assert torch.equal(batches[0][0], torch.from_numpy(first[0]))
    print("ok", backend)
    """
)


@pytest.mark.parametrize("backend", ["pyav", "decord", "torchcodec"])
def test_workers_forked_after_the_parent_decoded_do_not_deadlock(tmp_path: Path, backend: str) -> None:
    script = tmp_path / "fork_after_decode.py"
    script.write_text(SCRIPT)
    try:
        done = subprocess.run([sys.executable, str(script), str(tmp_path / "clip.mp4"), backend],
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{backend}: a DataLoader worker forked after the parent decoded hung for 120 s")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"ok {backend}" in done.stdout
