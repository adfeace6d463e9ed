"""Untrusted bytes never decide an allocation: every size a reader takes from a file (tar member sizes,
zstd/blosc decoded sizes, .npy headers, JPEG dimensions, zarr shard indices, basis.npy) is checked
against the bytes that hold it or the store's spec first, and a lie is StoreDamagedError naming the file
and the byte offset or entry. Crafted headers claim 64 GiB; the real CLI runs under a 6 GiB address-space
limit, so an allocation of the claim could not even be attempted quietly."""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import google_crc32c
import numpy as np
import pytest

from umt_distill.cache.basis import codec_for_store
from umt_distill.cache.codecs import compress_bytes, decompress_bytes
from umt_distill.cache.datasets import StreamingViewDataset
from umt_distill.cache.pipeline import cache_teacher
from umt_distill.cache.record import StoreDamagedError, record_layout
from umt_distill.cache.stores import CacheReader
from umt_distill.cache.verify import verify_store
from umt_distill.cache.wds_store import decode_sample
from umt_distill.cache.wds_stream import (
    META_CHECKSUM,
    NPY_HEADER_MAX,
    BatchAssembler,
    entry_checksum,
    entry_limit,
    iter_range_samples,
    seal_meta,
)
from umt_distill.config import load_recipe
from umt_distill.testing.corpora import write_shapes_corpus

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLAIM = 64 << 30  # 64 GiB
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_shapes_corpus(tmp_path_factory.mktemp("videos"), 2, seed=10)


def _recipe(corpus: Path, store: Path, *extra: str):
    return load_recipe("stage1/tiny", [f"corpus.source={corpus}", f"cache.store={store}", "cache.num_views=2",
                                       "cache.clips_per_shard=2", "train.batch_size=1", "train.num_workers=0",
                                       "train.shuffle_buffer=0", *extra])


@pytest.fixture(scope="module")
def stores(corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stores")
    settings = {
        "wds": ["cache.layout=wds"],
        "wds-none-jpeg": ["cache.layout=wds", "cache.compressor=none", "cache.frames=jpeg"],
        "zarr": ["cache.layout=zarr"],
        "pca": ["cache.layout=zarr", "cache.codec=pca4", "cache.basis_clips=2"],
    }
    out = {}
    for name, extra in settings.items():
        cache_teacher(_recipe(corpus, root / name, *extra), progress=False)
        out[name] = root / name
    return out


def _copy(store: Path, tmp_path: Path) -> Path:
    out = tmp_path / store.name
    shutil.copytree(store, out)
    return out


def _header_with_size(header: bytes, size: int, base256: bool = True) -> bytes:
    """A ustar header block with another size (GNU base-256 or octal) and its checksum recomputed."""
    block = bytearray(header)
    block[124:136] = b"\x80" + size.to_bytes(11, "big") if base256 else f"{size:011o}\0".encode()
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}\0 ".encode()
    return bytes(block)


def _claim_in_tar(store: Path, size: int, base256: bool = True) -> tuple[Path, int, str]:
    """Give the first member of shard 0's epoch-slot group 1 a header claiming ``size`` bytes."""
    tar = store / "shards" / "shard-000000.tar"
    with tarfile.open(tar) as t:
        member = next(m for m in t.getmembers() if m.name.startswith("shard-000000_001_000000."))
    data = bytearray(tar.read_bytes())
    data[member.offset : member.offset + 512] = _header_with_size(bytes(data[member.offset : member.offset + 512]),
                                                                 size, base256)
    tar.write_bytes(bytes(data))
    return tar, member.offset, member.name


def test_a_tar_header_claiming_64_gib_is_damage_naming_the_file_and_byte(stores, corpus, tmp_path) -> None:
    store = _copy(stores["wds"], tmp_path)
    tar, offset, name = _claim_in_tar(store, CLAIM)
    said = f"{tar}: byte {offset}: member {name!r} claims {CLAIM} bytes"
    # training: the epoch that reads group 1
    ds = StreamingViewDataset(store, _recipe(corpus, store), pixels=False)
    ds.set_epoch(1)
    with pytest.raises(StoreDamagedError, match=f"byte {offset}: member .* claims {CLAIM} bytes") as err:
        list(ds)
    assert str(err.value).startswith(said)
    # the plain reader (tarfile through webdataset) names the byte too
    with pytest.raises(StoreDamagedError, match=f"unreadable tar.*byte {offset}") as err:
        list(CacheReader(store).iter_shard("shard-000000"))
    assert err.value.path == str(tar)
    report = verify_store(store, sample=4, device="cpu", deep=True)
    assert any(p.startswith(said) for p in report["problems"]), report["problems"]


def test_the_cli_reads_a_64_gib_claim_under_a_6_gib_address_space(stores, tmp_path) -> None:
    store = _copy(stores["wds"], tmp_path)
    tar, offset, _ = _claim_in_tar(store, CLAIM)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    proc = subprocess.run([sys.executable, "-m", "umt_distill", "cache", "verify", str(store), "--deep", "-n", "4",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300, env=ENV, preexec_fn=limit)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if f"{tar}: byte {offset}: member" in line]
    assert lines and all(line.startswith("mismatch: ") for line in lines), proc.stderr


@pytest.mark.parametrize("claim, base256", [(8**11 - 1, False), (CLAIM, True)])
def test_a_member_larger_than_its_group_range_or_file_is_refused_before_reading(stores, tmp_path, claim,
                                                                               base256) -> None:
    store = _copy(stores["wds"], tmp_path)
    tar, offset, _ = _claim_in_tar(store, claim, base256)
    group = json.loads((store / "index.json").read_text())["shards"][0]["groups"][1]
    with pytest.raises(StoreDamagedError, match=f"byte {offset}: .*claims {claim} bytes, past the end of its "
                                                f"group's byte range"):
        list(iter_range_samples(str(tar), group["offset"], group["nbytes"]))
    with pytest.raises(StoreDamagedError, match=f"byte {offset}: .*claims {claim} bytes, past the end of the file"):
        list(iter_range_samples(str(tar)))
    # a claim inside the file but past its group's range: the next group's bytes are not its own
    store = _copy(stores["wds"], tmp_path / "inside")
    size = group["nbytes"] + 512  # one block more than the whole group holds
    tar, offset, _ = _claim_in_tar(store, size, base256=False)
    with pytest.raises(StoreDamagedError, match=f"byte {offset}: .*claims {size} bytes, past the end of its group"):
        list(iter_range_samples(str(tar), group["offset"], group["nbytes"]))


def _sample(store: Path) -> tuple[str, str, dict, dict]:
    """The first sample of shard 0 as training reads it: (url, key, entries, meta)."""
    url = str(store / "shards" / "shard-000000.tar")
    key, entries = next(iter_range_samples(url))
    return url, key, entries, json.loads(entries["view.json"])


def _with_entry(entries: dict, meta: dict, entry: str, data: bytes) -> tuple[dict, dict]:
    """The sample with one entry's bytes replaced and its CRC-32C and view.json's own checksum redone,
    as a crafted (not merely damaged) file would have them."""
    meta = {k: v for k, v in meta.items() if k != META_CHECKSUM}
    meta["crc32c"] = {**meta["crc32c"], entry: entry_checksum(data)}
    out = {**entries, entry: data, "view.json": seal_meta(meta)}
    return out, json.loads(out["view.json"])


def _npy_claiming(data: bytes, shape: tuple[int, ...]) -> bytes:
    """An .npy file's bytes with a header declaring ``shape`` (float32) over the original data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    start = 10 + int.from_bytes(data[8:10], "little")
    return buf.getvalue() + data[start:]


def _layout(store: Path) -> dict:
    return record_layout(json.loads((store / "spec.json").read_text()), "wds")


def test_an_npy_header_claiming_64_gib_is_refused(stores) -> None:
    store = stores["wds-none-jpeg"]
    url, key, entries, meta = _sample(store)
    crafted, meta2 = _with_entry(entries, meta, "attn.npy", _npy_claiming(entries["attn.npy"], (CLAIM // 4,)))
    said = f"sample {key}: entry attn.npy: ValueError: .npy header declares float32 [{CLAIM // 4}] ({CLAIM} bytes)"
    with pytest.raises(StoreDamagedError, match=rf"{url}: {said}".replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        decode_sample({"__url__": url, "__key__": key, **crafted})
    for layout in (None, _layout(store)):
        with pytest.raises(StoreDamagedError, match=f"sample {key}: entry attn.npy: .*declares float32"):
            BatchAssembler(1, 0, None, layout=layout).add(url, key, crafted, meta2)


def test_an_npy_header_the_spec_does_not_allow_is_refused(stores) -> None:
    """A header that matches its bytes but not the spec (tokens the teacher cannot have produced)."""
    store = stores["wds-none-jpeg"]
    url, key, entries, meta = _sample(store)
    want = _layout(store)["attn"][1]  # [T, N]
    crafted, meta2 = _with_entry(entries, meta, "attn.npy", _npy_claiming(entries["attn.npy"], (want[1], want[0])))
    with pytest.raises(StoreDamagedError, match=rf"entry attn.npy: ValueError: float32 \[{want[1]}, {want[0]}\], "
                                                rf"the store's spec says float32 \[{want[0]}, {want[1]}\]"):
        BatchAssembler(1, 0, None, layout=_layout(store)).add(url, key, crafted, meta2)


def _zstd_claiming(frame: bytes, size: int) -> bytes:
    """A zstd frame whose header declares ``size`` decoded bytes (8-byte content size field)."""
    fhd = frame[4]
    assert fhd & 0b00100000, "single-segment frame"
    fcs = (1, 2, 4, 8)[fhd >> 6]
    return frame[:4] + bytes([0b11100000 | (fhd & 0b00011111)]) + struct.pack("<Q", size) + frame[5 + fcs :]


def test_a_zstd_frame_claiming_64_gib_is_refused_before_decoding(stores) -> None:
    store = stores["wds"]
    url, key, entries, meta = _sample(store)
    entry = "tokens.npy.zst"
    crafted, meta2 = _with_entry(entries, meta, entry, _zstd_claiming(entries[entry], CLAIM))
    with pytest.raises(StoreDamagedError, match=f"{url}: sample {key}: entry {entry}: ValueError: declares {CLAIM} "
                                                "decoded bytes, more than the"):
        decode_sample({"__url__": url, "__key__": key, **crafted})
    layout = _layout(store)
    dtype, shape = layout["tokens"]
    exact = int(np.prod(shape)) * dtype.itemsize
    with pytest.raises(StoreDamagedError, match=f"declares {CLAIM} decoded bytes"):
        BatchAssembler(1, 0, None, layout=layout).add(url, key, crafted, meta2)
    # with the spec's layout the bound is the entry's exact size (and room for an .npy header), not a cap
    limit = entry_limit(layout, "tokens")
    assert limit == exact + NPY_HEADER_MAX
    one_more = compress_bytes("zstd", np.zeros(limit + 1, np.uint8).tobytes())
    with pytest.raises(ValueError, match=f"declares {limit + 1} decoded bytes, more than the {limit}"):
        decompress_bytes("zstd", one_more, limit)


def test_jpeg_dimensions_are_checked_against_the_view_before_decoding(stores) -> None:
    store = stores["wds-none-jpeg"]
    url, key, entries, meta = _sample(store)
    jpeg = bytearray(entries["frame000.jpg"])
    sof = next(i for i in range(2, len(jpeg) - 1) if jpeg[i] == 0xFF and jpeg[i + 1] in (0xC0, 0xC1, 0xC2))
    jpeg[sof + 5 : sof + 9] = b"\xff\xff\xff\xff"  # 65535 x 65535: 12 GiB of pixels to a decoder
    crafted, meta2 = _with_entry(entries, meta, "frame000.jpg", bytes(jpeg))
    with pytest.raises(StoreDamagedError, match=f"sample {key}: jpeg frames: frame 0: the JPEG is 65535x65535, "
                                                "the view is 64x64"):
        decode_sample({"__url__": url, "__key__": key, **crafted})
    with pytest.raises(StoreDamagedError, match="the JPEG is 65535x65535"):
        BatchAssembler(1, 0, "array").add(url, key, crafted, meta2)


def test_a_zarr_shard_index_claiming_64_gib_is_damage(stores, tmp_path) -> None:
    store = _copy(stores["zarr"], tmp_path)
    (path,) = [p for p in (store / "shards" / "shard-000000.zarr" / "tokens" / "c").rglob("*") if p.is_file()]
    data = bytearray(path.read_bytes())
    n = 4  # 2 clips x 2 views
    start = len(data) - (16 * n + 4)
    data[start + 8 : start + 16] = CLAIM.to_bytes(8, "little")  # row 0: offset 0, 64 GiB
    data[-4:] = google_crc32c.value(bytes(data[start:-4])).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    said = f"{path}: the shard index places row 0's chunk at bytes [0, {CLAIM})"
    report = verify_store(store, sample=0, device="cpu")
    assert any(p.startswith(said) for p in report["problems"]), report["problems"]
    with pytest.raises(StoreDamagedError, match=r"row 1: cannot read its chunk: the shard index places row 0's"):
        CacheReader(store).get(*json.loads((store / "index.json").read_text())["shards"][0]["records"][1])


def test_a_basis_npy_header_claiming_64_gib_is_damage(stores, tmp_path) -> None:
    store = _copy(stores["pca"], tmp_path)
    path = store / "basis.npy"
    data = _npy_claiming(path.read_bytes(), (CLAIM // 4,))
    path.write_bytes(data)
    spec = json.loads((store / "spec.json").read_text())
    spec["basis"]["sha256"] = "sha256:" + hashlib.sha256(data).hexdigest()  # crafted: the digest agrees
    (store / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(StoreDamagedError, match=f"basis.npy: not a valid .npy file: .npy header declares float32 "
                                                rf"\[{CLAIM // 4}\]"):
        codec_for_store(store)
