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

Stage 1 counts its run in samples of one global stream instead (so it resumes at any world size)::

    clock = sample_clock(cfg, epoch_samples, env.world_size)           # global batch, LR by samples
    run, step = open_run(cfg, "stage1", env, model, optimizer, ckpt, clock=clock)
    batches = stream_batches(dataset, sampler, make_loader, run.position, run.end, ...)
    while step < run.total_steps:
        ...                                                            # the same step
        run.advance(step, samples)                                     # ledger.jsonl, position += global batch

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
from umt_distill.training.distributed import DistEnv, barrier, gather_objects
from umt_distill.training.ledger import Ledger
from umt_distill.training.metrics import MetricsLogger
from umt_distill.training.optim import lr_schedule, scaled_lrs
from umt_distill.training.progress import StepProgress
from umt_distill.training.state_file import read_plain_entry

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


@dataclass(frozen=True)
class SampleClock:
    """Stage 1's run counted in samples of its global stream (``data.samplers``), so it resumes at any
    world size.

    The run consumes the stream of global positions (epoch ``e``'s order of all ``N`` samples, then
    ``e + 1``'s, ...); a step at this world takes the next ``global_batch = W·B·A`` positions, and the
    checkpoint records the position reached, not per-rank offsets. A run resumed at another world size
    continues from that position with its own global batch: the same sequence of samples, consumed in
    order, each exactly once per epoch; only where the steps cut it changes. The learning rate follows
    the samples, not the steps: linear warmup over ``optim.warmup_epochs × N`` samples, then the
    half-cosine to the run's last sample (at one world size and ``N`` a multiple of the global batch,
    exactly the per-step schedule of :func:`step_budget`); the peak is scaled by the current global
    batch (``optim.scale_lr``, UMT's rule per 256 samples).

    Attributes:
        epoch_samples: ``N``, samples per epoch (every one of them is trained; a step may straddle two epochs).
        global_batch: Samples per step at this world size.
        lr, min_lr, warmup_lr: Learning rates scaled by ``global_batch``.
        warmup_samples: Samples of the warmup.
    """

    epoch_samples: int
    global_batch: int
    lr: float
    min_lr: float
    warmup_lr: float
    warmup_samples: int

    def epoch(self, position: int) -> int:
        return position // self.epoch_samples

    def run_samples(self, cfg: Recipe, start_global_batch: int | None = None) -> int:
        """The run's length: ``train.epochs × N``, or ``train.max_steps`` steps of the global batch the run
        started with (``start_global_batch``; this world's for a fresh run)."""
        if cfg.train.max_steps:
            return cfg.train.max_steps * (start_global_batch or self.global_batch)
        return cfg.train.epochs * self.epoch_samples

    def steps_left(self, position: int, run_samples: int) -> int:
        """Steps to the run's end: the last one is whole (its samples past the end are the next epoch's)."""
        return max(0, -(-(run_samples - position) // self.global_batch))

    def lr_at(self, position: int, run_samples: int) -> float:
        """The LR of the step that starts at global ``position`` of a run of ``run_samples``."""
        warm = min(self.warmup_samples, run_samples)
        if position < warm:
            return self.warmup_lr + (self.lr - self.warmup_lr) * position / warm
        rest = max(run_samples - warm, 1)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * min(position - warm, rest) / rest))

    def state(self, position: int, start_global_batch: int, world: int) -> dict:
        """What a checkpoint records of the stream (``state.json``'s ``data``)."""
        return {"position": position, "epoch_samples": self.epoch_samples, "global_batch": self.global_batch,
                "start_global_batch": start_global_batch, "world": world}


def sample_clock(cfg: Recipe, epoch_samples: int, world_size: int) -> SampleClock:
    """Stage 1's :class:`SampleClock` at this world size.

    Raises:
        RecipeError: A rank's share of an epoch fills no step.
    """
    t = cfg.train
    per_step = t.batch_size * t.accum_steps
    if epoch_samples // world_size < per_step:
        raise RecipeError(f"{epoch_samples // world_size} clips per rank are fewer than one step of train.batch_size="
                          f"{t.batch_size} x train.accum_steps={t.accum_steps}; lower train.batch_size, or train on more "
                          "clips or fewer ranks")
    global_batch = per_step * world_size
    lr, min_lr, warmup_lr = scaled_lrs(cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_lr, global_batch, cfg.optim.scale_lr)
    return SampleClock(epoch_samples, global_batch, lr, min_lr, warmup_lr, int(cfg.optim.warmup_epochs * epoch_samples))


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


def stream_batches(dataset, sampler, make_loader: Callable[[], DataLoader], start: int, end: int,
                   epoch_samples: int, batch_size: int, world_size: int = 1) -> Iterator:
    """This rank's batches of the global positions ``[start, end)`` of stage 1's sample stream.

    An :class:`~umt_distill.data.samplers.ElasticSampler` (random access) or a dataset with
    ``set_position`` (``cache.datasets.ElasticStreamingViewDataset``) reads exactly this rank's positions,
    one loader for the rest of the run. Any other dataset (one that streams a whole epoch per
    ``set_epoch``) is read epoch after epoch, the batches already consumed skipped: that is exact only at
    the world size it started with.
    """
    if hasattr(sampler, "set_position"):
        sampler.set_position(start, end)
        return iter(make_loader())
    if hasattr(dataset, "set_position"):
        dataset.set_position(start, end)
        return iter(make_loader())
    return _epoch_after_epoch(dataset, make_loader, start, epoch_samples, batch_size * world_size)


def _epoch_after_epoch(dataset, make_loader: Callable[[], DataLoader], start: int, epoch_samples: int,
                       samples_per_batch: int) -> Iterator:
    epoch, done = divmod(start, epoch_samples)
    skip = done // samples_per_batch
    while True:
        dataset.set_epoch(epoch)
        batches = iter(make_loader())
        for _ in range(skip):
            next(batches)
        yield from batches
        epoch, skip = epoch + 1, 0


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
    # Stage 1's sample stream (None elsewhere): the global position consumed, the run's length in samples,
    # the global batch it started with, the ledger, and this rank's place in the world.
    clock: SampleClock | None = None
    position: int = 0
    run_samples: int = 0
    start_global_batch: int = 0
    ledger: Ledger | None = None
    rank: int = 0
    world: int = 1

    @property
    def end(self) -> int:
        """The global position after the run's last step (stage 1)."""
        return self.position + self.clock.steps_left(self.position, self.run_samples) * self.clock.global_batch

    def advance(self, step: int, samples: list[tuple[int, str, int]]) -> None:
        """After step ``step`` (1-based): the ledger gets every rank's samples, and the position moves by
        one global batch (stage 1).

        Args:
            samples: This rank's ``(epoch, clip id, view index)`` in the order it read them; its ``j``-th
                is at global position ``position + rank + j × world`` (``data.samplers.rank_positions``).
        """
        mine = [[int(e), self.position + self.rank + j * self.world, str(clip), int(view)]
                for j, (e, clip, view) in enumerate(samples)]
        ranks = gather_objects(mine)  # every rank takes part; rank 0 writes
        if self.ledger is not None:
            self.ledger.record(step, self.world, self.position, ranks)
        self.position += self.clock.global_batch

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
            if self.clock is not None:  # the global position of the sample stream, not per-rank offsets
                state["data"] = self.clock.state(self.position, self.start_global_batch, self.world)
            if self.is_main:
                save_checkpoint(self.out_dir, step, model, state, self.recipe_yaml)
            barrier()  # no rank runs ahead of a checkpoint that is not on disk yet

    def close(self) -> None:
        self.metrics.close()


def open_run(cfg: Recipe, label: str, env: DistEnv, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             ckpt: Path | None, total_steps: int | None = None, clock: SampleClock | None = None) -> tuple[RunOutputs, int]:
    """The run's outputs in ``train.output_dir``, resumed from ``ckpt`` if given.

    Resuming restores the weights, optimizer and RNG state and drops metrics logged after the checkpoint.
    With a ``clock`` (stage 1) the run is counted in samples: it continues from the checkpoint's global
    position at this world size (``outputs.position``; ``total_steps`` follows from it) and writes
    ``ledger.jsonl`` (``training.ledger``), dropping its lines after the checkpoint.

    Args:
        label: The stage's name on the progress line.
        model: The unwrapped model (what checkpoints hold).
        ckpt: :func:`~umt_distill.training.checkpoint.find_resume_checkpoint`'s answer.
        total_steps: The run's steps (without a clock).

    Returns:
        (outputs, the step to continue from: 0 for a fresh run).
    """
    out_dir = Path(cfg.train.output_dir)
    metrics = MetricsLogger(out_dir, env.is_main, cfg.train.tensorboard)
    step = resume_training(ckpt, model, optimizer, metrics, env.is_main) if ckpt is not None else 0
    stream: dict = {}
    if clock is not None:
        position, start_batch = resume_position(ckpt, step, clock)
        run_samples = clock.run_samples(cfg, start_batch)
        total_steps = step + clock.steps_left(position, run_samples)
        ledger = Ledger(out_dir, env.is_main)
        ledger.truncate_after(step)
        stream = {"clock": clock, "position": position, "run_samples": run_samples, "start_global_batch": start_batch,
                  "ledger": ledger, "rank": env.rank, "world": env.world_size}
    progress = StepProgress(label, total_steps, start=step, enabled=env.is_main)
    outputs = RunOutputs(out_dir, metrics, progress, total_steps, cfg.train.log_every, cfg.train.ckpt_every,
                         recipe_to_yaml(cfg), env.is_main, **stream)
    return outputs, step


def resume_position(ckpt: Path | None, step: int, clock: SampleClock) -> tuple[int, int]:
    """(global position consumed, global batch the run started with) from a checkpoint's ``data``.

    A checkpoint written before the stream was recorded resumes at ``step × global batch`` (exact at the
    world size it was written at).

    Raises:
        RecipeError: The checkpoint's epochs held another number of samples (other data).
    """
    if ckpt is None:
        return 0, clock.global_batch
    data = read_plain_entry(ckpt, "data")
    if not isinstance(data, dict) or not isinstance(data.get("position"), int):
        return step * clock.global_batch, clock.global_batch
    if data.get("epoch_samples") != clock.epoch_samples:
        raise RecipeError(f"{ckpt}: the run's epochs held {data.get('epoch_samples')} samples, this data holds "
                          f"{clock.epoch_samples}; resume with the store or corpus the run started with")
    return data["position"], int(data.get("start_global_batch") or clock.global_batch)
