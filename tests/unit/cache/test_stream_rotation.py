"""Without a shuffle buffer, the samples an epoch drops rotate: every clip is trained in some epoch
(a rank's batches beyond the smallest rank's, and a worker's last partial batch, are not the same clips
every epoch). Where nothing is dropped, the stream keeps the store's order."""

from __future__ import annotations

import pytest

from umt_distill.cache.datasets import StreamingViewDataset
from umt_distill.cache.pipeline import cache_teacher
from umt_distill.config import load_recipe
from umt_distill.testing.corpora import write_shapes_corpus


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("rotation")
    corpus = write_shapes_corpus(root, 10, seed=40)  # shards of 4, 4, 2 clips: rank 0 holds 6, rank 1 holds 4
    store = root / "store"
    cache_teacher(load_recipe("stage1/tiny_wds", [f"corpus.source={corpus}", f"cache.store={store}",
                                                  "cache.frames=none", "cache.num_views=1"]), progress=False)
    return store


def _trained(store, batch_size: int, world: int, epochs: int, monkeypatch) -> list[set[str]]:
    """The clips each epoch trains, over all ranks (each rank takes the smallest rank's batch count)."""
    cfg = load_recipe("stage1/tiny_wds", [f"cache.store={store}", "train.shuffle_buffer=0",
                                          f"train.batch_size={batch_size}", "train.num_workers=0"])
    per_epoch = []
    for epoch in range(epochs):
        seen: set[str] = set()
        for rank in range(world):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", str(world))
            ds = StreamingViewDataset(store, cfg, pixels=False)
            ds.set_epoch(epoch)
            steps = ds.batches_per_rank(world)
            batches = [b for _, b in zip(range(steps), ds)]
            assert len(batches) == steps
            seen |= {c for b in batches for c in b["clip_id"]}
        per_epoch.append(seen)
    return per_epoch


def test_two_ranks_without_a_shuffle_buffer_train_every_clip_over_epochs(store, monkeypatch) -> None:
    epochs = _trained(store, batch_size=2, world=2, epochs=3, monkeypatch=monkeypatch)
    assert all(len(e) == 8 for e in epochs)  # 2 ranks x 2 steps x 2 clips: 2 of 10 clips dropped per epoch
    assert len(set().union(*epochs)) == 10  # before: the same 2 clips (the end of rank 0's stream) every epoch
    assert epochs[0] != epochs[1]


def test_a_workers_partial_batch_rotates(store, monkeypatch) -> None:
    epochs = _trained(store, batch_size=3, world=1, epochs=3, monkeypatch=monkeypatch)
    assert all(len(e) == 9 for e in epochs)  # 10 clips, steps of 3: one left over per epoch
    assert len(set().union(*epochs)) == 10


def test_nothing_dropped_keeps_the_store_order(store, monkeypatch) -> None:
    cfg = load_recipe("stage1/tiny_wds", [f"cache.store={store}", "train.shuffle_buffer=0", "train.batch_size=2",
                                          "train.num_workers=0"])
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    orders = []
    for epoch in range(2):
        ds = StreamingViewDataset(store, cfg, pixels=False)
        ds.set_epoch(epoch)
        orders.append([c for b in ds for c in b["clip_id"]])
    assert orders[0] == orders[1] == sorted(orders[0], key=lambda c: int(c[1:]))
