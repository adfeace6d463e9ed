"""The recipe's frozen teacher, built by its registered type (caching and the online mode share it)."""

from __future__ import annotations

import torch

from umt_distill.config import Recipe
from umt_distill.registry import TEACHERS
from umt_distill.teachers import clip  # noqa: F401  (registers "open_clip")
from umt_distill.teachers.configs import register_tiny_configs


def build_teacher(cfg: Recipe, device: torch.device):
    """Instantiate the recipe's teacher (registered by ``teacher.type``) on ``device``, frozen."""
    register_tiny_configs()
    t = cfg.teacher
    cls = TEACHERS.get(t.type)
    return cls(
        name=t.name,
        pretrained=t.pretrained,
        model_config=t.model_config_path,
        layers=t.layers,
        layer_interval=t.layer_interval,
        input_size=t.input_size,
        normalize=t.normalize,
        precision=t.precision,
        device=device,
    )
