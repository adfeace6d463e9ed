"""Reading stores from object storage, against real servers on 127.0.0.1 (moto's S3 server, an HTTP file
server without listings) and a fault-injecting proxy: the same bytes as the local copy, only the bytes
needed, and network faults reported as the network, never as damage."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from umt_distill import storage
from umt_distill.cache.datasets import CachedViewDataset, StreamingViewDataset
from umt_distill.cache.stores import CacheReader
from umt_distill.config import load_recipe
from umt_distill.testing.servers import upload_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = ["storage.backoff_s=0.01", "storage.retries=3"]


@pytest.fixture(autouse=True)
def _fast_retries():
    storage.configure(backoff_s=0.01, retries=3)
    yield
    storage.configure(backoff_s=0.5, retries=5)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_store):
    """Both layouts in one folder the HTTP server serves (the session's fp16 stores, shared with other tests:
    the bytes travel the same whatever the codec; cache/FORMAT.md's test reads every codec)."""
    root = tmp_path_factory.mktemp("served")
    for layout in ("zarr", "wds"):
        shutil.copytree(tiny_store(layout, "fp16", "full"), root / layout)
    return root


@pytest.fixture
def remotes(served, s3_server, http_server):
    """layout -> {"local": path, "s3": url, "http": url}; the S3 copy uploaded once per session."""
    http = http_server(served, listings=False)
    out = {}
    for layout in ("zarr", "wds"):
        url = s3_server.url(f"read/{layout}")
        if not storage.exists(f"{url}/index.json"):
            upload_folder(served / layout, url)
        out[layout] = {"local": served / layout, "s3": url, "http": f"{http.url}/{layout}"}
    return out, http


def _recipe(layout: str, store, shapes_corpus, *extra: str):
    name = "stage1/tiny_wds" if layout == "wds" else "stage1/tiny"
    return load_recipe(name, [f"corpus.source={shapes_corpus}", f"cache.store={store}", "cache.codec=fp16",
                              "train.pixels_from=video", *FAST, *extra])


def _batches(layout: str, store, shapes_corpus) -> list[dict]:
    from umt_distill.data.corpus import read_corpus

    cfg = _recipe(layout, store, shapes_corpus)
    rows = {r.id: r for r in read_corpus(cfg.corpus.source)}
    if layout == "wds":
        ds = StreamingViewDataset(store, cfg, rows, pixels=False)
        ds.set_epoch(1)
        return list(ds)
    ds = CachedViewDataset(store, cfg, rows, pixels=False)
    ds.set_epoch(1)
    return [ds.__getitems__([0, 3, 5]), ds.__getitems__([7, 1])]


def _same(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("layout", ["zarr", "wds"])
def test_s3_and_http_give_the_local_batches_byte_for_byte(remotes, shapes_corpus, layout) -> None:
    stores, http = remotes
    local = _batches(layout, stores[layout]["local"], shapes_corpus)
    assert local
    for where in ("s3", "http"):
        _same(local, _batches(layout, stores[layout][where], shapes_corpus))
    # The HTTP server has no listings: nothing read a folder, and no request failed.
    assert all(e.status in (200, 206) for e in http.log), [e for e in http.log if e.status not in (200, 206)]
    assert not any(e.path.endswith("/") for e in http.log)


def test_random_access_fetches_the_record_ranges_in_coalesced_requests(remotes) -> None:
    """A batch of zarr records: one request per array file and coalesced run of chunks, never the whole
    shard file, and the bytes fetched for chunks are the chunks' bytes."""
    stores, http = remotes
    reader = CacheReader(stores["zarr"]["http"])
    keys = reader.keys
    reader.get_stored_many(keys[:1])  # opens the shard, reads its metadata and shard indexes
    http.clear_log()
    storage.STATS.reset()
    reader.get_stored_many(keys[1:4])
    ranged = [e for e in http.log if e.range]
    assert ranged and len(ranged) == len(http.log)  # chunk reads only: no metadata, no index re-read
    shard = reader._zarr_shard(reader._where[keys[1]][0])
    chunk_bytes = 0
    for name in shard.arrays:
        if name != "pooled" and not name.startswith("frames"):
            chunk_bytes += sum(int(shard.chunk_ranges[name][reader._where[k][1]][1]) for k in keys[1:4])
    assert storage.STATS.bytes == chunk_bytes  # exactly the chunks (rows 1-3 are adjacent: merged)
    names = {e.path for e in ranged}
    assert len(ranged) == len(names)  # one request per array file for the three neighbouring rows


def test_a_server_cut_mid_body_or_throttling_is_retried_and_gives_the_same_batches(remotes, shapes_corpus,
                                                                                   fault_proxy, monkeypatch) -> None:
    stores, http = remotes
    proxy = fault_proxy(http.url)
    local = _batches("wds", stores["wds"]["local"], shapes_corpus)
    proxy.drop_after(20_000, times=2)
    proxy.slow_down(2)
    _same(local, _batches("wds", f"{proxy.endpoint}/wds", shapes_corpus))
    assert proxy.cuts == 2 and proxy.slowed == 2


@pytest.mark.parametrize("layout", ["zarr", "wds"])
def test_a_dead_server_is_a_network_error_naming_the_url_never_damage(remotes, shapes_corpus, fault_proxy,
                                                                      layout) -> None:
    from umt_distill.cache.record import StoreDamagedError

    _, http = remotes
    proxy = fault_proxy(http.url)
    url = f"{proxy.endpoint}/{layout}"
    cfg = _recipe(layout, url, shapes_corpus)
    ds = StreamingViewDataset(url, cfg, pixels=False) if layout == "wds" else CachedViewDataset(url, cfg, pixels=False)
    proxy.drop_after(3000, times=None)  # every connection cut: the server dies mid-body, for good
    with pytest.raises(storage.NetworkError, match=rf"{url}.*the network failed after 3 tries") as e:
        list(ds) if layout == "wds" else ds.__getitems__([0, 1, 2])
    assert not isinstance(e.value, StoreDamagedError) and "damage" not in str(e.value)
    proxy.heal()
    reader = CacheReader(url)
    proxy.refuse()
    with pytest.raises(storage.NetworkError, match="the network failed"):
        CacheReader(url)
    from umt_distill.cache.verify import check_structure

    with pytest.raises(storage.NetworkError):  # verify: not "shard data is missing"
        check_structure(url, reader.spec, reader)
    from typer.testing import CliRunner

    from umt_distill.cli import app

    result = CliRunner().invoke(app, ["cache", "info", url])  # the CLI: one line, exit status 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and "the network failed" in lines[0], result.output


def test_cache_info_and_verify_over_urls(remotes) -> None:
    from umt_distill.cache.pipeline import store_info
    from umt_distill.cache.verify import check_structure

    stores, _ = remotes
    for layout in ("zarr", "wds"):
        local = store_info(stores[layout]["local"])
        for where in ("s3", "http"):
            info = store_info(stores[layout][where])
            assert info["sizes"]["data_bytes"] > 0 and info["counts"] == local["counts"]
            reader = CacheReader(stores[layout][where])  # deep: every record read (HTTP: no listings)
            assert check_structure(stores[layout][where], reader.spec, reader, deep=where == "http") == []


@pytest.mark.parametrize("layout", ["zarr", "wds"])
def test_two_training_steps_from_s3_and_http_give_the_local_losses(remotes, shapes_corpus, tmp_path, layout) -> None:
    from umt_distill.stages.stage1 import train
    from umt_distill.training.metrics import read_metrics

    stores, _ = remotes
    losses = {}
    for where in ("local", "s3", "http"):
        out = tmp_path / where
        train(_recipe(layout, stores[layout][where], shapes_corpus, "train.max_steps=2", f"train.output_dir={out}",
                      "train.ckpt_every=100"))
        losses[where] = [m["loss"] for m in read_metrics(out / "metrics.jsonl")]
    assert len(losses["local"]) == 2
    assert losses["s3"] == losses["local"] and losses["http"] == losses["local"], losses


def test_a_run_stopped_by_the_network_resumes_at_the_exact_sample(remotes, shapes_corpus, fault_proxy,
                                                                 tmp_path: Path) -> None:
    """Four steps from the local copy, against four steps over HTTP where the server dies mid-body partway
    (the run stops with NetworkError after its last checkpoint) and the run is resumed: the same loss at
    every step and the same samples at every step in the ledger."""
    from umt_distill.stages.stage1 import train
    from umt_distill.training.ledger import read_ledger
    from umt_distill.training.metrics import read_metrics

    stores, http = remotes
    proxy = fault_proxy(http.url)
    common = ["train.max_steps=4", "train.ckpt_every=1", "train.batch_size=2", "storage.read_ahead=0"]
    straight = tmp_path / "straight"
    train(_recipe("wds", stores["wds"]["local"], shapes_corpus, *common, f"train.output_dir={straight}"))
    tar_bytes = sum(p.stat().st_size for p in (stores["wds"]["local"] / "shards").glob("*.tar"))

    run = tmp_path / "cut"
    cfg = _recipe("wds", f"{proxy.endpoint}/wds", shapes_corpus, *common, f"train.output_dir={run}")
    proxy.drop_after(tar_bytes // 3, times=None)  # a third of the way into the shards, for good
    with pytest.raises(storage.NetworkError):
        train(cfg)
    stopped_at = len(read_ledger(run / "ledger.jsonl"))
    assert stopped_at < 4
    proxy.heal()
    train(cfg)

    def by_step(folder: Path) -> dict[int, float]:
        return {m["step"]: m["loss"] for m in read_metrics(folder / "metrics.jsonl")}  # a redone step: its last

    assert by_step(run) == by_step(straight)
    assert [r["ranks"] for r in read_ledger(run / "ledger.jsonl")] == [r["ranks"] for r in read_ledger(straight / "ledger.jsonl")]


def test_the_format_md_reading_program_reads_from_s3_and_http(remotes) -> None:
    """cache/FORMAT.md §11, run with ``root`` a URL: the record the local copy gives."""
    import re

    import webdataset as wds

    fmt = (Path(__file__).resolve().parents[2] / "cache" / "FORMAT.md").read_text(encoding="utf-8")
    (program,) = [b for b in re.findall(r"```python\n(.*?)```", fmt, flags=re.DOTALL) if "zarr.open_group" in b]
    stores, _ = remotes
    saved = dict(wds.gopen_schemes)
    try:
        for layout in ("zarr", "wds"):
            want = {"root": str(stores[layout]["local"])}
            exec(compile(program, "FORMAT.md", "exec"), want)  # noqa: S102
            for where in ("s3", "http"):
                scope = {"root": stores[layout][where]}
                exec(compile(program, "FORMAT.md", "exec"), scope)  # noqa: S102 - the documented program itself
                assert (scope["clip_id"], scope["view_index"]) == (want["clip_id"], want["view_index"])
                np.testing.assert_array_equal(scope["tokens"], want["tokens"])
                np.testing.assert_array_equal(scope["attn"], want["attn"])
    finally:
        wds.gopen_schemes.clear()
        wds.gopen_schemes.update(saved)


@pytest.mark.slow
def test_loader_workers_sharing_a_cache_fetch_each_group_once(remotes, shapes_corpus, fault_proxy, tmp_path) -> None:
    """Stage 1's elastic order splits an epoch group (4 clips) between two loader workers (batches of 2):
    without a cache both fetch it whole (about 2x the bytes used), with a shared storage.cache_dir once."""
    from umt_distill.cache.stores import read_index
    from umt_distill.stages.stage1 import train

    stores, http = remotes
    proxy = fault_proxy(http.url)
    used = sum(s["groups"][0]["nbytes"] for s in read_index(stores["wds"]["local"])["shards"])  # epoch 0
    ratios = {}
    for cached in (False, True):
        proxy.response_bytes = 0
        extra = [f"storage.cache_dir={tmp_path / 'cache'}", "storage.cache_gb=1.0"] if cached else []
        train(_recipe("wds", f"{proxy.endpoint}/wds", shapes_corpus, "train.num_workers=2", "train.batch_size=2",
                      "train.max_steps=4", f"train.output_dir={tmp_path / str(cached)}", *extra))
        ratios[cached] = proxy.response_bytes / used  # headers, spec.json and index.json included
    print(f"bytes fetched / bytes used, one epoch, 2 workers: no cache {ratios[False]:.2f}, cache {ratios[True]:.2f}")
    assert ratios[False] > 1.6 and ratios[True] < 1.15, ratios
