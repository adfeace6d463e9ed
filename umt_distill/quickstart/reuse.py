"""Reuse of finished steps: a run folder is trained, resumed, or reused when its identity matches."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

DONE_FILE = "quickstart_done.json"  # a finished run: its identity (recipe, teacher, ...) and last metrics
STARTED_FILE = "quickstart_started.json"  # a started one: resumed only with the same identity


@dataclass
class StepLog:
    """What each pipeline step did: ``(name, "done" | "reused", seconds, detail)``."""

    steps: list[tuple[str, str, float, str]] = field(default_factory=list)

    def add(self, name: str, reused: bool, seconds: float, detail: str = "") -> None:
        self.steps.append((name, "reused" if reused else "done", round(seconds, 1), detail))


def ensure_run(run: Path, identity: dict, train: Callable[[], dict], console: Console, label: str) -> tuple[bool, dict]:
    """Train into ``run``, resume an interrupted run, or reuse a finished one with the same ``identity``.

    Args:
        run: The run folder (``train`` writes its checkpoints and metrics.jsonl there).
        identity: JSON-able; everything that makes two runs the same (recipe, initial weights ...).
        train: Trains (resuming from ``run``'s checkpoints) and returns JSON-able final metrics.
        console: Messages and a progress line labelled ``label``.

    Returns:
        (reused, what ``train`` returned: kept in the done marker, so a reused run returns it too).
    """
    marker, started = run / DONE_FILE, run / STARTED_FILE
    last = finished_run(run, identity)
    if last is not None:
        return True, last
    if run.exists() and not (started.exists() and same_identity(json.loads(started.read_text()), identity)):
        # Another recipe or teacher (or a run from before this marker existed): a resume would mix them.
        console.print(f"  [yellow]{run} holds a run of another recipe or teacher; training again[/]")
        shutil.rmtree(run)
    elif started.exists():
        console.print("  [green]resuming the interrupted training run[/]")
    run.mkdir(parents=True, exist_ok=True)
    started.write_text(json.dumps(identity), encoding="utf-8")
    with TrainingProgress(run / "metrics.jsonl", console, label):
        last = train()
    marker.write_text(json.dumps({**identity, "last": last}), encoding="utf-8")
    return False, last


def finished_run(run: Path, identity: dict) -> dict | None:
    """The final metrics of a finished run in ``run`` with this ``identity`` (reusable), else None."""
    marker = run / DONE_FILE
    if not marker.exists():
        return None
    done = json.loads(marker.read_text())
    return done.get("last", {}) if same_identity(done, identity) else None


def same_identity(found: dict, identity: dict) -> bool:
    """Whether a marker's content ``found`` holds exactly ``identity`` (other keys, e.g. ``last``, aside)."""
    return {k: found.get(k) for k in identity} == identity


class TrainingProgress:
    """Shows step and loss while a training loop runs, by following its metrics.jsonl (the loop stays untouched)."""

    def __init__(self, metrics: Path, console: Console, label: str = "stage 1") -> None:
        self.metrics, self.console, self.label, self.stop = metrics, console, label, threading.Event()

    def __enter__(self):
        self.progress = Progress(SpinnerColumn(), TextColumn(f"[bold]{self.label}[/] {{task.description}}"), TimeElapsedColumn(),
                                 console=self.console, transient=True)
        self.task = self.progress.add_task("starting")
        self.progress.start()
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()
        return self

    def _follow(self) -> None:
        while not self.stop.wait(0.5):
            try:
                lines = self.metrics.read_text(encoding="utf-8").splitlines()
                last = json.loads(lines[-1]) if lines else None
            except (OSError, json.JSONDecodeError, IndexError):
                continue
            if last and "loss" in last:
                self.progress.update(self.task, description=f"step {last['step']}  loss {last['loss']:.4f}")

    def __exit__(self, *exc) -> bool:
        self.stop.set()
        self.thread.join()
        self.progress.stop()
        return False
