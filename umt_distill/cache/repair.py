"""Which shards a re-run of ``cache-teacher`` must (re)do, and why.

A shard counts as finished when its sidecar ``shards/<name>.json`` exists. A re-run does not trust that
blindly: every finished shard is checked against its own sidecar, cheaply (the data is present and
has the recorded size) or, with ``deep``, by reading every record as training reads it (zarr: the
shard attributes, array metadata and shard indices, every chunk; wds: each epoch slot's byte range,
every sample's key, record, slot and checksums; basis codecs decoded with the store's basis). A
damaged shard loses its sidecar and data and is redone like an unfinished one. With ``retry_failed`` a shard whose sidecar lists failed clips is redone too, but only if one of
those clips decodes now; otherwise only the reasons in the sidecar are refreshed.

``cache-teacher`` (through :func:`plan_shard_work`) and ``cache verify --repair`` share this code.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from umt_distill.cache import wds_store, zarr_store
from umt_distill.cache.basis import codec_for_store
from umt_distill.cache.record import record_layout
from umt_distill.cache.spec import now_iso, read_spec
from umt_distill.cache.wds_store import group_problem, read_groups
from umt_distill.cache.zarr_store import ZarrShardReader
from umt_distill.data.clipviews import ClipFailure, decode_clip_views
from umt_distill.io import atomic_write_json


@dataclass(frozen=True)
class Redo:
    """A finished shard that is redone: ``shard`` name and the ``reason`` (said to the user)."""

    shard: str
    reason: str


def read_sidecar(shards_dir: Path, name: str) -> dict | None:
    """The sidecar of shard ``name``, or None when it does not exist. Unreadable → ValueError."""
    path = shards_dir / f"{name}.json"
    if not path.exists():
        return None
    try:
        sidecar = json.loads(path.read_text(encoding="utf-8"))
        for key in ("name", "num_records", "nbytes", "records", "failures"):
            sidecar[key]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable sidecar ({type(e).__name__}: {e})") from None
    return sidecar


def _data_path(shards_dir: Path, layout: str, name: str) -> Path:
    return shards_dir / f"{name}{zarr_store.SUFFIX if layout == 'zarr' else wds_store.SUFFIX}"


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def shard_damage(shards_dir: Path, layout: str, sidecar: dict, deep: bool = False) -> str | None:
    """Why a finished shard's data cannot be trusted, or None if it matches its sidecar.

    Args:
        shards_dir: ``<root>/shards``.
        layout: ``"zarr"`` or ``"wds"``.
        sidecar: The shard's sidecar (``read_sidecar``).
        deep: Also read every record (checksums, shapes, record order); costs a full read of the shard.
    """
    if sidecar["num_records"] == 0:
        return None  # every clip failed: the sidecar is the whole shard
    path = _data_path(shards_dir, layout, sidecar["name"])
    if not path.exists():
        return f"{path.name} is missing"
    size = _size(path)
    if size != sidecar["nbytes"]:
        return f"{path.name} has {size} bytes, its sidecar records {sidecar['nbytes']} (truncated or modified)"
    if not deep:
        return None

    root = shards_dir.parent
    try:
        spec = read_spec(root)
        codec = codec_for_store(root, spec)  # a basis codec bound to the store's basis
        if layout == "zarr":
            reader = ZarrShardReader(str(path), sidecar["records"], spec)
            if reader.codec.needs_basis:
                reader.codec = codec
            reader.check_indexes()
            count = 0
            for row in range(len(reader)):
                reader.read(row)
                count += 1
        else:  # as training reads it: each epoch slot's byte range on its own (wds_store.read_groups)
            views = spec.get("views", {})
            problem = group_problem(str(path), sidecar, int(views.get("num_views", 1)), int(views.get("seed", 0)))
            problem = problem or read_groups(str(path), sidecar, codec, record_layout(spec, "wds"))
            if problem is not None:
                return f"{path.name}: {problem.removeprefix(f'{path}: ')}"
            count = sidecar["num_records"]
    except Exception as e:  # StoreDamagedError, or whatever a corrupt file makes the decoder raise
        return f"{path.name}: {getattr(e, 'reason', None) or e}"
    if count != sidecar["num_records"]:
        return f"{path.name}: {count} records readable, its sidecar records {sidecar['num_records']}"
    return None


def discard_shard(shards_dir: Path, name: str) -> None:
    """Delete a shard's sidecar first (so a kill mid-way leaves an unfinished shard), then its data."""
    sidecar = shards_dir / f"{name}.json"
    if sidecar.exists():
        sidecar.unlink()
    for path in list(shards_dir.glob(f".tmp-{name}*")) + list(shards_dir.glob(f"{name}.*")):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _retry_decision(shards_dir: Path, sidecar: dict, rows, cfg) -> str | None:
    """``--retry-failed`` for one shard: a reason to redo it if a failed clip decodes now; else None,
    after writing the clips' new failure reasons into the sidecar."""
    by_id = {rows[i].id: rows[i] for i in range(*sidecar["clips"])}
    recovered, refreshed = [], []
    for failure in sidecar["failures"]:
        row = by_id.get(failure["id"])
        if row is None:  # the corpus changed under the store; the spec check normally stops this earlier
            refreshed.append(failure)
            continue
        try:
            decode_clip_views(row, cfg, num_views=1)
        except ClipFailure as e:
            refreshed.append({**failure, "reason": str(e)})
        else:
            recovered.append(failure["id"])
    if recovered:
        shown = ", ".join(recovered[:3]) + (" ..." if len(recovered) > 3 else "")
        return f"retrying failed clips: {len(recovered)} of {len(sidecar['failures'])} decode now ({shown})"
    if refreshed != sidecar["failures"]:
        atomic_write_json(shards_dir / f"{sidecar['name']}.json", {**sidecar, "failures": refreshed,
                                                                     "retried": now_iso()})
    return None


def plan_shard_work(shards_dir: Path, layout: str, plans: list, *, deep: bool = False,
                    retry_failed: bool = False, rows=None, cfg=None) -> tuple[list, list[Redo]]:
    """Split one rank's shards into work to do and finished shards to keep.

    Unfinished shards (no sidecar) lose their leftovers and are redone silently, as before. Finished
    shards are checked (:func:`shard_damage`); damaged ones, and with ``retry_failed`` those whose failed
    clips decode now, are discarded and redone — each with a :class:`Redo` saying why.

    Returns:
        ``(todo, redone)``: the plans to run, in order, and the finished shards among them with reasons.
    """
    from umt_distill.cache.remote_write import staged_remote

    remote = staged_remote(shards_dir.parent)  # a store on object storage: its shards are checked in the bucket
    todo, redone = [], []
    for plan in plans:
        try:
            sidecar = read_sidecar(shards_dir, plan.name)
        except ValueError as e:
            sidecar, reason = None, str(e)
            redone.append(Redo(plan.name, reason))
        if sidecar is not None:
            reason = shard_damage(shards_dir, layout, sidecar, deep) if remote is None else \
                remote.shard_damage(shards_dir, layout, sidecar, deep, read=shard_damage)
            if reason is None and retry_failed and sidecar["failures"]:
                reason = _retry_decision(shards_dir, sidecar, rows, cfg)
            if reason is None:
                continue
            redone.append(Redo(plan.name, reason))
        discard_shard(shards_dir, plan.name)
        if remote is not None:
            remote.discard(plan.name)
        todo.append(plan)
    return todo, redone
