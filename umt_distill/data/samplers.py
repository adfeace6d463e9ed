"""Samplers of clip indices for the training loops, and the elastic global order of stage 1.

Two orders live here:

- :class:`EpochSampler`: a seeded permutation per epoch split across ranks, resumable at the world size
  it stopped at (fine-tuning, retrieval, stage 2, VideoMAE).
- The **global sample stream** of stage 1 (:func:`epoch_order`, :class:`ElasticSampler`,
  :class:`StreamOrder`): epoch ``e`` is a permutation of all ``N`` samples drawn from ``(seed, e)``
  alone; the run consumes epoch 0's order, then epoch 1's, ... as one stream of global positions
  ``P = e·N + i``. A step at world size ``W`` (``B`` samples per micro-batch, ``A`` micro-batches)
  takes the next ``G = W·B·A`` positions; rank ``r`` takes positions ``P + r, P + r + W, ...`` (position
  mod W = rank). Nothing here depends on the world size except which rank reads a position, so a run
  stopped at ``W`` resumes at any ``W′`` from the global position it consumed and trains the same
  sequence of samples, each exactly once per epoch (a step may straddle two epochs; nothing is dropped).
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, split across ranks, resumable from a position.

    Every rank gets ``len(dataset) // world_size`` indices (the remainder is dropped, like
    ``drop_last``), so all ranks take the same number of steps.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.seed, self.rank, self.world = size, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """``start``: how many of this rank's indices of the epoch were already consumed."""
        self.epoch, self.start = epoch, start

    def per_rank(self) -> int:
        return self.size // self.world

    def __len__(self) -> int:
        return self.per_rank() - self.start

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=g)[: self.per_rank() * self.world]
        mine = order[self.rank :: self.world]
        return iter(mine[self.start :].tolist())


# --------------------------------------------------------------------------------------------------
# the global sample stream (stage 1)


def _generator(*parts: object) -> torch.Generator:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def epoch_order(seed: int, epoch: int, size: int) -> list[int]:
    """Epoch ``epoch``'s order of ``size`` samples: a permutation drawn from ``(seed, epoch)`` alone."""
    return torch.randperm(size, generator=_generator(seed, "order", epoch)).tolist()


def rank_positions(start: int, end: int, rank: int, world: int) -> range:
    """The global positions in ``[start, end)`` that ``rank`` of ``world`` reads: position mod W = rank
    (counted from ``start``, the first position of a step)."""
    return range(start + rank, end, world)


class ElasticSampler(Sampler[int]):
    """This rank's share of the global sample stream from a global position (random-access datasets).

    Yields *stream indices* ``e·N + i`` (sample ``i`` of the dataset, shown as in epoch ``e``), in the
    order of this rank's global positions; a dataset takes ``divmod(index, N)`` (``CachedViewDataset``,
    ``OnlineViewDataset``). The DataLoader's workers only fetch what the sampler lists, so their number
    changes nothing.

    Args:
        size: ``N``, the samples of one epoch.
        seed: The recipe seed (:func:`epoch_order`).
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.seed, self.rank, self.world = size, seed, rank, world_size
        self.start = self.end = 0

    def set_position(self, start: int, end: int) -> None:
        """Read global positions ``[start, end)`` (``start``: samples the run consumed; ``end``: a whole step)."""
        self.start, self.end = start, end

    def __len__(self) -> int:
        return len(rank_positions(self.start, self.end, self.rank, self.world))

    def __iter__(self) -> Iterator[int]:
        orders: dict[int, list[int]] = {}
        for position in rank_positions(self.start, self.end, self.rank, self.world):
            epoch, i = divmod(position, self.size)
            if epoch not in orders:
                orders.clear()  # one epoch's order held at a time
                orders[epoch] = epoch_order(self.seed, epoch, self.size)
            yield epoch * self.size + orders[epoch][i]


class StreamOrder:
    """One epoch's global order of a streamed store: shards in a seeded order, each shard's epoch group
    in a seeded order of its rows (``shuffle``), else the store's order.

    A streamed store cannot be permuted sample by sample without a read per sample, so the epoch's
    order is a permutation of the shards, and within a shard a permutation of the rows of the group the
    epoch reads: a reader holds at most its share of one group. Position ``i`` of the epoch is row
    ``row(i)`` of shard ``shard(i)``.

    Args:
        sizes: Rows of the epoch's group in every shard (index order).
        shuffle: False: index order of shards, store order of rows.
    """

    def __init__(self, seed: int, epoch: int, sizes: Sequence[int], shuffle: bool) -> None:
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        n = len(sizes)
        self.shards = torch.randperm(n, generator=_generator(seed, "shards", epoch)).tolist() if shuffle and n else list(range(n))
        self.sizes = [int(sizes[s]) for s in self.shards]
        self.starts = [0]
        for s in self.sizes:
            self.starts.append(self.starts[-1] + s)
        self._rows: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, i: int) -> tuple[int, int, int]:
        """(slot of the shard in this epoch's order, shard index, row in its group) of position ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"position {i} of an epoch of {len(self)} samples")
        slot = bisect.bisect_right(self.starts, i) - 1
        return slot, self.shards[slot], self.rows(slot)[i - self.starts[slot]]

    def rows(self, slot: int) -> list[int]:
        """The rows of the ``slot``-th shard of the order, in the order the epoch reads them."""
        rows = self._rows.get(slot)
        if rows is None:
            size, shard = self.sizes[slot], self.shards[slot]
            rows = (torch.randperm(size, generator=_generator(self.seed, "rows", self.epoch, shard)).tolist()
                    if self.shuffle else list(range(size)))
            self._rows = {slot: rows}  # one shard's rows held at a time
        return rows


def worker_positions(start: int, end: int, rank: int, world: int, batch_size: int, worker: int,
                     workers: int) -> Iterator[int]:
    """The global positions a stream's loader worker reads: this rank's positions in batches of
    ``batch_size``, batch ``b`` in worker ``b mod workers``. The DataLoader takes the workers' batches
    round-robin, so the rank sees its positions in order whatever the number of workers."""
    mine = rank_positions(start, end, rank, world)
    for b in range(worker, -(-len(mine) // batch_size), workers):
        yield from mine[b * batch_size : (b + 1) * batch_size]
