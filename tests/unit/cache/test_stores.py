"""Cache stores on disk: round trips through both layouts x codecs, plain-library reading, damage, atomicity."""

from __future__ import annotations

import gc
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from umt_distill.cache.codecs import COMPRESSORS
from umt_distill.cache.record import RecordError, StoreDamagedError, TargetRecord, frames_digest
from umt_distill.cache.stores import (
    CacheReader,
    init_store_root,
    open_shard_writer,
    read_index,
    wds_records,
    write_index,
)
from umt_distill.registry import STORES
from umt_distill.testing.stores import D, H, K, N, T, W, build_store, make_record, smooth_frames

TOLERANCE = {"fp32": 0.0, "fp16": 1e-3, "bf16": 8e-3, "int8": 2e-2}  # max |error| / max |token|


def assert_same_record(got: TargetRecord, want: TargetRecord, codec: str, frames: str) -> None:
    assert (got.clip_id, got.view_index, got.view, got.frames_digest) == (
        want.clip_id, want.view_index, want.view, want.frames_digest)
    assert got.tokens.dtype == np.float32 and got.tokens.shape == want.tokens.shape
    err = np.abs(got.tokens - want.tokens).max() / np.abs(want.tokens).max()
    assert err <= TOLERANCE[codec], err
    if codec == "fp32":
        assert np.array_equal(got.tokens, want.tokens)
    assert np.array_equal(got.attn, want.attn) and np.array_equal(got.pooled, want.pooled)  # always float32
    if want.visible_idx is None:
        assert got.visible_idx is None
    else:
        assert got.visible_idx.dtype == np.int16 and np.array_equal(got.visible_idx, want.visible_idx)
    if frames == "none":
        assert got.frames is None
    elif frames == "raw":
        assert np.array_equal(got.frames, want.frames)
    else:  # jpeg: lossy, but the right frames in the right order
        assert got.frames.shape == want.frames.shape and got.frames.dtype == np.uint8
        err = np.abs(got.frames[:, None].astype(int) - want.frames[None].astype(int)).mean(axis=(2, 3, 4))  # [T, T]
        assert err.diagonal().max() < 3 and (err.argmin(axis=1) == np.arange(T)).all()


# --------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("layout", ["zarr", "wds"])
@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16", "int8"])
def test_round_trip_layout_codec(tmp_path: Path, layout: str, codec: str) -> None:
    records = build_store(tmp_path, layout, codec)
    reader = CacheReader(tmp_path)
    assert len(reader) == len(records) == 8
    assert reader.keys == [(r.clip_id, r.view_index) for r in records]
    for want in reversed(records):  # random order: zarr reads single rows
        assert_same_record(reader.get(want.clip_id, want.view_index), want, codec, "none")
    streamed = list(reader)
    assert [(r.clip_id, r.view_index) for r in streamed] == reader.keys


@pytest.mark.parametrize("layout", ["zarr", "wds"])
@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_round_trip_compressors_visible_mode_frames(tmp_path: Path, layout: str, compressor: str) -> None:
    records = build_store(tmp_path, layout, "fp16", compressor, frames="raw", shards=1, visible=3)
    reader = CacheReader(tmp_path)
    for want in records:
        got = reader.get(want.clip_id, want.view_index)
        assert got.tokens.shape == (3, K, T, 5, D)
        assert_same_record(got, want, "fp16", "raw")
        assert frames_digest(got.frames) == want.frames_digest


@pytest.mark.parametrize("layout", ["wds", "zarr"])
def test_jpeg_frames(tmp_path: Path, layout: str) -> None:
    from umt_distill.data.jpeg import decode_jpegs

    records = build_store(tmp_path, layout, "int8", frames="jpeg", shards=1)
    got = list(CacheReader(tmp_path).iter_shard("shard-000000"))
    for g, want in zip(got, records, strict=True):
        assert_same_record(g, want, "int8", "jpeg")
        assert len(g.frames_jpeg) == len(want.view.frame_indices)  # the stored bytes come back, and decode to frames
        assert np.array_equal(decode_jpegs(g.frames_jpeg).numpy(), g.frames)


def test_unknown_frames_mode_is_refused(tmp_path: Path) -> None:
    for layout in ("zarr", "wds"):
        with pytest.raises(ValueError, match="frames must be one of none, raw, jpeg|frames must be one of none, jpeg, raw"):
            open_shard_writer(layout, tmp_path, "shard-000000", "fp16", frames="png")


def test_registries_and_unknown_names(tmp_path: Path) -> None:
    assert {"zarr", "wds"} <= set(STORES.names())
    with pytest.raises(KeyError, match="store layout 'zar'"):
        open_shard_writer("zar", tmp_path, "shard-000000", "fp16")
    with pytest.raises(KeyError, match="codec 'fp8'"):
        open_shard_writer("wds", tmp_path, "shard-000000", "fp8")


# --------------------------------------------------------------------------------------------------
# reading without this package


def test_plain_zarr_reads_the_store(tmp_path: Path) -> None:
    import zarr

    records = build_store(tmp_path, "zarr", "int8", frames="raw")
    root = zarr.open_group(str(tmp_path), mode="r")
    assert sorted(root["shards"].group_keys()) == ["shard-000000.zarr", "shard-000001.zarr"]
    shard = root["shards"]["shard-000001.zarr"]
    row = shard.attrs["records"].index([records[5].clip_id, records[5].view_index])
    assert shard.attrs["codec"] == "int8" and shard["tokens.q"].chunks == (1, K, T, N, D)
    assert shard["tokens.q"].shards == (4, K, T, N, D)  # one zarr shard holds every row
    tokens = shard["tokens.q"][row].astype(np.float32) * shard["tokens.scale"][row]  # [K, T, N, D]
    np.testing.assert_allclose(tokens, records[5].tokens, atol=np.abs(records[5].tokens).max() / 127)
    assert np.array_equal(shard["attn"][row], records[5].attn)
    assert np.array_equal(shard["frames"][row], records[5].frames)
    assert shard.attrs["frames_digests"][row] == records[5].frames_digest


def test_plain_webdataset_reads_the_store(tmp_path: Path) -> None:
    import numcodecs
    import webdataset as wds

    records = build_store(tmp_path, "wds", "bf16", frames="jpeg", shards=1)
    dataset = wds.WebDataset(str(tmp_path / "shards" / "shard-000000.tar"), shardshuffle=False).decode("rgb8")
    samples = list(dataset)
    assert len(samples) == len(records)
    sample, want = samples[1], records[1]
    meta = sample["view.json"]  # decoded by webdataset's json handler
    assert (meta["clip_id"], meta["view_index"], meta["codec"]) == (want.clip_id, want.view_index, "bf16")
    bits = np.load(io.BytesIO(numcodecs.Zstd().decode(sample["tokens.npy.zst"])))
    tokens = (bits.astype(np.uint32) << 16).view(np.float32)  # bfloat16 bits are a float32's top half
    np.testing.assert_allclose(tokens, want.tokens, rtol=4e-3, atol=1e-6)
    assert np.array_equal(np.load(io.BytesIO(numcodecs.Zstd().decode(sample["attn.npy.zst"]))), want.attn)
    assert sample["frame002.jpg"].shape == (H, W, 3)  # decoded by webdataset's image handler


# --------------------------------------------------------------------------------------------------
# streaming


def test_wds_records_split_by_node_and_shuffle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = build_store(tmp_path, "wds", "fp16", shards=4, clips=1)
    all_keys = {(r.clip_id, r.view_index) for r in records}
    ordered = [(r.clip_id, r.view_index) for r in wds_records(tmp_path)]
    assert ordered == [(r.clip_id, r.view_index) for r in records]

    parts = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        parts.append([(r.clip_id, r.view_index) for r in wds_records(tmp_path, shuffle=3, seed=7)])
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert len(parts[0]) == len(parts[1]) == 4
    assert set(parts[0]) | set(parts[1]) == all_keys and not set(parts[0]) & set(parts[1])

    def order(seed: int, epoch: int) -> list:
        return [(r.clip_id, r.view_index) for r in wds_records(tmp_path, shuffle=8, seed=seed, epoch=epoch)]

    assert order(1, 0) == order(1, 0)  # deterministic
    assert order(1, 0) != order(1, 1) and sorted(order(1, 1)) == sorted(ordered)
    stream = wds_records(tmp_path, shuffle=8, seed=1)
    stream.set_epoch(1)
    assert [(r.clip_id, r.view_index) for r in stream] == order(1, 1)


def test_wds_records_split_by_dataloader_worker(tmp_path: Path) -> None:
    records = build_store(tmp_path, "wds", "fp16", shards=2, clips=1, views=2)
    loader = torch.utils.data.DataLoader(wds_records(tmp_path), batch_size=None, num_workers=2,
                                         collate_fn=lambda r: (r.clip_id, r.view_index))
    got = list(loader)
    assert sorted(got) == sorted((r.clip_id, r.view_index) for r in records)


def test_wds_records_from_url_pattern(tmp_path: Path) -> None:
    records = build_store(tmp_path, "wds", "fp32", shards=2, clips=1, views=1)
    pattern = str(tmp_path / "shards" / "shard-{000000..000001}.tar")
    got = list(wds_records(pattern))
    for g, want in zip(got, records, strict=True):
        assert_same_record(g, want, "fp32", "none")


# --------------------------------------------------------------------------------------------------
# damage


def _shard_file(root: Path, array: str) -> Path:
    """The single file holding every chunk of ``array`` in shard 0."""
    files = list((root / "shards" / "shard-000000.zarr" / array / "c").rglob("*"))
    (path,) = [f for f in files if f.is_file()]
    return path


def test_zarr_deleted_shard_file(tmp_path: Path) -> None:
    records = build_store(tmp_path, "zarr", "fp16", shards=1)
    path = _shard_file(tmp_path, "tokens")
    path.unlink()
    with pytest.raises(StoreDamagedError, match="chunks missing") as err:
        CacheReader(tmp_path).get(records[0].clip_id, 0)
    assert err.value.path == str(path)


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_zarr_corrupted_or_truncated_shard_file(tmp_path: Path, compressor: str) -> None:
    records = build_store(tmp_path, "zarr", "fp32", compressor, shards=1)
    path = _shard_file(tmp_path, "tokens")
    data = bytearray(path.read_bytes())
    data[40] ^= 0x10  # one flipped bit inside the first chunk
    path.write_bytes(bytes(data))
    with pytest.raises(StoreDamagedError, match=r"row 0: .*checksum") as err:
        CacheReader(tmp_path).get(records[0].clip_id, 0)
    assert err.value.path == str(path)
    path.write_bytes(bytes(data[: len(data) // 2]))  # cut: the shard index at the end is gone
    with pytest.raises(StoreDamagedError, match="row 1"):
        CacheReader(tmp_path).get(records[1].clip_id, 1)


def test_zarr_bad_metadata_and_index(tmp_path: Path) -> None:
    records = build_store(tmp_path, "zarr", "fp16", shards=1)
    meta = tmp_path / "shards" / "shard-000000.zarr" / "zarr.json"
    good = meta.read_text()
    meta.write_text(good[:-20])
    with pytest.raises(StoreDamagedError, match="cannot open the shard's zarr group") as err:
        CacheReader(tmp_path).get(records[0].clip_id, 0)
    assert "shard-000000.zarr" in err.value.path
    meta.write_text(good)
    (tmp_path / "index.json").write_text('{"format": 1, "layout": "zarr", "shards": [')
    with pytest.raises(StoreDamagedError, match="index.json: not valid JSON"):
        CacheReader(tmp_path)
    (tmp_path / "index.json").unlink()
    with pytest.raises(StoreDamagedError, match="index.json: missing"):
        CacheReader(tmp_path)


def test_zarr_shard_disagreeing_with_index(tmp_path: Path) -> None:
    records = build_store(tmp_path, "zarr", "fp16", shards=1)
    index = read_index(tmp_path)
    index["shards"][0]["records"][0][1] = 7
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(StoreDamagedError, match="differ from index.json"):
        CacheReader(tmp_path).get(records[1].clip_id, 1)


def _member_offsets(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def test_wds_truncated_tar(tmp_path: Path) -> None:
    records = build_store(tmp_path, "wds", "fp16", shards=1)
    path = tmp_path / "shards" / "shard-000000.tar"
    data = path.read_bytes()
    members = _member_offsets(path)
    last = members[-1]
    for cut, reason in [
        (last.offset_data + last.size // 2, "unreadable tar|incomplete sample"),  # inside an entry
        (members[-4].offset, "3 samples, index.json lists 4"),  # a whole sample lost at a header boundary
    ]:
        path.write_bytes(data[:cut])
        with pytest.raises(StoreDamagedError, match=reason) as err:
            list(CacheReader(tmp_path).iter_shard("shard-000000"))
        assert err.value.path == str(path)
        with pytest.raises(StoreDamagedError):
            list(wds_records(tmp_path))
    assert len(records) == 4


@pytest.mark.parametrize("compressor", ["none", "zstd"])
def test_wds_corrupted_entry(tmp_path: Path, compressor: str) -> None:
    build_store(tmp_path, "wds", "fp32", compressor, shards=1)
    path = tmp_path / "shards" / "shard-000000.tar"
    entry = "tokens.npy.zst" if compressor == "zstd" else "tokens.npy"
    tokens = next(m for m in _member_offsets(path) if m.name.endswith(entry))
    data = bytearray(path.read_bytes())
    data[tokens.offset_data + tokens.size - 9] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(StoreDamagedError, match=r"sample shard-000000_000_000000: entry tokens\.npy.*CRC32"):
        list(CacheReader(tmp_path).iter_shard("shard-000000"))


# --------------------------------------------------------------------------------------------------
# atomic writes


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped writer's file
@pytest.mark.parametrize("layout", ["zarr", "wds"])
def test_abort_and_unclosed_writers_leave_no_final_shard(tmp_path: Path, layout: str) -> None:
    shards = tmp_path / "shards"
    init_store_root(tmp_path, layout, {})
    writer = open_shard_writer(layout, shards, "shard-000000", "fp16")
    writer.add(make_record("a", 0, 0, frames=False))
    writer.abort()
    assert not [p for p in shards.iterdir() if p.name.startswith((".tmp-", "shard-"))]

    writer = open_shard_writer(layout, shards, "shard-000001", "fp16")  # a "crash": never closed
    writer.add(make_record("a", 0, 0, frames=False))
    del writer
    gc.collect()
    assert not list(shards.glob("shard-000001*"))

    # The re-run of that shard replaces any leftover temporary and lands under the final name.
    writer = open_shard_writer(layout, shards, "shard-000001", "fp16")
    writer.add(make_record("a", 0, 0, frames=False))
    info = writer.close()
    assert info["num_records"] == 1 and info["records"] == [["a", 0]] and info["nbytes"] > 0
    assert Path(info["path"]).name.startswith("shard-000001.")
    assert not list(shards.glob(".tmp-*"))


def test_zarr_close_replaces_a_stale_final_shard(tmp_path: Path) -> None:
    """A run killed after the rename but before its sidecar redoes the shard; the old copy is replaced."""
    for clip in ("old", "new"):
        writer = open_shard_writer("zarr", tmp_path / "shards", "shard-000000", "fp32")
        writer.add(make_record(clip, 0, 1))
        info = writer.close()
    write_index(tmp_path, "zarr", [info])
    (tmp_path / "spec.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["shard-000000.zarr"]
    assert CacheReader(tmp_path).keys == [("new", 0)]
    assert CacheReader(tmp_path).get("new", 0).clip_id == "new"


def test_writer_rejects_records_that_do_not_fit(tmp_path: Path) -> None:
    writer = open_shard_writer("zarr", tmp_path, "shard-000000", "fp16")
    writer.add(make_record("a", 0, 0))
    with pytest.raises(RecordError, match="'b' view 0: shapes"):
        writer.add(make_record("b", 0, 1, visible=2))
    with pytest.raises(RecordError, match="'a' view 0: already in this shard"):
        writer.add(make_record("a", 0, 5))
    bad = make_record("c", 0, 2)
    bad.tokens = bad.tokens.astype(np.float64)
    with pytest.raises(RecordError, match="tokens must be a float32"):
        writer.add(bad)
    writer.abort()


# --------------------------------------------------------------------------------------------------
# record, index, root


def test_record_validation_names_the_problem() -> None:
    rec = make_record("clip", 1, 0, visible=2)
    assert rec.validate() is rec and rec.mode == "visible"
    rec.visible_idx = rec.visible_idx[:, :, ::-1].copy()
    with pytest.raises(RecordError, match="record 'clip' view 1: visible_idx must be strictly increasing"):
        rec.validate()
    rec = make_record("clip", 1, 0)
    rec.attn = rec.attn[:2]
    with pytest.raises(RecordError, match="attn has T=2 frames but the view has 3"):
        rec.validate()
    rec = make_record("clip", 1, 0)
    rec.tokens[0, 0, 0, 0] = np.nan
    with pytest.raises(RecordError, match="tokens contains NaN"):
        rec.validate()
    rec = make_record("clip", 1, 0)
    rec.frames_digest = "abc"
    with pytest.raises(RecordError, match="frames_digest"):
        rec.validate()


def test_frames_digest() -> None:
    import hashlib

    frames = smooth_frames(0)
    digest = frames_digest(frames)
    assert digest == "sha256:" + hashlib.sha256(frames.tobytes()).hexdigest()
    strided = np.asfortranarray(frames)  # same pixels, other memory order: same digest
    assert frames_digest(strided) == digest
    with pytest.raises(ValueError, match=r"uint8 \[T, 3, H, W\]"):
        frames_digest(frames.transpose(0, 2, 3, 1))


def test_write_index_sorts_and_keeps_only_index_fields(tmp_path: Path) -> None:
    infos = [
        {"name": "shard-000001", "num_records": 1, "nbytes": 10, "records": [["b", 0]], "failures": [], "path": "/x"},
        {"name": "shard-000000", "num_records": 2, "nbytes": 20, "records": [["a", 0], ["a", 1]]},
    ]
    index = write_index(tmp_path, "wds", infos)
    assert json.loads((tmp_path / "index.json").read_text()) == index == {
        "format": 2, "layout": "wds", "shards": [
            {"name": "shard-000000", "num_records": 2, "nbytes": 20, "records": [["a", 0], ["a", 1]]},
            {"name": "shard-000001", "num_records": 1, "nbytes": 10, "records": [["b", 0]]},
        ]}
    with pytest.raises(ValueError, match="shard-000000 listed twice"):
        write_index(tmp_path, "wds", infos + infos[1:])


def test_init_store_root_is_idempotent(tmp_path: Path) -> None:
    import zarr

    build_store(tmp_path, "zarr", "fp16", shards=1)
    init_store_root(tmp_path, "zarr", {"umt_distill_spec": "spec.json", "again": True})
    root = zarr.open_group(str(tmp_path), mode="r")
    assert root.attrs["again"] is True and root.attrs["layout"] == "zarr"
    assert list(root["shards"].group_keys()) == ["shard-000000.zarr"]
    assert len(CacheReader(tmp_path)) == 4


def test_missing_key_and_shard(tmp_path: Path) -> None:
    build_store(tmp_path, "zarr", "fp16", shards=1)
    reader = CacheReader(tmp_path)
    assert ("vids/clip.0.0.mp4", 1) in reader
    with pytest.raises(KeyError, match="no record for clip 'nope' view 0"):
        reader.get("nope", 0)
    with pytest.raises(KeyError, match="no shard 'shard-000009'"):
        list(reader.iter_shard("shard-000009"))
    assert os.path.basename(reader.shard_path("shard-000000")) == "shard-000000.zarr"


# --------------------------------------------------------------------------------------------------
# cache/FORMAT.md


def _format_example(marker: str) -> str:
    text = (Path(__file__).resolve().parents[3] / "cache" / "FORMAT.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    (block,) = [b for b in blocks if marker in b]
    return block


@pytest.mark.parametrize("codec", ["int8", "bf16", "fp16"])
def test_format_md_examples_read_the_store(tmp_path: Path, codec: str) -> None:
    """The plain-library examples in cache/FORMAT.md run and decode what the package wrote."""
    for layout, marker in (("zarr", "zarr.open_group"), ("wds", "wds.WebDataset")):
        root = tmp_path / layout
        records = build_store(root, layout, codec, "blosc" if codec == "fp16" else "zstd", shards=1)
        scope: dict = {"root": str(root)}
        exec(_format_example(marker), scope)  # zarr: row 0; wds: loops to the last sample
        want = records[0] if layout == "zarr" else records[-1]
        assert_same_record(
            TargetRecord(want.clip_id, want.view_index, want.view, want.frames_digest, scope["tokens"],
                         scope["attn"], want.pooled),
            want, codec, "none")
