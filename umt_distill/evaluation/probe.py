"""Frozen-feature evaluation: a linear probe (closed-form ridge) and a kNN classifier on any features.

The features of a model are computed once per clip from the canonical ``eval_center`` view, the model
stays frozen, and only the probe is fitted: what the probe reads out is what the representation
already holds. Two readers, both deterministic:

- :func:`linear_probe` — ridge regression onto one-hot labels (standardised features, the ridge
  strength chosen on a validation split), classify by the largest output. Closed form: no learning
  rate, no epochs, nothing to tune by hand.
- :func:`knn_probe` — cosine k-nearest-neighbours vote (standardised features).

:func:`order_sensitivity` measures whether a feature can tell a clip from its time reversal at all.

Feature helpers: :func:`decode_eval_views` decodes the views once; :func:`teacher_features` (the
image teacher's pooled embedding averaged over frames) and :func:`student_features` (the student's
final-norm tokens, mean-pooled) turn them into one vector per clip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from umt_distill.data.pixels import normalize_video
from umt_distill.data.video import open_video
from umt_distill.data.views import apply_view, sample_view

DEFAULT_LAMBDAS: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


@dataclass
class ProbeResult:
    """Accuracy of one probe on the test split, and what was chosen on the validation split."""

    accuracy: float
    val_accuracy: float | None = None
    ridge: float | None = None
    k: int | None = None
    num_train: int = 0
    num_test: int = 0
    per_class: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "val_accuracy": self.val_accuracy, "ridge": self.ridge, "k": self.k,
                "num_train": self.num_train, "num_test": self.num_test,
                "per_class": {str(c): a for c, a in self.per_class.items()}}


def _check(x: np.ndarray, y: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"{name}: expected features [N, D] and labels [N], got {x.shape} and {y.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return x, y.astype(np.int64)


def standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Zero mean, unit variance per feature, with the training split's statistics."""
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)  # constant features stay 0 instead of dividing by 0
    return [(a - mean) / std for a in (train, *others)]


def fit_ridge(x: np.ndarray, y: np.ndarray, num_classes: int, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression onto one-hot targets: returns weights [D, C] and bias [C].

    The bias is the mean target (features are centred), so it is not shrunk.
    """
    targets = np.eye(num_classes)[y]  # [N, C]
    x_mean, t_mean = x.mean(axis=0), targets.mean(axis=0)
    xc, tc = x - x_mean, targets - t_mean
    dim = x.shape[1]
    if dim <= len(x):  # primal: (XᵀX + λI)⁻¹ XᵀT
        weights = np.linalg.solve(xc.T @ xc + ridge * np.eye(dim), xc.T @ tc)
    else:  # dual, cheaper when features outnumber samples: Xᵀ(XXᵀ + λI)⁻¹T
        weights = xc.T @ np.linalg.solve(xc @ xc.T + ridge * np.eye(len(x)), tc)
    return weights, t_mean - x_mean @ weights


def _accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    return float((pred == y).mean()) if len(y) else float("nan")


def _per_class(pred: np.ndarray, y: np.ndarray) -> dict[int, float]:
    return {int(c): float((pred[y == c] == c).mean()) for c in np.unique(y)}


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    val_x: np.ndarray | None = None,
    val_y: np.ndarray | None = None,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    num_classes: int | None = None,
) -> ProbeResult:
    """Fit a ridge classifier on frozen features and report test accuracy.

    The ridge strength is the one with the best validation accuracy (ties: the stronger ridge);
    without a validation split the middle of ``lambdas`` is used. The final probe is fitted on the
    training split only, so validation and test stay unseen by the weights.

    Args:
        train_x, train_y: Features [N, D] and integer labels [N] to fit on.
        test_x, test_y: Where accuracy is measured.
        val_x, val_y: Optional split to choose the ridge strength on.
        lambdas: Candidate ridge strengths (on standardised features).
        num_classes: Number of classes (default: 1 + the largest label seen).
    """
    train_x, train_y = _check(train_x, train_y, "train")
    test_x, test_y = _check(test_x, test_y, "test")
    has_val = val_x is not None and val_y is not None and len(val_y) > 0
    if has_val:
        val_x, val_y = _check(val_x, val_y, "val")
    labels = [train_y, test_y] + ([val_y] if has_val else [])
    classes = num_classes or int(max(int(a.max()) for a in labels if len(a))) + 1
    if has_val:
        train_s, test_s, val_s = standardize(train_x, test_x, val_x)
        scores = []
        for ridge in lambdas:
            w, b = fit_ridge(train_s, train_y, classes, ridge)
            scores.append(_accuracy((val_s @ w + b).argmax(1), val_y))
        best = max(range(len(lambdas)), key=lambda i: (scores[i], lambdas[i]))
        ridge, val_acc = float(lambdas[best]), scores[best]
    else:
        train_s, test_s = standardize(train_x, test_x)
        ridge, val_acc = float(sorted(lambdas)[len(lambdas) // 2]), None
    w, b = fit_ridge(train_s, train_y, classes, ridge)
    pred = (test_s @ w + b).argmax(1)
    return ProbeResult(_accuracy(pred, test_y), val_acc, ridge, None, len(train_y), len(test_y), _per_class(pred, test_y))


def knn_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    k: int = 10,
) -> ProbeResult:
    """Cosine k-nearest-neighbour vote (similarity-weighted) on standardised features."""
    train_x, train_y = _check(train_x, train_y, "train")
    test_x, test_y = _check(test_x, test_y, "test")
    train_s, test_s = standardize(train_x, test_x)
    train_n = train_s / np.maximum(np.linalg.norm(train_s, axis=1, keepdims=True), 1e-12)
    test_n = test_s / np.maximum(np.linalg.norm(test_s, axis=1, keepdims=True), 1e-12)
    sims = test_n @ train_n.T  # [N_test, N_train]
    k = min(k, len(train_y))
    nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # [N_test, k]
    classes = int(max(train_y.max(), test_y.max())) + 1
    votes = np.zeros((len(test_y), classes))
    rows = np.arange(len(test_y))[:, None]
    np.add.at(votes, (rows.repeat(k, 1), train_y[nearest]), np.take_along_axis(sims, nearest, 1) + 1.0)
    pred = votes.argmax(1)
    return ProbeResult(_accuracy(pred, test_y), None, None, k, len(train_y), len(test_y), _per_class(pred, test_y))


def order_sensitivity(features: np.ndarray, reversed_features: np.ndarray) -> float:
    """How far a clip's feature moves when the clip is played backwards, relative to how far clips lie apart.

    ``mean_i ||f(x_i) − f(reverse(x_i))|| / mean_i ||f(x_i) − mean_j f(x_j)||``: 0 for a feature that cannot
    tell a clip from its time reversal (a frame average), about 1 when reversing a clip moves its feature
    as far as a typical clip lies from the average clip. Direction classes (left/right, growing/shrinking)
    are time reversals of each other, so a linear probe can only separate them along such movement.

    Args:
        features: [N, D] features of N clips.
        reversed_features: [N, D] features of the same clips with their frames in reverse order.
    """
    features = np.asarray(features, dtype=np.float64)
    reversed_features = np.asarray(reversed_features, dtype=np.float64)
    if features.shape != reversed_features.shape or features.ndim != 2:
        raise ValueError(f"order_sensitivity: expected two [N, D] arrays of one shape, got {features.shape} and {reversed_features.shape}")
    spread = np.linalg.norm(features - features.mean(axis=0), axis=1).mean()
    return float(np.linalg.norm(features - reversed_features, axis=1).mean() / max(spread, 1e-12))


# --------------------------------------------------------------------------------------------------
# features


def decode_eval_views(rows: Sequence, num_frames: int, size: int, backend: str = "pyav") -> torch.Tensor:
    """The canonical ``eval_center`` view of each clip: uint8 [N, T, 3, size, size].

    Raises:
        umt_distill.data.video_base.VideoDecodeError: A clip cannot be decoded (named by its path).
    """
    views = []
    for row in rows:
        with open_video(row.path, backend=backend) as video:
            view = sample_view("eval_center", video.info, num_frames, size, 0, row.id, 0)
            frames = video.get_frames(list(view.frame_indices))  # [T, H, W, 3]
        views.append(apply_view(frames, view))  # [T, 3, size, size]
    return torch.stack(views)


@torch.no_grad()
def teacher_features(teacher, pixels: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """The image teacher's clip feature: its pooled embedding of each frame, averaged over frames.

    Averaging is how an image model is applied to video without a temporal model; it is blind to the
    order of frames by construction.

    Args:
        teacher: A :class:`~umt_distill.teachers.clip.ClipTeacher`.
        pixels: uint8 [N, T, 3, H, W] views.

    Returns:
        float32 [N, D].
    """
    out = [teacher(pixels[i : i + batch_size]).pooled.mean(dim=1).cpu() for i in range(0, len(pixels), batch_size)]
    return torch.cat(out).numpy().astype(np.float32)


@torch.no_grad()
def student_features(student, pixels: torch.Tensor, batch_size: int = 32, device: str | torch.device = "cpu") -> np.ndarray:
    """The video student's clip feature: final-norm tokens of the full (unmasked) clip, mean-pooled.

    Args:
        student: A model with ``forward_features(x [B, 3, T, H, W]) -> [B, L, C]`` (e.g. ``UMTStudent``).
        pixels: uint8 [N, T, 3, H, W] views.

    Returns:
        float32 [N, C].
    """
    was_training = student.training
    student.eval()
    out = []
    for i in range(0, len(pixels), batch_size):
        x = normalize_video(pixels[i : i + batch_size].to(device))  # [B, 3, T, H, W]
        out.append(student.forward_features(x).mean(dim=1).float().cpu())  # [B, C]
    student.train(was_training)
    return torch.cat(out).numpy().astype(np.float32)
