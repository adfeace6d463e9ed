"""The training input path: WebDataset epoch-slot groups (format 2), batches in stored dtypes decoded on
the device, JPEG frames the teacher saw — each checked against the plain reference reader."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from umt_distill.testing.stores import make_record

from umt_distill.cache.record import StoreDamagedError
from umt_distill.cache.stores import CacheReader, init_store_root, open_shard_writer, write_index
from umt_distill.config import load_recipe
from umt_distill.cache.datasets import StreamingViewDataset, batch_pixels, stored_targets
from umt_distill.data.views import epoch_view
from umt_distill.cache.codecs import get_codec
from umt_distill.cache.datasets import device_targets

SEED, VIEWS, CLIPS, SHARDS = 3, 3, 5, 2


def build_wds(root: Path, codec: str = "fp16", frames: str = "none", visible: int | None = None,
              grouped: bool = True, compressor: str = "zstd") -> None:
    """A complete wds store of random records, written the way the pipeline writes (spec, shards, index)."""
    init_store_root(root, "wds", {})
    spec = {"layout": "wds", "codec": {"name": codec, "compressor": compressor}, "frames": frames,
            "views": {"num_views": VIEWS, "seed": SEED}, "mode": {"mode": "visible" if visible else "full"}}
    (root / "spec.json").write_text(json.dumps(spec))
    infos = []
    for s in range(SHARDS):
        options = {"num_views": VIEWS, "view_seed": SEED} if grouped else {}
        writer = open_shard_writer("wds", root / "shards", f"shard-{s:06d}", codec, compressor, frames=frames, **options)
        for c in range(CLIPS):
            for v in range(VIEWS):
                writer.add(make_record(f"vids/clip.{s}.{c}.mp4", v, seed=100 * s + 10 * c + v, visible=visible,
                                       frames=frames != "none"))
        infos.append(writer.close())
    write_index(root, "wds", infos)


def _cfg(batch_size: int = 2, pixels_from: str = "store", workers: int = 0, codec: str = "fp16"):
    return load_recipe("stage1/tiny", [f"seed={SEED}", f"train.batch_size={batch_size}", f"train.pixels_from={pixels_from}",
                                       f"train.num_workers={workers}", "train.shuffle_buffer=0", f"cache.codec={codec}"])


def test_each_group_holds_the_views_of_its_epoch_slot_and_the_tar_stays_plain(tmp_path: Path) -> None:
    import webdataset as wds

    build_wds(tmp_path)
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["format"] == 2
    for shard in index["shards"]:
        tar = tmp_path / "shards" / f"{shard['name']}.tar"
        groups = shard["groups"]
        assert [g["num_records"] for g in groups] == [CLIPS] * VIEWS
        assert groups[0]["offset"] == 0  # contiguous ranges, in slot order
        assert all(a["offset"] + a["nbytes"] == b["offset"] for a, b in zip(groups, groups[1:]))
        with tarfile.open(tar) as t:  # a standard tar: members of group g lie inside its byte range
            for m in t.getmembers():
                g = int(m.name.split("_")[1])  # <shard>_<group>_<row>.<entry>
                assert groups[g]["offset"] <= m.offset < groups[g]["offset"] + groups[g]["nbytes"]
        for slot in range(VIEWS):  # every sample of group g is the view that epochs g, g + K, ... show
            start = sum(g["num_records"] for g in groups[:slot])
            for clip, view in shard["records"][start : start + CLIPS]:
                assert all(epoch_view(SEED, clip, e, VIEWS) == view for e in (slot, slot + VIEWS))
        # plain webdataset still reads every sample of the shard, end to end
        samples = list(wds.WebDataset(str(tar), shardshuffle=False))
        assert len(samples) == CLIPS * VIEWS


def _clip_views(ds: StreamingViewDataset) -> list[tuple[str, int]]:
    return [(c, int(v)) for batch in ds for c, v in zip(batch["clip_id"], batch["view_index"])]


@pytest.mark.parametrize("grouped", [True, False])
def test_an_epoch_streams_each_clip_once_in_its_epoch_view_and_reads_only_its_group(tmp_path: Path, grouped: bool,
                                                                                    monkeypatch) -> None:
    from umt_distill.cache import datasets  # reads through the iter_range_samples it imported

    build_wds(tmp_path, grouped=grouped)
    if grouped:
        ds = StreamingViewDataset(tmp_path, _cfg(batch_size=1), pixels=False)
    else:
        with pytest.warns(UserWarning, match="reads all 3 views of every clip"):
            ds = StreamingViewDataset(tmp_path, _cfg(batch_size=1), pixels=False)
    read = []
    real = datasets.iter_range_samples
    monkeypatch.setattr(datasets, "iter_range_samples", lambda url, o=0, n=None: (read.append(n), real(url, o, n))[1])
    clips = sorted({c for s in ds.shards for c, _ in s["records"]})
    for epoch in range(VIEWS + 1):
        ds.set_epoch(epoch)
        read.clear()
        got = _clip_views(ds)
        assert sorted(got) == sorted((c, epoch_view(SEED, c, epoch, VIEWS)) for c in clips)
        tar_bytes = sum((tmp_path / "shards" / f"{s['name']}.tar").stat().st_size for s in ds.shards)
        if grouped:  # one group per shard: 1/K of the data
            assert sum(read) == sum(s["groups"][epoch % VIEWS]["nbytes"] for s in ds.shards) < tar_bytes / (VIEWS - 0.5)
        else:  # format-1 order: the whole tar
            assert read == [None] * SHARDS
    assert ds.batches_per_rank(1) == SHARDS * CLIPS


CASES = [("fp32", "full", "none"), ("fp16", "full", "raw"), ("bf16", "full", "none"), ("int8", "full", "jpeg"),
         ("int8", "visible", "raw"), ("fp16", "visible", "jpeg")]


@pytest.mark.parametrize("codec, mode, frames", CASES)
def test_batches_decoded_on_the_device_equal_the_float32_reference(tmp_path: Path, codec: str, mode: str,
                                                                   frames: str) -> None:
    build_wds(tmp_path, codec, frames, visible=2 if mode == "visible" else None)
    reader = CacheReader(tmp_path)
    ds = StreamingViewDataset(tmp_path, _cfg(batch_size=3, codec=codec), pixels=frames != "none")
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for batch in ds:
            assert batch["tokens" if codec in ("fp32", "fp16", "bf16") else "tokens.q"].dtype == {
                "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.uint16, "int8": torch.int8}[codec]
            got = device_targets(batch, get_codec(codec), torch.device("cpu"))
            for b, (clip, view) in enumerate(zip(batch["clip_id"], batch["view_index"].tolist())):
                ref = reader.get(clip, view)  # float32 decoded on the CPU by the plain webdataset reader
                m = epoch % 2
                want = ref.tokens if mode == "full" else ref.tokens[m]
                assert torch.equal(got[b], torch.from_numpy(want)), (codec, clip)  # bit-identical, int8 included
                assert torch.equal(batch["attn"][b], torch.from_numpy(ref.attn))
                if mode == "visible":
                    assert torch.equal(batch["visible_idx"][b], torch.from_numpy(ref.visible_idx[m]))
                if frames != "none":
                    assert torch.equal(batch["pixels"][b], torch.from_numpy(ref.frames))


def test_jpeg_frames_shipped_as_bytes_decode_on_the_device_to_the_worker_pixels(tmp_path: Path) -> None:
    build_wds(tmp_path, "int8", "jpeg")
    in_worker = list(StreamingViewDataset(tmp_path, _cfg(batch_size=2)))
    shipped = list(StreamingViewDataset(tmp_path, _cfg(batch_size=2), jpeg_device="cpu"))
    assert "pixels" not in shipped[0] and shipped[0]["frames_jpeg"].dtype == torch.uint8
    for a, b in zip(in_worker, shipped, strict=True):
        assert torch.equal(a["pixels"], batch_pixels(b, torch.device("cpu")))


def test_zarr_items_keep_stored_dtypes(tmp_path: Path) -> None:
    from umt_distill.testing.stores import build_store

    from umt_distill.cache.datasets import CachedViewDataset

    build_store(tmp_path, "zarr", "int8", frames="raw")
    spec = json.loads((tmp_path / "spec.json").read_text())
    spec["views"] = {"num_views": 2, "seed": 0}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    ds = CachedViewDataset(tmp_path, _cfg(codec="int8"))
    reader = CacheReader(tmp_path)
    item = ds[0]
    assert item["tokens.q"].dtype == torch.int8 and "pooled" not in item
    ref = reader.get(item["clip_id"], item["view_index"])
    batch = torch.utils.data.default_collate([item])
    assert torch.equal(device_targets(batch, get_codec("int8"), torch.device("cpu"))[0], torch.from_numpy(ref.tokens))
    assert torch.equal(item["pixels"], torch.from_numpy(ref.frames))
    assert set(stored_targets({"attn": ref.attn, "tokens": ref.tokens}, "full", 0)) == {"attn", "tokens"}
    # a batch is read in one call into zarr (chunks of several shards at once): the same items
    batch_items = ds.__getitems__([3, 0, 2])
    for got, want in zip(batch_items, [ds[3], ds[0], ds[2]], strict=True):
        assert got.keys() == want.keys() and got["clip_id"] == want["clip_id"]
        assert all(torch.equal(got[k], want[k]) for k in got if isinstance(got[k], torch.Tensor))


def test_a_wrong_group_range_or_a_truncated_tar_names_the_tar(tmp_path: Path) -> None:
    build_wds(tmp_path)
    index = json.loads((tmp_path / "index.json").read_text())
    index["shards"][0]["groups"][1]["offset"] += 512  # no longer at a member header
    (tmp_path / "index.json").write_text(json.dumps(index))
    ds = StreamingViewDataset(tmp_path, _cfg(batch_size=1), pixels=False)
    ds.set_epoch(1)
    with pytest.raises(StoreDamagedError, match=r"shard-000000\.tar"):
        list(ds)
    build_wds(tmp_path / "b")
    tar = tmp_path / "b" / "shards" / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    ds = StreamingViewDataset(tmp_path / "b", _cfg(batch_size=1), pixels=False)
    ds.set_epoch(VIEWS - 1)
    with pytest.raises(StoreDamagedError, match=r"shard-000001\.tar.*truncated"):
        list(ds)


# --------------------------------------------------------------------------------------------------
# through cache-teacher and the stage-1 loop


@pytest.fixture(scope="module")
def corpus(shapes_corpus) -> Path:
    return shapes_corpus  # 8 clips, seed 200: written once per session (conftest)


@pytest.fixture(scope="module")
def jpeg_store(corpus, tmp_path_factory) -> Path:
    from umt_distill.cache.pipeline import cache_teacher

    store = tmp_path_factory.mktemp("ipstore") / "wds"
    cache_teacher(load_recipe("stage1/tiny_wds", [f"corpus.source={corpus}", f"cache.store={store}", "cache.codec=fp32"]),
                  progress=False)
    return store


@pytest.mark.parametrize("layout", ["wds", "zarr"])
def test_with_jpeg_frames_the_teacher_saw_the_decoded_pixels(corpus, jpeg_store, tmp_path, layout) -> None:
    from umt_distill.cache.pipeline import cache_teacher
    from umt_distill.teachers.build import build_teacher
    from umt_distill.cache.record import frames_digest

    store = jpeg_store
    if layout == "zarr":
        store = tmp_path / "zarr"
        cache_teacher(load_recipe("stage1/tiny_wds", [f"corpus.source={corpus}", f"cache.store={store}", "cache.codec=fp32",
                                                      "cache.layout=zarr"]), progress=False)
    cfg = load_recipe("stage1/tiny_wds", [f"corpus.source={corpus}", f"cache.store={store}", "cache.codec=fp32"])
    teacher = build_teacher(cfg, torch.device("cpu"))
    records = list(CacheReader(store))
    assert len(records) == 16
    for rec in records:
        assert frames_digest(rec.frames) == rec.frames_digest  # the digest is of the decoded JPEGs
    with torch.no_grad():
        out = teacher(torch.from_numpy(np.stack([r.frames for r in records[:4]])))
    # the teacher, run on the pixels training decodes, gives the stored targets
    assert torch.allclose(out.tokens, torch.from_numpy(np.stack([r.tokens for r in records[:4]])), atol=1e-5)


class _ReferenceStream(torch.utils.data.IterableDataset):
    """The pre-format-2 path: float32 records decoded on the CPU, this epoch's view kept, store order."""

    def __init__(self, store: Path, seed: int, num_views: int) -> None:
        self.reader, self.seed, self.num_views, self.epoch = CacheReader(store), seed, num_views, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        for rec in self.reader:
            if rec.view_index == epoch_view(self.seed, rec.clip_id, self.epoch, self.num_views):
                yield {"clip_id": rec.clip_id, "view_index": rec.view_index, "pixels": torch.from_numpy(rec.frames),
                       "attn": torch.from_numpy(rec.attn), "tokens": torch.from_numpy(rec.tokens)}


def test_training_from_the_stream_gives_the_losses_of_the_float32_reference(corpus, jpeg_store, tmp_path,
                                                                           monkeypatch) -> None:
    from umt_distill.stages import stage1
    from umt_distill.training.metrics import read_metrics

    def losses(run: Path) -> list[float]:
        cfg = load_recipe("stage1/tiny_wds", [f"corpus.source={corpus}", f"cache.store={jpeg_store}", "cache.codec=fp32",
                                              f"train.output_dir={run}", "train.pixels_from=store", "train.max_steps=10",
                                              "train.batch_size=2", "train.shuffle_buffer=0", "train.ckpt_every=100"])
        stage1.train(cfg)
        return [m["loss"] for m in read_metrics(run / "metrics.jsonl")]

    fast = losses(tmp_path / "fast")  # 10 steps = 2.5 epochs of 4 steps: both epoch slots
    reference = _ReferenceStream(jpeg_store, seed=0, num_views=2)

    def reference_data(cfg, env):
        def make_loader():
            return torch.utils.data.DataLoader(reference, batch_size=cfg.train.batch_size, drop_last=True)

        return reference, None, make_loader, 8

    monkeypatch.setattr(stage1, "build_data", reference_data)
    monkeypatch.setattr("umt_distill.stages.parts.target_codec", lambda store, name: get_codec("fp32"))
    assert losses(tmp_path / "reference") == fast


def test_a_basis_codec_streams_from_wds_and_decodes_on_the_device_like_the_reference(corpus, tmp_path) -> None:
    from umt_distill.cache.pipeline import cache_teacher
    from umt_distill.cache.datasets import target_codec

    store = tmp_path / "pca"
    cfg = load_recipe("stage1/tiny_wds", [f"corpus.source={corpus}", f"cache.store={store}", "cache.codec=pca8",
                                          "train.pixels_from=store", "train.batch_size=4", "train.shuffle_buffer=0"])
    cache_teacher(cfg, progress=False)
    reader = CacheReader(store)  # binds the store's basis: the float32 reference
    codec = target_codec(str(store), "pca8")  # what the step uses: bound to the same basis
    ds = StreamingViewDataset(store, cfg)
    n = 0
    for batch in ds:
        got = device_targets(batch, codec, torch.device("cpu"))
        for b, (clip, view) in enumerate(zip(batch["clip_id"], batch["view_index"].tolist())):
            torch.testing.assert_close(got[b], torch.from_numpy(reader.get(clip, view).tokens), rtol=0, atol=1e-6)
            n += 1
    assert n == 8


def test_two_workers_stream_the_same_batches_as_one_process(tmp_path: Path) -> None:
    build_wds(tmp_path, "int8", "raw")
    one = {(c, int(v)): b for b in StreamingViewDataset(tmp_path, _cfg(batch_size=1))
           for c, v in zip(b["clip_id"], b["view_index"])}
    ds = StreamingViewDataset(tmp_path, _cfg(batch_size=1, workers=2))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    got = {(c, int(v)): b for b in loader for c, v in zip(b["clip_id"], b["view_index"])}  # batches in shared memory
    assert got.keys() == one.keys() and len(got) == ds.batches_per_rank(1) == SHARDS * CLIPS
    for key, b in got.items():
        assert all(torch.equal(b[k], one[key][k]) for k in ("tokens.q", "tokens.scale", "attn", "pixels"))
    with pytest.raises(ValueError, match="train.num_workers=2, the DataLoader runs 0 workers"):
        list(ds)


@pytest.mark.distributed
def test_two_ranks_train_from_the_stream_with_equal_steps(corpus, jpeg_store, tmp_path) -> None:
    import os
    import subprocess
    import sys

    from umt_distill.training.metrics import read_metrics

    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "umt_distill",
         "train", "stage1/tiny_wds", f"corpus.source={corpus}", f"cache.store={jpeg_store}", "cache.codec=fp32",
         f"train.output_dir={out}", "train.pixels_from=store", "train.max_steps=4", "train.batch_size=2",
         "train.ckpt_every=4"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]  # 2 steps per epoch per rank


def test_ranks_stream_disjoint_shards_covering_the_store(tmp_path: Path, monkeypatch) -> None:
    build_wds(tmp_path)
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append({c for b in StreamingViewDataset(tmp_path, _cfg(batch_size=1), pixels=False) for c in b["clip_id"]})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == SHARDS * CLIPS
