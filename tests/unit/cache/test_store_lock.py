"""One writer per store: the lock names its holder, and a lock whose holder died is taken by the next run."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from umt_distill.cache.lock import LOCK_FILE, StoreLock, StoreLockedError


def test_a_second_writer_is_refused_naming_the_holder(tmp_path: Path) -> None:
    with StoreLock(tmp_path / "store", "cache-teacher"):
        with pytest.raises(StoreLockedError, match=r"being written by another run \(cache-teacher by pid \d+ on "):
            StoreLock(tmp_path / "store", "repair").acquire()


def test_another_process_is_refused_while_the_holder_lives(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        from umt_distill.cache.lock import StoreLock, StoreLockedError
        try:
            StoreLock({str(tmp_path)!r}, "cache-teacher").acquire()
        except StoreLockedError as e:
            print("refused:", e)
    """)
    with StoreLock(tmp_path, "cache-teacher"):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "refused:" in done.stdout and "cache-teacher by pid" in done.stdout, done.stderr


def test_a_lock_whose_holder_died_is_taken_over(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import os
        from umt_distill.cache.lock import StoreLock
        StoreLock({str(tmp_path)!r}, "cache-teacher").acquire()
        os.kill(os.getpid(), 9)  # dies holding it
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == -9
    assert "cache-teacher" in (tmp_path / LOCK_FILE).read_text()  # its note is still there ...
    with StoreLock(tmp_path, "repair"):  # ... but the lock died with it
        assert '"purpose": "repair"' in (tmp_path / LOCK_FILE).read_text()
