"""Pixel normalisation for the student (the teacher carries its own constants)."""

from __future__ import annotations

import torch

# UMT normalises student input with ImageNet statistics (UMT code @4fb4049: single_modality/datasets/build.py).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_video(pixels: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 ``[B, T, 3, H, W]`` → normalised float ``[B, 3, T, H, W]`` (the student's layout)."""
    x = pixels.permute(0, 2, 1, 3, 4).float().div_(255)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1, 1)
    return (x - m) / s
