"""One writer per store, whatever the world size.

A writing run (``cache-teacher``, ``cache verify --repair``) holds an exclusive ``flock`` on
``<store>/.lock`` for its whole life; under torchrun only rank 0 takes it, before any rank touches a
file, and tells the other ranks whether it got it. The lock file names its holder (host, pid, start
time, command), so a refused run says who holds the store. The kernel releases the lock when its holder
exits, however it exits, so a lock whose holder died is simply taken by the next run: there is no stale
state to clean up, and a run never deletes files while another live run holds the store.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import IO

from umt_distill.cache.spec import now_iso

LOCK_FILE = ".lock"


class StoreLockedError(RuntimeError):
    """Another live run is writing the store."""


class StoreLock:
    """The exclusive write lock of one store (a context manager); see the module docstring."""

    def __init__(self, root: str | Path, purpose: str) -> None:
        self.root, self.purpose = Path(root), purpose
        self._handle: IO[str] | None = None

    def acquire(self) -> StoreLock:
        """Take the lock or raise :class:`StoreLockedError` naming the holder."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK_FILE
        handle = open(path, "a+", encoding="utf-8")  # never truncate before holding the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = describe_holder(handle.read(4096))
            handle.close()
            raise StoreLockedError(f"{self.root} is being written by another run ({holder}); wait for it to "
                                   "finish, or use another store") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": now_iso(),
                                 "purpose": self.purpose, "command": " ".join(sys.argv)[:500]}) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file releases the flock
            self._handle = None

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def describe_holder(text: str) -> str:
    """A lock file's holder in words (its content is informative only: the flock is what counts)."""
    try:
        info = json.loads(text)
        return (f"{info.get('purpose', 'a run')} by pid {info.get('pid')} on {info.get('host')}, "
                f"started {info.get('started')}")
    except (ValueError, AttributeError):
        return "holder unknown"
