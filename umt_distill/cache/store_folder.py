"""The store folder before any shard is written: one writer, what a fresh folder may hold, and the
store's spec and rows created or checked against the recipe and the corpus (rows by content: appended
rows become new work, other changes are refused naming the row). ``pipeline.cache_teacher`` runs these
on rank 0 and tells every rank the outcome."""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from umt_distill.cache.lock import LOCK_FILE, StoreLock, StoreLockedError
from umt_distill.cache.record import StoreDamagedError
from umt_distill.cache.spec import (
    CORPUS_FILE,
    SPEC_FILE,
    SpecMismatchError,
    check_spec,
    corpus_change,
    find_corpus,
    now_iso,
    read_corpus_rows,
    read_spec,
    write_corpus_rows,
)
from umt_distill.cache.stores import init_store_root
from umt_distill.config import Recipe
from umt_distill.data.corpus import ClipRow, corpus_digest
from umt_distill.io import atomic_write_json
from umt_distill.training import distributed as du

NEW_STORE = "cache into a new store (another cache.store)"


class CacheError(RuntimeError):
    """The cache run cannot proceed (bad store, mismatching spec, another run holding the lock ...)."""


def refuse_foreign_folder(root: Path) -> None:
    """Refuse to write into a folder that holds something other than a store (checked before the lock
    file is created in it, and again once the lock is held)."""
    if (root / SPEC_FILE).exists() or not root.is_dir():
        return
    # What a store holds before its spec.json: the lock, its corpus rows, temporaries of an interrupted
    # creation. A folder with only these is a fresh store.
    foreign = sorted(p.name for p in root.iterdir()
                     if p.name not in (LOCK_FILE, CORPUS_FILE) and not p.name.startswith(".tmp-"))
    if foreign:
        raise CacheError(f"{root} exists, is not empty ({foreign[0]} ...) and has no spec.json: it is not a "
                         f"cache store; refusing to write into it — use another cache.store")


def take_store_lock(root: Path, env: du.DistEnv, purpose: str) -> StoreLock | None:
    """Rank 0 takes the store's lock before any rank touches a file; every rank learns the outcome and
    a refused run stops on every rank (rank 0's message names the holder). Rank 0 returns the lock."""
    lock, refusal = None, None
    if env.is_main:
        try:
            refuse_foreign_folder(root)
            lock = StoreLock(root, purpose).acquire()
        except (StoreLockedError, CacheError) as e:
            refusal = str(e)
        except OSError as e:  # read-only or full disk, no permission: say so before any work
            refusal = f"cannot write the store {root}: {e.strerror or e}"
    refusal = du.broadcast_object(refusal)
    if refusal is not None:
        raise CacheError(refusal if env.is_main else
                         f"rank {env.rank} stops: rank 0 did not get the store {root} (its message says why)")
    return lock


def decided_by_rank0(env: du.DistEnv, decide):
    """Run ``decide()`` on rank 0 and give its result to every rank; if it fails, every rank raises
    :class:`CacheError` (rank 0 with its message), instead of the others waiting for a rank that left."""
    result, error = None, None
    if env.is_main:
        try:
            result = decide()
        except CacheError as e:
            error = str(e)
        except Exception as e:  # a bug: the other ranks stop, rank 0 keeps the traceback
            du.broadcast_object((None, f"rank 0 failed: {type(e).__name__}: {e}"))
            raise
    result, error = du.broadcast_object((result, error))
    if error is not None:
        raise CacheError(error if env.is_main else f"rank {env.rank} stops: {error}")
    return result


def prepare_store(root: Path, cfg: Recipe, spec: dict, rows: list[ClipRow], console: Console | None) -> dict:
    """Rank 0, holding the lock: create the store, or check an existing one against the recipe and the
    corpus and record a grown corpus. Returns the spec in effect (its ``corpus.extents`` plan the shards)."""
    for leftover in root.glob(".tmp-*"):  # temporaries of a killed run; no other run is writing
        if leftover.is_file():
            leftover.unlink()
    spec_path = root / SPEC_FILE
    if spec_path.exists():
        try:
            stored = read_spec(root)
            check_spec(stored, spec, f"cannot resume into {root}", skip=("corpus",))
        except (SpecMismatchError, ValueError) as e:
            raise CacheError(f"{e}\n  the store keeps the settings it was cached with: {NEW_STORE}") from None
        source = cfg.corpus.source if cfg.cache.limit is None else \
            f"{cfg.corpus.source} (its first {cfg.cache.limit} rows: cache.limit)"
        extents, added = check_corpus(root, stored, rows, source)
        recorded = (stored.get("corpus") or {}).get("rows")
        rows_info = write_corpus_rows(root, rows) if added or recorded is None else recorded
        current = {**stored, "corpus": {**spec["corpus"], "rows": rows_info, "extents": extents},
                   "recipe": spec["recipe"], "updated": now_iso()}
        if added:
            current["status"] = "in_progress"  # complete again when the new shards are in the index
            if console is not None:
                console.print(f"{escape(str(cfg.corpus.source))}: {added} row(s) added since the store was "
                              f"cached; caching them into new shards", highlight=False)
    else:
        refuse_foreign_folder(root)
        rows_info = write_corpus_rows(root, rows)  # before spec.json: a folder without one is still fresh
        current = {**spec, "corpus": {**spec["corpus"], "rows": rows_info, "extents": [len(rows)] if rows else []}}
    atomic_write_json(spec_path, current)
    init_store_root(root, cfg.cache.layout, {"umt_distill_spec": SPEC_FILE})  # also on resume: idempotent
    return current


def check_corpus(root: Path, stored: dict, rows: list[ClipRow], source) -> tuple[list[int], int]:
    """Compare the manifest's rows with the store's by content. Returns the extents after this run and
    how many rows were appended; any other change raises :class:`CacheError` naming the first row."""
    corpus = stored.get("corpus") or {}
    try:
        old = read_corpus_rows(root, stored)
    except StoreDamagedError as e:
        raise CacheError(f"{e} — {NEW_STORE}") from None
    if old is None:  # a store from before corpus.jsonl: only its digest (ids, absolute paths, times) is known
        n = corpus.get("num_clips")
        legacy = [ClipRow(r.id, r.path, start=r.start, end=r.end) for r in rows[: n or 0]]
        if not isinstance(n, int) or n > len(rows) or corpus.get("digest") not in (
                corpus_digest(legacy), corpus_digest(rows[:n])):
            raise CacheError(f"{source}: its rows differ from those the store {root} was cached from (the store "
                             f"predates per-row records, so the row cannot be named) — {NEW_STORE}")
        done = n
    else:
        change = corpus_change(old, rows)
        if change is not None:
            raise CacheError(f"{source}: {change} — a store's rows cannot change (only rows appended at the end "
                             f"of the manifest are added); {NEW_STORE}")
        done = len(old)
    extents = corpus.get("extents") or ([done] if done else [])
    if not (all(isinstance(e, int) for e in extents) and extents == sorted(set(extents))
            and (extents[-1] if extents else 0) == done):
        raise CacheError(f"{root / SPEC_FILE}: corpus.extents {extents!r} do not end at its {done} rows "
                         f"(modified) — {NEW_STORE}")
    added = len(rows) - done
    return (extents + [len(rows)] if added else extents), added


def corpus_source(cfg: Recipe, root: Path) -> tuple[str, str | None]:
    """The recipe's corpus; if its manifest is gone and it is the one the store records (``cache verify
    --repair`` passes the store's own recipe), the store's corpus where it lies now (``find_corpus``)."""
    source, corpus_root = cfg.corpus.source, cfg.corpus.root
    if Path(source).expanduser().exists() or not (root / SPEC_FILE).exists():
        return source, corpus_root
    try:
        spec = read_spec(root)
    except (FileNotFoundError, ValueError):
        return source, corpus_root
    if (spec.get("corpus") or {}).get("source") == os.path.abspath(Path(source).expanduser()):
        return find_corpus(root, spec)
    return source, corpus_root
