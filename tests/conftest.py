"""Shared fixtures. Everything is generated locally: tiny open_clip configs, PyAV-encoded videos."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores: keep torch from oversubscribing when tests spawn subprocesses.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach a model hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
