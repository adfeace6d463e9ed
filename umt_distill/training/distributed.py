"""Process-group setup for torchrun, DDP wrapping, and every collective the package uses.

Model code never imports torch.distributed; stages and the cache pipeline call these helpers.
Without torchrun (no ``WORLD_SIZE``), everything degrades to a single process.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_env_from_environ() -> DistEnv:
    """Read torchrun's environment variables (defaults: one process)."""
    return DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init_distributed(backend: str | None = None, timeout_minutes: float = 30.0) -> DistEnv:
    """Join the process group if launched by torchrun; otherwise return a 1-process environment.

    Args:
        backend: ``nccl``/``gloo``; default nccl when CUDA is available, else gloo.
        timeout_minutes: Collective timeout. Caching uses a long one: ranks finish their shards at
            different times and wait in the final barrier.
    """
    env = dist_env_from_environ()
    if not env.distributed or dist.is_initialized():
        return env
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=timeout_minutes))
    return env


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(name: str, env: DistEnv | None = None) -> torch.device:
    """``auto`` → this rank's CUDA device when available, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", (env or dist_env_from_environ()).local_rank)
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def wrap_ddp(model: torch.nn.Module, env: DistEnv, device: torch.device) -> torch.nn.Module:
    """DDP around the student when distributed; the model itself otherwise (same call signature)."""
    if not env.distributed:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


# --------------------------------------------------------------------------------------------------
# Collectives: the only home of cross-rank communication. Each one is a no-op in a single process
# (no initialised process group), so callers never branch on the world size.


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed element-wise over ranks (a new tensor); ``x`` itself in one process."""
    if rank_world()[1] == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)  # sync point
    return x


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Per-step scalars (the losses a loop logs) averaged over ranks: one small all_reduce per step.

    Every rank gets the global batch's mean, so what rank 0 logs describes the whole step, and a loss
    that is not finite on one rank is not finite on all of them (they stop together instead of one
    rank waiting forever in the next collective). Unchanged in one process.

    Args:
        values: Name → this rank's value.
        device: Where the reduction runs (NCCL reduces CUDA tensors only).
    """
    world = rank_world()[1]
    if world == 1:
        return values
    out = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(out)  # sync point
    return dict(zip(values, (out.cpu() / world).tolist()))


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    world = rank_world()[1]
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj=None, src: int = 0):
    """Rank ``src``'s ``obj`` (picklable), on every rank; ``obj`` itself in one process.

    Used where one rank decides for all (rank 0 takes a store's lock, checks its spec) and every rank
    must act on the decision, e.g. stop together with the same message instead of waiting in the next
    collective for a rank that has gone.
    """
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)  # sync point
    return box[0]


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums every rank's gradient for the local slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = rank_world()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank's loss depends on every rank's rows: d(Σ_r loss_r)/d(local rows) is the sum over
        # ranks of each rank's gradient for those rows. DDP then averages parameter gradients over
        # ranks; since every rank computes the same global contrastive loss, the result is exactly the
        # single-process gradient of that loss.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # sync point
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [B, ...] from all ranks in rank order → [W·B, ...]; gradients flow back to
    each rank's slice, summed over ranks (see ``_GatherWithGrad``). A tensor that needs no gradient
    (sample ids) is gathered plainly. ``x`` itself in one process.

    UMT's gather (``AllGather`` in multi_modality/models/utils.py, UMT code @4fb4049) returns only the
    local slice's gradient, which after DDP's averaging leaves the contrastive gradient divided by the
    world size; this one gives exactly the single-process gradient of the global loss.
    """
    if rank_world()[1] == 1:
        return x
    if not (torch.is_grad_enabled() and x.requires_grad):
        return gather_no_grad(x)
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [B, ...] from all ranks in rank order → [W·B, ...], without a gradient."""
    world = rank_world()[1]
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)
