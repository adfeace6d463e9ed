"""The parts the stage loops share (training/loop.py): step budget, loader and resume skip, micro-step
context, optimizer tail, and the run's outputs."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, IterableDataset

from umt_distill.config import load_recipe
from umt_distill.data.samplers import EpochSampler
from umt_distill.training import loop
from umt_distill.training.checkpoint import find_resume_checkpoint
from umt_distill.training.distributed import DistEnv, gather_objects, mean_over_ranks, rank_world, sum_over_ranks
from umt_distill.training.loop import (
    PREFETCH_FACTOR,
    NonFiniteLossError,
    RunOutputs,
    build_loader,
    epoch_batches,
    micro_step,
    open_run,
    optimizer_step,
    step_budget,
)
from umt_distill.training.metrics import MetricsLogger, read_metrics
from umt_distill.training.optim import amp_setup, lr_schedule
from umt_distill.training.progress import StepProgress

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")


def _cfg(*overrides: str):
    return load_recipe("stage1/tiny", ["train.batch_size=2", "train.accum_steps=3", "train.epochs=4", *overrides])


# --------------------------------------------------------------------------------------------------
# step budget


def test_step_budget_counts_full_steps_and_scales_the_lr_by_the_global_batch() -> None:
    cfg = _cfg("optim.scale_lr=true")
    budget = step_budget(cfg, 13, world_size=2)  # 13 clips per rank, steps of 2 x 3: 2 full steps, 1 left over
    assert (budget.steps_per_epoch, budget.total_steps, budget.source_steps) == (2, 8, {})
    lr, lrs = lr_schedule(cfg.optim, 2 * 3 * 2, 8, 2)
    assert budget.lr == lr == pytest.approx(cfg.optim.lr * 12 / 256) and budget.lrs.tolist() == lrs.tolist()
    # Fine-tuning counts every clip of a video (num_sample) in the LR's batch, as UMT does.
    assert step_budget(cfg, 13, 2, clips_per_item=2).lr == pytest.approx(2 * budget.lr)
    assert step_budget(_cfg("train.max_steps=5"), 13, 2).total_steps == 5


def test_step_budget_places_steps_in_epochs() -> None:
    budget = step_budget(_cfg("train.max_steps=7"), 18, 1)  # 3 steps per epoch, 7 in all
    assert [budget.position(s) for s in range(7)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    assert [budget.steps_left_in_epoch(s) for s in (0, 1, 3, 5, 6)] == [3, 2, 3, 1, 1]  # the run ends mid-epoch


def test_step_budget_of_several_sources_sums_their_steps() -> None:
    budget = step_budget(_cfg(), {"video": 13, "image": 5}, 1)
    assert budget.source_steps == {"video": 2, "image": 0} and budget.steps_per_epoch == 2


def test_step_budget_refuses_data_that_fills_no_step() -> None:
    with pytest.raises(ValueError, match="5 videos per rank are fewer than one step of train.batch_size=2 x train.accum_steps=3; lower"):
        step_budget(_cfg(), 5, 1, what="videos")
    with pytest.raises(ValueError, match=r"the sources fill no step of train.batch_size=2 x train.accum_steps=3 per rank \(clips per rank: \{'video': 5"):
        step_budget(_cfg(), {"video": 5, "image": 1}, 1)


# --------------------------------------------------------------------------------------------------
# data: one loader, and the resume skip


class _EpochItems(Dataset):
    """Item i of epoch e is the tensor [e, i]; like the view datasets, what it returns depends on the epoch."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([self.epoch, i])


class _EpochStream(IterableDataset):
    """A stream of whole batches whose order depends on the epoch (as a WebDataset store streams)."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(12, generator=torch.Generator().manual_seed(self.epoch))
        for start in range(0, 12, 3):
            yield order[start:start + 3] + 100 * self.epoch


@pytest.mark.parametrize("workers", [0, 1])
def test_a_resumed_epoch_yields_the_batches_of_an_uninterrupted_one(workers: int) -> None:
    dataset = _EpochItems(11)
    sampler = EpochSampler(len(dataset), seed=3, rank=0, world_size=1)
    make_loader = partial(build_loader, dataset, 2, workers, 3, sampler, drop_last=True)
    whole = list(epoch_batches(dataset, sampler, make_loader, 2, 0, 2))
    assert len(whole) == 5 and all(int(b[0, 0]) == 2 for b in whole), "5 full batches of epoch 2"
    resumed = list(epoch_batches(dataset, sampler, make_loader, 2, 3, 2))
    assert len(resumed) == 2 and all(torch.equal(a, b) for a, b in zip(resumed, whole[3:]))


def test_a_resumed_stream_reads_past_the_consumed_batches() -> None:
    stream = _EpochStream()
    make_loader = partial(build_loader, stream, None, 0, 0)
    whole = list(epoch_batches(stream, None, make_loader, 1, 0, 3))
    resumed = list(epoch_batches(stream, None, make_loader, 1, 3, 3))
    assert len(whole) == 4 and len(resumed) == 1 and torch.equal(resumed[0], whole[3])


def test_the_loader_leaves_the_global_rng_alone() -> None:
    dataset = _EpochItems(6)
    loader = build_loader(dataset, 4, 0, 0, EpochSampler(6, 0, 0, 1), drop_last=True)
    before = torch.get_rng_state()
    assert [b.shape[0] for b in loader] == [4]  # drop_last: the ragged batch is not trained on
    assert torch.equal(torch.get_rng_state(), before), "creating an iterator must not consume the global RNG"
    assert [b.shape[0] for b in build_loader(dataset, 4, 0, 0)] == [4, 2]  # evaluation sees every item
    assert build_loader(dataset, 4, 1, 0).prefetch_factor == PREFETCH_FACTOR
    assert not build_loader(dataset, 4, 1, 0).persistent_workers, "set_epoch must reach fresh workers"


# --------------------------------------------------------------------------------------------------
# one step


class _FakeDDP(nn.Module):
    """Records which micro-steps ran under ``no_sync``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.local = False
        self.calls = 0

    @contextmanager
    def no_sync(self):
        self.calls += 1
        self.local = True
        try:
            yield
        finally:
            self.local = False


def test_micro_steps_skip_the_gradient_sync_on_all_but_the_last() -> None:
    model = _FakeDDP()
    local = []
    for micro in range(4):
        with micro_step(model, micro, 4, None, CPU):
            local.append(model.local)
    assert local == [True, True, True, False] and model.calls == 3
    with micro_step(nn.Linear(2, 2), 0, 4, None, CPU):  # not wrapped (one process): no no_sync to call
        pass


@pytest.fixture
def gloo_world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_micro_steps_of_a_real_ddp_module_sync_once(gloo_world_of_one) -> None:
    model = DistributedDataParallel(nn.Linear(3, 1))
    syncing = []
    for micro in range(3):
        with micro_step(model, micro, 3, None, CPU):
            syncing.append(model.require_backward_grad_sync)
            model(torch.ones(2, 3)).sum().backward()
    assert syncing == [False, False, True]
    assert torch.equal(model.module.bias.grad, torch.tensor([6.0])), "gradients of all micro-steps accumulate"


def test_micro_step_autocasts_only_when_asked() -> None:
    with micro_step(nn.Linear(2, 2), 0, 1, torch.bfloat16, CPU):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with micro_step(nn.Linear(2, 2), 0, 1, None, CPU):
        assert not torch.is_autocast_enabled("cpu")


def _two_layers_one_frozen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    model[1].requires_grad_(False)
    model(torch.randn(4, 3)).pow(2).sum().backward()
    model[1].weight.grad = torch.full_like(model[1].weight, 100.0)  # a stale gradient on a frozen part
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    return model, optimizer, amp_setup("none", CPU)[1]


def test_gradients_are_clipped_over_the_parameters_that_require_grad(tmp_path) -> None:
    model, optimizer, scaler = _two_layers_one_frozen()
    trainable = [model[0].weight, model[0].bias]
    grads = [p.grad.clone() for p in trainable]
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()
    before = [p.detach().clone() for p in trainable]
    got = optimizer_step(1.0, 0, model, optimizer, scaler, grad_clip=norm / 2, out_dir=tmp_path)
    assert got == pytest.approx(norm), "the frozen layer's gradient is not part of the norm"
    for p, p0, g in zip(trainable, before, grads):  # SGD, lr 1: the step is the clipped gradient
        torch.testing.assert_close(p0 - p.detach(), g / 2, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in trainable), "gradients are zeroed (set to None) for the next step"

    model, optimizer, scaler = _two_layers_one_frozen()
    w0 = model[0].weight.detach().clone()
    g0 = model[0].weight.grad.clone()
    assert optimizer_step(1.0, 0, model, optimizer, scaler, None, tmp_path) == pytest.approx(norm)
    torch.testing.assert_close(w0 - model[0].weight.detach(), g0), "grad_clip None: measured, not clipped"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_loss_stops_before_the_update(tmp_path, bad: float) -> None:
    model, optimizer, scaler = _two_layers_one_frozen()
    before = model[0].weight.detach().clone()
    with pytest.raises(NonFiniteLossError, match=rf"loss is {bad} at step 5; the last good checkpoint is kept in .*run"):
        optimizer_step(bad, 4, model, optimizer, scaler, 1.0, tmp_path / "run")
    assert torch.equal(model[0].weight, before)


def test_collectives_are_identities_in_one_process() -> None:
    x = torch.arange(3.0)
    assert rank_world() == (0, 1)
    assert sum_over_ranks(x) is x and gather_objects("a") == ["a"]
    values = {"loss": 0.1 + 0.2, "loss_vtc": 3.0}
    assert mean_over_ranks(values, CPU) == values


# --------------------------------------------------------------------------------------------------
# the run's outputs


def test_steps_are_logged_and_checkpointed_on_their_cadence_and_at_the_end(tmp_path, monkeypatch) -> None:
    waits = []
    monkeypatch.setattr(loop, "barrier", lambda: waits.append(True))
    cfg = _cfg(f"train.output_dir={tmp_path}", "train.log_every=2", "train.ckpt_every=3")
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run, step = open_run(cfg, "test", DistEnv(), model, optimizer, None, total_steps=5)
    assert step == 0
    for step in range(1, 6):
        run.log_step({"step": step, "loss": float(step)})
        run.checkpoint_if_due(step, 0, model, optimizer)
    run.close()
    assert [m["step"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [2, 4, 5]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000003", "step-00000005"]
    assert len(waits) == 2, "every rank waits at each checkpoint"

    # Another rank writes nothing but waits as well.
    other = RunOutputs(tmp_path / "other", MetricsLogger(tmp_path / "other", enabled=False),
                       StepProgress("test", 3, enabled=False), 3, 1, 1, "", is_main=False)
    other.log_step({"step": 1, "loss": 1.0})
    other.checkpoint_if_due(1, 0, model, optimizer)
    assert not (tmp_path / "other").exists() and len(waits) == 3


def test_open_run_resumes_weights_and_drops_later_metrics(tmp_path) -> None:
    cfg = _cfg(f"train.output_dir={tmp_path}", "train.log_every=1", "train.ckpt_every=2")
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run, _ = open_run(cfg, "test", DistEnv(), model, optimizer, None, total_steps=4)
    for step in range(1, 4):
        run.log_step({"step": step, "loss": float(step)})
        run.checkpoint_if_due(step, 0, model, optimizer)
    saved = model.weight.detach().clone()
    run.close()

    fresh = nn.Linear(2, 2)
    run, step = open_run(cfg, "test", DistEnv(), fresh, torch.optim.SGD(fresh.parameters(), lr=0.1),
                         find_resume_checkpoint(tmp_path), total_steps=4)
    run.close()
    assert step == 2 and torch.equal(fresh.weight, saved)
    assert [m["step"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2], "step 3 is logged again"
