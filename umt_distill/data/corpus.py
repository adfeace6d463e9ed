"""The corpus: which clips exist, where they are, and what comes with them.

``read_corpus(source)`` reads one of

- a CSV manifest with a header row: columns ``id``, ``path`` (required), ``label``, ``captions``,
  ``start``, ``end`` (optional; empty cells mean absent). ``captions`` is either one plain caption or a
  JSON list of captions (a cell starting with ``[``). A label that is an integer literal becomes an int.
- a JSONL manifest (``.jsonl``/``.ndjson``): one object per line with the same keys; ``captions`` a
  string or a list of strings; ``label`` an int or a string; ``start``/``end`` numbers (seconds).
- a folder: every video/image below it (hidden files skipped), id = path relative to the folder without
  suffix, rows sorted by id.

Relative paths resolve against ``root`` or else the manifest's folder (never the current folder); paths
with a URL scheme (``s3://...``) are kept as written. Each row also keeps its path relative to that
folder (``ClipRow.rel_path``): what a cache store records, so that a manifest rewritten with absolute
paths, or moved together with its videos, still describes the same rows (``row_record``). Other columns/keys are ignored, unless they look like a misspelt
known one (``caption``), which is an error. The reader validates the manifest only: a row whose video is
missing or broken is a per-clip failure later, when the clip is decoded.

Every manifest problem raises :class:`CorpusError` naming the file, the line and the reason.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from umt_distill.data.video import IMAGE_SUFFIXES

VIDEO_SUFFIXES = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".mpg", ".mpeg", ".ts", ".wmv", ".3gp"}
)
MEDIA_SUFFIXES = VIDEO_SUFFIXES | IMAGE_SUFFIXES
REQUIRED_FIELDS = ("id", "path")
OPTIONAL_FIELDS = ("label", "captions", "start", "end")
ROW_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS  # a row's content, in this order (``row_record``)
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_INT_LABEL = re.compile(r"^[+-]?\d+$")


class CorpusError(ValueError):
    """A manifest (or corpus folder) is malformed. ``str()`` reads ``file:line: reason``."""

    def __init__(self, path: str | Path, line: int | None, reason: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.line, self.reason))


_ErrorAt = Callable[[str], CorpusError]  # builds the error for the manifest line being read


@dataclass(frozen=True)
class ClipRow:
    """One clip of the corpus. ``start``/``end`` (seconds) limit it to a segment of the file.

    ``path`` is absolute (or a URL). ``rel_path`` is the same file relative to the folder the corpus's
    relative paths resolve against (``root``, the manifest's folder, or the source folder), POSIX
    separators (``videos/a.mp4``, ``../b.mp4``); a URL as written; None for rows built by hand.
    """

    id: str
    path: str
    label: int | str | None = None
    captions: tuple[str, ...] = ()
    start: float | None = None
    end: float | None = None
    rel_path: str | None = field(default=None, compare=False, repr=False)


def read_corpus(source: str | Path, root: str | Path | None = None) -> list[ClipRow]:
    """Read a CSV/JSONL manifest or a folder of media into rows (manifest order, or sorted by id).

    Args:
        source: ``.csv``, ``.jsonl``/``.ndjson`` manifest, or a directory.
        root: Folder that relative manifest paths are relative to (default: the manifest's folder).
            Not used for a directory source.

    Returns:
        The rows, ids unique.

    Raises:
        CorpusError: Missing source, unsupported type, or a malformed/duplicate row (file, line, reason).
    """
    source = Path(source).expanduser()
    if source.is_dir():
        return _read_folder(source)
    if not source.is_file():
        raise CorpusError(source, None, "corpus source not found")
    base = corpus_base(source, root)
    suffix = source.suffix.lower()
    if suffix == ".csv":
        records = _csv_records(source)
    elif suffix in (".jsonl", ".ndjson"):
        records = _jsonl_records(source)
    else:
        raise CorpusError(source, None, f"unsupported manifest type {suffix!r}; use .csv, .jsonl or a folder")
    rows: list[ClipRow] = []
    first_line: dict[str, int] = {}
    for line, record, from_csv in records:
        row = _make_row(record, from_csv, base, lambda reason, line=line: CorpusError(source, line, reason))
        if row.id in first_line:
            raise CorpusError(source, line, f"duplicate id {row.id!r} (first on line {first_line[row.id]})")
        first_line[row.id] = line
        rows.append(row)
    if not rows:
        raise CorpusError(source, None, "manifest has no rows")
    return rows


def corpus_digest(rows: Sequence[ClipRow]) -> str:
    """SHA-256 (hex) over the rows' ids, paths, starts and ends, in order: the corpus's identity.

    Paths count relative to the corpus's folder (``ClipRow.rel_path`` where known), so the digest does
    not change when the manifest and its videos move together, or from where the manifest was read.
    """
    digest = hashlib.sha256()
    for row in rows:
        # One canonical JSON line per row; json writes floats with repr, which round-trips exactly.
        path = row.rel_path if row.rel_path is not None else row.path
        digest.update(json.dumps([row.id, path, row.start, row.end], separators=(",", ":")).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def row_record(row: ClipRow) -> dict[str, Any]:
    """A row's content as read, independent of where the manifest lies: ``id``, ``path`` (relative to the
    corpus's folder, see ``ClipRow.rel_path``), ``label``, ``captions`` (a list), ``start``, ``end``.

    Two manifests that differ only in column order, line endings, a byte-order mark, extra columns or
    absolute vs relative spelling of the same files give equal records.
    """
    return {
        "id": row.id,
        "path": row.rel_path if row.rel_path is not None else row.path,
        "label": row.label,
        "captions": list(row.captions),
        "start": row.start,
        "end": row.end,
    }


def corpus_base(source: str | Path, root: str | Path | None = None) -> Path:
    """The absolute folder that the corpus's relative paths resolve against (see :func:`read_corpus`)."""
    source = Path(source).expanduser()
    if source.is_dir():
        return Path(os.path.abspath(source))
    return Path(os.path.abspath(Path(root).expanduser() if root is not None else source.parent))


# ----------------------------------------------------------------------------------------------------
# sources


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # spreadsheets often prepend a byte-order mark
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise CorpusError(path, line, f"not valid UTF-8 (byte 0x{data[err.start]:02x})") from None


def _check_fields(path: Path, line: int, names: Sequence[str]) -> None:
    """Unknown fields are allowed (extra metadata), near-misses of known ones are not (typos)."""
    known = REQUIRED_FIELDS + OPTIONAL_FIELDS
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
            if close:
                raise CorpusError(path, line, f"unknown field {name!r}; did you mean {close[0]!r}?")


def _csv_records(path: Path) -> Iterator[tuple[int, dict[str, Any], bool]]:
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise CorpusError(path, 1, "empty file: expected a header row with columns id,path") from None
    except csv.Error as err:
        raise CorpusError(path, 1, f"bad CSV: {err}") from None
    header = [name.strip() for name in header]
    missing = [name for name in REQUIRED_FIELDS if name not in header]
    if missing:
        raise CorpusError(path, 1, f"missing required column(s) {', '.join(missing)} (header: {header})")
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise CorpusError(path, 1, f"duplicate column(s) {', '.join(duplicated)}")
    _check_fields(path, 1, header)
    while True:
        line = reader.line_num + 1  # where the next record starts (quoted cells may span lines)
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise CorpusError(path, line, f"bad CSV: {err}") from None
        if not cells:  # blank line
            continue
        if len(cells) != len(header):
            raise CorpusError(path, line, f"expected {len(header)} fields, got {len(cells)}")
        yield line, dict(zip(header, cells)), True


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any], bool]]:
    for line, text in enumerate(_read_text(path).splitlines(), start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise CorpusError(path, line, f"bad JSON: {err.msg} at column {err.colno}") from None
        if not isinstance(record, dict):
            raise CorpusError(path, line, f"expected a JSON object, got {type(record).__name__}")
        missing = [name for name in REQUIRED_FIELDS if name not in record]
        if missing:
            raise CorpusError(path, line, f"missing required key(s) {', '.join(missing)}")
        _check_fields(path, line, list(record))
        yield line, record, False


def _read_folder(folder: Path) -> list[ClipRow]:
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or Path(name).suffix.lower() not in MEDIA_SUFFIXES:
                continue  # hidden files include macOS "._clip.mp4" resource forks
            full = Path(dirpath) / name
            clip_id = full.relative_to(folder).with_suffix("").as_posix()
            if clip_id in found:
                raise CorpusError(folder, None, f"two files map to id {clip_id!r}: {found[clip_id]} and {full}")
            found[clip_id] = os.path.abspath(full)
    if not found:
        raise CorpusError(folder, None, f"no videos or images found (suffixes: {' '.join(sorted(MEDIA_SUFFIXES))})")
    base = os.path.abspath(folder)
    return [ClipRow(id=clip_id, path=found[clip_id], rel_path=Path(os.path.relpath(found[clip_id], base)).as_posix())
            for clip_id in sorted(found)]


# ----------------------------------------------------------------------------------------------------
# fields


def _make_row(record: dict[str, Any], from_csv: bool, base: Path, error: _ErrorAt) -> ClipRow:
    """Validate one record; ``error(reason)`` builds the CorpusError for this line."""
    clip_id = record["id"]
    if isinstance(clip_id, int) and not isinstance(clip_id, bool):
        clip_id = str(clip_id)  # JSON manifests often number their clips
    if not isinstance(clip_id, str) or not clip_id.strip():
        raise error(f"empty or non-string id {clip_id!r}")
    path = record["path"]
    if not isinstance(path, str) or not path.strip():
        raise error(f"empty or non-string path {path!r}")
    rel_path = path
    if not _URL.match(path):
        path = os.path.abspath(base / Path(path).expanduser())
        rel_path = Path(os.path.relpath(path, base)).as_posix()
    start = _seconds(record.get("start"), "start", from_csv, error)
    end = _seconds(record.get("end"), "end", from_csv, error)
    if start is not None and end is not None and start >= end:
        raise error(f"start ({start}) must be before end ({end})")
    return ClipRow(
        id=clip_id,
        path=path,
        label=_label(record.get("label"), from_csv, error),
        captions=_captions(record.get("captions"), from_csv, error),
        start=start,
        end=end,
        rel_path=rel_path,
    )


def _seconds(value: Any, name: str, from_csv: bool, error: _ErrorAt) -> float | None:
    if value is None or (from_csv and value.strip() == ""):
        return None
    if from_csv:
        try:
            value = float(value)
        except ValueError:
            raise error(f"{name} must be a number of seconds, got {value!r}") from None
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise error(f"{name} must be a finite, non-negative number of seconds, got {value!r}")
    return float(value)


def _label(value: Any, from_csv: bool, error: _ErrorAt) -> int | str | None:
    if value is None or value == "":
        return None
    if from_csv:
        return int(value) if _INT_LABEL.match(value.strip()) else value
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise error(f"label must be an integer or a string, got {value!r}")
    return value


def _captions(value: Any, from_csv: bool, error: _ErrorAt) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if from_csv:
        if not value.lstrip().startswith("["):
            return (value,)
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise error(f"captions cell starts with '[' but is not a JSON list: {err.msg}") from None
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise error(f"captions must be a string or a list of strings, got {value!r}")
    empty = [i for i, c in enumerate(value) if not c.strip()]
    if empty:
        raise error(f"caption {empty[0]} is empty")
    return tuple(value)
