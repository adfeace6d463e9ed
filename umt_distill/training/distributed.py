"""Process-group setup for torchrun, and rank-aware printing.

Model code never imports torch.distributed; stages and the cache pipeline call these helpers.
Without torchrun (no ``WORLD_SIZE``), everything degrades to a single process.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)
