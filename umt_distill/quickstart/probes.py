"""Quickstart step 5: linear and kNN probes on frozen features (``evaluation/probe.py``) for appearance
and motion: the teacher (frame-averaged embedding), each distilled student, and the same student with
its initial random weights (the control)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from umt_distill.config import Recipe
from umt_distill.data.corpus import read_corpus
from umt_distill.evaluation.probe import (
    decode_eval_views,
    knn_probe,
    linear_probe,
    order_sensitivity,
    student_features,
    teacher_features,
)
from umt_distill.models.checkpoints import latest_checkpoint
from umt_distill.quickstart.baselines import load_encoder
from umt_distill.quickstart.names import CONTROL, TEACHER, distilled
from umt_distill.quickstart.settings import QuickstartSettings
from umt_distill.quickstart.world import read_labels
from umt_distill.stages.parts import build_student
from umt_distill.teachers.build import build_teacher
from umt_distill.training.checkpoint import load_checkpoint


def evaluate(cfg: Recipe, world: dict, runs: dict[str, Path], settings: QuickstartSettings,
             baselines: dict[str, Path] | None = None) -> dict:
    """Probe appearance and motion on frozen features of the teacher, each distilled student and the control.

    ``baselines``: pixel-reconstruction runs by model name (``quickstart.baselines=true``); their encoders
    go into the same student.

    Returns:
        ``{"models": {name: {"appearance": {...}, "motion": {...}}}, "num_clips": {...}}``; each task
        holds ``linear`` and ``knn`` probe results (test split; ridge chosen on val).
    """
    labels = read_labels(world["labels"])["clips"]
    splits = {s: read_corpus(world["splits"][s]) for s in ("train", "val", "test")}
    pixels = {s: decode_eval_views(rows, cfg.views.num_frames, cfg.views.size, cfg.corpus.video_backend) for s, rows in splits.items()}
    pixels["test_reversed"] = pixels["test"].flip(1)  # the test clips played backwards
    targets = {task: {s: np.array([labels[r.id][f"{task}_label"] for r in rows]) for s, rows in splits.items()}
               for task in ("appearance", "motion")}

    teacher = build_teacher(cfg, torch.device("cpu"))
    features = {TEACHER: {s: teacher_features(teacher, p) for s, p in pixels.items()}}
    for mode, run in runs.items():
        student = build_student(cfg, teacher.embed_dim)
        load_checkpoint(latest_checkpoint(run), student)
        features[distilled(mode)] = {s: student_features(student, p) for s, p in pixels.items()}
    for name, run in (baselines or {}).items():
        student = build_student(cfg, teacher.embed_dim)
        load_encoder(student, run)
        features[name] = {s: student_features(student, p) for s, p in pixels.items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # exactly the weights stage 1 started from
        control = build_student(cfg, teacher.embed_dim)
    features[CONTROL] = {s: student_features(control, p) for s, p in pixels.items()}

    results: dict = {"models": {}, "num_clips": {s: len(r) for s, r in splits.items()}}
    for name, feats in features.items():
        results["models"][name] = {
            task: {
                "linear": linear_probe(feats["train"], y["train"], feats["test"], y["test"], feats["val"], y["val"]).to_dict(),
                "knn": knn_probe(feats["train"], y["train"], feats["test"], y["test"], k=settings.knn_k).to_dict(),
            }
            for task, y in targets.items()
        }
        results["models"][name]["order_sensitivity"] = order_sensitivity(feats["test"], feats["test_reversed"])
    results["_example"] = {"pixels": pixels["test"][:1], "teacher": teacher, "clip_id": splits["test"][0].id}
    results["_test_pixels"] = pixels["test"]  # stage 2's retrieval test reuses the decoded test views
    return results
