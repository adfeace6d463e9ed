"""Paths in a store: a store cached with a relative manifest from one folder verifies and repairs from any
other folder (the real CLI), and after it moved together with its manifest and videos."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from umt_distill.cache.spec import find_corpus, read_spec, store_corpus
from umt_distill.testing.media import moving_shapes_video, write_video

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "umt_distill", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300, check=False)


def _cached_tree(top: Path) -> Path:
    """``top/data/m.csv`` naming ``videos/v<i>.mp4`` relative to itself, cached from ``top`` with relative
    arguments into ``top/stores/s``; returns the store."""
    videos = top / "data" / "videos"
    videos.mkdir(parents=True)
    with open(top / "data" / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path"])
        for i in range(3):
            write_video(videos / f"v{i}.mp4", moving_shapes_video(12, 64, 80, seed=400 + i), fps=10)
            w.writerow([f"v{i}", f"videos/v{i}.mp4"])
    done = _cli(top, "cache-teacher", "stage1/tiny", "corpus.source=data/m.csv", "cache.store=stores/s",
                "cache.clips_per_shard=2")
    assert done.returncode == 0, done.stderr
    return top / "stores" / "s"


def _damage(store: Path) -> None:
    shutil.rmtree(store / "shards" / "shard-000001.zarr")


def test_a_store_cached_with_a_relative_manifest_verifies_and_repairs_from_another_folder(tmp_path: Path) -> None:
    store = _cached_tree(tmp_path / "A")
    spec = read_spec(store)
    manifest = os.path.abspath(tmp_path / "A" / "data" / "m.csv")
    assert spec["corpus"]["source"] == manifest and spec["recipe"]["corpus"]["source"] == manifest
    assert spec["corpus"]["source_from_store"] == "../../data/m.csv"
    assert spec["recipe"]["cache"]["store"] == os.path.abspath(store)
    elsewhere = tmp_path / "B"
    elsewhere.mkdir()
    relative = os.path.relpath(store, elsewhere)  # ../A/stores/s: a path that only works from B
    checked = _cli(elsewhere, "cache", "verify", relative, "--deep", "-n", "2", "--device", "cpu")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    _damage(store)
    repaired = _cli(elsewhere, "cache", "verify", relative, "--repair", "--deep", "-n", "2", "--device", "cpu")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "redoing shard-000001" in repaired.stderr and "missing" in repaired.stderr


def _moved_tree(tmp_path: Path) -> Path:
    _cached_tree(tmp_path / "A")
    shutil.move(tmp_path / "A", tmp_path / "C")  # store, manifest and videos together; A is gone
    return tmp_path / "C" / "stores" / "s"


def test_a_moved_store_repairs_and_verifies_where_it_lies_now(tmp_path: Path) -> None:
    store = _moved_tree(tmp_path)
    elsewhere = tmp_path / "B"
    elsewhere.mkdir()
    _damage(store)
    # The store's own recipe names the manifest where it was; the repair finds it relative to the store,
    # and records where it is now.
    repaired = _cli(elsewhere, "cache", "verify", str(store), "--repair", "--deep", "-n", "2", "--device", "cpu")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    spec = read_spec(store)
    assert spec["corpus"]["source"] == os.path.abspath(tmp_path / "C" / "data" / "m.csv")
    assert spec["recipe"]["corpus"]["source"] == spec["corpus"]["source"]
    checked = _cli(elsewhere, "cache", "verify", str(store), "--deep", "-n", "2", "--device", "cpu")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_moved_store_verifies_where_it_lies_now(tmp_path: Path) -> None:
    store = _moved_tree(tmp_path)
    elsewhere = tmp_path / "B"
    elsewhere.mkdir()
    checked = _cli(elsewhere, "cache", "verify", str(store), "--deep", "-n", "2", "--device", "cpu")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_corpus_is_found_beside_a_moved_or_copied_store_else_where_it_was(tmp_path: Path) -> None:
    store = _cached_tree(tmp_path / "A")
    spec = read_spec(store)
    original = (spec["corpus"]["source"], None)
    assert find_corpus(store, spec) == original
    shutil.copytree(tmp_path / "A", tmp_path / "copy")  # the whole tree: the copy's own manifest and videos
    copied = tmp_path / "copy" / "stores" / "s"
    assert find_corpus(copied, spec) == (os.path.abspath(tmp_path / "copy" / "data" / "m.csv"), None)
    rows = store_corpus(copied, spec)
    assert [r.path for r in rows] == [os.path.abspath(tmp_path / "copy" / "data" / "videos" / f"v{i}.mp4")
                                      for i in range(3)]
    shutil.copytree(store, tmp_path / "alone")  # the store alone: its corpus is where it was
    assert find_corpus(tmp_path / "alone", spec) == original
    shutil.move(tmp_path / "A" / "data", tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match=r"neither at .*A/data/m.csv nor at .*corpus.source=ITS_NEW_PATH"):
        find_corpus(tmp_path / "alone", spec)


def test_the_store_corpus_names_a_row_that_changed_under_the_store(tmp_path: Path) -> None:
    store = _cached_tree(tmp_path / "A")
    manifest = tmp_path / "A" / "data" / "m.csv"
    manifest.write_text(manifest.read_text().replace("videos/v1.mp4", "videos/v2.mp4"))
    from umt_distill.cache.spec import SpecMismatchError

    with pytest.raises(SpecMismatchError, match=r"row 2 \(id 'v1'\): path is 'videos/v2.mp4', the store has "
                                                r"'videos/v1.mp4'"):
        store_corpus(store, read_spec(store))
    assert json.loads((store / "spec.json").read_text())["status"] == "complete"
