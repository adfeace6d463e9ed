"""Atomic training checkpoints: safetensors weights plus a state file.

A checkpoint is a directory ``<output>/checkpoints/step-XXXXXXXX`` holding ``model.safetensors``
(the student only — never the teacher), ``state.json`` + ``state.safetensors`` (optimizer, step, epoch,
position in the epoch, RNG states, metrics so far; no pickle, see ``state_file.py``) and ``recipe.yaml``. It is written under a temporary name and renamed, and
``latest`` (a small text file) is replaced atomically to point at it. A kill at any instant leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from umt_distill.io import atomic_write_text, check_writable
from umt_distill.models.checkpoints import LATEST, latest_checkpoint
from umt_distill.training.state_file import load_state, save_state


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: str | Path, step: int, model: torch.nn.Module, state: dict[str, Any],
                    recipe_yaml: str, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and point ``latest`` at it; keep the newest ``keep``."""
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    for stale in root.glob(".tmp-step-*"):  # left by a run killed while saving (only rank 0 saves)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    tmp.mkdir()
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
    save_state(tmp, state)
    (tmp / "recipe.yaml").write_text(recipe_yaml, encoding="utf-8")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / LATEST, final.name + "\n")
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module) -> dict:
    """Load weights strictly into ``model`` and return the state dict (optimizer, step, RNG ...)."""
    path = Path(path)
    weights = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{path}: weights do not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    return load_state(path)


def find_resume_checkpoint(out_dir: str | Path, resume: str | Path | None = None) -> Path | None:
    """The checkpoint a training run continues from: ``resume`` if given, else ``out_dir``'s latest.

    Raises:
        FileNotFoundError: ``resume`` was given but holds no checkpoint.
    """
    check_writable(out_dir, "train.output_dir")  # every rank: a run that cannot save stops before it starts
    if resume is not None:
        ckpt = latest_checkpoint(resume) if Path(resume).exists() else None
        if ckpt is None:
            raise FileNotFoundError(f"--resume {resume}: no checkpoint there (expected model.safetensors or checkpoints/latest)")
        return ckpt
    return latest_checkpoint(out_dir) if Path(out_dir).exists() else None


def resume_training(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, metrics, announce: bool) -> int:
    """Restore weights, optimizer and RNG from ``ckpt``; drop metrics logged after it. Returns its step."""
    state = load_checkpoint(ckpt, model)
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    metrics.truncate_after(state["step"])
    if announce:
        print(f"resuming from {ckpt} at step {state['step']}", flush=True)
    return state["step"]
