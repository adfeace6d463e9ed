"""One writer per store, whatever the world size: a world-1 run and a world-2 torchrun started together on
one store — one is refused naming the holder, the other completes, and nothing was deleted under it.
``cache verify --repair`` takes the same lock; the lock file never makes a fresh folder look used."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from umt_distill.testing.corpora import write_shapes_corpus
from typer.testing import CliRunner

from umt_distill.cache.lock import LOCK_FILE, StoreLock
from umt_distill.cache.pipeline import cache_teacher
from umt_distill.cache.store_folder import CacheError
from umt_distill.cache.stores import CacheReader
from umt_distill.cache.verify import verify_store
from umt_distill.cli import app
from umt_distill.config import load_recipe

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}
HOLDER = "being written by another run"


def _args(manifest: Path, store: Path) -> list[str]:
    return ["cache-teacher", "stage1/tiny", f"corpus.source={manifest}", f"cache.store={store}",
            "cache.clips_per_shard=1"]


def _holder_pid(store: Path, deadline: float) -> int:
    """The pid the store's lock file names, once a run holds it (only the holder writes the file)."""
    while time.time() < deadline:
        try:
            return int(json.loads((store / LOCK_FILE).read_text())["pid"])
        except (FileNotFoundError, ValueError, KeyError):
            time.sleep(0.002)
    raise AssertionError("no run took the store's lock")


def _records(store: Path) -> dict:
    reader = CacheReader(store)
    return {key: reader.get(*key) for key in reader.keys}


@pytest.mark.distributed
def test_a_world_1_and_a_world_2_run_on_one_store_one_is_refused(tmp_path: Path) -> None:
    (tmp_path / "v").mkdir()
    manifest = write_shapes_corpus(tmp_path / "v", 6, seed=300)
    store = tmp_path / "store"
    logs = tmp_path / "logs"
    single = subprocess.Popen([sys.executable, "-m", "umt_distill", *_args(manifest, store)], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the ranks' own output goes to files under logs/ (torchrun adds its own report of a failed child)
    double = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "--log-dir", str(logs), "--redirects", "3", "-m", "umt_distill",
                               *_args(manifest, store)], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Pause the holder as soon as it holds the lock, so the two runs surely overlap: the other one
        # then reaches the store while the holder owns it, whichever started faster.
        holder = _holder_pid(store, time.time() + 240)
        os.kill(holder, signal.SIGSTOP)
        try:
            loser = double if holder == single.pid else single
            _, loser_err = loser.communicate(timeout=240)
        finally:
            os.kill(holder, signal.SIGCONT)
        winner = single if loser is double else double
        _, winner_err = winner.communicate(timeout=240)
    finally:
        for proc in (single, double):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert winner.returncode == 0, winner_err
    assert loser.returncode != 0
    if loser is single:
        said = loser_err
    else:  # what the ranks printed (torchrun's own report of the failed child is its business)
        said = "".join(p.read_text() for p in sorted(logs.rglob("std*.log")))
    named = [line for line in said.splitlines() if HOLDER in line]
    assert len(named) == 1, said
    assert f"cache-teacher by pid {holder} on " in named[0] and "started " in named[0], named
    assert "Traceback" not in said, said

    # The winner's store is whole: it verifies, and has a clean run's shards and records.
    report = verify_store(store, sample=2, device="cpu", deep=True)
    assert report["ok"], report["problems"]
    clean = tmp_path / "clean"
    cache_teacher(load_recipe("stage1/tiny", [f"corpus.source={manifest}", f"cache.store={clean}",
                                              "cache.clips_per_shard=1"]), progress=False)
    shard_names = {p.name for p in (store / "shards").iterdir()}
    assert shard_names == {p.name for p in (clean / "shards").iterdir()}
    assert not any(name.startswith(".tmp-") for name in shard_names)
    assert [s["name"] for s in CacheReader(store).shards.values()] == \
        [s["name"] for s in CacheReader(clean).shards.values()]
    a, b = _records(clean), _records(store)
    assert sorted(a) == sorted(b)
    for key in a:
        for field in ("tokens", "attn", "pooled"):
            np.testing.assert_array_equal(getattr(a[key], field), getattr(b[key], field), err_msg=str(key))


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("videos")
    manifest = write_shapes_corpus(folder, 3, seed=310)
    store = tmp_path_factory.mktemp("stores") / "small"
    cache_teacher(load_recipe("stage1/tiny", [f"corpus.source={manifest}", f"cache.store={store}",
                                              "cache.clips_per_shard=1"]), progress=False)
    return manifest, store


def test_repair_takes_the_same_lock_and_deletes_nothing_of_a_live_run(small_store, tmp_path: Path) -> None:
    _, store = small_store
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    victim = copy / "shards" / "shard-000001.zarr"
    shutil.rmtree(victim)  # damage that a repair would redo
    before = sorted(str(p.relative_to(copy)) for p in copy.rglob("*"))
    with StoreLock(copy, "cache-teacher"):  # a live run writing the store
        result = CliRunner().invoke(app, ["cache", "verify", str(copy), "--repair", "-n", "1", "--device", "cpu"],
                                    env={"COLUMNS": "300"})
    assert result.exit_code == 1, result.output
    named = [line for line in result.stderr.splitlines() if HOLDER in line]
    assert len(named) == 1 and f"cache-teacher by pid {os.getpid()} on " in named[0], result.stderr
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*")) == before  # nothing touched
    repaired = CliRunner().invoke(app, ["cache", "verify", str(copy), "--repair", "-n", "1", "--device", "cpu"],
                                  env={"COLUMNS": "300"})
    assert repaired.exit_code == 0, repaired.output  # once the holder is gone, the repair runs


def test_a_lock_file_does_not_make_a_fresh_folder_look_used(small_store, tmp_path: Path) -> None:
    manifest, _ = small_store
    store = tmp_path / "fresh"
    with StoreLock(store, "cache-teacher"):  # a run that died before writing anything leaves only .lock
        pass
    assert [p.name for p in store.iterdir()] == [LOCK_FILE]
    summary = cache_teacher(load_recipe("stage1/tiny", [f"corpus.source={manifest}", f"cache.store={store}"]),
                            progress=False)
    assert summary["records"] == 6


def test_a_foreign_folder_is_refused_before_the_lock_file_is_made(small_store, tmp_path: Path) -> None:
    manifest, _ = small_store
    store = tmp_path / "foreign"
    store.mkdir()
    (store / "notes.txt").write_text("mine\n")
    with pytest.raises(CacheError, match="notes.txt.*no spec.json.*another cache.store"):
        cache_teacher(load_recipe("stage1/tiny", [f"corpus.source={manifest}", f"cache.store={store}"]),
                      progress=False)
    assert [p.name for p in store.iterdir()] == ["notes.txt"]
