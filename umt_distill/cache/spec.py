"""``spec.json``: the provenance of a cache store, and the checks made against it.

The spec says everything that decides the stored numbers (teacher, weights, views, mode, codec ...).
Resuming into a store, or training from one, compares these *identity* fields with the recipe and
refuses any difference, naming the field.

The corpus is recorded by content, not by the bytes or location of its manifest: ``corpus.jsonl``
holds every row the store was cached from (``data.corpus.row_record``: id, path relative to the
corpus's folder, label, captions, start, end), and the spec's ``corpus`` section says where the
manifest was (absolute, and relative to the store) and checksums the rows. A re-run compares its
manifest's rows with these (:func:`corpus_change`): rows appended at the end are new work, any other
difference is refused naming the first differing row. :func:`store_corpus` finds a store's corpus
from any working folder, and after the store moved together with its manifest and videos.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from umt_distill import storage
from umt_distill.cache.record import StoreDamagedError
from umt_distill.data.corpus import ROW_FIELDS, ClipRow, read_corpus, row_record
from umt_distill.io import atomic_write_bytes

SPEC_FORMAT = 1
SPEC_FILE = "spec.json"
CORPUS_FILE = "corpus.jsonl"  # the store's corpus rows, one JSON object per line (see the module docstring)

# Fields of the spec that do not identify the data: they change as the run progresses.
_VOLATILE = ("created", "updated", "status", "counts", "versions", "recipe", "shards", "tolerance")
# Fields derived from the identity fields by the run itself: a recipe cannot give them, so they are not
# compared with one. ``basis`` (pca codecs: the fitted basis file's digest) is checked against the file
# instead (``cache/basis.py``); ``captions`` (the caption embeddings' index digest) by ``cache/captions.py``.
_DERIVED = ("basis", "captions")


class SpecMismatchError(ValueError):
    """A store's spec differs from what the recipe asks for."""


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("umt-distill", "torch", "open_clip_torch", "numpy", "zarr", "webdataset", "numcodecs", "av", "decord"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class SpecReadError(ValueError):
    """A store's spec.json cannot be read as a spec (not JSON, not an object)."""


def read_spec(root: str | Path) -> dict:
    path = storage.join(root, SPEC_FILE) if storage.is_url(root) else Path(root) / SPEC_FILE
    try:
        spec = json.loads(storage.read_text(path))  # a URL: retried; a network fault is storage.NetworkError
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no spec.json — not a umt-distill cache store (or not finished)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpecReadError(f"{path}: spec.json is not valid JSON ({e}); the store's description is damaged: "
                            "restore it from a copy, or cache into a new store") from None
    if not isinstance(spec, dict):
        raise SpecReadError(f"{path}: spec.json holds a {type(spec).__name__}, not an object")
    return spec


def identity(spec: dict, skip: Sequence[str] = ()) -> dict:
    """The part of a spec that must match for two runs to write into the same store.

    The corpus counts by its digest only (ids, paths relative to the corpus's folder, starts, ends):
    where the manifest lies is not part of a store's identity. ``skip`` leaves out whole sections.
    """
    out = {k: v for k, v in spec.items() if k not in _VOLATILE and k not in _DERIVED and k not in skip}
    if isinstance(out.get("corpus"), dict):
        out["corpus"] = {"digest": out["corpus"].get("digest")}
    return out


def _diff(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key, "<missing>"), b.get(key, "<missing>"), f"{prefix}{key}.")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return [] if a == b else [f"{prefix.rstrip('.')}: store has {a!r}, recipe gives {b!r}"]


def spec_differences(stored: dict, wanted: dict, fields: tuple[str, ...] | None = None,
                     skip: Sequence[str] = ()) -> list[str]:
    """Human-readable differences between two specs' identity fields (optionally only ``fields``;
    never the sections in ``skip``)."""
    a, b = identity(stored, skip), identity(wanted, skip)
    if fields is not None:
        a = {k: a.get(k) for k in fields}
        b = {k: b.get(k) for k in fields}
    return _diff(a, b, "")


def check_spec(stored: dict, wanted: dict, what: str, fields: tuple[str, ...] | None = None,
               skip: Sequence[str] = ()) -> None:
    """Raise :class:`SpecMismatchError` naming every differing field (``skip``: sections not compared)."""
    diffs = spec_differences(stored, wanted, fields, skip)
    if diffs:
        raise SpecMismatchError(f"{what}: the store's spec does not match the recipe:\n  " + "\n  ".join(diffs))


# --------------------------------------------------------------------------------------------------
# the store's corpus: where its manifest is, and its rows by content


def corpus_location(source: str | Path, root: str | Path | None, store: str | Path) -> dict:
    """The spec's record of where the corpus is: ``source`` and ``root`` absolute, and each also
    relative to the store (``source_from_store``, ``root_from_store``), so a store moved together with
    its manifest and videos still finds them (:func:`find_corpus`)."""
    here = os.path.abspath(Path(store).expanduser())
    src = os.path.abspath(Path(source).expanduser())
    top = os.path.abspath(Path(root).expanduser()) if root is not None else None
    return {
        "source": src,
        "root": top,
        "source_from_store": Path(os.path.relpath(src, here)).as_posix(),
        "root_from_store": Path(os.path.relpath(top, here)).as_posix() if top is not None else None,
    }


def find_corpus(store: str | Path, spec: dict) -> tuple[str, str | None]:
    """``(source, root)`` of a store's corpus, read from any working folder.

    Each is taken where it lies relative to the store if it is there (the store moved, or was copied,
    together with its manifest and videos), else at its recorded absolute place (the store alone
    moved). A store from before these records gives its recipe's paths as they were typed.

    Raises:
        FileNotFoundError: The manifest is at neither place; the message names both and the fix.
    """
    corpus = spec.get("corpus") or {}
    if "source_from_store" not in corpus:
        recipe = (spec.get("recipe") or {}).get("corpus") or {}
        return recipe.get("source") or corpus.get("source", ""), recipe.get("root", corpus.get("root"))
    if storage.is_url(store):  # a store on object storage: its corpus at its recorded place
        return corpus["source"], corpus.get("root")
    here = Path(os.path.abspath(Path(store).expanduser()))

    def pick(absolute: str | None, relative: str | None) -> str | None:
        if absolute is None:
            return None
        moved = os.path.normpath(here / relative) if relative is not None else None
        return moved if moved is not None and os.path.exists(moved) else absolute

    source = pick(corpus["source"], corpus.get("source_from_store"))
    if not os.path.exists(source):
        relative = corpus["source_from_store"]  # None for a store written to a URL: no place relative to it
        moved = f" nor at {os.path.normpath(here / relative)} (its place relative to the store)" if relative else ""
        raise FileNotFoundError(
            f"{store}: the corpus it was cached from is {'neither' if relative else 'not'} at {corpus['source']}"
            f"{moved}: put it back, or re-run cache-teacher on this store with corpus.source=ITS_NEW_PATH")
    return source, pick(corpus.get("root"), corpus.get("root_from_store"))


def rows_file_bytes(rows: Sequence[ClipRow]) -> bytes:
    """``corpus.jsonl``'s bytes: one compact JSON object (``row_record``) per row, each ending in ``\\n``."""
    return b"".join(json.dumps(row_record(r), separators=(",", ":")).encode() + b"\n" for r in rows)


def write_corpus_rows(store: str | Path, rows: Sequence[ClipRow]) -> dict:
    """Write ``<store>/corpus.jsonl`` atomically; return the spec's ``corpus.rows`` entry for it.

    A grown corpus rewrites the file with the old rows unchanged in front, so the checksum in the spec
    (over the first ``corpus.num_clips`` lines) stays valid until the spec itself is updated.
    """
    data = rows_file_bytes(rows)
    atomic_write_bytes(Path(store) / CORPUS_FILE, data)
    return {"file": CORPUS_FILE, "sha256": "sha256:" + hashlib.sha256(data).hexdigest()}


def read_corpus_rows(store: str | Path, spec: dict) -> list[dict] | None:
    """The rows a store was cached from (``row_record`` dicts), checked against the spec's checksum;
    None for a store from before ``corpus.jsonl``.

    Raises:
        StoreDamagedError: The file is missing, shorter than ``corpus.num_clips`` rows, or its rows
            differ from the checksum in ``spec.json``.
    """
    corpus = spec.get("corpus") or {}
    info = corpus.get("rows")
    if info is None:
        return None
    path = storage.join(store, CORPUS_FILE) if storage.is_url(store) else Path(store) / CORPUS_FILE
    try:
        n = int(corpus["num_clips"])
        data = storage.read_bytes(path)  # the spec names the file; only this name is ever read
    except FileNotFoundError:
        raise StoreDamagedError(str(path), "missing (it records the rows the store was cached from)") from None
    except (KeyError, TypeError, ValueError) as e:
        raise StoreDamagedError(f"{store}/{SPEC_FILE}", f"malformed corpus section: {e}") from None
    end = 0
    for _ in range(n):
        end = data.find(b"\n", end) + 1
        if end == 0:
            raise StoreDamagedError(str(path), f"holds fewer than the {n} rows spec.json records")
    if "sha256:" + hashlib.sha256(data[:end]).hexdigest() != info.get("sha256"):
        raise StoreDamagedError(str(path), "its rows differ from the checksum in spec.json (modified)")
    rows = []
    for line in data[:end].splitlines():
        try:
            record = json.loads(line)
            rows.append({k: record[k] for k in ROW_FIELDS})
        except (ValueError, KeyError, TypeError) as e:
            raise StoreDamagedError(str(path), f"unreadable row ({type(e).__name__}: {e})") from None
    return rows


def corpus_change(stored: Sequence[dict], rows: Sequence[ClipRow]) -> str | None:
    """The first way ``rows`` (a manifest read now) is not the store's rows plus rows appended at the
    end: the row (number, id) and the field, with both values; None if it is."""
    for i, old in enumerate(stored):
        if i >= len(rows):
            return (f"row {i + 1} (id {old['id']!r}) is missing: the manifest has {len(rows)} rows, the store "
                    f"was cached from {len(stored)}")
        new = row_record(rows[i])
        for name in ROW_FIELDS:
            if new[name] != old[name]:
                if name == "id":
                    return f"row {i + 1} has id {new['id']!r}, the store has {old['id']!r} there"
                return f"row {i + 1} (id {old['id']!r}): {name} is {new[name]!r}, the store has {old[name]!r}"
    return None


def store_corpus(store: str | Path, spec: dict, source: str | Path | None = None,
                 root: str | Path | None = None) -> list[ClipRow]:
    """The rows of a store's records, read from its manifest (found by :func:`find_corpus`, or at
    ``source``/``root``), for ``cache verify``: the first ``corpus.num_clips`` rows, which must be the
    rows the store was cached from (rows appended since are not yet in the store and are left out).

    Raises:
        FileNotFoundError: The manifest is not found.
        SpecMismatchError: The manifest's rows differ from the store's, naming the first differing row.
        StoreDamagedError: ``corpus.jsonl`` is damaged.
        CorpusError: The manifest is malformed.
    """
    if source is None:
        source, root = find_corpus(store, spec)
    rows = read_corpus(source, root)
    stored = read_corpus_rows(store, spec)
    if stored is None:
        return rows
    change = corpus_change(stored, rows)
    if change is not None:
        raise SpecMismatchError(f"{source}: {change} — this manifest no longer describes the store {store}; "
                                "restore the manifest it was cached from")
    return rows[: len(stored)]
