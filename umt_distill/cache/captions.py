"""Captions at cache time: each caption embedded once by the teacher's CLIP text tower, and every cached
view's frames scored against its clip's captions (text-guided frame selection, SMAUG arXiv 2211.11446).

The teacher's ``pooled`` output is CLIP's image embedding of each frame, in the same joint space as
the text embedding, so the score of frame ``t`` of a view for caption ``c`` is the cosine
``cos(pooled[t], text[c])``. Training does not read ``pooled`` (it is not in a batch), so the scores are
computed here, where ``pooled`` is in memory, and stored beside the shards:

- ``captions/embeddings.npy`` float32 ``[C, D]``: the L2-normalised text embedding of every caption of
  the store's rows (``corpus.jsonl`` order, each row's captions in its order);
- ``captions/offsets.npy`` int64 ``[R + 1]``: row ``r``'s captions are ``offsets[r]:offsets[r+1]``;
- ``captions/scores-<shard>.npz`` (``numpy.savez``, no pickles): ``clip_id`` ``<U`` ``[n]``,
  ``view_index`` int32 ``[n]``, ``scores`` float32 ``[n, T, C_max]`` (NaN past the row's captions);
- ``captions/index.json``: format, counts, the sha256 of both ``.npy`` files and the text tower's
  provenance; ``spec.json``'s ``captions`` section holds its sha256.

A shard's scores file is written before its sidecar marks the shard finished, so a finished shard of a
store with captions always has one. Stores from before (no ``captions`` in the spec) read and train as
before; selection then names the fix. Layout and a plain reading program: ``cache/FORMAT.md`` §12.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from umt_distill.cache.record import StoreDamagedError
from umt_distill.cache.spec import SPEC_FILE, read_corpus_rows, read_spec
from umt_distill.config import Recipe
from umt_distill.io import atomic_write_bytes, atomic_write_json

CAPTIONS_DIR = "captions"
INDEX_NAME = "index.json"
EMBEDDINGS_NAME = "embeddings.npy"
OFFSETS_NAME = "offsets.npy"
CAPTIONS_FORMAT = 1


def scores_name(shard: str) -> str:
    return f"scores-{shard}.npz"


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def row_captions(rows: Sequence) -> tuple[list[str], np.ndarray]:
    """Every caption of ``rows`` (ClipRow or ``row_record`` dicts) in order, and the offsets ``[R + 1]``."""
    texts: list[str] = []
    offsets = [0]
    for row in rows:
        caps = row["captions"] if isinstance(row, dict) else row.captions
        texts.extend(caps or ())
        offsets.append(len(texts))
    return texts, np.asarray(offsets, dtype=np.int64)


def captions_digest(texts: Sequence[str], offsets: np.ndarray) -> str:
    digest = hashlib.sha256(offsets.astype("<i8").tobytes())
    for text in texts:
        digest.update(text.encode() + b"\x00")
    return "sha256:" + digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# writing (cache time)


def write_caption_embeddings(root: str | Path, rows: Sequence, teacher) -> dict:
    """Embed every caption of ``rows`` with the teacher's text tower once; write ``captions/``.

    A store whose ``captions/index.json`` already holds these captions from this text tower keeps its
    files (a re-run, or a resume). Returns the spec's ``captions`` section.
    """
    folder = Path(root) / CAPTIONS_DIR
    texts, offsets = row_captions(rows)
    text_tower = {"name": teacher.name, "pretrained": teacher.pretrained, "digest": teacher.text_digest}
    digest = captions_digest(texts, offsets)
    index_path = folder / INDEX_NAME
    if index_path.exists():
        try:
            old = json.loads(index_path.read_text(encoding="utf-8"))
            if old.get("captions_sha256") == digest and old.get("text_tower") == text_tower:
                return _spec_section(index_path.read_bytes(), old)
        except (ValueError, OSError):
            pass  # rewritten below
    folder.mkdir(parents=True, exist_ok=True)
    emb = teacher.encode_text(texts).numpy().astype(np.float32)  # [C, D] unit norm
    emb_bytes, off_bytes = _npy_bytes(emb), _npy_bytes(offsets)
    atomic_write_bytes(folder / EMBEDDINGS_NAME, emb_bytes)
    atomic_write_bytes(folder / OFFSETS_NAME, off_bytes)
    index = {
        "format": CAPTIONS_FORMAT,
        "rows": len(rows),
        "captions": len(texts),
        "dim": int(emb.shape[1]),
        "score": "cosine(pooled[t], embeddings[c]); embeddings are L2-normalised",
        "embeddings": {"file": EMBEDDINGS_NAME, "sha256": _sha256(emb_bytes)},
        "offsets": {"file": OFFSETS_NAME, "sha256": _sha256(off_bytes)},
        "captions_sha256": digest,
        "text_tower": text_tower,
    }
    atomic_write_json(index_path, index)
    return _spec_section(index_path.read_bytes(), index)


def record_captions(root: str | Path, cfg: Recipe, rows: Sequence, teacher) -> dict | None:
    """Rank 0 at cache time, after the store's spec exists: embed the rows' captions and record them in
    ``spec.json`` (``captions``, a derived field: not compared with a recipe). None when the recipe turns
    it off (``frame_select.cache_captions``) or no row has a caption.

    Raises:
        ValueError: The teacher has no text tower (a visual-only weights file); the message names the fix.
    """
    if not cfg.frame_select.cache_captions or not any(getattr(r, "captions", ()) for r in rows):
        return None
    section = write_caption_embeddings(root, rows, teacher)
    spec = read_spec(root)
    if spec.get("captions") != section:
        spec["captions"] = section
        atomic_write_json(Path(root) / SPEC_FILE, spec)
    return section


def shard_score_writer(root: str | Path, rows: Sequence) -> ShardScoreWriter | None:
    """The writer of per-shard frame scores for a store whose spec records captions, else None."""
    try:
        spec = read_spec(root)
    except (FileNotFoundError, ValueError):
        return None
    return ShardScoreWriter(root, rows) if spec.get("captions") else None


def _spec_section(index_bytes: bytes, index: dict) -> dict:
    return {"format": CAPTIONS_FORMAT, "file": f"{CAPTIONS_DIR}/{INDEX_NAME}", "sha256": _sha256(index_bytes),
            "captions": index["captions"], "dim": index["dim"]}


def frame_scores(pooled: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """``cos(pooled[t], embeddings[c])``: pooled ``[T, D]`` (unnormalised), unit embeddings ``[C, D]`` → ``[T, C]``."""
    p = torch.nn.functional.normalize(torch.from_numpy(np.asarray(pooled, dtype=np.float32)), dim=-1)
    return (p @ torch.from_numpy(np.asarray(embeddings, dtype=np.float32)).T).numpy()


class ShardScoreWriter:
    """Collects each record's frame scores while a shard is cached; :meth:`close` writes the shard's file.

    Args:
        root: The store.
        rows: The store's rows (corpus order), whose captions :func:`write_caption_embeddings` embedded.
    """

    def __init__(self, root: str | Path, rows: Sequence) -> None:
        self.folder = Path(root) / CAPTIONS_DIR
        self.embeddings = np.load(self.folder / EMBEDDINGS_NAME, allow_pickle=False)  # [C, D]
        _, self.offsets = row_captions(rows)
        self.row_of = {row.id: i for i, row in enumerate(rows)}
        self.c_max = int(np.diff(self.offsets).max()) if len(rows) else 0
        self.pending: dict[str, list[tuple[str, int, np.ndarray]]] = {}

    def add(self, shard: str, clip_id: str, view_index: int, pooled: np.ndarray) -> None:
        r = self.row_of[clip_id]
        scores = frame_scores(pooled, self.embeddings[self.offsets[r] : self.offsets[r + 1]])  # [T, c]
        self.pending.setdefault(shard, []).append((clip_id, int(view_index), scores))

    def close(self, shard: str) -> None:
        """Write ``captions/scores-<shard>.npz`` (before the shard's sidecar marks it finished)."""
        items = self.pending.pop(shard, [])
        T = items[0][2].shape[0] if items else 0
        scores = np.full((len(items), T, max(self.c_max, 1)), np.nan, dtype=np.float32)
        for i, (_, _, s) in enumerate(items):
            scores[i, :, : s.shape[1]] = s
        buf = io.BytesIO()
        np.savez(buf, clip_id=np.array([c for c, _, _ in items], dtype=str),
                 view_index=np.array([v for _, v, _ in items], dtype=np.int32), scores=scores)
        atomic_write_bytes(self.folder / scores_name(shard), buf.getvalue())


# --------------------------------------------------------------------------------------------------
# reading (training time)


class CaptionTable:
    """A store's caption embeddings and frame scores, read and checked.

    ``embedding(clip_id, caption)`` → ``[D]``; ``scores(clip_id, view_index, caption)`` → ``[T]``. The
    scores of every shard are read into memory at the first lookup (4·T·C_max bytes per cached view: 128
    bytes for T = 8 and one caption, a few GB for a 5M-clip store with 4 views).
    """

    def __init__(self, root: str | Path, spec: dict, shards: Sequence[str]) -> None:
        self.root = Path(root)
        section = spec["captions"]
        folder = self.root / CAPTIONS_DIR
        index_path = folder / INDEX_NAME
        raw = _read(index_path)
        if _sha256(raw) != section.get("sha256"):
            raise StoreDamagedError(str(index_path), "differs from the checksum in spec.json (modified)")
        index = json.loads(raw)
        self.embeddings = _read_npy(folder, index["embeddings"], np.float32, 2)  # [C, D]
        offsets = _read_npy(folder, index["offsets"], np.int64, 1)  # [R + 1]
        rows = read_corpus_rows(self.root, spec)
        if rows is None or len(offsets) != len(rows) + 1 or offsets[-1] != len(self.embeddings) \
                or len(self.embeddings) != index["captions"]:
            raise StoreDamagedError(str(index_path), f"counts disagree: {len(offsets) - 1} rows of offsets, "
                                    f"{len(self.embeddings)} embeddings, corpus.jsonl {len(rows or [])} rows")
        self.where: dict[tuple[str, str], int] = {}  # (clip, caption) -> embedding row
        self.caption_slot: dict[tuple[str, str], int] = {}  # (clip, caption) -> its position within the row
        for r, row in enumerate(rows):
            for j, text in enumerate(row["captions"] or ()):
                self.where.setdefault((row["id"], text), int(offsets[r]) + j)
                self.caption_slot.setdefault((row["id"], text), j)
        self.shards = list(shards)
        self._scores: dict[tuple[str, int], np.ndarray] | None = None

    def embedding(self, clip_id: str, caption: str) -> np.ndarray:
        return self.embeddings[self.where[(clip_id, caption)]]

    def _load_scores(self) -> dict[tuple[str, int], np.ndarray]:
        out: dict[tuple[str, int], np.ndarray] = {}
        for shard in self.shards:
            path = self.root / CAPTIONS_DIR / scores_name(shard)
            if not path.exists():
                raise FileNotFoundError(f"{path}: shard {shard} has no frame scores (cached before the store kept "
                                        "captions); re-run cache-teacher into a new store, or use "
                                        "frame_select.method=uniform or random")
            try:
                with np.load(path, allow_pickle=False) as z:  # zip members: CRC-32 checked on read
                    clips, views, scores = z["clip_id"], z["view_index"], z["scores"]
            except Exception as e:  # noqa: BLE001 - zipfile and numpy raise many types
                raise StoreDamagedError(str(path), f"unreadable ({type(e).__name__}: {e})") from None
            if not (len(clips) == len(views) == len(scores)) or scores.ndim != 3:
                raise StoreDamagedError(str(path), "clip_id, view_index and scores disagree in length")
            for c, v, s in zip(clips.tolist(), views.tolist(), scores):
                out[(c, int(v))] = s
        return out

    def scores(self, clip_id: str, view_index: int, caption: str) -> np.ndarray:
        """Frame scores ``[T]`` of one cached view for one of its clip's captions."""
        if self._scores is None:
            self._scores = self._load_scores()
        return self._scores[(clip_id, int(view_index))][:, self.caption_slot[(clip_id, caption)]]

    def batch_scores(self, clip_ids: Sequence[str], view_index: Sequence[int], captions: Sequence[str]) -> torch.Tensor:
        """``[B, T]`` float32 scores of a batch's views for its captions."""
        return torch.from_numpy(np.stack([self.scores(c, int(v), t) for c, v, t in zip(clip_ids, view_index, captions)]))

    def batch_embeddings(self, clip_ids: Sequence[str], captions: Sequence[str]) -> torch.Tensor:
        """``[B, D]`` unit text embeddings of a batch's captions."""
        return torch.from_numpy(np.stack([self.embedding(c, t) for c, t in zip(clip_ids, captions)]))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise StoreDamagedError(str(path), "missing (spec.json records captions)") from None


def _read_npy(folder: Path, entry: dict, dtype, ndim: int) -> np.ndarray:
    name = entry.get("file")
    if name not in (EMBEDDINGS_NAME, OFFSETS_NAME):
        raise StoreDamagedError(str(folder / INDEX_NAME), f"names an unexpected file {name!r}")
    path = folder / name
    raw = _read(path)
    if _sha256(raw) != entry.get("sha256"):
        raise StoreDamagedError(str(path), "differs from the checksum in captions/index.json (modified)")
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except ValueError as e:
        raise StoreDamagedError(str(path), f"not a .npy array ({e})") from None
    if arr.dtype != dtype or arr.ndim != ndim:
        raise StoreDamagedError(str(path), f"is {arr.dtype} {list(arr.shape)}, expected {np.dtype(dtype)} with {ndim} dims")
    return arr


def read_caption_table(root: str | Path, spec: dict, shards: Sequence[str]) -> CaptionTable | None:
    """The store's :class:`CaptionTable`, or None for a store cached without captions."""
    return CaptionTable(root, spec, shards) if spec.get("captions") else None



class OnlineCaptions:
    """Online mode: the same embeddings, made at the start of training by the online teacher's text tower."""

    def __init__(self, rows: Sequence, teacher) -> None:
        texts, offsets = row_captions(rows)
        self.embeddings = teacher.encode_text(texts).numpy()
        self.where = {}
        for r, row in enumerate(rows):
            for j, text in enumerate(row.captions or ()):
                self.where.setdefault((row.id, text), int(offsets[r]) + j)

    def batch_embeddings(self, clip_ids: Sequence[str], captions: Sequence[str]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.embeddings[self.where[(c, t)]] for c, t in zip(clip_ids, captions)]))
