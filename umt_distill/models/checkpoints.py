"""Load official UMT checkpoints (and our own safetensors files) into :class:`UMTStudent`, strictly.

UMT stage-1 files hold ``encoder.*`` and ``clip_decoder.{k}.*`` (UMT code @4fb4049:
single_modality/models/modeling_pretrain_umt.py), either bare or wrapped as ``{"model": ...}``
(``save_model`` in single_modality/utils.py) or ``{"module": ...}`` (DeepSpeed). Stage-2 files hold
the same keys under ``vision_encoder.`` next to the text encoder and the teacher
(multi_modality/models/umt.py); only that subtree is taken. The position embeddings are not stored (they are recomputed), so the key sets match
exactly. A file that does not match — missing, unexpected or mis-shaped keys — raises an error listing
them, instead of UMT's silent ``strict=False``.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

# Checkpoint containers whose weights sit under one key (SM save_model / DeepSpeed / ours).
_WRAPPER_KEYS = ("model", "module", "state_dict")
# Stage-2 vision encoder keys that belong to the stage-2 model, not to the stage-1 student.
_STAGE2_VISION_PREFIX = "vision_encoder."
_STAGE2_IGNORED = frozenset({"pool_norm.weight", "pool_norm.bias"})
_LIST_LIMIT = 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the model. ``source`` names the file."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A run or checkpoint folder holds no (complete) checkpoint."""


# Our run folders: <run>/checkpoints/step-XXXXXXXX/{model.safetensors, state.json, state.safetensors,
# recipe.yaml} (state.pt before), and
# <run>/checkpoints/latest naming the newest (training/checkpoint.py writes them). The one place that
# resolves such a folder to a checkpoint.
LATEST = "latest"


def latest_checkpoint(path: str | Path) -> Path | None:
    """Resolve a checkpoint dir, an output dir (its ``checkpoints/latest``) or None if there is none."""
    path = Path(path)
    if (path / "model.safetensors").exists():
        return path
    root = path / "checkpoints" if (path / "checkpoints").exists() else path
    pointer = root / LATEST
    if not pointer.exists():
        return None
    target = root / pointer.read_text().strip()
    if not ((target / "state.json").exists() or (target / "state.pt").exists()):  # this version, or earlier
        raise CheckpointNotFoundError(str(pointer), f"points at {target}, which is not a complete checkpoint")
    return target


def run_recipe_file(path: str | Path) -> Path | None:
    """The recipe a run (or checkpoint) folder was trained with: its newest checkpoint's ``recipe.yaml``;
    None if ``path`` holds no checkpoint of ours."""
    ckpt = latest_checkpoint(path)
    if ckpt is None or not (ckpt / "recipe.yaml").is_file():
        return None
    return ckpt / "recipe.yaml"


def weights_file(path: str | Path) -> Path:
    """A weights file, or the newest ``model.safetensors`` of one of our run/checkpoint folders."""
    path = Path(path)
    if path.is_dir():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise CheckpointNotFoundError(str(path), "no checkpoint found (expected checkpoints/latest or model.safetensors)")
        return ckpt / "model.safetensors"
    return path



class CheckpointMismatchError(CheckpointError):
    """The checkpoint's keys or shapes differ from the model's."""

    def __init__(
        self,
        source: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_short(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_short(unexpected)}")
        if mismatched:
            shapes = [f"{k} (file {list(f)}, model {list(m)})" for k, f, m in mismatched]
            parts.append(f"{len(mismatched)} shape mismatch(es): {_short(shapes)}")
        super().__init__(source, "checkpoint does not match the model; " + "; ".join(parts))


@dataclass
class LoadReport:
    """What :func:`load_umt_checkpoint` did (for logs): source, layout and keys left out (non-strict)."""

    source: str
    layout: str  # "stage1" | "stage2"
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a ``.safetensors`` file or a torch checkpoint (safely: tensors and plain containers only).

    Official SM checkpoints carry an ``argparse.Namespace`` under ``args``; that class is allowed, any
    other pickled object is refused rather than executed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(str(path), "no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(str(path), f"unreadable safetensors file ({err})") from err
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types (UnpicklingError, RuntimeError, zip errors)
        raise CheckpointError(str(path), f"not a loadable torch checkpoint ({err})") from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(str(path), f"expected a dict of tensors, found {type(obj).__name__}")
    return obj  # type: ignore[return-value]


def unwrap_state_dict(obj: Mapping[str, object], source: str = "<state dict>") -> dict[str, Tensor]:
    """Peel ``model`` / ``module`` / ``state_dict`` wrappers and DDP's ``module.`` prefix."""
    for _ in range(3):  # e.g. {"model": {"module": ...}} — bounded, wrappers do not nest deeper
        for key in _WRAPPER_KEYS:
            inner = obj.get(key) if isinstance(obj, Mapping) else None
            if isinstance(inner, Mapping) and inner:
                obj = inner
                break
        else:
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(source, f"no tensors found (top-level keys: {_short(list(obj))})")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def select_student_keys(state: Mapping[str, Tensor], source: str = "<state dict>") -> tuple[dict[str, Tensor], str]:
    """Pick the student's keys: stage-1 layout as is, or the ``vision_encoder.`` subtree of stage 2.

    Returns:
        (state dict in stage-1 key layout, layout name).

    Raises:
        CheckpointError: no ``encoder.*`` key in either layout (e.g. a CLIP teacher file).
    """
    if any(k.startswith("encoder.") for k in state):
        return dict(state), "stage1"
    prefix = _STAGE2_VISION_PREFIX
    if any(k.startswith(prefix + "encoder.") for k in state):
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        return {k: v for k, v in sub.items() if k not in _STAGE2_IGNORED}, "stage2"
    raise CheckpointError(
        source,
        "no UMT student keys (expected 'encoder.*' or 'vision_encoder.encoder.*'); "
        f"found e.g. {_short(sorted(state), 8)}",
    )


def load_umt_checkpoint(
    model: nn.Module,
    path_or_state_dict: str | Path | Mapping[str, object],
    strict: bool = True,
) -> LoadReport:
    """Load UMT weights into a :class:`~umt_distill.models.vit.UMTStudent` (or anything with its keys).

    Args:
        model: The student; its ``state_dict`` keys define what must be present.
        path_or_state_dict: ``.pth``/``.pt``/``.safetensors`` path, or an (optionally wrapped) dict.
        strict: Require exactly the model's keys. With ``strict=False`` missing/unexpected keys are
            reported in the result instead, but shape mismatches and a file with no student key at
            all still fail.

    Returns:
        A :class:`LoadReport`.

    Raises:
        CheckpointError: unreadable file or no student keys.
        CheckpointMismatchError: key or shape mismatch (lists the keys).
    """
    if isinstance(path_or_state_dict, Mapping):
        source, raw = "<state dict>", path_or_state_dict
    else:
        source, raw = str(path_or_state_dict), read_state_dict(path_or_state_dict)
    state, layout = select_student_keys(unwrap_state_dict(raw, source), source)

    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        (k, tuple(state[k].shape), tuple(expected[k].shape))
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if mismatched or (strict and (missing or unexpected)):
        raise CheckpointMismatchError(source, missing, unexpected, mismatched)
    usable = {k: v for k, v in state.items() if k in expected}
    if not usable:
        raise CheckpointMismatchError(source, missing, unexpected, [])
    model.load_state_dict(usable, strict=strict)
    return LoadReport(source, layout, len(usable), missing, unexpected)


def load_exact(model: nn.Module, state: Mapping[str, Tensor], source: str = "<state dict>") -> int:
    """Load ``state`` into ``model`` only if it has every key of the model's state dict, no other, each at
    the model's shape; returns the number of tensors loaded.

    Raises:
        CheckpointMismatchError: missing, unexpected or mis-shaped keys (all listed).
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in sorted(set(state) & set(expected))
                  if state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(source, missing, unexpected, mismatched)
    model.load_state_dict(state, strict=True)
    return len(state)


def save_student(model: nn.Module, path: str | Path) -> Path:
    """Write the student's weights as safetensors, in UMT's stage-1 key layout (loadable by
    :func:`load_umt_checkpoint`)."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return path


def _short(items: list[str], limit: int = _LIST_LIMIT) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")
