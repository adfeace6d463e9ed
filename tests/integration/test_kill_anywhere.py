"""Kill anywhere: SIGKILL cache-teacher and train at seeded random instants, resume, compare with an
uninterrupted run. Slow (a dozen subprocess runs each); run with `pytest -m slow`."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

KILLS = 5


def _corpus(folder: Path, n: int) -> Path:
    from umt_distill.testing.media import moving_shapes_video, write_video

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path"])
        for i in range(n):
            write_video(folder / f"k{i}.mp4", moving_shapes_video(12, 64, 80, seed=200 + i), fps=10)
            w.writerow([f"k{i}", f"k{i}.mp4"])
    return folder / "m.csv"


def _run(args: list[str], kill_after: float | None = None) -> int | None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "umt_distill", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    if kill_after is None:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode in (0, 3), err
        return proc.returncode
    try:
        proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return None


def _timed(args: list[str]) -> float:
    t = time.perf_counter()
    _run(args)
    return time.perf_counter() - t


# The WebDataset layout writes a shard as one part file per epoch slot and concatenates them at close;
# its view frames (JPEG) are what training reads.
LAYOUTS = {"zarr": [], "wds": ["cache.layout=wds", "cache.frames=jpeg"]}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_cache_teacher_survives_kills_anywhere(tmp_path: Path, layout: str) -> None:
    from umt_distill.cache.stores import CacheReader

    corpus = _corpus(tmp_path / "v", 12)
    common = ["cache-teacher", "stage1/tiny", f"corpus.source={corpus}", "cache.clips_per_shard=2", "cache.codec=int8",
              *LAYOUTS[layout]]
    duration = _timed([*common, f"cache.store={tmp_path / 'ref'}"])
    rng = random.Random(1234)
    store = tmp_path / "killed"
    for _ in range(KILLS):
        _run([*common, f"cache.store={store}"], kill_after=rng.uniform(0.1, 1.0) * duration)
    _run([*common, f"cache.store={store}"])
    a, b = CacheReader(tmp_path / "ref"), CacheReader(store)
    assert sorted(a.keys) == sorted(b.keys) and len(set(b.keys)) == len(b.keys)
    for key in a.keys:
        ra, rb = a.get(*key), b.get(*key)
        assert ra.view == rb.view and ra.frames_digest == rb.frames_digest
        for field in ("tokens", "attn", "pooled"):
            np.testing.assert_array_equal(getattr(ra, field), getattr(rb, field))
    assert not list(store.rglob(".tmp-*"))
    assert json.loads((store / "spec.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_training_survives_kills_anywhere(tmp_path: Path, layout: str) -> None:
    from safetensors.torch import load_file

    from umt_distill.training.metrics import read_metrics

    corpus = _corpus(tmp_path / "v", 8)
    store = tmp_path / "store"
    _run(["cache-teacher", "stage1/tiny", f"corpus.source={corpus}", f"cache.store={store}", "cache.codec=fp32",
          *LAYOUTS[layout]])
    pixels = ["train.pixels_from=store"] if layout == "wds" else []
    common = ["train", "stage1/tiny", f"corpus.source={corpus}", f"cache.store={store}", "cache.codec=fp32",
              "train.max_steps=24", "train.ckpt_every=3", "train.batch_size=2", *LAYOUTS[layout], *pixels]
    duration = _timed([*common, f"train.output_dir={tmp_path / 'ref'}"])
    rng = random.Random(99)
    out = tmp_path / "killed"
    for _ in range(KILLS):
        _run([*common, f"train.output_dir={out}"], kill_after=rng.uniform(0.1, 1.0) * duration)
    _run([*common, f"train.output_dir={out}"])
    ref = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "ref" / "metrics.jsonl")}
    got = {m["step"]: m["loss"] for m in read_metrics(out / "metrics.jsonl")}
    assert got == ref
    wa = load_file(str(tmp_path / "ref" / "checkpoints" / "step-00000024" / "model.safetensors"))
    wb = load_file(str(out / "checkpoints" / "step-00000024" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not list(out.rglob(".tmp-*"))
