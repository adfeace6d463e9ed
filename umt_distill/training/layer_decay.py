"""Layer-wise learning-rate decay for fine-tuning (UMT code @4fb4049:
``LayerDecayValueAssigner`` in single_modality/optim_factory.py, used by run_class_finetuning.py).

A model of depth L has layer ids 0..L+1: id 0 for the stem (patch embedding, position table, CLS token),
id i+1 for block i, id L+1 for everything after the blocks (``fc_norm``, ``head``). Layer id ``j`` gets
the LR scale ``decay ** (L + 1 - j)``: block i trains at ``decay ** (L - i)`` of the base LR, the stem at
``decay ** (L + 1)``, the head at 1. The scale plugs into :func:`umt_distill.training.optim.param_groups`
as its ``lr_scale`` callback, which splits the AdamW groups by it.

Both parameter-name schemes in this package are understood: the UMT video ViT (``patch_embed``,
``blocks.{i}``) and the open_clip image tower of the image-teacher baseline (``visual.conv1``,
``visual.transformer.resblocks.{i}``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

# Parameters of the stem (layer id 0), by name after any ``module.``/``backbone.`` prefix.
_STEM = re.compile(
    r"^(patch_embed\.|pos_embed$|cls_token$|visual\.(conv1\.|class_embedding$|positional_embedding$|ln_pre\.))"
)
_BLOCK = re.compile(r"^(?:blocks|visual\.transformer\.resblocks)\.(\d+)\.")
_PREFIXES = ("module.", "backbone.")


def layer_id(name: str, depth: int) -> int:
    """Layer id (0..depth+1) of a parameter name; see the module docstring."""
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
    if _STEM.match(name):
        return 0
    block = _BLOCK.match(name)
    if block:
        index = int(block.group(1))
        if not 0 <= index < depth:
            raise ValueError(f"parameter {name!r} names block {index}, but the model has {depth} blocks")
        return index + 1
    return depth + 1


def layer_scales(decay: float, depth: int) -> list[float]:
    """LR scale per layer id: ``[decay ** (depth + 1 - j) for j in 0..depth+1]``."""
    if not 0 < decay <= 1:
        raise ValueError(f"layer decay must be in (0, 1], got {decay}")
    return [decay ** (depth + 1 - j) for j in range(depth + 2)]


def layer_decay_lr_scale(decay: float, depth: int) -> Callable[[str], float]:
    """The ``lr_scale`` callback for :func:`~umt_distill.training.optim.param_groups`.

    Example::

        scale = layer_decay_lr_scale(0.75, model.depth)
        optimizer = build_adamw(model, lr, 0.05, (0.9, 0.999), 1e-8, skip=model.no_weight_decay(), lr_scale=scale)
    """
    scales = layer_scales(decay, depth)
    return lambda name: scales[layer_id(name, depth)]
