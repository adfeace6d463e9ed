"""open_clip model configs registered at runtime: tiny test teachers and user JSON files.

open_clip describes an architecture as data (``{"embed_dim", "vision_cfg", "text_cfg"}``) and finds it by
name in its config registry. Tests, the quickstart and users with custom models need configs that are not
shipped with open_clip; :func:`register_model_config` adds one under a name so that both
``ClipTeacher(name)`` and ``open_clip.create_model(name)`` build it, offline.
"""

from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path
from typing import Any

import open_clip
import open_clip.factory

TINY_TEACHER = "umt-test-tiny"
TINY_TEACHER_P14 = "umt-test-tiny-p14"

# A text tower is mandatory in an open_clip config even though the teacher only keeps the vision
# tower; keep it small but with open_clip's tokenizer sizes so `encode_text` would still work.
_TINY_TEXT_CFG: dict[str, Any] = {
    "context_length": 77,
    "vocab_size": 49408,
    "width": 32,
    "heads": 2,
    "layers": 1,
}

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    # ViT-B/16 in miniature: 64 px, patch 16 -> 4x4 grid (N=16), width 64, 4 blocks, 4 heads, D=32.
    TINY_TEACHER: {
        "embed_dim": 32,
        "quick_gelu": True,  # OpenAI CLIP (UMT's teacher) uses QuickGELU
        "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 64, "layers": 4, "head_width": 16},
        "text_cfg": _TINY_TEXT_CFG,
    },
    # ViT-L/14 in miniature: native 56 px (4x4 grid of 14-px patches). Run at 42 px (3x3) it mimics
    # UMT-L's teacher, CLIP-L/14 trained at 224 px (16x16) and run at 196 px (14x14).
    TINY_TEACHER_P14: {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 56, "patch_size": 14, "width": 64, "layers": 4, "head_width": 16},
        "text_cfg": _TINY_TEXT_CFG,
    },
}

_REQUIRED_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


def register_model_config(name: str, config: dict[str, Any], source: str = "<dict>") -> None:
    """Register an open_clip model config under ``name`` (idempotent for an identical config).

    Writes into open_clip's config registry (``open_clip.factory._MODEL_CONFIGS``): the public
    ``add_model_config`` only takes files and names the model after the file stem. The registry dict
    is re-bound by open_clip on every rescan, so it is looked up afresh on each call; rescans keep
    entries they did not load from disk.

    Args:
        name: Model name, as later passed to ``ClipTeacher(name=...)`` / ``open_clip.create_model``.
        config: ``{"embed_dim": ..., "vision_cfg": {...}, "text_cfg": {...}, ...}``.
        source: Where the config came from, for error messages (e.g. the JSON path).

    Raises:
        ValueError: The config lacks a required key, or ``name`` is already registered with a
            different config (e.g. a built-in open_clip model name).
    """
    missing = [key for key in _REQUIRED_KEYS if key not in config]
    if missing:
        raise ValueError(f"{source}: open_clip model config lacks key(s) {missing} (needs {list(_REQUIRED_KEYS)})")
    registry = getattr(open_clip.factory, "_MODEL_CONFIGS", None)
    if not isinstance(registry, dict):
        raise RuntimeError(
            f"open_clip {open_clip.__version__} has no config registry `open_clip.factory._MODEL_CONFIGS`; "
            "cannot register model configs at runtime"
        )
    existing = registry.get(name)
    if existing is not None and existing != config:
        raise ValueError(
            f"{source}: open_clip model {name!r} is already registered with a different config; "
            "choose another name"
        )
    registry[name] = deepcopy(config)


def load_model_config(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read an open_clip model-config JSON file.

    Accepts a bare architecture config (the format of open_clip's ``model_configs/*.json``) or the
    hub/local-dir format ``{"model_cfg": {...}, "preprocess_cfg": {...}}``.

    Returns:
        ``(model_cfg, preprocess_cfg)``; ``preprocess_cfg`` is ``{}`` for a bare config.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file is not a JSON object with the keys open_clip needs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: open_clip model config file not found")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    preprocess_cfg: dict[str, Any] = {}
    if "model_cfg" in config:
        preprocess_cfg = dict(config.get("preprocess_cfg") or {})
        config = config["model_cfg"]
    missing = [key for key in _REQUIRED_KEYS if key not in config]
    if missing:
        raise ValueError(f"{path}: open_clip model config lacks key(s) {missing} (needs {list(_REQUIRED_KEYS)})")
    return config, preprocess_cfg


def register_model_config_file(name: str, path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read the JSON config at ``path``, register it with open_clip as ``name``; see load_model_config."""
    config, preprocess_cfg = load_model_config(path)
    register_model_config(name, config, source=str(path))
    return config, preprocess_cfg


def register_tiny_configs() -> None:
    """Register the tiny test teachers ``umt-test-tiny`` and ``umt-test-tiny-p14`` with open_clip."""
    for name, config in TINY_CONFIGS.items():
        register_model_config(name, config, source=f"umt_distill.teachers.configs.{name}")
