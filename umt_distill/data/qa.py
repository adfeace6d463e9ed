"""Video QA data: the annotation format, the answer list, a converter from UMT's JSON files, the dataset.

**Annotations** (JSONL, one question a line; format in docs/qa.md)::

    {"id": "q17", "video": "videos/video7010.mp4", "question": "what is a man doing?",
     "answers": {"cooking": 3, "frying": 1}, "type": "what", "start": null, "end": null}

``answers`` maps each distinct answer to how many annotators gave it (a plain string or a list of strings
is read as counts of 1 per occurrence); ``type`` (optional) groups the accuracy; ``start``/``end``
(optional, seconds) cut a segment; ``video_id`` (optional, default: ``video`` as written) names the clip,
and must equal the clip id of a cache store the frames are read from. Relative paths resolve against the
annotation file's folder (or ``root``).

**Answer list** (``.json``: a list of strings, or UMT's ``{answer: index}`` mapping; ``.txt``: one per
line): the fixed list that inference ranks.

The converter (:func:`convert_official`) reads UMT's QA JSON files (multi_modality/configs/qa*.py name
them: a list of ``{"video", "question", "answer", "answer_type"?, "question_id"?}``, ``answer`` a string or
a list) and the ``*_ans2label.json`` answer list, and writes the two files above.

Pixels come through the same view loaders as retrieval fine-tuning: one fresh ``views.policy`` view per
clip and epoch decoded from the video (``train.pixels_from=video``), or the stored view frames of a zarr
cache store (``train.pixels_from=store``, ``cache.store``: the epoch's view as stage 1 reads it).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from umt_distill.config import Recipe, RecipeError
from umt_distill.data.clipviews import decode_view
from umt_distill.data.corpus import ClipRow
from umt_distill.data.text import pre_text

MAX_ANNOTATION_BYTES = 2 << 30  # a QA file larger than this is not an annotation file
MAX_FIELD_CHARS = 10_000  # a question or answer longer than this is a corrupt line


class QAFormatError(ValueError):
    """An annotation or answer-list file is malformed; the message names the file, line and key."""


@dataclass(frozen=True)
class QARow:
    """One question about one clip; ``answers`` maps each distinct answer to its annotation count."""

    id: str
    video_id: str
    path: str
    question: str
    answers: dict[str, int] = field(hash=False)
    type: str | None = None
    start: float | None = None
    end: float | None = None

    def weights(self) -> list[tuple[str, float]]:
        """(answer, share of the annotations) per distinct answer, in first-seen order: UMT's loss weights."""
        total = sum(self.answers.values())
        return [(a, n / total) for a, n in self.answers.items()]

    def best_answers(self) -> set[str]:
        """The answers given most often (what an exact match must equal)."""
        top = max(self.answers.values())
        return {a for a, n in self.answers.items() if n == top}


def normalize_answer(text: str) -> str:
    """Answers and predictions are compared after the captions' cleaning (lower case, no punctuation)."""
    return pre_text(text)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise QAFormatError(f"{path}: not found")
    size = path.stat().st_size
    if size > MAX_ANNOTATION_BYTES:
        raise QAFormatError(f"{path}: {size} bytes is larger than any annotation file ({MAX_ANNOTATION_BYTES}); wrong file?")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QAFormatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _answer_counts(value, where: str) -> dict[str, int]:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        if not value or not all(isinstance(a, str) for a in value):
            raise QAFormatError(f"{where}: 'answers' must be a non-empty list of strings, got {value!r:.80}")
        counts = Counter(normalize_answer(a) for a in value)
        return dict(counts)
    if isinstance(value, dict) and value:
        out: dict[str, int] = {}
        for a, n in value.items():
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise QAFormatError(f"{where}: answer {a!r} needs a count >= 1, got {n!r}")
            key = normalize_answer(a)
            out[key] = out.get(key, 0) + n
        return out
    raise QAFormatError(f"{where}: 'answers' must be a string, a list of strings or {{answer: count}}, got {value!r:.80}")


def _optional_seconds(record: dict, key: str, where: str) -> float | None:
    v = record.get(key)
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
        raise QAFormatError(f"{where}: '{key}' must be seconds >= 0 or null, got {v!r}")
    return float(v)


def read_qa(source: str | Path, root: str | Path | None = None) -> list[QARow]:
    """Read a QA annotation file (JSONL, format above) → rows in file order.

    Raises:
        QAFormatError: a malformed line (file, line, key and what is wrong), duplicate ids, no rows.
    """
    path = Path(source).expanduser()
    base = Path(root).expanduser() if root else path.parent
    rows: list[QARow] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise QAFormatError(f"{where}: not JSON ({e.msg}); each line holds one question object") from None
        if not isinstance(record, dict):
            raise QAFormatError(f"{where}: expected an object with video, question, answers")
        for key in ("video", "question"):
            if not isinstance(record.get(key), str) or not record[key].strip() or len(record[key]) > MAX_FIELD_CHARS:
                raise QAFormatError(f"{where}: '{key}' must be a non-empty string (<= {MAX_FIELD_CHARS} chars)")
        if "answers" not in record:
            raise QAFormatError(f"{where}: no 'answers' (give {{answer: count}}, a list, or one string)")
        qid = str(record.get("id", n))
        if qid in seen:
            raise QAFormatError(f"{where}: duplicate id {qid!r} (first on line {seen[qid]})")
        seen[qid] = n
        video = record["video"]
        full = video if "://" in video else str((base / video).resolve())
        qtype = record.get("type")
        if qtype is not None and not isinstance(qtype, str):
            raise QAFormatError(f"{where}: 'type' must be a string or null, got {qtype!r}")
        rows.append(QARow(qid, str(record.get("video_id") or video), full, record["question"],
                          _answer_counts(record["answers"], where), qtype,
                          _optional_seconds(record, "start", where), _optional_seconds(record, "end", where)))
    if not rows:
        raise QAFormatError(f"{path}: no questions")
    return rows


def read_answer_list(source: str | Path) -> list[str]:
    """The answers inference ranks: JSON list, JSON ``{answer: index}`` (UMT's ans2label) or text lines.

    Answers are normalised like the annotations; duplicates after that are an error.
    """
    path = Path(source).expanduser()
    text = _read_text(path)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise QAFormatError(f"{path}: not JSON ({e.msg})") from None
        if isinstance(data, dict):
            if not all(isinstance(v, int) for v in data.values()):
                raise QAFormatError(f"{path}: an {{answer: index}} list needs integer indices")
            data = [a for a, _ in sorted(data.items(), key=lambda kv: kv[1])]
        if not isinstance(data, list) or not all(isinstance(a, str) for a in data):
            raise QAFormatError(f"{path}: expected a list of answer strings or an {{answer: index}} mapping")
        answers = data
    else:
        answers = [line.strip() for line in text.splitlines() if line.strip()]
    answers = [normalize_answer(a) for a in answers]
    dupes = [a for a, n in Counter(answers).items() if n > 1]
    if dupes:
        raise QAFormatError(f"{path}: answer {dupes[0]!r} appears {answers.count(dupes[0])} times (after lower-casing "
                            "and removing punctuation); every answer once")
    if not answers or any(not a for a in answers):
        raise QAFormatError(f"{path}: the answer list is empty or holds an empty answer")
    return answers


def convert_official(annotations: str | Path, out: str | Path, video_prefix: str = "",
                     answer_list: str | Path | None = None, answer_list_out: str | Path | None = None) -> dict:
    """Convert one of UMT's QA JSON files (and its ans2label list) to this toolkit's format.

    Args:
        annotations: UMT's JSON: a list of ``{"video", "question", "answer", "answer_type"?, "question_id"?}``.
        out: The JSONL to write (ids: ``question_id`` when given, else the position).
        video_prefix: Prepended to every ``video`` (e.g. ``videos/``), relative to ``out``'s folder.
        answer_list: UMT's ``*_ans2label.json`` (or a list); written to ``answer_list_out`` as a JSON list.
        answer_list_out: Default: ``answers.json`` beside ``out``.

    Returns:
        ``{"questions", "types", "answer_list"}`` counts and paths.
    """
    src = Path(annotations)
    try:
        items = json.loads(_read_text(src))
    except json.JSONDecodeError as e:
        raise QAFormatError(f"{src}: not JSON ({e.msg}); expected UMT's list of question objects") from None
    if not isinstance(items, list) or not items:
        raise QAFormatError(f"{src}: expected a non-empty JSON list of {{video, question, answer}} objects")
    lines, types = [], Counter()
    for i, item in enumerate(items):
        where = f"{src}: item {i}"
        if not isinstance(item, dict) or not all(k in item for k in ("video", "question", "answer")):
            raise QAFormatError(f"{where}: needs 'video', 'question' and 'answer'")
        record = {"id": str(item.get("question_id", i)), "video": f"{video_prefix}{item['video']}",
                  "question": item["question"], "answers": _answer_counts(item["answer"], where)}
        if item.get("answer_type") is not None:
            record["type"] = str(item["answer_type"])
            types[record["type"]] += 1
        lines.append(json.dumps(record, ensure_ascii=False))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result: dict = {"questions": len(lines), "types": dict(types), "output": str(out)}
    if answer_list is not None:
        answers = read_answer_list(answer_list)
        target = Path(answer_list_out) if answer_list_out else out.parent / "answers.json"
        target.write_text(json.dumps(answers, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
        result.update(answer_list=str(target), answers=len(answers))
    read_qa(out)  # what was written reads back
    return result


# --------------------------------------------------------------------------------------------------
# clips and pixels


def clip_rows(rows: list[QARow]) -> dict[str, ClipRow]:
    """The distinct clips the questions ask about, by ``video_id`` (a clip with two paths is an error)."""
    clips: dict[str, ClipRow] = {}
    for r in rows:
        clip = ClipRow(r.video_id, r.path, start=r.start, end=r.end)
        if clips.setdefault(r.video_id, clip) != clip:
            raise QAFormatError(f"question {r.id!r}: video_id {r.video_id!r} names two clips "
                                f"({clips[r.video_id].path} and {r.path}, or other start/end)")
    return clips


class ClipPixels:
    """The uint8 [T, 3, H, W] view of a clip for an epoch, decoded or read from a store.

    ``train.pixels_from=video``: view ``epoch`` of the clip (a fresh view per epoch, as retrieval
    fine-tuning draws them) under ``views.*``. ``store``: the view a zarr store of this recipe holds for
    the epoch (``cache.datasets.CachedViewDataset``, the stage-1 loader); a WebDataset store streams and
    cannot serve questions in random order.
    """

    def __init__(self, clips: dict[str, ClipRow], cfg: Recipe, store: Dataset | None = None) -> None:
        """``store``: a ``CachedViewDataset`` over ``cache.store`` with pixels (the stage builds it; the
        cache package sits above this one), or None to decode the videos."""
        self.clips, self.cfg, self.store = clips, cfg, store
        if store is not None:
            self.index = {c: i for i, c in enumerate(store.clip_ids)}
            missing = sorted(set(clips) - set(self.index))
            if missing:
                raise RecipeError(f"{cfg.cache.store}: {len(missing)} QA clip(s) are not in the store (first: "
                                  f"{missing[0]!r}); give each question the store's clip id as video_id, or use "
                                  "train.pixels_from=video")

    def get(self, video_id: str, epoch: int) -> torch.Tensor:
        if self.store is None:
            return decode_view(self.clips[video_id], self.cfg, epoch)
        self.store.set_epoch(epoch)
        return self.store[self.index[video_id]]["pixels"]


class QADataset(Dataset):
    """One item per question: ``pixels`` uint8 [T, 3, H, W], ``question``, ``answers`` and ``weights``."""

    def __init__(self, rows: list[QARow], pixels: ClipPixels) -> None:
        self.rows, self.pixels = rows, pixels
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        answers, weights = zip(*row.weights())
        return {"pixels": self.pixels.get(row.video_id, self.epoch), "question": row.question,
                "answers": list(answers), "weights": list(weights), "index": i}


def collate_qa(items: list[dict]) -> dict:
    """Stack pixels; flatten every question's answers with the question index of each (``answer_question``)."""
    return {
        "pixels": torch.stack([it["pixels"] for it in items]),  # [B, T, 3, H, W]
        "question": [it["question"] for it in items],
        "answers": [a for it in items for a in it["answers"]],
        "weights": torch.tensor([w for it in items for w in it["weights"]], dtype=torch.float32),  # [N]
        "answer_question": torch.tensor([b for b, it in enumerate(items) for _ in it["answers"]]),  # [N]
        "index": torch.tensor([it["index"] for it in items]),
    }


__all__ = [
    "ClipPixels",
    "QADataset",
    "QAFormatError",
    "QARow",
    "clip_rows",
    "collate_qa",
    "convert_official",
    "normalize_answer",
    "read_answer_list",
    "read_qa",
]
