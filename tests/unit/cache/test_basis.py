"""pca<r> stores: cache-teacher fits the basis on a corpus sample, stores it once, and readers refuse a
store whose basis is missing or differs from the spec's digest."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from umt_distill.cache.basis import BASIS_FILE, codec_for_store, sample_clip_indices
from umt_distill.cache.pipeline import cache_teacher
from umt_distill.cache.store_folder import CacheError
from umt_distill.cache.record import StoreDamagedError
from umt_distill.testing.corpora import write_shapes_corpus
from umt_distill.cache.spec import SpecMismatchError
from umt_distill.cache.stores import CacheReader
from umt_distill.config import load_recipe

NUM_CLIPS = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_shapes_corpus(tmp_path_factory.mktemp("basis_videos"), NUM_CLIPS, seed=200)


def _recipe(corpus: Path, store: Path, codec: str, *extra: str):
    return load_recipe("stage1/tiny", [f"corpus.source={corpus}", f"cache.store={store}", f"cache.codec={codec}",
                                       "cache.basis_clips=2", *extra])


@pytest.fixture(scope="module")
def stores(corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("basis_stores")
    out = {}
    for codec in ("fp32", "pca16"):
        out[codec] = root / codec
        cache_teacher(_recipe(corpus, out[codec], codec), progress=False)
    return out


def _copy(store: Path, tmp_path: Path) -> Path:
    dst = tmp_path / store.name
    shutil.copytree(store, dst)
    return dst


def test_sample_clips_spread_over_the_corpus() -> None:
    assert sample_clip_indices(100, 5) == [0, 25, 50, 74, 99]
    assert sample_clip_indices(3, 32) == [0, 1, 2]
    assert sample_clip_indices(0, 4) == []


def test_cache_teacher_stores_the_basis_once_with_its_digest(stores) -> None:
    store = stores["pca16"]
    spec = json.loads((store / "spec.json").read_text())
    entry = spec["basis"]
    data = (store / BASIS_FILE).read_bytes()
    assert entry["sha256"] == "sha256:" + hashlib.sha256(data).hexdigest()
    basis = np.load(store / BASIS_FILE)  # numpy alone reads it
    K = spec["teacher"]["layers"]
    assert basis.dtype == np.float32 and basis.shape == (K, 17, spec["teacher"]["D"]) and entry["shape"] == list(basis.shape)
    assert entry["fit"]["clips"] == 2 and spec["codec"] == {"name": "pca16", "compressor": "zstd", "basis_clips": 2}
    assert not list(store.glob("**/basis*.npy"))[1:], "one basis per store, not per shard"


def test_pca_store_decodes_to_the_codec_round_trip_of_the_fp32_targets(stores) -> None:
    ref, got = CacheReader(stores["fp32"]), CacheReader(stores["pca16"])
    codec = codec_for_store(stores["pca16"])
    assert codec.basis is not None and got.keys == ref.keys
    for key in ref.keys:
        want = codec.decode(codec.encode(ref.get(*key).tokens))  # [K, T, N, D]
        np.testing.assert_allclose(got.get(*key).tokens, want, rtol=1e-5, atol=1e-5)


def test_a_store_without_its_basis_is_refused(stores, tmp_path) -> None:
    store = _copy(stores["pca16"], tmp_path)
    (store / BASIS_FILE).unlink()
    with pytest.raises(StoreDamagedError, match=r"basis\.npy: missing"):
        CacheReader(store).get("v0", 0)
    with pytest.raises(StoreDamagedError, match=r"basis\.npy: missing"):
        codec_for_store(store)


def test_a_store_with_another_basis_is_refused(stores, tmp_path) -> None:
    store = _copy(stores["pca16"], tmp_path)
    basis = np.load(store / BASIS_FILE)
    basis[:, 1] *= 1.01  # one direction changed: every record would decode to other numbers
    np.save(store / BASIS_FILE, basis)
    with pytest.raises(StoreDamagedError, match="differs from spec.json's basis"):
        CacheReader(store).get("v0", 0)


def test_a_spec_without_a_basis_entry_is_refused(stores, tmp_path) -> None:
    store = _copy(stores["pca16"], tmp_path)
    spec = json.loads((store / "spec.json").read_text())
    del spec["basis"]
    (store / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(StoreDamagedError, match="needs a basis, but spec.json records none"):
        codec_for_store(store)


def test_training_from_a_store_with_a_replaced_basis_is_refused(stores, corpus, tmp_path) -> None:
    from umt_distill.data.corpus import read_corpus
    from umt_distill.cache.datasets import CachedViewDataset

    store = _copy(stores["pca16"], tmp_path)
    np.save(store / BASIS_FILE, np.load(store / BASIS_FILE) * 1.5)
    cfg = _recipe(corpus, store, "pca16")
    ds = CachedViewDataset(store, cfg, {r.id: r for r in read_corpus(corpus)})
    with pytest.raises(StoreDamagedError, match="basis"):
        ds[0]


def test_resume_keeps_the_basis_and_refuses_a_missing_one(stores, corpus, tmp_path) -> None:
    store = _copy(stores["pca16"], tmp_path)
    before = (store / BASIS_FILE).read_bytes()
    cache_teacher(_recipe(corpus, store, "pca16"), progress=False)  # all shards finished: nothing to redo
    assert (store / BASIS_FILE).read_bytes() == before
    (store / BASIS_FILE).unlink()
    with pytest.raises(StoreDamagedError, match="missing"):
        cache_teacher(_recipe(corpus, store, "pca16"), progress=False)


def test_resume_with_another_fit_sample_is_refused(stores, corpus, tmp_path) -> None:
    store = _copy(stores["pca16"], tmp_path)
    with pytest.raises(CacheError, match="codec.basis_clips"):
        cache_teacher(_recipe(corpus, store, "pca16", "cache.basis_clips=3"), progress=False)


def test_rank_at_or_above_the_teacher_width_is_refused(corpus, tmp_path) -> None:
    from umt_distill.cache.codecs import CodecError

    with pytest.raises(CodecError, match="below the teacher's D = 32"):
        cache_teacher(_recipe(corpus, tmp_path / "s", "pca32"), progress=False)


def test_spec_check_ignores_the_derived_basis_but_not_the_codec(stores) -> None:
    from umt_distill.cache.spec import check_spec, read_spec

    spec = read_spec(stores["pca16"])
    fresh = {k: v for k, v in spec.items() if k != "basis"}  # what a recipe gives: no fitted basis
    check_spec(spec, fresh, "same recipe")
    with pytest.raises(SpecMismatchError, match="codec.name"):
        check_spec(spec, {**fresh, "codec": {**fresh["codec"], "name": "pca8"}}, "other codec")


def test_cache_verify_reports_a_pca_store_s_error_against_the_one_measured_at_write_time(stores, tmp_path) -> None:
    from umt_distill.cache.verify import verify_store

    report = verify_store(stores["pca16"], sample=2, device="cpu")
    assert report["ok"], report["problems"]
    tokens = next(f for f in report["fields"] if f["field"] == "tokens")
    assert tokens["tol"] <= tokens["min_cos"] < 0.9999  # the codec's real error, not 0, within what was measured
    store = _copy(stores["pca16"], tmp_path)
    (store / BASIS_FILE).unlink()
    with pytest.raises(CacheError, match="basis.npy: missing"):
        verify_store(store, sample=2, device="cpu")
