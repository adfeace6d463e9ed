"""The quickstart's job pool: the same results side by side (spawned processes) as one after the other."""

from __future__ import annotations

import io
import sys
import time

import pytest
from rich.console import Console
from rich.progress import Progress

from umt_distill.quickstart.pool import Job, JobPool, TaggedLines


def square_and_say(x: int, console: Console) -> int:
    console.print(f"[green]squared[/] {x}")
    print(f"plain print of {x}")
    with Progress(console=console, transient=True):  # as ensure_run shows a run: stderr must not go into it
        sys.stderr.write(f"progress of {x}\npartial ")
        sys.stderr.write("line\n")
    return x * x


def fail(message: str, console: Console) -> None:
    raise ValueError(message)


def sleep_long(seconds: float, console: Console) -> None:
    time.sleep(seconds)


def quiet() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=100), buffer


def test_jobs_side_by_side_give_what_they_give_in_process(capfd) -> None:
    console, printed = quiet()
    with JobPool(1, 1, console) as pool:
        assert not pool.side_by_side
        here = [pool.submit(Job(f"job {x}", square_and_say, (x,))).result() for x in (2, 3)]
    assert [d.value for d in here] == [4, 9] and all(d.printed == "" for d in here)
    assert "squared 2" in printed.getvalue()  # printed on the caller's console, as it ran
    capfd.readouterr()

    console, printed = quiet()
    with JobPool(2, 1, console) as pool:
        assert pool.side_by_side
        futures = [pool.submit(Job(f"job {x}", square_and_say, (x,))) for x in (2, 3, 4)]
        apart = [f.result() for f in futures]
    assert [d.value for d in apart] == [4, 9, 16] and printed.getvalue() == ""
    for x, done in zip((2, 3, 4), apart, strict=True):
        assert "squared" in done.printed and f"plain print of {x}" in done.printed and done.seconds >= 0
        assert "\x1b[32m" in done.printed  # styles kept for the caller's console
        done.show(console)
    assert "squared 3" in printed.getvalue() and "\x1b" not in printed.getvalue()  # a file console: plain text
    err = capfd.readouterr().err  # the workers' stderr: whole lines, tagged by job
    for x in (2, 3, 4):
        assert f"  [job {x}] progress of {x}\n" in err and f"  [job {x}] partial line\n" in err


def test_a_failing_job_raises_its_error_to_the_caller() -> None:
    with JobPool(1, 1, quiet()[0]) as pool, pytest.raises(ValueError, match="no such clip: clip-007"):
        pool.submit(Job("bad", fail, ("no such clip: clip-007",)))  # in this process: raised at once
    with JobPool(2, 1, quiet()[0]) as pool:
        future = pool.submit(Job("bad", fail, ("no such clip: clip-007",)))
        with pytest.raises(ValueError, match="no such clip: clip-007"):
            future.result()


def test_leaving_the_pool_on_an_error_stops_running_jobs() -> None:
    t = time.perf_counter()
    with pytest.raises(RuntimeError, match="the caller failed"), JobPool(2, 1, quiet()[0]) as pool:
        pool.submit(Job("slow", sleep_long, (120.0,)))
        pool.submit(Job("slow too", sleep_long, (120.0,)))
        time.sleep(2.0)  # both started
        raise RuntimeError("the caller failed")
    assert time.perf_counter() - t < 60.0


def test_tagged_lines_write_whole_lines_and_are_no_terminal() -> None:
    out = io.StringIO()
    stream = TaggedLines(out)
    stream.write("untagged\n")
    stream.tag = "stage 2"
    stream.write("stage2 step 1/")
    assert out.getvalue() == "untagged\n"  # a partial line waits for its end
    stream.write("10\nstage2 step 10/10\n")
    assert out.getvalue() == "untagged\n  [stage 2] stage2 step 1/10\n  [stage 2] stage2 step 10/10\n"
    assert not stream.isatty()
