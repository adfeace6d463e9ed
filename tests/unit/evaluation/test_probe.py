"""Frozen-feature probes on synthetic features, and the teacher/student feature helpers on real clips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from umt_distill.evaluation.probe import (
    decode_eval_views,
    fit_ridge,
    knn_probe,
    linear_probe,
    standardize,
    student_features,
    teacher_features,
)


def blobs(n_per_class: int, classes: int, dim: int, spread: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, dim)) * 3
    y = np.repeat(np.arange(classes), n_per_class)
    x = centres[y] + rng.normal(0, spread, (len(y), dim))
    return x.astype(np.float32), y


def test_linear_and_knn_probes_separate_separable_classes() -> None:
    x, y = blobs(40, 5, 16, 0.5, seed=0)
    xt, yt = blobs(20, 5, 16, 0.5, seed=0)  # same centres (same seed), fresh noise below
    xt = xt + np.random.default_rng(1).normal(0, 0.5, xt.shape).astype(np.float32)
    xv, yv = x[::4], y[::4]
    result = linear_probe(x, y, xt, yt, xv, yv)
    assert result.accuracy == 1.0 and result.val_accuracy == 1.0 and result.num_test == 100
    assert set(result.per_class) == set(range(5))
    assert knn_probe(x, y, xt, yt, k=5).accuracy == 1.0


def test_probes_are_at_chance_on_random_labels() -> None:
    rng = np.random.default_rng(0)
    x, xt = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    y, yt = rng.integers(0, 4, 400), rng.integers(0, 4, 400)
    assert abs(linear_probe(x, y, xt, yt, x[:100], y[:100]).accuracy - 0.25) < 0.08
    assert abs(knn_probe(x, y, xt, yt).accuracy - 0.25) < 0.08


def test_ridge_primal_and_dual_agree() -> None:
    """Fewer samples than features takes the dual path; it must give the primal solution."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 30)), rng.integers(0, 3, 12)
    w_dual, b_dual = fit_ridge(x, y, 3, ridge=0.7)
    t = np.eye(3)[y]
    xc, tc = x - x.mean(0), t - t.mean(0)
    w_primal = np.linalg.solve(xc.T @ xc + 0.7 * np.eye(30), xc.T @ tc)
    np.testing.assert_allclose(w_dual, w_primal, atol=1e-9)
    np.testing.assert_allclose(b_dual, t.mean(0) - x.mean(0) @ w_primal, atol=1e-9)


def test_the_ridge_strength_is_chosen_on_validation() -> None:
    """Many noise features and few samples: a weak ridge overfits, validation picks a stronger one."""
    rng = np.random.default_rng(0)
    signal = rng.integers(0, 2, 60)
    x = np.concatenate([signal[:, None] + 0.8 * rng.normal(size=(60, 1)), rng.normal(size=(60, 200))], axis=1)
    result = linear_probe(x[:20], signal[:20], x[40:], signal[40:], x[20:40], signal[20:40], lambdas=(1e-6, 1e3))
    assert result.ridge == 1e3


def test_standardize_uses_training_statistics_and_keeps_constant_features_finite() -> None:
    train = np.array([[1.0, 5.0], [3.0, 5.0]])
    test = np.array([[2.0, 7.0]])
    tr, te = standardize(train, test)
    np.testing.assert_allclose(tr, [[-1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(te, [[0.0, 2.0]])


@pytest.mark.parametrize("bad", ["shape", "nan"])
def test_bad_features_are_named(bad: str) -> None:
    x, y = np.zeros((4, 2)), np.array([0, 1, 0, 1])
    if bad == "shape":
        with pytest.raises(ValueError, match="train"):
            linear_probe(x, y[:3], x, y)
    else:
        x_nan = x.copy()
        x_nan[0, 0] = np.nan
        with pytest.raises(ValueError, match="test: features contain NaN"):
            knn_probe(x, y, x_nan, y)


# --------------------------------------------------------------------------------------------------
# feature helpers on real clips and real tiny models


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from umt_distill.data.corpus import read_corpus
    from umt_distill.quickstart.world import WorldSettings, write_world

    folder = tmp_path_factory.mktemp("probe_world")
    info = write_world(folder, WorldSettings(clips=6, num_frames=8, seed=1))
    return read_corpus(info["manifest"])


def test_eval_views_and_feature_shapes(clips) -> None:
    from umt_distill.models.vit import create_student
    from umt_distill.teachers.clip import ClipTeacher

    pixels = decode_eval_views(clips, num_frames=4, size=64)
    assert pixels.shape == (6, 4, 3, 64, 64) and pixels.dtype == torch.uint8
    teacher = ClipTeacher("umt-test-tiny", layers=2, normalize="imagenet")
    feats = teacher_features(teacher, pixels, batch_size=4)
    assert feats.shape == (6, 32) and feats.dtype == np.float32
    np.testing.assert_allclose(feats[:2], teacher(pixels[:2]).pooled.mean(1).numpy(), rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    student = create_student("umt_test_tiny").train()
    sfeats = student_features(student, pixels, batch_size=4)
    assert sfeats.shape == (6, 64) and np.isfinite(sfeats).all()
    assert student.training  # the helper restores the mode it found


def test_the_image_teacher_is_blind_to_frame_order_and_the_student_is_not(clips) -> None:
    """Frame-averaging makes the teacher's clip feature order-invariant; the video student sees order."""
    from umt_distill.models.vit import create_student
    from umt_distill.teachers.clip import ClipTeacher

    pixels = decode_eval_views(clips[:2], num_frames=4, size=64)
    reversed_pixels = pixels.flip(1)  # the same frames played backwards
    teacher = ClipTeacher("umt-test-tiny", layers=2, normalize="imagenet")
    np.testing.assert_allclose(teacher_features(teacher, pixels), teacher_features(teacher, reversed_pixels), rtol=1e-4, atol=1e-5)
    torch.manual_seed(0)
    student = create_student("umt_test_tiny")
    assert not np.allclose(student_features(student, pixels), student_features(student, reversed_pixels), atol=1e-4)
