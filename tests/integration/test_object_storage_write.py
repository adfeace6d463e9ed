"""``cache-teacher ... cache.store=s3://bucket/prefix`` against moto's S3 server on 127.0.0.1 (real HTTP,
real botocore/s3fs, no mocked client): both layouts written to the bucket equal the store written to
disk file by file; a run killed mid-way resumes from the bucket (its leftover lease and a half-uploaded
shard are dealt with); a shard damaged in the bucket is redone; ``--retry-failed`` works; a second
writer is refused while the first holds the lease; HTTP stores are refused as read-only."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from umt_distill.cache.lock import LOCK_FILE
from umt_distill.cache.pipeline import cache_teacher
from umt_distill.cache.remote_write import RemoteLease, _staging_prefix, filesystem
from umt_distill.cache.store_folder import CacheError
from umt_distill.cache.stores import CacheReader
from umt_distill.cli import app
from umt_distill.config import load_recipe

RECIPE = {"zarr": "stage1/tiny", "wds": "stage1/tiny_wds"}
# Fields of spec.json that say when, with what, and where a store was written (not what it holds).
_WHEN = ("created", "updated", "versions")


def _recipe(layout: str, manifest: Path, store: str, *extra: str):
    return load_recipe(RECIPE[layout], [f"corpus.source={manifest}", f"cache.store={store}", "cache.codec=fp16",
                                        "cache.mode=full", *extra])


def _download(url: str, folder: Path) -> Path:
    """The bucket prefix as a local folder (what ``aws s3 cp --recursive`` makes of it)."""
    fs, root = filesystem(url)
    fs.invalidate_cache()
    for path in fs.find(root):
        target = folder / path[len(root) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(target))
    return folder


def _exists(fs, path: str) -> bool:
    fs.invalidate_cache()  # the listing as the bucket has it now, not as this process last saw it
    return fs.exists(path)


def _files(root: Path) -> dict[str, bytes]:
    """Every file of a store by relative path, but the run log (timings) and the local lock."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("summary.jsonl", LOCK_FILE)}


def _assert_same_store(local: Path, copy: Path, url: str) -> None:
    a, b = _files(local), _files(copy)
    assert sorted(a) == sorted(b)
    for rel in a:
        if rel != "spec.json":
            assert a[rel] == b[rel], f"{rel} differs between the local store and the bucket's"
    spec_a, spec_b = json.loads(a["spec.json"]), json.loads(b["spec.json"])
    assert spec_b["recipe"]["cache"]["store"] == url  # where it was written: the URL, not the staging folder
    assert spec_b["corpus"]["source_from_store"] is None and spec_b["corpus"]["root_from_store"] is None
    for spec in (spec_a, spec_b):
        for key in _WHEN:
            spec.pop(key)
        spec["recipe"]["cache"].pop("store")
        for key in ("source_from_store", "root_from_store"):
            spec["corpus"].pop(key)
    assert spec_a == spec_b


@pytest.mark.parametrize("layout", ["zarr", "wds"])
def test_a_store_written_to_s3_equals_the_store_written_to_disk(layout: str, s3_server, tiny_store, shapes_corpus,
                                                               tmp_path: Path) -> None:
    url = s3_server.url(f"equal-{layout}")
    summary = cache_teacher(_recipe(layout, shapes_corpus, url), progress=False)
    assert summary["store"] == url and summary["records"] == 8 * 2
    fs, root = filesystem(url)
    assert not _exists(fs, f"{root}/{LOCK_FILE}")  # the lease is given back
    local = tiny_store(layout, "fp16", "full")
    copy = _download(url, tmp_path / "copy")
    _assert_same_store(local, copy, url)

    # a shard damaged in the bucket (an object gone) is found from the bucket's listing and redone by
    # `cache verify --repair` on the URL, which then verifies the store from the bucket
    data = "shard-000000.zarr/tokens/zarr.json" if layout == "zarr" else "shard-000000.tar"
    fs.rm_file(f"{root}/shards/{data}")
    result = CliRunner().invoke(app, ["cache", "verify", url, "--repair", "-n", "2", "--device", "cpu"],
                                env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "redoing shard-000000" in result.stderr and ("missing" in result.stderr or "bytes" in result.stderr)
    _assert_same_store(local, _download(url, tmp_path / "repaired"), url)


def test_a_killed_cache_run_resumes_from_the_bucket(s3_server, shapes_corpus, tiny_store, tmp_path: Path) -> None:
    url = s3_server.url("killed")
    fs, root = filesystem(url)
    args = ["cache-teacher", RECIPE["zarr"], f"corpus.source={shapes_corpus}", f"cache.store={url}",
            "cache.codec=fp16", "cache.mode=full", "cache.clips_per_shard=1"]
    env = {**os.environ, **s3_server.env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "umt_distill", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not _exists(fs, f"{root}/shards/shard-000000.json"):  # the first shard is uploaded: kill now
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert _exists(fs, f"{root}/{LOCK_FILE}") and not _exists(fs, f"{root}/index.json")  # a killed writer's lease
    fs.invalidate_cache()
    finished = sorted(p.rsplit("/", 1)[1] for p in fs.glob(f"{root}/shards/shard-*.json"))
    assert "shard-000007.json" not in finished
    # a shard whose upload was cut off: some of its objects, no sidecar
    fs.pipe_file(f"{root}/shards/shard-000007.zarr/zarr.json", b"{half an upload")
    staged = list(Path(tempfile.gettempdir()).glob(f"{_staging_prefix(proc.pid)}*"))
    assert staged  # the killed writer could not delete its staging folder

    summary = cache_teacher(_recipe("zarr", shapes_corpus, url, "cache.clips_per_shard=1"), progress=False)
    assert summary["rank0_skipped_shards"] == len(finished) >= 1  # what the killed run uploaded is kept
    assert summary["rank0_shards_written"] == 8 - len(finished)
    assert not _exists(fs, f"{root}/{LOCK_FILE}")
    assert not any(folder.exists() for folder in staged)  # the next writer did
    copy = _download(url, tmp_path / "copy")
    assert json.loads((copy / "spec.json").read_text())["status"] == "complete"
    a, b = CacheReader(tiny_store("zarr", "fp16", "full")), CacheReader(copy)
    assert sorted(a.keys) == sorted(b.keys)
    for key in a.keys:
        ra, rb = a.get(*key), b.get(*key)
        assert ra.frames_digest == rb.frames_digest and (ra.tokens == rb.tokens).all()


def test_retry_failed_against_the_bucket(s3_server, shapes_corpus, tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path"])
        w.writerows([["v0", shapes_corpus.parent / "v0.mp4"], ["late", tmp_path / "late.mp4"],
                     ["v1", shapes_corpus.parent / "v1.mp4"]])
    url = s3_server.url("retry")
    fs, root = filesystem(url)
    first = cache_teacher(_recipe("zarr", manifest, url), progress=False)
    assert first["failures"] == 1
    assert [json.loads(x)["id"] for x in fs.cat_file(f"{root}/failures.jsonl").decode().splitlines()] == ["late"]
    (tmp_path / "late.mp4").write_bytes((shapes_corpus.parent / "v2.mp4").read_bytes())  # the file appears
    retried = cache_teacher(_recipe("zarr", manifest, url), progress=False, retry_failed=True)
    assert [r["shard"] for r in retried["rank0_redone_shards"]] == ["shard-000000"]
    assert retried["failures"] == 0 and retried["records"] == 3 * 2
    assert fs.cat_file(f"{root}/failures.jsonl") == b""
    index = json.loads(fs.cat_file(f"{root}/index.json"))
    assert ["late", 0] in index["shards"][0]["records"]
    assert json.loads(fs.cat_file(f"{root}/spec.json"))["counts"]["failures"] == 0

    # --deep downloads each shard and reads every record: a changed byte (same size) is found and redone
    chunk = next(p for p in fs.find(f"{root}/shards/shard-000000.zarr") if "/tokens/c/" in p)
    data = bytearray(fs.cat_file(chunk))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(chunk, bytes(data))
    deep = cache_teacher(_recipe("zarr", manifest, url), progress=False, deep=True)
    assert [r["shard"] for r in deep["rank0_redone_shards"]] == ["shard-000000"]
    assert fs.cat_file(chunk) != bytes(data)

    # a refusal names the store's URL, not the local staging folder the writer works in
    with pytest.raises(CacheError) as refused:
        cache_teacher(_recipe("zarr", manifest, url, "cache.codec=fp32"), progress=False)
    assert f"cannot resume into {url}" in str(refused.value) and "staging" not in str(refused.value)


def test_an_unreachable_endpoint_is_one_line_naming_the_network(s3_server, shapes_corpus, monkeypatch) -> None:
    from umt_distill import storage

    monkeypatch.setattr(storage, "_SETTINGS", storage.settings())  # the recipe's settings last for this test only
    with socket.socket() as probe:  # a port nothing listens on: connection refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    url = s3_server.url("unreachable")
    result = CliRunner().invoke(app, ["cache-teacher", RECIPE["zarr"], f"corpus.source={shapes_corpus}",
                                      f"cache.store={url}", "storage.retries=2", "storage.backoff_s=0.05"],
                                env={"COLUMNS": "300"})
    assert result.exit_code == 1
    message = result.stderr.strip()
    assert "\n" not in message and "the network failed after 2 tries" in message and "not the store's bytes" in message


def test_a_second_writer_is_refused_while_the_first_holds_the_lease(s3_server, shapes_corpus) -> None:
    url = s3_server.url("held")
    lease = RemoteLease(url, "cache-teacher").acquire()
    try:
        result = CliRunner().invoke(app, ["cache-teacher", RECIPE["zarr"], f"corpus.source={shapes_corpus}",
                                          f"cache.store={url}"], env={"COLUMNS": "300"})
    finally:
        lease.release()
    assert result.exit_code == 1
    message = result.stderr.strip()
    assert "\n" not in message and "being written by another run" in message and f"pid {os.getpid()}" in message
    fs, root = filesystem(url)
    fs.invalidate_cache()
    assert fs.find(root) == []  # nothing was written


def test_an_http_store_is_refused_as_read_only(shapes_corpus) -> None:
    url = "http://127.0.0.1:9/store"
    result = CliRunner().invoke(app, ["cache-teacher", RECIPE["zarr"], f"corpus.source={shapes_corpus}",
                                      f"cache.store={url}"], env={"COLUMNS": "300"})
    assert result.exit_code == 1
    message = result.stderr.strip()
    assert "\n" not in message and "read-only" in message and url in message


@pytest.mark.slow
@pytest.mark.distributed
def test_a_world_2_torchrun_writes_one_store_to_the_bucket(s3_server, shapes_corpus, tmp_path: Path) -> None:
    """Each rank uploads its own shards; rank 0 alone holds the lease, creates the store, and writes the
    index from every rank's sidecars; a re-run at world 2 keeps them all."""
    url = s3_server.url("world2")
    args = ["cache-teacher", RECIPE["zarr"], f"corpus.source={shapes_corpus}", f"cache.store={url}",
            "cache.codec=fp16", "cache.mode=full", "cache.clips_per_shard=1"]
    env = {**os.environ, **s3_server.env(), "OMP_NUM_THREADS": "1"}
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "umt_distill", *args], env=env, capture_output=True, text=True, timeout=600,
                              check=False)
        assert done.returncode == 0, done.stderr[-3000:]
    fs, root = filesystem(url)
    summaries = [json.loads(line) for line in fs.cat_file(f"{root}/summary.jsonl").decode().splitlines()]
    assert [s["rank0_shards_written"] for s in summaries] == [4, 0] and summaries[1]["rank0_skipped_shards"] == 4
    index = json.loads(fs.cat_file(f"{root}/index.json"))
    assert [s["name"] for s in index["shards"]] == [f"shard-{i:06d}" for i in range(8)]
    assert not _exists(fs, f"{root}/{LOCK_FILE}")
    result = CliRunner().invoke(app, ["cache", "verify", url, "-n", "2", "--device", "cpu"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
