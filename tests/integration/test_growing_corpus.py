"""Growing corpora: a re-run compares the manifest with the store by content (rows: id, path, label,
captions, start, end), so a rewritten manifest resumes; appended rows go into new shards (the old ones
untouched) that verify and the index cover; a removed or changed row is refused, naming it."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import pytest

from umt_distill.cache.pipeline import cache_teacher
from umt_distill.cache.store_folder import CacheError
from umt_distill.cache.spec import CORPUS_FILE, read_spec
from umt_distill.cache.stores import CacheReader
from umt_distill.cache.verify import verify_store
from umt_distill.config import load_recipe
from umt_distill.testing.media import moving_shapes_video, write_video

CLIPS = 6


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    for i in range(CLIPS):
        write_video(folder / f"v{i}.mp4", moving_shapes_video(12, 64, 80, seed=500 + i), fps=10)
    return folder


def _rows(n: int) -> list[dict]:
    return [{"id": f"v{i}", "path": f"v{i}.mp4", "label": str(i % 2), "captions": f"clip {i}"} for i in range(n)]


def _write_csv(path: Path, rows: list[dict], columns=("id", "path", "label", "captions"), newline="\n") -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), lineterminator=newline)
        w.writeheader()
        w.writerows(rows)
    return path


def _cache(manifest: Path, store: Path, **kw) -> dict:
    cfg = load_recipe("stage1/tiny", [f"corpus.source={manifest}", f"cache.store={store}", "cache.clips_per_shard=3"])
    return cache_teacher(cfg, progress=False, **kw)


def _shard_bytes(store: Path) -> dict[str, str]:
    """Every file under shards/ (data and sidecars) → sha256 of its bytes."""
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((store / "shards").rglob("*")) if p.is_file()}


def test_the_same_manifest_rewritten_resumes(videos: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    _cache(_write_csv(videos / "a.csv", _rows(4)), store)
    before = _shard_bytes(store)
    # other column order, CRLF line endings, absolute paths, an extra column, and as JSONL
    rewritten = _write_csv(videos / "b.csv", [{**r, "path": str(videos / r["path"]), "split": "train"}
                                              for r in _rows(4)],
                           columns=("captions", "split", "path", "label", "id"), newline="\r\n")
    assert b"\r\n" in rewritten.read_bytes()
    summary = _cache(rewritten, store)
    assert summary["rank0_records"] == 0 and summary["rank0_skipped_shards"] == 2
    jsonl = videos / "c.jsonl"
    jsonl.write_text("".join(json.dumps({**r, "label": int(r["label"]), "captions": [r["captions"]]}) + "\n"
                             for r in _rows(4)))
    summary = _cache(jsonl, store)
    assert summary["rank0_records"] == 0 and _shard_bytes(store) == before
    assert read_spec(store)["corpus"]["source"] == os.path.abspath(jsonl)  # where the corpus is now


def test_appended_rows_go_into_new_shards_only(videos: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    manifest = _write_csv(tmp_path / "m.csv", [{**r, "path": str(videos / r["path"])} for r in _rows(4)])
    first = _cache(manifest, store)
    assert first["records"] == 8 and sorted(CacheReader(store).shards) == ["shard-000000", "shard-000001"]
    before = _shard_bytes(store)
    _write_csv(manifest, [{**r, "path": str(videos / r["path"])} for r in _rows(6)])  # 2 rows appended
    grown = _cache(manifest, store)
    assert grown["rank0_records"] == 4 and grown["rank0_skipped_shards"] == 2
    after = _shard_bytes(store)
    assert {k: after[k] for k in before} == before  # old shards (data and sidecars) byte-identical
    new = sorted({k.split("/")[1].split(".")[0] for k in set(after) - set(before)})
    assert new == ["shard-000002"]  # the 2 rows start a shard of their own; shard-000001 keeps its 1 row
    assert json.loads((store / "shards" / "shard-000002.json").read_text())["clips"] == [4, 6]
    spec = read_spec(store)
    assert spec["status"] == "complete" and spec["counts"]["records"] == 12 and spec["counts"]["clips"] == 6
    assert spec["corpus"]["extents"] == [4, 6] and spec["corpus"]["num_clips"] == 6
    assert len((store / CORPUS_FILE).read_text().splitlines()) == 6
    reader = CacheReader(store)  # what training reads: the index lists the new records
    assert len(reader) == 12 and ("v5", 1) in reader
    report = verify_store(store, sample=12, device="cpu", deep=True)
    assert report["ok"], report["problems"]
    assert report["checked"] == 12
    again = _cache(manifest, store)  # and a re-run of the grown manifest is a no-op
    assert again["rank0_records"] == 0 and _shard_bytes(store) == after


@pytest.mark.parametrize("change", ["path", "label", "removed", "inserted"])
def test_a_changed_or_removed_row_is_refused_naming_it(videos: Path, tmp_path: Path, change: str) -> None:
    store = tmp_path / "store"
    manifest = _write_csv(videos / f"m-{change}.csv", _rows(4))  # relative paths, beside the videos
    _cache(manifest, store)
    before = _shard_bytes(store)
    rows = _rows(5)
    if change == "path":
        rows[2]["path"] = "v5.mp4"
        expected = r"row 3 \(id 'v2'\): path is 'v5.mp4', the store has 'v2.mp4'"
    elif change == "label":
        rows[1]["label"] = "7"
        expected = r"row 2 \(id 'v1'\): label is 7, the store has 1"
    elif change == "removed":
        rows = rows[:3]
        expected = r"row 4 \(id 'v3'\) is missing: the manifest has 3 rows, the store was cached from 4"
    else:
        rows.insert(1, {"id": "new", "path": "v5.mp4", "label": "", "captions": ""})
        expected = r"row 2 has id 'new', the store has 'v1' there"
    _write_csv(manifest, rows)
    with pytest.raises(CacheError, match=expected) as refused:
        _cache(manifest, store)
    message = str(refused.value)
    assert "\n" not in message and "cache into a new store" in message and "delete" not in message
    assert str(manifest) in message
    assert _shard_bytes(store) == before and read_spec(store)["corpus"]["num_clips"] == 4


def test_other_settings_are_refused_with_the_fix_not_a_deletion(videos: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    manifest = _write_csv(videos / "s.csv", _rows(2))
    _cache(manifest, store)
    cfg = load_recipe("stage1/tiny", [f"corpus.source={manifest}", f"cache.store={store}", "cache.clips_per_shard=3",
                                      "cache.codec=int8"])
    with pytest.raises(CacheError, match="codec.name") as refused:
        cache_teacher(cfg, progress=False)
    assert "cache into a new store" in str(refused.value) and "delete" not in str(refused.value)


def test_rows_by_content_and_shards_by_extent(tmp_path: Path) -> None:
    from umt_distill.cache.pipeline import plan_shards
    from umt_distill.data.corpus import read_corpus, row_record

    (tmp_path / "m").mkdir()
    a = _write_csv(tmp_path / "m" / "a.csv", [{"id": "x", "path": "v/x.mp4", "label": "3", "captions": "hi"}])
    b = tmp_path / "m" / "b.jsonl"  # the same row: absolute path, JSON types, a byte-order mark
    b.write_bytes(b"\xef\xbb\xbf" + json.dumps({"path": str(tmp_path / "m" / "v" / "x.mp4"), "id": "x", "label": 3,
                                                   "captions": ["hi"]}).encode() + b"\n")
    ra, rb = read_corpus(a)[0], read_corpus(b)[0]
    assert ra.rel_path == rb.rel_path == "v/x.mp4" and ra.path == rb.path
    assert row_record(ra) == row_record(rb) == {"id": "x", "path": "v/x.mp4", "label": 3, "captions": ["hi"],
                                                "start": None, "end": None}
    assert read_corpus(a, root=tmp_path)[0].rel_path == "v/x.mp4"  # relative to the root when one is given
    assert [(p.name, p.start, p.stop) for p in plan_shards(7, 3, [4, 7])] == [
        ("shard-000000", 0, 3), ("shard-000001", 3, 4), ("shard-000002", 4, 7)]
    assert plan_shards(7, 3) == plan_shards(7, 3, [7])
