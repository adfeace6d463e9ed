"""Stage 1's elastic global order (data.samplers): the same samples in the same order at any world size and
number of loader workers, every sample of an epoch exactly once, for random access and for a real stream."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import default_collate

from umt_distill.cache.datasets import CachedViewDataset, ElasticStreamingViewDataset
from umt_distill.cache.stores import read_index, shard_path
from umt_distill.cache.wds_stream import iter_range_samples
from umt_distill.config import load_recipe
from umt_distill.data.samplers import (
    ElasticSampler,
    StreamOrder,
    epoch_order,
    rank_positions,
    worker_positions,
)
from umt_distill.data.views import epoch_view
from umt_distill.stages.parts import (
    build_elastic_data,
    sample_mask_generators,
    step_targets_attn,
)
from umt_distill.training.ledger import Ledger, epoch_samples, read_ledger
from umt_distill.training.loop import sample_clock
from umt_distill.training.optim import cosine_schedule


def _run_legs(size: int, seed: int, legs: list[tuple[int, int]], per_rank: int) -> dict[int, int]:
    """Legs of (world size, steps) on ElasticSamplers, each resumed where the last stopped:
    {global position: stream index} of every sample read."""
    position, seen = 0, {}
    for world, steps in legs:
        end = position + steps * world * per_rank
        for rank in range(world):
            sampler = ElasticSampler(size, seed, rank, world)
            sampler.set_position(position, end)
            got = list(sampler)
            assert len(got) == len(sampler) == steps * per_rank  # every rank takes whole steps
            for p, index in zip(rank_positions(position, end, rank, world), got):
                assert p not in seen
                seen[p] = index
        position = end
    return seen


@pytest.mark.parametrize("legs", [[(2, 3), (1, 9)], [(2, 3), (3, 3)], [(1, 5), (2, 4)], [(2, 1), (1, 3), (2, 2), (3, 3)]])
def test_a_run_resumed_at_another_world_size_reads_the_same_stream(legs) -> None:
    size, seed = 10, 7
    got = _run_legs(size, seed, legs, per_rank=2)  # B x A = 2 per rank and step
    assert sorted(got) == list(range(len(got)))  # consecutive positions, none twice
    reference = _run_legs(size, seed, [(1, len(got))], per_rank=1)  # one process, uninterrupted
    assert all(got[p] == reference[p] for p in got)
    for epoch in range(len(got) // size):  # every complete epoch: each sample exactly once, shown as that epoch
        indices = [got[p] for p in range(epoch * size, (epoch + 1) * size)]
        assert sorted(i % size for i in indices) == list(range(size))
        assert {i // size for i in indices} == {epoch}
    assert [got[p] % size for p in range(size)] == epoch_order(seed, 0, size)


def test_epoch_orders_are_permutations_that_differ_by_epoch_and_seed() -> None:
    a, b, c = epoch_order(1, 0, 50), epoch_order(1, 1, 50), epoch_order(2, 0, 50)
    assert sorted(a) == list(range(50)) and a == epoch_order(1, 0, 50) and a != b and a != c


@pytest.mark.parametrize("shuffle", [True, False])
def test_a_stream_order_visits_every_row_of_every_shard_once(shuffle) -> None:
    sizes = [4, 0, 3, 5]
    order = StreamOrder(3, 2, sizes, shuffle)
    seen = [order.locate(i)[1:] for i in range(len(order))]
    assert len(order) == 12 and sorted(seen) == sorted((s, r) for s, n in enumerate(sizes) for r in range(n))
    # a shard's rows are contiguous in the order (a reader holds one group at a time)
    shards = [s for s, _ in seen]
    assert all(shards.index(s) + shards.count(s) - 1 == len(shards) - 1 - shards[::-1].index(s) for s in set(shards))
    if not shuffle:
        assert seen == [(s, r) for s, n in enumerate(sizes) for r in range(n)]  # store order
    else:
        assert [order.locate(i) for i in range(12)] == [StreamOrder(3, 2, sizes, True).locate(i) for i in range(12)]
    with pytest.raises(IndexError):
        order.locate(12)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_loader_workers_taken_round_robin_give_the_rank_its_positions_in_order(workers) -> None:
    B, start, end, rank, world = 2, 5, 5 + 6 * 3 * 2, 1, 3
    per_worker = [list(worker_positions(start, end, rank, world, B, w, workers)) for w in range(workers)]
    batches = [[w[i : i + B] for i in range(0, len(w), B)] for w in per_worker]
    round_robin = [p for i in range(max(map(len, batches))) for w in batches if i < len(w) for p in w[i]]
    assert round_robin == list(rank_positions(start, end, rank, world))


def test_a_range_read_keeps_the_wanted_samples_and_skips_the_others(tiny_store) -> None:
    store = tiny_store("wds")
    shard = read_index(store)["shards"][0]
    group = shard["groups"][1]
    url = shard_path(store, "wds", shard["name"])
    whole = list(iter_range_samples(url, group["offset"], group["nbytes"]))
    kept = list(iter_range_samples(url, group["offset"], group["nbytes"], keep={1, 3}))
    assert [k for k, _ in kept] == [k for k, _ in whole]  # every sample counted
    assert [e is None for _, e in kept] == [i not in (1, 3) for i in range(len(whole))]
    assert all(e == whole[i][1] for i, (_, e) in enumerate(kept) if e is not None)


def _stream(store, world: int, rank: int, workers: int, start: int, end: int, monkeypatch) -> dict[int, tuple]:
    """{global position: (epoch, clip, view)} that rank ``rank`` of ``world`` streams with ``workers``
    loader workers (each worker run in turn, its batches taken round-robin as the DataLoader does)."""
    cfg = load_recipe("stage1/tiny_wds", [f"cache.store={store}", "train.batch_size=2", f"train.num_workers={workers}"])
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("NUM_WORKERS", str(workers))
    per_worker = []
    for w in range(workers):
        monkeypatch.setenv("WORKER", str(w))
        ds = ElasticStreamingViewDataset(store, cfg, pixels=False)
        ds.set_position(start, end)
        per_worker.append(list(ds))
    batches = [b for i in range(max(map(len, per_worker))) for w in per_worker if i < len(w) for b in [w[i]]]
    samples = [(int(e), c, int(v)) for b in batches for e, c, v in zip(b["epoch"], b["clip_id"], b["view_index"])]
    return dict(zip(rank_positions(start, end, rank, world), samples, strict=True))


def test_a_real_stream_reads_the_same_sequence_at_any_world_size_and_worker_count(tiny_store, monkeypatch) -> None:
    store = tiny_store("wds")  # 8 clips in 2 shards, 2 views
    ds = ElasticStreamingViewDataset(store, load_recipe("stage1/tiny_wds", [f"cache.store={store}"]), pixels=False)
    N, K, seed = ds.epoch_samples, ds.num_views, ds.seed
    start, end = 6, 30  # from mid-epoch 0 into epoch 3: whole steps of 2 x 2 and 3 x 2 samples
    reference = _stream(store, 1, 0, 1, start, end, monkeypatch)
    for world, workers in [(2, 2), (3, 1)]:
        got = {}
        for rank in range(world):
            got |= _stream(store, world, rank, workers, start, end, monkeypatch)
        assert sorted(got) == list(range(start, end)) and all(got[p] == reference[p] for p in got)
    for epoch in (1, 2):  # every clip once, with the view of its epoch
        samples = [reference[p] for p in range(epoch * N, (epoch + 1) * N)]
        assert sorted(c for _, c, _ in samples) == sorted(f"v{i}" for i in range(8))
        assert all(e == epoch and v == epoch_view(seed, c, epoch, K) for e, c, v in samples)
    assert [reference[p][0] for p in (start, N - 1, 3 * N)] == [0, 0, 3]


def test_a_stream_index_is_a_sample_in_its_own_epoch(tiny_store) -> None:
    store = tiny_store("zarr")
    cfg = load_recipe("stage1/tiny", [f"cache.store={store}", "cache.codec=fp16"])
    ds = CachedViewDataset(store, cfg, pixels=False)
    n = len(ds)
    a, b = ds.__getitems__([3, n + 3])
    assert (a["epoch"], b["epoch"]) == (0, 1) and a["clip_id"] == b["clip_id"]
    assert b["view_index"] == epoch_view(ds.seed, b["clip_id"], 1, ds.num_views) != a["view_index"]
    ds.set_epoch(1)
    c = ds.__getitems__([3])[0]
    assert c["view_index"] == b["view_index"] and torch.equal(c["attn"], b["attn"])


def test_a_samples_mask_does_not_depend_on_its_batch(tiny_store) -> None:
    store = tiny_store("zarr")
    cfg = load_recipe("stage1/tiny", [f"cache.store={store}", "cache.codec=fp16", "mask.type=semantic"])
    ds = CachedViewDataset(store, cfg, pixels=False)
    items = ds.__getitems__([0, 1, 2])
    cpu = torch.device("cpu")

    def masks(batch_items):
        batch = default_collate(batch_items)
        gens = sample_mask_generators(cfg.seed, batch["epoch"].tolist(), list(batch["clip_id"]))
        return step_targets_attn(cfg, batch, None, None, gens, cpu)[1]  # visible_idx [B, L]

    together, alone = masks(items), masks(items[2:])
    assert torch.equal(together[2:], alone) and not torch.equal(together[0], together[1])


def test_the_ledger_keeps_whole_lines_and_drops_steps_after_a_checkpoint(tmp_path) -> None:
    ledger = Ledger(tmp_path)
    ledger.record(1, 2, 0, [[[0, 0, "a", 1]], [[0, 1, "b", 0]]])
    ledger.record(2, 2, 2, [[[0, 2, "c", 1]], [[1, 3, "a", 0]]])
    with open(tmp_path / "ledger.jsonl", "a") as f:
        f.write('{"step": 3, "world": 2, "ranks": [[')  # a run killed mid-write
    assert [r["step"] for r in read_ledger(tmp_path / "ledger.jsonl")] == [1, 2]
    assert epoch_samples(read_ledger(tmp_path / "ledger.jsonl")) == {0: [(0, "a"), (1, "b"), (2, "c")], 1: [(3, "a")]}
    ledger.truncate_after(1)
    assert [r["step"] for r in read_ledger(tmp_path / "ledger.jsonl")] == [1]
    Ledger(tmp_path / "other", enabled=False).record(1, 1, 0, [[]])
    assert not (tmp_path / "other" / "ledger.jsonl").exists()


def test_the_learning_rate_follows_samples_and_equals_the_step_schedule_at_one_world_size() -> None:
    cfg = load_recipe("stage1/tiny", ["train.batch_size=2", "train.epochs=3", "optim.warmup_epochs=1"])
    clock = sample_clock(cfg, 8, 2)  # global batch 4: 2 steps per epoch
    total = clock.run_samples(cfg)
    steps = cosine_schedule(clock.lr, clock.min_lr, 6, 2, clock.warmup_lr)
    assert total == 24 and clock.steps_left(0, total) == 6 and clock.steps_left(22, total) == 1
    assert [clock.lr_at(4 * s, total) for s in range(6)] == pytest.approx(steps.tolist(), rel=1e-12)
    capped = load_recipe("stage1/tiny", ["train.batch_size=2", "train.max_steps=5"])
    assert sample_clock(capped, 8, 3).run_samples(capped, start_global_batch=4) == 20  # steps of the first world
    with pytest.raises(ValueError, match="4 clips per rank are fewer than one step of train.batch_size=2 x "
                                         "train.accum_steps=3"):
        sample_clock(load_recipe("stage1/tiny", ["train.batch_size=2", "train.accum_steps=3"]), 8, 2)


def test_online_training_reads_the_same_stream_as_the_store(tiny_store, shapes_corpus) -> None:
    from umt_distill.data.clipviews import OnlineViewDataset
    from umt_distill.training.distributed import DistEnv

    store = tiny_store("zarr")
    args = [f"corpus.source={shapes_corpus}", f"cache.store={store}", "cache.codec=fp16", "cache.num_views=2"]
    env = DistEnv(rank=1, world_size=2)
    online, sampler, _, n = build_elastic_data(load_recipe("stage1/tiny", [*args, "teacher.mode=online"]), env)
    cfg = load_recipe("stage1/tiny", args)
    cached = CachedViewDataset(store, cfg, pixels=False)
    cached_sampler = ElasticSampler(len(cached), cfg.seed, env.rank, env.world_size)
    assert isinstance(online, OnlineViewDataset) and online.clip_ids == cached.clip_ids and n == len(cached)
    for s in (sampler, cached_sampler):
        s.set_position(5, 13)
    indices = list(sampler)
    assert indices == list(cached_sampler) and len(indices) == 4
    item = online[indices[-1]]  # position 12: epoch 1
    want = cached.__getitems__([indices[-1]])[0]
    assert (item["epoch"], item["clip_id"], item["view_index"]) == (1, want["clip_id"], want["view_index"])
    assert item["pixels"].shape[0] == 4  # [T, 3, H, W], decoded from the video


def test_the_global_position_is_read_from_state_json_alone(tmp_path) -> None:
    from umt_distill.models.checkpoints import CheckpointError
    from umt_distill.training.state_file import read_plain_entry, save_state

    data = {"position": 18, "epoch_samples": 8, "global_batch": 3, "start_global_batch": 2, "world": 3}
    save_state(tmp_path, {"optimizer": {"m": torch.ones(2)}, "data": data, "step": 10})
    (tmp_path / "state.safetensors").unlink()  # the tensors are not read
    assert read_plain_entry(tmp_path, "data") == data and read_plain_entry(tmp_path, "absent") is None
    with pytest.raises(CheckpointError, match="optimizer: holds tensors"):
        read_plain_entry(tmp_path, "optimizer")
    assert read_plain_entry(tmp_path / "nowhere", "data") is None
