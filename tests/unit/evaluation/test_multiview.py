"""Multi-view aggregation and metrics against hand-computed examples."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from umt_distill.evaluation.multiview import (
    classification_report,
    confusion_matrix,
    merge_views,
    per_class_accuracy,
    plot_confusion_matrix,
    topk_accuracy,
    write_report,
)


def _logits(*probs: list[float]) -> torch.Tensor:
    """Logits whose softmax is exactly ``probs`` (log-probabilities)."""
    return torch.tensor([[math.log(p) for p in row] for row in probs], dtype=torch.float64)


def test_softmax_is_averaged_per_video_not_the_logits():
    # video a, two views: probabilities [.7 .2 .1] and [.1 .5 .4] -> mean [.4 .35 .25] -> class 0.
    # (Averaging the logits instead would pick class 1: log .2 + log .5 > log .7 + log .1.)
    # video b, one view listed between a's views: [.2 .3 .5] -> class 2.
    logits = _logits([0.7, 0.2, 0.1], [0.2, 0.3, 0.5], [0.1, 0.5, 0.4])
    videos, probs = merge_views(["a", "b", "a"], [(0, 0), (0, 0), (1, 0)], logits)
    assert videos == ["a", "b"]
    assert torch.allclose(probs, torch.tensor([[0.4, 0.35, 0.25], [0.2, 0.3, 0.5]], dtype=torch.float64))
    assert logits[[0, 2]].mean(0).argmax() == 1  # the trap the test guards against
    labels = torch.tensor([0, 1])
    acc = topk_accuracy(probs, labels, (1, 2, 5))
    assert acc == {1: 0.5, 2: 1.0, 5: 1.0}  # b's label 1 is its second choice; top-5 capped at 3 classes


def test_a_repeated_view_is_an_error():
    with pytest.raises(ValueError, match="clip 1, crop 2.*'a' appears twice"):
        merge_views(["a", "a"], [(1, 2), (1, 2)], torch.zeros(2, 3))
    with pytest.raises(ValueError, match="logit rows"):
        merge_views(["a"], [(0, 0)], torch.zeros(2, 3))


def test_confusion_matrix_and_per_class_accuracy():
    labels = torch.tensor([0, 0, 0, 1, 1, 3])
    preds = torch.tensor([0, 1, 0, 1, 1, 0])
    cm = confusion_matrix(preds, labels, 4)
    assert cm.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    acc = per_class_accuracy(cm)
    assert acc[0] == pytest.approx(2 / 3) and acc[1] == 1.0 and math.isnan(acc[2]) and acc[3] == 0.0


def test_report_and_files(tmp_path):
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8]])
    labels = torch.tensor([0, 1, 1, 2])
    report = classification_report(probs, labels, num_views=12)
    assert report.top1 == 0.75 and report.top5 == 1.0
    assert report.per_class == [1.0, 0.5, 1.0] and report.mean_class_accuracy == pytest.approx(2.5 / 3)
    files = write_report(report, ["v0", "v1", "v2", "v3"], probs, labels, tmp_path, ["run", "jump", "swim"])
    metrics = json.loads(files["metrics"].read_text())
    assert metrics["top1"] == 0.75 and metrics["num_views"] == 12 and metrics["class_names"] == ["run", "jump", "swim"]
    lines = [json.loads(x) for x in files["predictions"].read_text().splitlines()]
    assert lines[2] == {"id": "v2", "label": 1, "top5": [0, 1, 2], "top5_prob": [0.5, 0.4, 0.1], "label_prob": 0.4}
    assert files["confusion"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.load(tmp_path / "confusion.npy").tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


def test_large_confusion_matrix_plots_without_labels(tmp_path):
    cm = np.eye(60, dtype=np.int64) * 3
    path = plot_confusion_matrix(cm, tmp_path / "big.png")
    assert path.stat().st_size > 1000
