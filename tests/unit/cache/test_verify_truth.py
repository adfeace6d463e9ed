"""``cache verify`` tells the truth: every fresh store passes (layout x codec x frames x mode, and the
shipped recipes as they are), and each damage training would hit is named — by the library function and
by the real CLI (exit status 1, one line naming the file, shard or key, no traceback). Real stores from
the real pipeline on PyAV-encoded videos with the tiny teacher; damage is done to their bytes."""

from __future__ import annotations

import csv
import itertools
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import google_crc32c
import numpy as np
import pytest

from umt_distill.cache.datasets import CachedViewDataset, StreamingViewDataset
from umt_distill.cache.pipeline import cache_teacher
from umt_distill.cache.store_folder import CacheError
from umt_distill.cache.record import StoreDamagedError
from umt_distill.cache.stores import CacheReader
from umt_distill.cache.verify import verify_store
from umt_distill.cache.wds_stream import META_CHECKSUM, parse_meta, seal_meta
from umt_distill.cache.zarr_store import ATTRS_CHECKSUM, ZarrShardReader
from umt_distill.config import load_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GOOD = 3  # c0, c1, c2; "broken" is not a video. clips_per_shard=2: shard 0 = c0 + broken, shard 1 = c1 + c2
VIEWS = 2
RECORDS = GOOD * VIEWS
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}

LAYOUTS = ("zarr", "wds")
CODECS = ("fp32", "fp16", "int8", "pca4")
FRAMES = ("none", "raw", "jpeg")
MODES = ("full", "visible")
MATRIX = list(itertools.product(LAYOUTS, CODECS, FRAMES, MODES))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from umt_distill.testing.media import moving_shapes_video, write_video

    folder = tmp_path_factory.mktemp("videos")
    rows = []
    for i in range(GOOD):
        write_video(folder / f"c{i}.mp4", moving_shapes_video(12, 64, 80, seed=i), fps=10)
        rows.append({"id": f"c{i}", "path": f"c{i}.mp4"})
    (folder / "broken.mp4").write_text("not a video\n")
    rows.insert(1, {"id": "broken", "path": "broken.mp4"})
    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "path"])
        w.writeheader()
        w.writerows(rows)
    return folder / "manifest.csv"


class Stores:
    """Builds each store of the module once, on first use."""

    def __init__(self, corpus: Path, root: Path) -> None:
        self.corpus, self.root, self.built = corpus, root, {}

    def get(self, layout: str, codec: str, frames: str = "none", mode: str = "full") -> Path:
        key = (layout, codec, frames, mode)
        if key not in self.built:
            store = self.root / "-".join(key)
            extra = [f"cache.layout={layout}", f"cache.codec={codec}", f"cache.frames={frames}", f"cache.mode={mode}",
                     f"cache.num_views={VIEWS}", "cache.clips_per_shard=2", "cache.basis_clips=2"]
            if mode == "visible":
                extra += ["cache.masks_per_view=2", "cache.mask_ratio=0.5"]
            summary = cache_teacher(recipe(self.corpus, store, *extra), progress=False)
            assert summary["records"] == RECORDS and summary["failures"] == 1, summary
            self.built[key] = store
        return self.built[key]

    def recipe(self, name: str) -> Path:
        """A shipped recipe with its own store settings (only the corpus and the store path given)."""
        if name not in self.built:
            store = self.root / name.replace("/", "_")
            cache_teacher(load_recipe(name, [f"corpus.source={self.corpus}", f"cache.store={store}"]), progress=False)
            self.built[name] = store
        return self.built[name]


def recipe(corpus: Path, store: Path, *extra: str):
    return load_recipe("stage1/tiny", [f"corpus.source={corpus}", f"cache.store={store}", *extra])


@pytest.fixture(scope="module")
def stores(corpus, tmp_path_factory) -> Stores:
    return Stores(corpus, tmp_path_factory.mktemp("stores"))


def copy(store: Path, tmp_path: Path) -> Path:
    out = tmp_path / store.name
    shutil.copytree(store, out)
    return out


def problems(store: Path, deep: bool = False) -> list[str]:
    report = verify_store(store, sample=RECORDS, device="cpu", deep=deep)
    assert not report["ok"]
    return report["problems"]


def cli_verify(store: Path, deep: bool = False) -> subprocess.Popen:
    args = [sys.executable, "-m", "umt_distill", "cache", "verify", str(store), "-n", str(RECORDS), "--device", "cpu"]
    return subprocess.Popen(args + (["--deep"] if deep else []), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# --------------------------------------------------------------------------------------------------
# fresh stores pass


@pytest.mark.parametrize("layout, codec, frames, mode", MATRIX, ids=["-".join(c) for c in MATRIX])
def test_every_fresh_store_passes_verify_and_deep_verify(stores: Stores, layout, codec, frames, mode) -> None:
    store = stores.get(layout, codec, frames, mode)
    report = verify_store(store, sample=RECORDS, device="cpu", deep=True)
    assert report["ok"], report["problems"]
    assert report["checked"] == report["records"] == RECORDS
    tokens = next(f for f in report["fields"] if f["field"] == "tokens")
    if codec == "fp32":
        assert tokens["min_cos"] > 1 - 1e-6
    else:  # a lossy codec reports its real error, against the error measured when the records were written
        assert tokens["max_abs"] > 0 and tokens["tol"] <= tokens["min_cos"] < 1
        assert "write time" in tokens["tol_source"]


@pytest.mark.parametrize("name", ["stage1/tiny", "stage1/tiny_wds"])
def test_the_shipped_recipes_stores_pass_verify(stores: Stores, name: str) -> None:
    store = stores.recipe(name)
    for deep in (False, True):
        report = verify_store(store, sample=RECORDS, device="cpu", deep=deep)
        assert report["ok"], report["problems"]
        assert report["checked"] == RECORDS
    proc = cli_verify(store, deep=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err


# --------------------------------------------------------------------------------------------------
# damage, each kind named


def index_of(store: Path) -> dict:
    return json.loads((store / "index.json").read_text())


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data))


def damage_zero_records(store: Path) -> str:
    index, spec = index_of(store), json.loads((store / "spec.json").read_text())
    index["shards"] = []
    spec["counts"]["records"] = 0
    write_json(store / "index.json", index)
    write_json(store / "spec.json", spec)
    return "no records"


def damage_fewer_records(store: Path) -> str:
    index, spec = index_of(store), json.loads((store / "spec.json").read_text())
    dropped = index["shards"].pop()  # shard-000001: c1, c2
    spec["counts"]["records"] -= dropped["num_records"]
    write_json(store / "index.json", index)
    write_json(store / "spec.json", spec)
    return "c1 (0 of 2 views)"


def members(tar: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(tar) as t:
        return t.getmembers()


def damage_group_range(store: Path) -> str:
    """Shard 1's group 0 range loses its last sample to group 1: contiguous, same totals, wrong ranges."""
    index = index_of(store)
    shard = index["shards"][1]
    tar = store / "shards" / f"{shard['name']}.tar"
    last = min(m.offset for m in members(tar) if m.name.startswith(f"{shard['name']}_000_000001."))
    g0, g1 = shard["groups"][:2]
    moved = g0["offset"] + g0["nbytes"] - last
    g0["nbytes"] -= moved
    g1["offset"] -= moved
    g1["nbytes"] += moved
    write_json(store / "index.json", index)
    return "group 0"


def _rewrite_member(tar: Path, name: str, edit) -> None:
    member = next(m for m in members(tar) if m.name == name)
    data = bytearray(tar.read_bytes())
    body = edit(bytes(data[member.offset_data : member.offset_data + member.size]))
    assert len(body) == member.size
    data[member.offset_data : member.offset_data + member.size] = body
    tar.write_bytes(bytes(data))


def damage_view_json_bit(store: Path) -> str:
    """One flipped bit in a view.json: clip c0's sample now claims to be c1's."""
    tar = store / "shards" / "shard-000000.tar"
    name = next(m.name for m in members(tar) if m.name.endswith("view.json"))
    _rewrite_member(tar, name, lambda b: b.replace(b'"clip_id": "c0"', b'"clip_id": "c1"'))
    return f"{name.split('.')[0]}: view.json: checksum mismatch"


def damage_duplicate(store: Path) -> str:
    """Shard 0's second sample (c0, view v) rewritten to hold c0's other view, checksum recomputed."""
    tar = store / "shards" / "shard-000000.tar"
    views = sorted(m.name for m in members(tar) if m.name.endswith("view.json"))

    def edit(raw: bytes) -> bytes:
        meta = json.loads(raw)
        meta.pop(META_CHECKSUM)
        meta["view_index"] = 1 - meta["view_index"]
        return seal_meta(meta)

    _rewrite_member(tar, views[1], edit)
    return "duplicated record"


def damage_zarr_attrs(store: Path) -> str:
    """A value in a shard group's attributes changed (a view's first frame index)."""
    path = store / "shards" / "shard-000000.zarr" / "zarr.json"
    meta = json.loads(path.read_text())
    meta["attributes"]["views"][0]["frame_indices"][0] ^= 1
    path.write_text(json.dumps(meta, indent=2))
    return f"{path}: the shard's attributes"


def shard_file(store: Path, shard: str, array: str) -> Path:
    (path,) = [p for p in (store / "shards" / f"{shard}.zarr" / array / "c").rglob("*") if p.is_file()]
    return path


def damage_absent_chunk(store: Path) -> str:
    """Shard 1's tokens: the shard index marks row 1's chunk absent (its CRC recomputed)."""
    name = next(n for n in ("tokens", "tokens.q") if (store / "shards" / "shard-000001.zarr" / n).exists())
    path = shard_file(store, "shard-000001", name)
    data = bytearray(path.read_bytes())
    n = len(index_of(store)["shards"][1]["records"])
    start = len(data) - (16 * n + 4)
    data[start + 16 : start + 32] = b"\xff" * 16
    data[-4:] = google_crc32c.value(bytes(data[start:-4])).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return f"{path}: the shard index marks the chunk of row 1 absent"


def damage_dtype(store: Path) -> str:
    """An int8 store's tokens.q declared uint8 in its zarr.json: same bytes, other numbers."""
    path = store / "shards" / "shard-000001.zarr" / "tokens.q" / "zarr.json"
    meta = json.loads(path.read_text())
    assert meta["data_type"] == "int8"
    meta["data_type"] = "uint8"
    path.write_text(json.dumps(meta, indent=2))
    return f"{path}: array tokens.q is uint8"


def damage_lossy_numbers(store: Path) -> str:
    """A pca store's coefficients of shard 0's row 0 rewritten through zarr (checksums valid, index.json's
    size updated): readable, but no longer the codec's encoding of what the teacher says."""
    import zarr

    arr = zarr.open_array(str(store / "shards" / "shard-000000.zarr" / "tokens.q"), mode="r+")
    arr[0] = np.roll(arr[0], 1, axis=-1)
    index = index_of(store)
    data = store / "shards" / "shard-000000.zarr"
    index["shards"][0]["nbytes"] = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
    write_json(store / "index.json", index)
    return "shard-000000.zarr: record 'c0' view 0: tokens: worst cosine"


def test_zero_records_fail(stores: Stores, tmp_path: Path) -> None:
    for layout in LAYOUTS:
        store = copy(stores.get(layout, "fp16"), tmp_path / layout)
        said = damage_zero_records(store)
        found = problems(store)
        assert any(said in p and "index.json" in p for p in found), found


def test_fewer_records_than_the_corpus_minus_failures_names_the_clips(stores: Stores, tmp_path: Path) -> None:
    for layout in LAYOUTS:
        store = copy(stores.get(layout, "fp16"), tmp_path / layout)
        said = damage_fewer_records(store)
        found = problems(store)
        assert any(said in p and "c2 (0 of 2 views)" in p for p in found), found
        assert any("2 records, the corpus needs 6" in p and "1 failed" in p for p in found), found


def test_a_failure_line_accounts_for_its_clip_but_a_missing_failures_file_is_damage(stores: Stores, tmp_path: Path) -> None:
    store = copy(stores.get("zarr", "fp16"), tmp_path)
    assert verify_store(store, sample=0, device="cpu")["ok"]  # 4 clips x 2 views - 1 failed clip's 2 = 6
    (store / "failures.jsonl").unlink()
    found = problems(store)
    assert any("failures.jsonl: missing" in p for p in found) and any("the corpus needs 8" in p for p in found), found


def test_index_byte_ranges_are_read_by_deep_verify_and_training_as_training_reads_them(stores: Stores, corpus: Path,
                                                                                          tmp_path: Path) -> None:
    store = copy(stores.get("wds", "fp16"), tmp_path)
    said = damage_group_range(store)
    found = problems(store, deep=True)
    tar = str(store / "shards" / "shard-000001.tar")
    assert any(p.startswith(tar) and said in p for p in found), found
    cfg = recipe(corpus, store, "train.batch_size=1", "train.num_workers=0", "train.shuffle_buffer=0",
                 "cache.codec=fp16")
    ds = StreamingViewDataset(store, cfg, pixels=False)
    with pytest.raises(StoreDamagedError, match="shard-000001"):
        for epoch in range(VIEWS):
            ds.set_epoch(epoch)
            list(ds)


def test_a_flipped_bit_in_view_json_is_named_by_verify_and_by_training(stores: Stores, corpus: Path, tmp_path: Path) -> None:
    store = copy(stores.get("wds", "int8", "jpeg"), tmp_path)
    said = damage_view_json_bit(store)
    tar = str(store / "shards" / "shard-000000.tar")
    for deep in (False, True):  # the sampled reads hit it too
        found = problems(store, deep=deep)
        assert any(p.startswith(tar) and said in p for p in found), found
    cfg = recipe(corpus, store, "train.batch_size=1", "train.num_workers=0", "train.shuffle_buffer=0",
                 "train.pixels_from=store", "cache.codec=int8")
    ds = StreamingViewDataset(store, cfg)
    with pytest.raises(StoreDamagedError, match=f"{tar}: sample shard-000000_00[01]_000000: view.json: checksum"):
        for epoch in range(VIEWS):
            ds.set_epoch(epoch)
            list(ds)


def test_a_changed_value_in_zarr_shard_attributes_is_named_by_verify_and_by_training(stores: Stores, corpus: Path,
                                                                                       tmp_path: Path) -> None:
    store = copy(stores.get("zarr", "fp16"), tmp_path)
    said = damage_zarr_attrs(store)
    found = problems(store)
    assert any(said in p and ATTRS_CHECKSUM in p for p in found), found
    cfg = recipe(corpus, store, "train.batch_size=2", "train.num_workers=0", "cache.codec=fp16")
    ds = CachedViewDataset(store, cfg, pixels=False)
    with pytest.raises(StoreDamagedError, match="shard-000000.zarr/zarr.json: the shard's attributes"):
        ds.__getitems__(list(range(len(ds))))


def test_stores_without_the_metadata_checksums_still_read(stores: Stores, tmp_path: Path) -> None:
    """Older samples (no json_crc32c in view.json) and format-1 zarr shards (no attrs_crc32c) read."""
    store = copy(stores.get("zarr", "fp16"), tmp_path)
    path = store / "shards" / "shard-000000.zarr" / "zarr.json"
    meta = json.loads(path.read_text())
    del meta["attributes"][ATTRS_CHECKSUM]
    meta["attributes"]["umt_distill_format"] = 1
    path.write_text(json.dumps(meta))
    assert len(ZarrShardReader(str(path.parent), spec=json.loads((store / "spec.json").read_text()))) == 2
    meta["attributes"]["umt_distill_format"] = 2  # format 2 without its checksum: damage
    path.write_text(json.dumps(meta))
    with pytest.raises(StoreDamagedError, match="fail their checksum"):
        ZarrShardReader(str(path.parent))
    tar = stores.get("wds", "fp16") / "shards" / "shard-000000.tar"
    with tarfile.open(tar) as t:
        member = next(m for m in t.getmembers() if m.name.endswith("view.json"))
        raw = t.extractfile(member).read()
    sealed = parse_meta(str(tar), "k", {"view.json": raw})
    older = {k: v for k, v in sealed.items() if k != META_CHECKSUM}
    assert parse_meta(str(tar), "k", {"view.json": json.dumps(older, sort_keys=True).encode()}) == older
    with pytest.raises(StoreDamagedError, match="unknown field 'json_crc32d'"):  # a flipped bit in the field's name
        parse_meta(str(tar), "k", {"view.json": raw.replace(b'"json_crc32c"', b'"json_crc32d"')})


def test_a_duplicated_record_is_named_by_deep_verify_and_by_training(stores: Stores, corpus: Path, tmp_path: Path) -> None:
    store = copy(stores.get("wds", "fp16"), tmp_path)
    said = damage_duplicate(store)
    tar = str(store / "shards" / "shard-000000.tar")
    found = problems(store, deep=True)
    assert any(p.startswith(tar) and said in p and "'c0' view" in p for p in found), found
    cfg = recipe(corpus, store, "train.batch_size=1", "train.num_workers=0", "train.shuffle_buffer=0",
                 "cache.codec=fp16")
    ds = StreamingViewDataset(store, cfg, pixels=False)
    with pytest.raises(StoreDamagedError, match=f"{tar}: sample shard-000000_00[01]_000000: holds 'c0'"):
        for epoch in range(VIEWS):
            ds.set_epoch(epoch)
            list(ds)
    # zarr: a record listed twice (index.json and the shard's attributes agreeing) is refused by name
    store = copy(stores.get("zarr", "fp16"), tmp_path / "zarr")
    index = index_of(store)
    index["shards"][1]["records"][1] = index["shards"][1]["records"][0]
    write_json(store / "index.json", index)
    with pytest.raises(CacheError, match=r"index.json: record \('c1', \d\) listed twice"):
        verify_store(store, sample=0, device="cpu")


def test_an_absent_zarr_chunk_is_damage_not_zeros(stores: Stores, tmp_path: Path) -> None:
    store = copy(stores.get("zarr", "fp16"), tmp_path)
    said = damage_absent_chunk(store)
    found = problems(store)
    assert any(said in p for p in found), found
    reader = CacheReader(store)
    clip, view = index_of(store)["shards"][1]["records"][0]  # row 0's chunk is there, row 1's is not
    with pytest.raises(StoreDamagedError, match="row 0: cannot read its chunk: the shard index marks the chunk of row 1"):
        reader.get(clip, view)


def test_array_metadata_is_checked_against_the_spec_before_reading(stores: Stores, tmp_path: Path) -> None:
    store = copy(stores.get("zarr", "int8"), tmp_path)
    said = damage_dtype(store)
    found = problems(store)
    assert any(said in p and "spec says int8" in p for p in found), found
    store = copy(stores.get("zarr", "fp16"), tmp_path / "chunks")
    path = store / "shards" / "shard-000000.zarr" / "attn" / "zarr.json"
    meta = json.loads(path.read_text())
    meta["shape"][2] += 1  # attn [n, T, N]: one token more than the teacher has
    meta["chunk_grid"]["configuration"]["chunk_shape"][2] += 1
    meta["codecs"][0]["configuration"]["chunk_shape"][2] += 1
    path.write_text(json.dumps(meta))
    found = problems(store)
    assert any(str(path) in p and "the store's spec says float32" in p for p in found), found


def test_a_lossy_codec_is_held_to_the_error_measured_at_write_time(stores: Stores, tmp_path: Path) -> None:
    store = copy(stores.get("zarr", "pca4"), tmp_path)
    sidecar = json.loads((store / "shards" / "shard-000000.json").read_text())
    assert 0 < sidecar["codec_error"]["min_cos"] < 1 and sidecar["codec_error"]["records"] == 2
    said = damage_lossy_numbers(store)
    found = problems(store)
    assert len(found) == 1 and said in found[0] and "write time" in found[0], found


def test_the_cli_names_each_damage_in_one_line_with_exit_status_1(stores: Stores, tmp_path: Path) -> None:
    """One real ``python -m umt_distill cache verify`` per damaged store (two damages per store where they lie
    in different shards: every kind is covered by five runs), run side by side."""
    cases = []

    def case(name: str, base: Path, damages, deep: bool = False) -> None:
        store = copy(base, tmp_path / name)
        cases.append((store, [d(store) for d in damages], deep))

    case("zero", stores.get("wds", "fp16"), [damage_zero_records])
    case("zarr-attrs-dtype", stores.get("zarr", "int8"), [damage_zarr_attrs, damage_dtype])  # shards 0, 1
    case("pca-numbers-chunk", stores.get("zarr", "pca4"), [damage_lossy_numbers, damage_absent_chunk])  # 0, 1
    case("wds-view-range", stores.get("wds", "fp16"), [damage_view_json_bit, damage_group_range], deep=True)
    case("wds-duplicate-fewer", stores.get("wds", "int8", "jpeg"), [damage_duplicate, damage_fewer_records], deep=True)
    running = [(store, said, cli_verify(store, deep)) for store, said, deep in cases]
    for store, said, proc in running:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, (store, out, err)
        assert "Traceback" not in out + err, err
        lines = [line for line in err.splitlines() if line.startswith(("mismatch:", "error:"))]
        for expected in said:
            hits = [line for line in lines if expected in line]
            assert hits, (store, expected, err)
            assert all(str(store) in line for line in hits), hits  # each names a file of the store


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_deep_rerun_keeps_every_shard_of_a_fresh_store_and_redoes_a_damaged_one(stores: Stores, corpus: Path,
                                                                                  tmp_path: Path, layout: str) -> None:
    """cache-teacher --deep reads shards as training does (basis codecs decoded with the store's basis)."""
    store = copy(stores.get(layout, "pca4"), tmp_path)
    extra = [f"cache.layout={layout}", "cache.codec=pca4", f"cache.num_views={VIEWS}", "cache.clips_per_shard=2",
             "cache.basis_clips=2"]
    summary = cache_teacher(recipe(corpus, store, *extra), progress=False, deep=True)
    assert summary["rank0_redone_shards"] == [] and summary["rank0_skipped_shards"] == 2
    if layout == "wds":
        damage_view_json_bit(store)
        redone = "shard-000000"
    else:
        damage_absent_chunk(store)
        redone = "shard-000001"
    summary = cache_teacher(recipe(corpus, store, *extra), progress=False, deep=True)
    assert [r["shard"] for r in summary["rank0_redone_shards"]] == [redone], summary["rank0_redone_shards"]
    assert verify_store(store, sample=RECORDS, device="cpu", deep=True)["ok"]
