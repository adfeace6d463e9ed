"""Re-runs that repair: damaged shards are redone (and named), failed clips can be retried, and the
final messages count cached and failed clips apart. Real zarr/wds stores from real MP4s."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from umt_distill.cache.pipeline import cache_teacher
from umt_distill.cache.stores import CacheReader
from umt_distill.cache.verify import verify_store
from umt_distill.config import load_recipe

GOOD = 6  # c0..c5; "late" is listed but its file does not exist yet


def _write_corpus(folder: Path) -> Path:
    from umt_distill.testing.media import moving_shapes_video, write_video

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(GOOD):
        write_video(folder / f"c{i}.mp4", moving_shapes_video(12, 64, 80, seed=i), fps=10)
        rows.append({"id": f"c{i}", "path": f"c{i}.mp4"})
    rows.insert(1, {"id": "late", "path": "late.mp4"})  # shard 0 holds c0, late, c1, c2
    rows.append({"id": "never", "path": "never.mp4"})  # shard 1 holds c3, c4, c5, never
    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "path"])
        w.writeheader()
        w.writerows(rows)
    return folder / "manifest.csv"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("videos"))


def _recipe(manifest: Path, store: Path, *extra: str):
    return load_recipe("stage1/tiny", [f"corpus.source={manifest}", f"cache.store={store}", "cache.codec=fp32", *extra])


@pytest.fixture(scope="module", params=["zarr", "wds"])
def store(request, corpus, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stores") / request.param
    summary = cache_teacher(_recipe(corpus, root, f"cache.layout={request.param}"), progress=False)
    assert summary["failures"] == 2 and summary["records"] == GOOD * 2
    return root


def _copy(store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / store.name
    shutil.copytree(store, copy)
    return copy


def _records(root: Path) -> dict:
    reader = CacheReader(root)
    return {key: reader.get(*key) for key in reader.keys}


def _assert_same_records(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        for field in ("tokens", "attn", "pooled"):
            np.testing.assert_array_equal(getattr(a[key], field), getattr(b[key], field), err_msg=f"{key} {field}")


def _shard_data(root: Path, name: str = "shard-000001") -> Path:
    return next(p for p in (root / "shards").glob(f"{name}.*") if not p.name.endswith(".json"))


def _largest_file(path: Path) -> Path:
    if path.is_file():
        return path
    return max((p for p in path.rglob("*") if p.is_file() and p.name != "zarr.json"), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_rerun_redoes_a_damaged_shard_and_says_why(store: Path, corpus: Path, tmp_path: Path, damage: str) -> None:
    copy = _copy(store, tmp_path)
    layout = json.loads((copy / "spec.json").read_text())["layout"]
    data = _shard_data(copy)
    if damage == "delete":
        shutil.rmtree(data) if data.is_dir() else data.unlink()
    else:  # a truncated zarr chunk file, or a truncated tar
        victim = _largest_file(data)
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    assert not verify_store(copy, sample=0, device="cpu")["ok"]
    summary = cache_teacher(_recipe(corpus, copy, f"cache.layout={layout}"), progress=False)
    redone = summary["rank0_redone_shards"]
    assert [r["shard"] for r in redone] == ["shard-000001"]
    assert ("missing" if damage == "delete" else "bytes") in redone[0]["reason"], redone
    assert summary["rank0_skipped_shards"] == 1 and summary["records"] == GOOD * 2
    _assert_same_records(_records(store), _records(copy))
    report = verify_store(copy, sample=2, device="cpu", deep=True)
    assert report["ok"], report["problems"]
    spec = json.loads((copy / "spec.json").read_text())
    assert spec["counts"]["records"] == GOOD * 2 and spec["counts"]["failures"] == 2


def test_deep_rerun_finds_damage_of_the_same_size(store: Path, corpus: Path, tmp_path: Path) -> None:
    copy = _copy(store, tmp_path)
    layout = json.loads((copy / "spec.json").read_text())["layout"]
    victim = _largest_file(_shard_data(copy, "shard-000000"))
    raw = bytearray(victim.read_bytes())
    at = len(raw) // 3 if layout == "zarr" else _first_npy_payload(raw)
    raw[at] ^= 0xFF  # same size: only reading the records can tell
    victim.write_bytes(bytes(raw))
    cheap = cache_teacher(_recipe(corpus, copy, f"cache.layout={layout}"), progress=False)
    assert cheap["rank0_redone_shards"] == []
    deep = cache_teacher(_recipe(corpus, copy, f"cache.layout={layout}"), progress=False, deep=True)
    assert [r["shard"] for r in deep["rank0_redone_shards"]] == ["shard-000000"], deep
    _assert_same_records(_records(store), _records(copy))


def _first_npy_payload(raw: bytearray) -> int:
    """Offset of a byte inside the first stored token array of a tar (past the npy header)."""
    at = raw.index(b"\x93NUMPY")
    return at + 200


def test_cache_verify_repair(store: Path, tmp_path: Path) -> None:
    from umt_distill.cli import app

    copy = _copy(store, tmp_path)
    data = _shard_data(copy)
    shutil.rmtree(data) if data.is_dir() else data.unlink()
    result = CliRunner().invoke(app, ["cache", "verify", str(copy), "--repair", "-n", "2", "--device", "cpu"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "redoing shard-000001" in result.stderr and "missing" in result.stderr
    _assert_same_records(_records(store), _records(copy))


def test_failed_clips_stay_failed_by_default_and_retry_failed_recovers_them(corpus: Path, tmp_path: Path) -> None:
    folder = tmp_path / "videos"
    shutil.copytree(corpus.parent, folder)
    manifest = folder / "manifest.csv"
    root = tmp_path / "store"
    cache_teacher(_recipe(manifest, root), progress=False)
    failed = {json.loads(line)["id"] for line in (root / "failures.jsonl").read_text().splitlines()}
    assert failed == {"late", "never"}
    shutil.copy(folder / "c0.mp4", folder / "late.mp4")  # the missing file appears
    again = cache_teacher(_recipe(manifest, root), progress=False)
    assert again["failures"] == 2 and again["rank0_redone_shards"] == []  # documented default: no retry
    retried = cache_teacher(_recipe(manifest, root), progress=False, retry_failed=True)
    assert [r["shard"] for r in retried["rank0_redone_shards"]] == ["shard-000000"]
    assert "late" in retried["rank0_redone_shards"][0]["reason"]
    lines = [json.loads(line) for line in (root / "failures.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == ["never"] and lines[0]["reason"] == "file not found"
    assert retried["failures"] == 1 and retried["records"] == (GOOD + 1) * 2
    assert ("late", 0) in CacheReader(root)
    assert verify_store(root, sample=2, device="cpu")["ok"]


def test_retry_of_a_clip_that_still_fails_keeps_the_shard_and_refreshes_the_reason(corpus: Path, tmp_path: Path) -> None:
    root = tmp_path / "store"
    cache_teacher(_recipe(corpus, root), progress=False)
    sidecar = root / "shards" / "shard-000001.json"
    data = json.loads(sidecar.read_text())
    data["failures"][0]["reason"] = "an old reason"
    sidecar.write_text(json.dumps(data))
    before = _shard_data(root).stat().st_mtime_ns
    summary = cache_teacher(_recipe(corpus, root), progress=False, retry_failed=True)
    assert summary["rank0_redone_shards"] == [] and summary["rank0_records"] == 0
    assert _shard_data(root).stat().st_mtime_ns == before  # not rewritten
    reasons = {json.loads(x)["id"]: json.loads(x)["reason"] for x in (root / "failures.jsonl").read_text().splitlines()}
    assert reasons["never"] == "file not found"


def test_summary_counts_cached_and_failed_clips_apart(store: Path) -> None:
    from umt_distill.cache.messages import summary_lines

    spec = json.loads((store / "spec.json").read_text())
    lines = summary_lines(store, {"store": str(store), **spec["counts"]})
    assert lines[0].startswith(f"done, with failed clips: {GOOD} of {GOOD + 2} clips cached ({GOOD * 2} records), 2 failed")
    assert any(line.strip().startswith("failed late (") and "late.mp4): file not found" in line for line in lines)
    assert any(str(store / "failures.jsonl") in line and "--retry-failed" in line for line in lines)
    ok = summary_lines(store, {"clips": 3, "records": 6, "failures": 0})
    assert ok == [f"done: 3 of 3 clips cached (6 records), 0 failed — store {store}"]
    # A store on object storage is written through a staging folder: the report names the URL, not the folder.
    remote = summary_lines(store, {"store": "s3://bucket/run/store", **spec["counts"]})
    assert "— store s3://bucket/run/store" in remote[0] and str(store) not in "\n".join(remote)
    assert any("s3://bucket/run/store/failures.jsonl" in line for line in remote)


def test_verify_prints_the_tolerance_and_the_count_and_each_damage_once(store: Path, tmp_path: Path) -> None:
    from umt_distill.cli import app

    ok = CliRunner().invoke(app, ["cache", "verify", str(store), "-n", "3", "--device", "cpu"], env={"COLUMNS": "200"})
    assert ok.exit_code == 0, ok.output
    assert "0.99999" in ok.stdout and f"3 of {GOOD * 2} records re-computed" in ok.stdout
    copy = _copy(store, tmp_path)
    data = _shard_data(copy)
    shutil.rmtree(data) if data.is_dir() else data.unlink()
    report = verify_store(copy, sample=GOOD * 2, device="cpu")
    assert not report["ok"]
    assert len(report["problems"]) == len(set(report["problems"]))
    named = [p for p in report["problems"] if data.name in p]
    assert 1 <= len(named) <= 2, report["problems"]  # the structure line, plus at most one summed read line
    assert report["checked"] == GOOD * 2 - len(CacheReader(copy).shards["shard-000001"]["records"])
