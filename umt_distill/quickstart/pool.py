"""Independent quickstart jobs side by side: one process per slot, or one after the other in this process.

Once stage 1 has finished, the fine-tuning runs of step 6 and stage 2 of step 7 share nothing but their
inputs, so with ``quickstart.finetune.parallel=2`` (the default; this machine has 2 cores) they run two
at a time, each in its own spawned process with one torch thread. Every job is deterministic on its own,
so running jobs side by side changes when they finish, not what they compute.

A job is a module-level function whose last argument is ``console``. In this process (``parallel=1``)
it is the quickstart's console and the job runs when it is submitted. In a worker process it is a
console that records what is printed (``print`` included), handed back with the result (:class:`Done`)
for the caller to show or drop. A worker's stderr, where the training loops write their
progress, is never a terminal there (two processes cannot share one live bar): it gets the loops' plain
lines, each prefixed with the job's tag.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.text import Text


@dataclass(frozen=True)
class Job:
    """``fn(*args, console=...)``, shown as ``tag`` in its progress lines."""

    tag: str
    fn: Callable[..., Any]
    args: tuple = field(default=())


@dataclass(frozen=True)
class Done:
    """A finished job: what ``fn`` returned, what it printed (ANSI-styled; empty when it ran in this
    process and printed to the console itself) and its wall-clock seconds."""

    value: Any
    printed: str
    seconds: float

    def show(self, console: Console) -> None:
        """Print what the job printed, with its styles, on ``console``."""
        if self.printed:
            console.print(Text.from_ansi(self.printed.rstrip("\n")), highlight=False)


class JobPool:
    """Runs :class:`Job` s ``parallel`` at a time in spawned processes (``parallel`` > 1), else in order here.

    Args:
        parallel: Jobs at a time.
        threads: torch threads of each worker process.
        console: The caller's console (the in-process jobs print there; its width is the workers').
    """

    def __init__(self, parallel: int, threads: int, console: Console) -> None:
        self.parallel, self.threads, self.console = int(parallel), int(threads), console
        self._executor: ProcessPoolExecutor | None = None

    @property
    def side_by_side(self) -> bool:
        return self.parallel > 1

    def submit(self, job: Job) -> Future:
        """Start ``job``; the future's result is a :class:`Done`, or raises what the job raised.

        In this process the job runs now, and what it raises is raised here, before anything else starts
        (as a plain loop would).
        """
        if not self.side_by_side:
            t = time.perf_counter()
            value = job.fn(*job.args, console=self.console)
            future: Future = Future()
            future.set_result(Done(value, "", round(time.perf_counter() - t, 1)))
            return future
        if self._executor is None:
            # spawn: a fresh interpreter per worker (no forked torch state); a worker runs job after job
            self._executor = ProcessPoolExecutor(self.parallel, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_start_worker, initargs=(self.threads,))
        return self._executor.submit(_run_in_worker, job, self.console.width)

    def close(self, cancel: bool = False) -> None:
        """Wait for the running jobs and stop the workers; ``cancel`` (the caller failed): stop them now."""
        if self._executor is None:
            return
        if cancel:  # nobody will read the results: do not wait minutes for a run to finish
            for process in list(getattr(self._executor, "_processes", {}).values()):  # no public API before 3.14
                process.terminate()
        self._executor.shutdown(wait=True, cancel_futures=cancel)
        self._executor = None

    def __enter__(self) -> JobPool:
        return self

    def __exit__(self, exc_type, *_) -> bool:
        self.close(cancel=exc_type is not None)
        return False


class TaggedLines(io.TextIOBase):
    """A text stream of whole lines, each prefixed with ``[tag]``; never a TTY (a worker's stderr)."""

    def __init__(self, stream) -> None:
        super().__init__()
        self.stream, self.tag, self._partial = stream, "", ""

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, s: str) -> int:
        *lines, self._partial = (self._partial + s).split("\n")
        for line in lines:
            self.stream.write(f"  [{self.tag}] {line}\n" if self.tag else f"{line}\n")
        if lines:
            self.stream.flush()
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    sys.stderr = TaggedLines(sys.__stderr__)


def _run_in_worker(job: Job, width: int) -> Done:
    # Not a terminal console: rich's live displays would redirect stderr (the loops' progress) into it.
    console = Console(file=io.StringIO(), record=True, width=width)
    if isinstance(sys.stderr, TaggedLines):
        sys.stderr.tag = job.tag
    t = time.perf_counter()
    try:
        with contextlib.redirect_stdout(_IntoConsole(console)):  # print() lands in order with the rest
            value = job.fn(*job.args, console=console)
    finally:
        sys.stderr.flush()
    return Done(value, console.export_text(styles=True), round(time.perf_counter() - t, 1))


class _IntoConsole(io.TextIOBase):
    """``print`` into a console's record, as written (no markup, no wrapping)."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.console.out(s, end="", highlight=False)
        return len(s)


__all__ = ["Done", "Job", "JobPool", "TaggedLines"]
