"""Samplers of clip indices for the training loops."""

from __future__ import annotations

from collections.abc import Iterator

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
