"""Optimizer groups, schedules, samplers, checkpoints, epoch views."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from umt_distill.data.samplers import EpochSampler
from umt_distill.data.views import epoch_view
from umt_distill.models.checkpoints import latest_checkpoint
from umt_distill.training.checkpoint import load_checkpoint, save_checkpoint
from umt_distill.training.optim import cosine_schedule, param_groups, scaled_lrs


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.pos = nn.Parameter(torch.zeros(3, 4))
        self.frozen = nn.Linear(2, 2).requires_grad_(False)


def test_param_groups_skip_decay_for_1d_biases_and_named() -> None:
    groups = param_groups(_Net(), 0.05, skip=["pos"])
    by_wd = {g["weight_decay"]: set(g["names"]) for g in groups}
    assert by_wd[0.05] == {"lin.weight"}
    assert by_wd[0.0] == {"lin.bias", "norm.weight", "norm.bias", "pos"}
    assert all("frozen" not in n for g in groups for n in g["names"])


def test_cosine_schedule_warmup_and_end() -> None:
    s = cosine_schedule(1.0, 0.1, total_iters=20, warmup_iters=5, warmup_start=0.0)
    assert len(s) == 20
    np.testing.assert_allclose(s[:5], [0.0, 0.2, 0.4, 0.6, 0.8])
    assert s[5] == pytest.approx(1.0)
    assert np.all(np.diff(s[5:]) <= 0) and s[-1] > 0.1 and s[-1] == pytest.approx(0.1, abs=0.02)


def test_lr_scaling_rule() -> None:
    assert scaled_lrs(1.5e-4, 1e-5, 0.0, 2048, True) == pytest.approx((1.2e-3, 8e-5, 0.0))
    assert scaled_lrs(1.5e-4, 1e-5, 0.0, 2048, False) == (1.5e-4, 1e-5, 0.0)


def test_epoch_sampler_is_a_partition_and_resumes() -> None:
    a, b = EpochSampler(11, seed=3, rank=0, world_size=2), EpochSampler(11, seed=3, rank=1, world_size=2)
    a.set_epoch(2)
    b.set_epoch(2)
    ia, ib = list(a), list(b)
    assert len(ia) == len(ib) == 5 and not set(ia) & set(ib)
    a.set_epoch(2, start=3)
    assert list(a) == ia[3:]
    a.set_epoch(3)
    assert list(a) != ia


def test_epoch_view_cycles_through_all_views() -> None:
    seen = {epoch_view(0, "clip", e, 4) for e in range(4)}
    assert seen == {0, 1, 2, 3}
    offsets = {epoch_view(0, f"c{i}", 0, 4) for i in range(40)}
    assert len(offsets) > 1, "clips start at different views"


def test_checkpoint_round_trip_and_latest(tmp_path) -> None:
    net = _Net()
    opt = torch.optim.AdamW(net.parameters())
    save_checkpoint(tmp_path, 3, net, {"step": 3, "optimizer": opt.state_dict()}, "seed: 0\n")
    save_checkpoint(tmp_path, 6, net, {"step": 6, "optimizer": opt.state_dict()}, "seed: 0\n")
    save_checkpoint(tmp_path, 9, net, {"step": 9, "optimizer": opt.state_dict()}, "seed: 0\n")
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "step-00000009"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000006", "step-00000009"]
    other = _Net()
    state = load_checkpoint(ckpt, other)
    assert state["step"] == 9
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))
    with pytest.raises(RuntimeError, match="missing"):
        load_checkpoint(ckpt, nn.Linear(4, 4))


def test_find_resume_checkpoint_refuses_an_empty_resume_path(tmp_path) -> None:
    from umt_distill.training.checkpoint import find_resume_checkpoint

    assert find_resume_checkpoint(tmp_path / "new_run") is None  # a fresh run starts from scratch
    (tmp_path / "empty").mkdir()
    for missing in (tmp_path / "empty", tmp_path / "nowhere"):
        with pytest.raises(FileNotFoundError, match="no checkpoint there"):
            find_resume_checkpoint(tmp_path / "run", resume=missing)


def test_weights_file_passes_files_and_names_empty_run_folders(tmp_path) -> None:
    from umt_distill.models.checkpoints import weights_file

    assert weights_file(tmp_path / "umt_b16.pth") == tmp_path / "umt_b16.pth"  # an official file as given
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        weights_file(tmp_path)
