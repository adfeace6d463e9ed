"""The parts every stage loop shares, as plain functions; each loop keeps its own body.

A stage's ``train`` reads top to bottom like nanoGPT's train.py: build the data and the model, then
per step ``micro-batches → loss → backward`` in the stage's own words. Around that body it calls
these parts, in this order::

    budget = step_budget(cfg, clips_per_rank, env.world_size)          # steps, LR schedule
    run, step = open_run(cfg, "stage1", env, model, optimizer, ckpt, budget.total_steps)
    while step < budget.total_steps:
        epoch, done = budget.position(step)
        batches = epoch_batches(dataset, sampler, make_loader, epoch, done * accum, batch_size)
        for _ in range(budget.steps_left_in_epoch(step)):
            ...
            for micro in range(accum):
                with micro_step(ddp_model, micro, accum, amp_dtype, device):
                    loss = ...; scaler.scale(loss / accum).backward()
            losses = mean_over_ranks({...}, device)                    # training.distributed
            grad_norm = optimizer_step(losses["loss"], step, model, optimizer, scaler, grad_clip, out_dir)
            step += 1
            run.log_step({...})
            run.checkpoint_if_due(step, epoch, model, optimizer)
    run.close()

There is no Trainer class on purpose: the loops differ in exactly the places a reader needs to see.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from umt_distill.config import Recipe, RecipeError, recipe_to_yaml
from umt_distill.training.checkpoint import resume_training, rng_state, save_checkpoint
from umt_distill.training.distributed import DistEnv, barrier
from umt_distill.training.metrics import MetricsLogger
from umt_distill.training.optim import lr_schedule
from umt_distill.training.progress import StepProgress

# Batches each loader worker keeps in flight. The cached input path measured 4 (a worker's reads and
# decompression come in bursts); a decoding loader only holds a few more batches in memory with it.
PREFETCH_FACTOR = 4


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; training stops and the last good checkpoint stays."""


# --------------------------------------------------------------------------------------------------
# the step budget


@dataclass(frozen=True)
class StepBudget:
    """How long a run is and how fast it learns at each step.

    Attributes:
        steps_per_epoch: Optimizer steps in one epoch (all sources together).
        total_steps: Steps of the whole run.
        lr: Peak learning rate after scaling by the global batch.
        lrs: float64 [total_steps], the learning rate of every step.
        source_steps: Steps of each source per epoch (stage 2's sources); empty for one source.
    """

    steps_per_epoch: int
    total_steps: int
    lr: float
    lrs: np.ndarray
    source_steps: dict[str, int] = field(default_factory=dict)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, steps of that epoch already done) of the run's ``step``-th step (0-based)."""
        return divmod(step, self.steps_per_epoch)

    def steps_left_in_epoch(self, step: int) -> int:
        """Steps from ``step`` to the end of its epoch or of the run, whichever comes first."""
        return min(self.steps_per_epoch - self.position(step)[1], self.total_steps - step)


def step_budget(cfg: Recipe, items_per_rank: int | Mapping[str, int], world_size: int, what: str = "clips",
                clips_per_item: int = 1) -> StepBudget:
    """Steps per epoch, total steps and the per-step LR schedule of a run.

    An epoch is the full steps of ``train.batch_size × train.accum_steps`` items that each rank's share
    of the data fills; the remainder is dropped. With several sources (stage 2: a mapping from source
    name to items per rank) each source fills its own steps and an epoch holds all of them. The run
    lasts ``train.max_steps``, else ``train.epochs`` epochs. The LR is scaled by the global batch,
    ``batch_size × accum_steps × world_size × clips_per_item`` (fine-tuning: UMT counts each of the
    ``num_sample`` clips of a video).

    Args:
        items_per_rank: Items (clips, videos) one rank sees per epoch, or that per source.
        what: The items' name in the error message.

    Raises:
        ValueError: The data fills no step.
    """
    t = cfg.train
    per_step = t.batch_size * t.accum_steps
    if isinstance(items_per_rank, Mapping):
        source_steps = {name: n // per_step for name, n in items_per_rank.items()}
        steps_per_epoch = sum(source_steps.values())
        if steps_per_epoch == 0:
            raise RecipeError(f"the sources fill no step of train.batch_size={t.batch_size} x train.accum_steps="
                              f"{t.accum_steps} per rank ({what} per rank: {dict(items_per_rank)}); lower "
                              "train.batch_size, or train on more clips or fewer ranks")
    else:
        source_steps, steps_per_epoch = {}, items_per_rank // per_step
        if steps_per_epoch == 0:
            raise RecipeError(f"{items_per_rank} {what} per rank are fewer than one step of train.batch_size="
                              f"{t.batch_size} x train.accum_steps={t.accum_steps}; lower train.batch_size, or train "
                              "on more clips or fewer ranks")
    total_steps = t.max_steps or steps_per_epoch * t.epochs
    lr, lrs = lr_schedule(cfg.optim, per_step * world_size * clips_per_item, total_steps, steps_per_epoch)
    return StepBudget(steps_per_epoch, total_steps, lr, lrs, source_steps)


# --------------------------------------------------------------------------------------------------
# data


def build_loader(dataset: Dataset, batch_size: int | None, num_workers: int, seed: int, sampler=None,
                 collate_fn: Callable | None = None, drop_last: bool = False) -> DataLoader:
    """The one DataLoader of every loop and evaluation.

    - Its own generator, seeded by ``seed``: creating an iterator must not consume the global RNG
      (resume exactness); the workers' seeds come from it.
    - Fresh workers per iterator (``persistent_workers=False``): a loop calls ``set_epoch`` on the
      dataset before each epoch's iterator, and forked workers must see it.
    - No ``worker_init_fn``: PyTorch already runs every worker on one intra-op thread, so decoding
      workers do not oversubscribe the cores the model uses.

    Args:
        batch_size: Items per batch; None for a stream that yields whole batches.
        sampler: The epoch's order (:class:`~umt_distill.data.samplers.EpochSampler`), or None.
        drop_last: True for training (every micro-batch is full); False to see every item (evaluation).
    """
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate_fn,
                      drop_last=drop_last, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(seed), persistent_workers=False,
                      prefetch_factor=PREFETCH_FACTOR if num_workers else None)


def epoch_batches(dataset, sampler, make_loader: Callable[[], DataLoader], epoch: int, consumed: int,
                  batch_size: int) -> Iterator:
    """The batches of ``epoch`` after the first ``consumed`` ones (a run resumed mid-epoch).

    A random-access dataset seeks: its sampler starts at item ``consumed × batch_size``. A stream
    (``sampler`` None) cannot seek: its first ``consumed`` batches are read and dropped. Either way the
    batches are those an uninterrupted run trains on next.

    Args:
        dataset: Has ``set_epoch`` (views, captions and stream order depend on the epoch).
        make_loader: Builds the DataLoader (:func:`build_loader`) over ``dataset`` and ``sampler``.
    """
    dataset.set_epoch(epoch)
    if sampler is not None:
        sampler.set_epoch(epoch, start=consumed * batch_size)
    batches = iter(make_loader())
    if sampler is None:
        for _ in range(consumed):
            next(batches)
    return batches


# --------------------------------------------------------------------------------------------------
# one step


@contextmanager
def micro_step(model: torch.nn.Module, micro: int, accum_steps: int, amp_dtype: torch.dtype | None,
               device: torch.device) -> Iterator[None]:
    """Forward and backward of micro-batch ``micro`` of ``accum_steps``.

    DDP all-reduces gradients in backward; on every micro-step but the last, ``no_sync`` makes it
    only accumulate them locally (one all-reduce per optimizer step). A model that is not wrapped
    (one process) has no ``no_sync``. Autocast to ``amp_dtype``; None runs in float32.
    """
    no_sync = getattr(model, "no_sync", None)
    local = no_sync() if no_sync is not None and micro < accum_steps - 1 else nullcontext()
    with local, torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        yield


def optimizer_step(loss: float, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, grad_clip: float | None, out_dir: str | Path) -> float:
    """Finish step ``step`` (0-based): refuse a non-finite loss, unscale, clip, update, zero the gradients.

    One clipping rule for every stage: the norm is taken over the parameters that require grad (what
    the optimizer updates; frozen parts such as unused heads have no gradient) and clipped to
    ``grad_clip``; None measures the norm for the log without clipping.

    Args:
        loss: The step's loss, averaged over ranks (then every rank refuses it together).
        model: The unwrapped model whose gradients are clipped.
        out_dir: Named in the error: the last good checkpoint is there.

    Returns:
        The total gradient norm before clipping.

    Raises:
        NonFiniteLossError: ``loss`` is NaN or infinite; the parameters are left as they were.
    """
    if not math.isfinite(loss):
        raise NonFiniteLossError(f"loss is {loss} at step {step + 1}; the last good checkpoint is kept in {out_dir}")
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


# --------------------------------------------------------------------------------------------------
# the run's outputs: metrics, progress, checkpoints


@dataclass
class RunOutputs:
    """Where a run's steps are recorded: ``metrics.jsonl``, live progress, checkpoints (see :func:`open_run`)."""

    out_dir: Path
    metrics: MetricsLogger
    progress: StepProgress
    total_steps: int
    log_every: int
    ckpt_every: int
    recipe_yaml: str
    is_main: bool

    def log_step(self, record: dict) -> None:
        """Log a finished step's ``record`` (every ``log_every`` steps and the last) and show progress.

        ``record`` holds ``step`` (1-based) and ``loss``; rank 0 writes, the others do nothing.
        """
        step = record["step"]
        if step % self.log_every == 0 or step == self.total_steps:
            self.metrics.log(record)
        self.progress.update(step, loss=record["loss"])

    def checkpoint_if_due(self, step: int, epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Every ``ckpt_every`` steps and at the last: rank 0 saves, then every rank waits for it.

        The RNG state is taken after the step (and anything the loop ran since), so a resumed run
        continues the same random streams.
        """
        if step % self.ckpt_every == 0 or step == self.total_steps:
            state = {"optimizer": optimizer.state_dict(), "step": step, "epoch": epoch, "rng": rng_state()}
            if self.is_main:
                save_checkpoint(self.out_dir, step, model, state, self.recipe_yaml)
            barrier()  # no rank runs ahead of a checkpoint that is not on disk yet

    def close(self) -> None:
        self.metrics.close()


def open_run(cfg: Recipe, label: str, env: DistEnv, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             ckpt: Path | None, total_steps: int) -> tuple[RunOutputs, int]:
    """The run's outputs in ``train.output_dir``, resumed from ``ckpt`` if given.

    Resuming restores the weights, optimizer and RNG state and drops metrics logged after the checkpoint.

    Args:
        label: The stage's name on the progress line.
        model: The unwrapped model (what checkpoints hold).
        ckpt: :func:`~umt_distill.training.checkpoint.find_resume_checkpoint`'s answer.

    Returns:
        (outputs, the step to continue from: 0 for a fresh run).
    """
    out_dir = Path(cfg.train.output_dir)
    metrics = MetricsLogger(out_dir, env.is_main, cfg.train.tensorboard)
    step = resume_training(ckpt, model, optimizer, metrics, env.is_main) if ckpt is not None else 0
    progress = StepProgress(label, total_steps, start=step, enabled=env.is_main)
    outputs = RunOutputs(out_dir, metrics, progress, total_steps, cfg.train.log_every, cfg.train.ckpt_every,
                         recipe_to_yaml(cfg), env.is_main)
    return outputs, step
