"""cache-teacher end to end on generated MP4s with the tiny teacher: records, spec, failures, resume,
SIGKILL, two processes under torchrun, info and verify."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from umt_distill.cache.pipeline import cache_teacher, store_info
from umt_distill.cache.store_folder import CacheError
from umt_distill.data.clipviews import decode_clip_views
from umt_distill.config import load_recipe

NUM_GOOD = 6


def _write_corpus(folder: Path, good: int, bad: bool = True) -> Path:
    from umt_distill.testing.media import moving_shapes_video, write_video

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(good):
        path = folder / f"c{i}.mp4"
        write_video(path, moving_shapes_video(12, 64, 80, seed=i), fps=10)
        rows.append({"id": f"c{i}", "path": path.name})
    if bad:
        (folder / "text.mp4").write_text("this is not a video\n")
        rows.insert(2, {"id": "not_a_video", "path": "text.mp4"})
        write_video(folder / "short.mp4", moving_shapes_video(2, 64, 80, seed=99), fps=10)
        rows.append({"id": "too_short", "path": "short.mp4"})
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "path"])
        w.writeheader()
        w.writerows(rows)
    return manifest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("videos"), NUM_GOOD)


def _recipe(manifest: Path, store: Path, *extra: str):
    return load_recipe("stage1/tiny", [f"corpus.source={manifest}", f"cache.store={store}", *extra])


def _records(store: Path) -> dict:
    from umt_distill.cache.stores import CacheReader

    reader = CacheReader(store)
    return {key: reader.get(*key) for key in reader.keys}


def _assert_same_records(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        ra, rb = a[key], b[key]
        assert ra.view == rb.view and ra.frames_digest == rb.frames_digest, key
        for field in ("tokens", "attn", "pooled"):
            np.testing.assert_array_equal(getattr(ra, field), getattr(rb, field), err_msg=f"{key} {field}")


@pytest.fixture(scope="module")
def fp32_store(corpus, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("stores") / "fp32"
    summary = cache_teacher(_recipe(corpus, store, "cache.codec=fp32"), progress=False)
    assert summary["failures"] == 2
    # where the time went: parts of the whole, each measured
    parts = [summary[f"rank0_{k}_seconds"] for k in ("teacher", "first_clip", "drain")]
    assert all(p > 0 for p in parts) and sum(parts) <= summary["rank0_seconds"]
    return store


def test_store_contents_and_spec(fp32_store: Path, corpus: Path) -> None:
    spec = json.loads((fp32_store / "spec.json").read_text())
    assert spec["status"] == "complete"
    assert spec["counts"] == {**spec["counts"], "clips": NUM_GOOD + 2, "records": NUM_GOOD * 2, "failures": 2}
    assert spec["teacher"]["name"] == "umt-test-tiny" and spec["teacher"]["weights_digest"]
    assert spec["views"]["num_views"] == 2 and spec["views"]["seed"] == 0
    assert spec["codec"] == {"name": "fp32", "compressor": "zstd"} and spec["layout"] == "zarr"
    assert spec["corpus"]["digest"] and spec["versions"]["torch"]
    records = _records(fp32_store)
    assert sorted(records) == sorted((f"c{i}", k) for i in range(NUM_GOOD) for k in range(2))
    rec = records[("c0", 1)]
    K, T, N, D = rec.tokens.shape
    assert (K, T) == (2, 4) and rec.attn.shape == (T, N) and rec.pooled.shape == (T, D)
    assert rec.view.frame_indices != records[("c0", 0)].view.frame_indices or rec.view.crop != records[("c0", 0)].view.crop


def test_failures_are_recorded_with_reasons(fp32_store: Path) -> None:
    lines = [json.loads(x) for x in (fp32_store / "failures.jsonl").read_text().splitlines()]
    assert {x["id"] for x in lines} == {"not_a_video", "too_short"}
    for line in lines:
        assert line["path"].endswith(".mp4") and line["reason"] and line["shard"].startswith("shard-")


def test_records_equal_a_fresh_teacher_run(fp32_store: Path, corpus: Path) -> None:
    """fp32 records are the teacher's output for exactly the stored view's pixels."""
    from umt_distill.teachers.build import build_teacher
    from umt_distill.data.corpus import read_corpus

    cfg = _recipe(corpus, fp32_store, "cache.codec=fp32")
    teacher = build_teacher(cfg, torch.device("cpu"))
    row = next(r for r in read_corpus(corpus) if r.id == "c3")
    views, pixels = decode_clip_views(row, cfg)
    out = teacher(pixels)  # [K views as batch, T, 3, H, W]
    records = _records(fp32_store)
    for k in range(2):
        rec = records[("c3", k)]
        assert rec.view == views[k]
        np.testing.assert_allclose(rec.tokens, out.tokens[k].numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(rec.attn, out.attn[k].numpy(), atol=1e-6, rtol=0)
        np.testing.assert_allclose(rec.pooled, out.pooled[k].numpy(), atol=1e-5, rtol=0)


def test_store_opens_with_plain_zarr(fp32_store: Path) -> None:
    import zarr

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        root = zarr.open_group(str(fp32_store), mode="r")
        groups = [name for name, _ in root.groups()]
    assert groups, "shard groups are visible from the root group"
    # zarr names every file beside the arrays that it does not know; those are the store's own (FORMAT.md).
    foreign = {re.search(r"Object at (\S+) is not recognized", str(w.message)).group(1) for w in caught}
    assert foreign <= {"spec.json", "index.json", "summary.jsonl", "failures.jsonl", "corpus.jsonl"} | {
        n for n in foreign if n.startswith(".lock")}, foreign


def test_info_and_verify(fp32_store: Path) -> None:
    from umt_distill.cache.verify import verify_store

    info = store_info(fp32_store)
    assert info["counts"]["records"] == NUM_GOOD * 2
    assert info["sizes"]["bytes_per_clip_view"] > 0
    report = verify_store(fp32_store, sample=3, device="cpu")
    assert report["ok"], report["problems"]
    assert {r["field"] for r in report["fields"]} == {"tokens", "attn", "pooled"}


def test_verify_detects_other_teacher_weights(fp32_store: Path, tmp_path: Path) -> None:
    import shutil

    from umt_distill.cache.verify import verify_store

    copy = tmp_path / "copy"
    shutil.copytree(fp32_store, copy)
    spec = json.loads((copy / "spec.json").read_text())
    spec["teacher"]["weights_digest"] = "sha256:" + "0" * 64
    (copy / "spec.json").write_text(json.dumps(spec))
    report = verify_store(copy, sample=1, device="cpu")
    assert not report["ok"] and any("weights" in p for p in report["problems"])


def test_rerun_is_a_no_op_and_mismatch_is_refused(fp32_store: Path, corpus: Path) -> None:
    before = _records(fp32_store)
    summary = cache_teacher(_recipe(corpus, fp32_store, "cache.codec=fp32"), progress=False)
    assert summary["rank0_records"] == 0 and summary["rank0_skipped_shards"] == 2
    _assert_same_records(before, _records(fp32_store))
    with pytest.raises(CacheError, match="codec.name"):
        cache_teacher(_recipe(corpus, fp32_store, "cache.codec=int8"), progress=False)


def test_visible_mode_and_wds_layout(corpus: Path, tmp_path: Path) -> None:
    store = tmp_path / "vis"
    cache_teacher(_recipe(corpus, store, "cache.mode=visible", "cache.masks_per_view=3", "cache.mask_ratio=0.5",
                          "cache.layout=wds", "cache.frames=raw", "cache.codec=fp32"), progress=False)
    records = _records(store)
    rec = records[("c1", 0)]
    M, K, T, n_vis, D = rec.tokens.shape
    N = rec.attn.shape[1]
    assert (M, K, T) == (3, 2, 4) and n_vis == N - int(N * 0.5)
    assert rec.visible_idx.shape == (3, T, n_vis)
    assert rec.frames.shape[:2] == (T, 3)
    # The visible tokens are the full tokens at the stored indices.
    full = _records_full_tokens(corpus, tmp_path, rec.clip_id, rec.view_index)
    idx = rec.visible_idx[1].astype(np.int64)
    np.testing.assert_allclose(rec.tokens[1], full[:, np.arange(T)[:, None], idx], atol=1e-5)


def _records_full_tokens(corpus: Path, tmp_path: Path, clip_id: str, k: int) -> np.ndarray:
    store = tmp_path / "full_for_visible"
    if not (store / "spec.json").exists():
        cache_teacher(_recipe(corpus, store, "cache.codec=fp32"), progress=False)
    return _records(store)[(clip_id, k)].tokens


def _cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "umt_distill", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_cli_exit_status(corpus: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from umt_distill.cli import app

    def invoke(*args: str):
        return CliRunner().invoke(app, list(args), env={"COLUMNS": "300"})

    ok = invoke("cache-teacher", "stage1/tiny", f"corpus.source={corpus}", f"cache.store={tmp_path / 's'}", "cache.limit=2")
    assert ok.exit_code == 0, ok.output
    partial = invoke("cache-teacher", "stage1/tiny", f"corpus.source={corpus}", f"cache.store={tmp_path / 's2'}", "cache.limit=3")
    assert partial.exit_code == 3, partial.output  # row 3 is not a video
    bad = invoke("cache-teacher", "stage1/tiny", "cache.codek=fp16")
    assert bad.exit_code == 2 and "cache.codec" in bad.stderr
    info = invoke("cache", "info", str(tmp_path / "s"))
    assert info.exit_code == 0 and "bytes_per_clip_view" in info.stdout, info.output


def test_sigkill_then_resume_gives_identical_records(tmp_path: Path) -> None:
    corpus = _write_corpus(tmp_path / "videos", 16, bad=False)
    args = ["stage1/tiny", f"corpus.source={corpus}", "cache.clips_per_shard=1", "cache.codec=fp16"]
    reference = tmp_path / "reference"
    proc = _cli("cache-teacher", *args, f"cache.store={reference}")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err

    store = tmp_path / "killed"
    proc = _cli("cache-teacher", *args, f"cache.store={store}")
    shards = store / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shards.glob("shard-*.json"))) < 3:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(shards.glob("shard-*.json")))
    assert 0 < finished < 16, f"the kill should land mid-run ({finished} shards finished)"
    assert json.loads((store / "spec.json").read_text())["status"] == "in_progress"

    proc = _cli("cache-teacher", *args, f"cache.store={store}")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    _assert_same_records(_records(reference), _records(store))
    leftovers = [p.name for p in store.rglob(".tmp-*")]
    assert not leftovers


@pytest.mark.distributed
def test_two_processes_write_the_records_of_one(tmp_path: Path) -> None:
    corpus = _write_corpus(tmp_path / "videos", 5)
    args = ["stage1/tiny", f"corpus.source={corpus}", "cache.clips_per_shard=2"]
    one = tmp_path / "one"
    proc = _cli("cache-teacher", *args, f"cache.store={one}")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "umt_distill", "cache-teacher", *args, f"cache.store={two}"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    # Every rank exits 3 ("done with failures"); torchrun reports that as a failed job.
    assert proc.returncode != 0, proc.stderr
    spec = json.loads((two / "spec.json").read_text())
    assert spec["status"] == "complete" and spec["counts"]["failures"] == 2
    _assert_same_records(_records(one), _records(two))
    assert sorted((one / "failures.jsonl").read_text().splitlines()) == sorted((two / "failures.jsonl").read_text().splitlines())


def test_a_second_run_on_the_same_store_is_refused(corpus: Path, tmp_path: Path) -> None:
    from umt_distill.cache.lock import StoreLock

    store = tmp_path / "locked"
    cfg = _recipe(corpus, store, "cache.limit=2")
    cache_teacher(cfg, progress=False)
    with StoreLock(store, "cache-teacher"):  # as if another run were writing the store
        with pytest.raises(CacheError, match=r"being written by another run \(cache-teacher by pid"):
            cache_teacher(cfg, progress=False)


@pytest.mark.parametrize("damage", ["truncate", "delete", "counts"])
def test_verify_names_the_damaged_shard(fp32_store: Path, tmp_path: Path, damage: str) -> None:
    import shutil

    from umt_distill.cache.verify import verify_store

    copy = tmp_path / "damaged"
    shutil.copytree(fp32_store, copy)
    shard = sorted((copy / "shards").glob("shard-*.zarr"))[-1]
    if damage == "truncate":
        victim = max((p for p in shard.rglob("*") if p.is_file() and p.name != "zarr.json"), key=lambda p: p.stat().st_size)
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    elif damage == "delete":
        shutil.rmtree(shard)
    else:
        spec = json.loads((copy / "spec.json").read_text())
        spec["counts"]["records"] += 1
        (copy / "spec.json").write_text(json.dumps(spec))
    report = verify_store(copy, sample=0, device="cpu", deep=True)
    assert not report["ok"]
    named = shard.name if damage != "counts" else "spec.json"
    assert any(named in p for p in report["problems"]), report["problems"]


def test_file_size_limit_fails_cleanly_and_resume_completes(corpus: Path, tmp_path: Path) -> None:
    """RLIMIT_FSIZE hit while a shard is written: a clear error, no shard that looks complete, and a
    later run without the limit finishes the store."""
    import resource

    store = tmp_path / "fsize"
    args = ["cache-teacher", "stage1/tiny", f"corpus.source={corpus}", f"cache.store={store}", "cache.codec=fp32"]

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    proc = subprocess.run([sys.executable, "-m", "umt_distill", *args], capture_output=True, text=True, timeout=180,
                          preexec_fn=limit, env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"})
    assert proc.returncode == 1, proc.stderr
    assert "File too large" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads((store / "spec.json").read_text())["status"] == "in_progress"
    assert not list((store / "shards").glob(".tmp-*")), "the failed shard's temporary files are removed"
    complete = {p.stem for p in (store / "shards").glob("shard-*.json")}
    data = {p.name.split(".")[0] for p in (store / "shards").glob("shard-*") if not p.name.endswith(".json")}
    assert data <= complete, "no shard data without its completion marker"
    proc = _cli(*args)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 3, err
    assert json.loads((store / "spec.json").read_text())["status"] == "complete"


def test_read_only_output_is_a_clear_error(corpus: Path, tmp_path: Path) -> None:
    """An immutable (read-only even for root) store folder: a clear error before any work, nothing written."""
    store = tmp_path / "readonly"
    store.mkdir()
    if subprocess.run(["chattr", "+i", str(store)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        with pytest.raises(CacheError, match="cannot write the store"):
            cache_teacher(_recipe(corpus, store, "cache.limit=2"), progress=False)
        assert not any(store.iterdir())
    finally:
        subprocess.run(["chattr", "-i", str(store)], check=True)
