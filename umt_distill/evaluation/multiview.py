"""Multi-view test aggregation and classification metrics (UMT code @4fb4049:
``final_test`` and ``merge`` in single_modality/engines/engine_for_finetuning.py).

Each test video is seen in V views (clips × crops). The logits of every view go through a softmax and
the probabilities are averaged per video — averaging probabilities, not logits, as UMT's ``merge``
does. Reported: top-1/top-5 over videos, per-class accuracy, the mean of per-class accuracies, and a
confusion matrix (also drawn as a PNG).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


def merge_views(video_ids: Sequence[str], view_keys: Sequence[tuple[int, int]], logits: torch.Tensor,
                ) -> tuple[list[str], torch.Tensor]:
    """Average the per-view softmax probabilities of each video.

    Args:
        video_ids: The video of each view row (any order, e.g. gathered from several ranks).
        view_keys: ``(clip, crop)`` of each row; a repeated (video, clip, crop) is an error, since it
            means a view was evaluated twice and would be weighted double.
        logits: float [N, C], one row per view.

    Returns:
        (video ids in first-seen order, probabilities [num_videos, C] float64).
    """
    if len(video_ids) != logits.shape[0] or len(view_keys) != logits.shape[0]:
        raise ValueError(f"{len(video_ids)} ids and {len(view_keys)} view keys for {logits.shape[0]} logit rows")
    probs = torch.softmax(logits.double(), dim=-1)  # [N, C]
    order: dict[str, int] = {}
    seen: set[tuple[str, int, int]] = set()
    rows_of: list[list[int]] = []
    for row, (vid, key) in enumerate(zip(video_ids, view_keys)):
        view = (vid, int(key[0]), int(key[1]))
        if view in seen:
            raise ValueError(f"view (clip {view[1]}, crop {view[2]}) of video {vid!r} appears twice")
        seen.add(view)
        if vid not in order:
            order[vid] = len(order)
            rows_of.append([])
        rows_of[order[vid]].append(row)
    merged = torch.stack([probs[rows].mean(dim=0) for rows in rows_of])  # [num_videos, C]
    return list(order), merged


def topk_accuracy(probs: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose label is among the k highest scores (k capped at the class count)."""
    out = {}
    for k in ks:
        top = probs.topk(min(k, probs.shape[1]), dim=1).indices  # [N, k]
        out[k] = (top == labels[:, None]).any(dim=1).double().mean().item()
    return out


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """int64 [num_classes, num_classes]: row = true class, column = predicted class."""
    index = labels.long() * num_classes + preds.long()
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes).numpy()


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Recall of each class from a confusion matrix; NaN for classes with no test video."""
    totals = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(cm) / np.maximum(totals, 1), np.nan)


@dataclass
class ClassificationReport:
    """Metrics of one evaluation run."""

    top1: float
    top5: float
    mean_class_accuracy: float
    num_videos: int
    num_views: int
    per_class: list[float | None]
    confusion: np.ndarray

    def summary(self) -> dict:
        """JSON-able scalars (for metrics.jsonl)."""
        return {"top1": self.top1, "top5": self.top5, "mean_class_accuracy": self.mean_class_accuracy,
                "num_videos": self.num_videos, "num_views": self.num_views}


def classification_report(probs: torch.Tensor, labels: torch.Tensor, num_views: int) -> ClassificationReport:
    """Top-1/top-5, per-class accuracy and the confusion matrix of video-level probabilities [N, C]."""
    num_classes = probs.shape[1]
    acc = topk_accuracy(probs, labels, (1, 5))
    cm = confusion_matrix(probs.argmax(dim=1), labels, num_classes)
    per_class = per_class_accuracy(cm)
    present = per_class[~np.isnan(per_class)]
    return ClassificationReport(
        top1=acc[1], top5=acc[5], mean_class_accuracy=float(present.mean()) if present.size else float("nan"),
        num_videos=int(probs.shape[0]), num_views=num_views,
        per_class=[None if np.isnan(a) else float(a) for a in per_class], confusion=cm,
    )


def plot_confusion_matrix(cm: np.ndarray, path: str | Path, class_names: Sequence[str] | None = None,
                          title: str = "confusion matrix") -> Path:
    """Draw a row-normalised confusion matrix as a PNG (class names on the axes up to 50 classes)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = cm.shape[0]
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    side = min(4 + 0.25 * n, 24)
    fig, ax = plt.subplots(figsize=(side, side))
    image = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if n <= 50:
        names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
        if n <= 12:  # counts in the cells stay legible
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(report: ClassificationReport, video_ids: Sequence[str], probs: torch.Tensor, labels: torch.Tensor,
                 out_dir: str | Path, class_names: Sequence[str] | None = None) -> dict[str, Path]:
    """Write ``metrics.json`` (scalars + per-class), ``predictions.jsonl`` (per video: label, top-5,
    probability of the label), ``confusion.npy`` and ``confusion.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(class_names) if class_names is not None else None
    metrics = {**report.summary(), "per_class_accuracy": report.per_class}
    if names is not None:
        metrics["class_names"] = names
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    top = probs.topk(min(5, probs.shape[1]), dim=1)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for i, vid in enumerate(video_ids):
            f.write(json.dumps({"id": vid, "label": int(labels[i]), "top5": top.indices[i].tolist(),
                                "top5_prob": [round(p, 6) for p in top.values[i].tolist()],
                                "label_prob": round(float(probs[i, labels[i]]), 6)}) + "\n")
    np.save(out / "confusion.npy", report.confusion)
    png = plot_confusion_matrix(report.confusion, out / "confusion.png", names)
    return {"metrics": out / "metrics.json", "predictions": out / "predictions.jsonl", "confusion": png}
