"""Live progress of a loop for a human: a rich bar at a terminal, periodic plain lines otherwise.

Only rank 0 shows anything (``enabled=False`` elsewhere). At a TTY the bar shows the step, the last
loss, steps/s and the time left; when stderr is a file or a pipe (a cluster log, CI) one plain line is
written at the first step, then every ``every_s`` seconds, and at the last step, so a log shows that
the run is alive without a line per step. Metrics still go to ``metrics.jsonl``; this is decoration.

A loop needs two lines::

    progress = StepProgress("stage1", total_steps, start=step, enabled=env.is_main)
    ...
    progress.update(step, loss=loss_sum)  # after each step; the display closes itself at the last one
"""

from __future__ import annotations

import atexit
import math
import sys
import time
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` (or ``m:ss`` under an hour); ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_line(label: str, done: int, total: int, rate: float, values: dict[str, float]) -> str:
    """One plain progress line, e.g. ``stage1 step 120/720 (16.7%) loss 0.4123 | 2.31 steps/s ETA 4:20``."""
    pct = 100.0 * done / total if total else 100.0
    shown = " ".join(f"{k} {v:.4g}" for k, v in values.items())
    eta = format_duration((total - done) / rate) if rate > 0 else "?"
    return f"{label} step {done}/{total} ({pct:.1f}%)" + (f" {shown}" if shown else "") + f" | {rate:.3g} steps/s ETA {eta}"


class StepProgress:
    """Progress of ``total`` steps of one loop, starting at ``start`` (a resumed run).

    Args:
        label: What is running (``"stage1"``, ``"eval"`` ...).
        total: The step count at which the loop ends.
        start: Steps already done before this process started (resume); the rate counts only new ones.
        enabled: False on ranks other than 0 (every call becomes a no-op).
        every_s: Seconds between plain lines when not at a terminal.
        unit: What one step is, for the rate (``steps``, ``batches``).
        stream: Where to write (default ``sys.stderr``); a TTY gets the rich bar.
    """

    def __init__(self, label: str, total: int, start: int = 0, enabled: bool = True, every_s: float = 30.0,
                 unit: str = "steps", stream: IO[str] | None = None) -> None:
        self.label, self.total, self.start, self.unit = label, int(total), int(start), unit
        self.enabled = enabled and self.total > self.start
        self.every_s = every_s
        self.stream = stream if stream is not None else sys.stderr
        self._t0 = time.perf_counter()
        self._last_line = -math.inf
        self._bar = None
        self._closed = not self.enabled
        if self.enabled and getattr(self.stream, "isatty", lambda: False)():
            self._bar = self._start_bar()
        if self.enabled:
            atexit.register(self.close)  # a loop that raises still restores the terminal

    def _start_bar(self):
        progress = Progress(
            TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(), console=Console(file=self.stream), transient=False,
        )
        self._task = progress.add_task(self.label, total=self.total, completed=self.start, info="")
        progress.start()
        return progress

    def rate(self, step: int) -> float:
        """Steps per second since this process started."""
        elapsed = time.perf_counter() - self._t0
        return (step - self.start) / elapsed if elapsed > 0 else 0.0

    def update(self, step: int, **values: float) -> None:
        """Report that ``step`` steps are done, with the latest values (e.g. ``loss=0.41``)."""
        if self._closed:
            return
        rate = self.rate(step)
        if self._bar is not None:
            shown = " ".join(f"{k} {v:.4g}" for k, v in values.items())
            self._bar.update(self._task, completed=step, info=f"{shown} {rate:.3g} {self.unit}/s")
        else:
            now = time.perf_counter()
            first, last = step == self.start + 1, step >= self.total
            if first or last or now - self._last_line >= self.every_s:
                self._last_line = now
                line = progress_line(self.label, step, self.total, rate, values).replace("steps/s", f"{self.unit}/s")
                print(line, file=self.stream, flush=True)
        if step >= self.total:
            self.close()

    def close(self) -> None:
        """Stop the bar (idempotent)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if self._bar is not None:
            self._bar.stop()


def track(items, label: str, total: int, enabled: bool = True, unit: str = "batches", **kw):
    """Yield from ``items`` while showing a :class:`StepProgress` of ``total`` (e.g. evaluation batches)."""
    progress = StepProgress(label, total, enabled=enabled, unit=unit, **kw)
    try:
        for i, item in enumerate(items, 1):
            yield item
            progress.update(i)
    finally:
        progress.close()
