"""The run folder's ``ledger.jsonl``: which samples every rank trained on at every step.

One JSON line per optimizer step, written by rank 0 after the step::

    {"step": 7, "world": 2, "position": 12, "ranks": [[[e, p, "clip", v], ...], [[e, p, "clip", v], ...]]}

``position`` is the global position (samples of the run consumed) where the step starts; ``ranks[r]``
lists rank ``r``'s samples in the order it read them, each ``[epoch, global position, clip id, view
index]``. With the elastic order of stage 1 (``data.samplers``) the positions of all ranks of a step
are ``position .. position + W·B·A − 1``, each once; so the ledger shows that a run resumed at another
world size trained the same sequence, every sample of an epoch exactly once.

A line is written with one ``write`` on a file opened for appending, so a killed run leaves whole
lines (a torn last line, if any, is ignored by :func:`read_ledger`); a resumed run first drops the
lines after its checkpoint's step (they are trained again).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

LEDGER = "ledger.jsonl"


class Ledger:
    """Appends the per-step sample lists of a run (rank 0 writes; on other ranks it does nothing)."""

    def __init__(self, output_dir: str | Path, enabled: bool = True) -> None:
        self.path, self.enabled = Path(output_dir) / LEDGER, enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, step: int, world: int, position: int, ranks: list[list[list]]) -> None:
        """Append step ``step`` (1-based, after it finished) that started at global ``position``."""
        if not self.enabled:
            return
        line = json.dumps({"step": step, "world": world, "position": position, "ranks": ranks}) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))  # one write: a kill leaves the line whole or absent
        finally:
            os.close(fd)

    def truncate_after(self, step: int) -> None:
        """On resume: keep the lines of steps up to ``step`` (the checkpoint's), atomically; read and written
        line by line (a long run's ledger holds one line per step)."""
        if not self.enabled or not self.path.exists():
            return
        tmp = self.path.with_name(f".{LEDGER}.tmp-{os.getpid()}")
        with open(self.path, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as dst:
            for record in _records(src):
                if record["step"] <= step:
                    dst.write(json.dumps(record) + "\n")
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, self.path)


def _records(lines) -> Iterator[dict]:
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a torn last line
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and isinstance(record.get("ranks"), list):
            yield record


def read_ledger(path: str | Path) -> list[dict]:
    """The ledger's steps, in file order; a torn or unreadable line (a run killed mid-write) is skipped."""
    with open(path, encoding="utf-8") as f:
        return list(_records(f))


def epoch_samples(records: list[dict]) -> dict[int, list[tuple[int, str]]]:
    """Every epoch's ``(global position, clip id)`` pairs over all steps and ranks, sorted by position."""
    by_epoch: dict[int, list[tuple[int, str]]] = {}
    for record in records:
        for samples in record["ranks"]:
            for epoch, position, clip, _view in samples:
                by_epoch.setdefault(int(epoch), []).append((int(position), str(clip)))
    return {e: sorted(v) for e, v in sorted(by_epoch.items())}
