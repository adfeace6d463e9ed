"""Training state without pickle: the new format round-trips a real state exactly; an earlier version's
state.pt still loads when it holds only tensors, containers and numpy's RNG state; a state.pt carrying
anything else is refused by name and its payload never runs."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from umt_distill.models.checkpoints import CheckpointError, latest_checkpoint
from umt_distill.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from umt_distill.training.state_file import LEGACY_STATE, STATE_JSON, load_state, save_state


def _real_state() -> dict:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(3, 4)).sum().backward()
    opt.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    return {"step": 7, "epoch": 1, "consumed": 3, "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
            "rng": rng_state(), "metrics": [{"loss": 0.5, "nan": float("nan")}], "shape": (2, 3), "none": None}


def _assert_same(a, b, where="state") -> None:
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, where
    else:
        assert a == b, where


def test_a_real_training_state_round_trips_exactly(tmp_path: Path) -> None:
    state = _real_state()
    save_state(tmp_path, state)
    assert not (tmp_path / LEGACY_STATE).exists()
    _assert_same(state, load_state(tmp_path))


def test_restored_rng_state_gives_the_same_draws(tmp_path: Path) -> None:
    save_state(tmp_path, {"rng": rng_state()})
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_state(tmp_path)["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_an_earlier_versions_state_pt_still_loads(tmp_path: Path) -> None:
    state = _real_state()
    torch.save(state, tmp_path / LEGACY_STATE)
    _assert_same(state, load_state(tmp_path))


class _Payload:
    """What an attacker puts in a shared run folder: unpickling it would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_state_pt_carrying_a_payload_is_refused_by_name_and_never_runs(tmp_path: Path) -> None:
    net = nn.Linear(4, 2)
    ckpt = save_checkpoint(tmp_path / "run", 5, net, {"step": 5}, "seed: 0\n")
    (ckpt / STATE_JSON).unlink()
    (ckpt / "state.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    torch.save({"step": 5, "optimizer": {}, "extra": _Payload(marker)}, ckpt / LEGACY_STATE)
    assert latest_checkpoint(tmp_path / "run") == ckpt
    with pytest.raises(CheckpointError, match=r"state\.pt: refused: it holds objects outside the allow-list"):
        load_checkpoint(ckpt, nn.Linear(4, 2))
    assert not marker.exists(), "the pickled payload ran"


def test_a_damaged_state_is_named(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "run", 1, nn.Linear(2, 2), {"step": 1, "w": torch.ones(3)}, "")
    (ckpt / "state.safetensors").write_bytes(b"\x00" * 8)
    with pytest.raises(CheckpointError, match=r"state\.json: cannot read the training state"):
        load_checkpoint(ckpt, nn.Linear(2, 2))


def test_objects_outside_the_format_are_refused_when_saving(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"state\.when: datetime cannot be saved"):
        import datetime

        save_state(tmp_path, {"when": datetime.datetime.now()})
