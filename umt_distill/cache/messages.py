"""What ``cache-teacher`` tells the user: the shards it redoes and why, and the final counts.

The final report names cached and failed clips separately (a failed clip has no records), shows the
first failed ids with their reasons and points at ``failures.jsonl``, which lists them all.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from umt_distill.data.admission import FAILURES_FILE


def print_redone(redone: list, env, enabled: bool) -> None:
    if not (enabled and redone):
        return
    who = f"rank {env.rank}: " if env.world_size > 1 else ""
    console = Console(stderr=True)
    for r in redone:
        console.print(f"[yellow]{who}redoing {r.shard}[/]: {escape(r.reason)}", highlight=False)


def summary_lines(root: Path, summary: dict, shown: int = 5) -> list[str]:
    """The final report: cached and failed clip counts, the first failed ids with their reasons.

    ``root`` is the folder the files are read from; a store on object storage is written through a local
    staging folder, and the report names the store's URL (``summary["store"]``) instead.
    """
    clips, failed = summary.get("clips", 0), summary.get("failures", 0)
    where = summary.get("store") or str(root)
    head = "done" if not failed else "done, with failed clips"
    lines = [(f"{head}: {clips - failed} of {clips} clips cached ({summary.get('records', 0)} records), "
              f"{failed} failed — store {where}")]
    if failed:
        with open(root / FAILURES_FILE, encoding="utf-8") as f:
            first = [json.loads(line) for _, line in zip(range(shown), f)]
        lines += [f"  failed {x['id']} ({x.get('path')}): {x['reason']}" for x in first]
        if failed > len(first):
            lines.append(f"  ... and {failed - len(first)} more")
        lines.append(f"  every failed clip and its reason: {where.rstrip('/')}/{FAILURES_FILE} "
                     f"(re-attempt them with --retry-failed)")
    return lines


def print_summary(root: Path, summary: dict) -> None:
    console = Console(stderr=True)
    lines = summary_lines(root, summary)
    colour = "green" if not summary.get("failures") else "yellow"
    console.print(f"[{colour}]{escape(lines[0])}[/]", highlight=False)
    for line in lines[1:]:
        console.print(line, highlight=False, markup=False)
