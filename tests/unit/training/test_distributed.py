"""The collectives of training/distributed.py on 2 gloo processes (each is an identity in one process;
see test_training_loop.py). VTC's gather with gradients is tested in test_losses_vl.py."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from umt_distill.training.distributed import (
    gather_no_grad,
    gather_objects,
    gather_with_grad,
    mean_over_ranks,
    rank_world,
    sum_over_ranks,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x = torch.tensor([1.0, 2.0]) * (rank + 1)
        ids = torch.tensor([10 * rank, 10 * rank + 1])
        rows = torch.full((1, 2), float(rank), requires_grad=True)
        gathered = gather_with_grad(rows)  # [2, 2]
        (gathered * torch.tensor([[1.0], [2.0]])).sum().backward()
        queue.put((rank, {
            "rank_world": rank_world(),
            "sum": sum_over_ranks(x).tolist(),
            "x_after": x.tolist(),
            "mean": mean_over_ranks({"loss": float(rank), "other": 1.0 + rank}, torch.device("cpu")),
            "objects": gather_objects({"rank": rank}),
            "ids": gather_no_grad(ids).tolist(),
            "rows": gathered.detach().tolist(),
            "grad": rows.grad.tolist(),
        }))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_collectives_on_two_processes() -> None:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for rank, got in results.items():
        assert got["rank_world"] == (rank, 2)
        assert got["sum"] == [3.0, 6.0] and got["x_after"] == [float(rank + 1), 2.0 * (rank + 1)], "input unchanged"
        assert got["mean"] == {"loss": 0.5, "other": 1.5}, "every rank logs the global mean"
        assert got["objects"] == [{"rank": 0}, {"rank": 1}]
        assert got["ids"] == [0, 1, 10, 11] and got["rows"] == [[0.0, 0.0], [1.0, 1.0]]
        # d(Σ_ranks loss)/d(own row): both ranks weight row r by (r + 1), summed over 2 ranks.
        assert got["grad"] == [[2.0 * (rank + 1)] * 2]
