"""A checkpoint's training state without pickle: tensors in safetensors, everything else in JSON.

The state of a run (optimizer moments, step and epoch, data position, RNG states, grad-scaler scale,
metrics; stage 1's ``data``: the global position of its sample stream, see ``data/samplers.py``) is a
tree of dicts, lists, tuples, numbers, strings, tensors and numpy arrays. It is written as
``state.json`` (the tree, with each tensor or array replaced by a reference) beside
``state.safetensors`` (the tensors). Reading either runs no code from the file, so a run folder from
someone else can be resumed safely. Checkpoints of earlier versions (``state.pt``, a pickle) are read
with ``torch.load(weights_only=True)`` and an allow-list of the numpy types an RNG state holds;
anything else in them is refused, naming the file, and never executed.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from umt_distill.models.checkpoints import CheckpointError

STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
LEGACY_STATE = "state.pt"

# Markers of the JSON tree; a dict whose keys are not all plain strings is stored as pairs.
_TENSOR, _ARRAY, _TUPLE, _PAIRS = "$tensor", "$ndarray", "$tuple", "$pairs"


def save_state(folder: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` as ``state.json`` + ``state.safetensors`` in ``folder`` (not atomically: the
    caller writes into a temporary checkpoint folder and renames it)."""
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors, "state")
    save_file(tensors, str(folder / STATE_TENSORS))
    (folder / STATE_JSON).write_text(json.dumps(tree) + "\n", encoding="utf-8")


def load_state(folder: str | Path) -> dict[str, Any]:
    """The training state of a checkpoint folder (this format, or an earlier version's ``state.pt``).

    Raises:
        CheckpointError: the state is missing, damaged, or (``state.pt``) holds objects outside the
            allow-list — a pickle that could run code is refused, not loaded.
    """
    folder = Path(folder)
    if (folder / STATE_JSON).exists():
        return _load_current(folder)
    if (folder / LEGACY_STATE).exists():
        return _load_legacy(folder / LEGACY_STATE)
    raise CheckpointError(str(folder), f"no training state ({STATE_JSON} or {LEGACY_STATE})")


def read_plain_entry(folder: str | Path, key: str) -> Any:
    """One top-level entry of a checkpoint's ``state.json`` that holds no tensors (e.g. ``data``, the
    global position of the sample stream), read without the tensors; None if absent or an older format.

    Raises:
        CheckpointError: ``state.json`` is unreadable, or the entry refers to tensors.
    """
    path = Path(folder) / STATE_JSON
    if not path.exists():
        return None
    try:
        tree = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(str(path), f"cannot read the training state ({e})") from None
    node = tree.get(key) if isinstance(tree, dict) else None
    if node is not None and (_TENSOR in json.dumps(node) or _ARRAY in json.dumps(node)):
        raise CheckpointError(str(path), f"{key}: holds tensors; read it with load_state")
    return _decode(node, {}, str(path))


def has_state(folder: str | Path) -> bool:
    """Whether ``folder`` holds a training state (a complete checkpoint has one)."""
    folder = Path(folder)
    return (folder / STATE_JSON).exists() or (folder / LEGACY_STATE).exists()


def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        t = obj.detach().cpu()
        # safetensors refuses tensors that share storage: a CPU tensor is copied; .cpu() already copied others
        tensors[key] = (t.clone() if t.device == obj.device else t).contiguous()
        return {_TENSOR: key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        # torch has no full unsigned types beyond uint8: wider ones travel as int64 (lossless for uint32)
        wide = obj.dtype.kind == "u" and obj.dtype.itemsize > 1
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj.astype(np.int64) if wide else obj).copy())
        return {_ARRAY: key, "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        for k in obj:
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: dict key {k!r} ({type(k).__name__}) cannot be saved in a training state")
        return {_PAIRS: [[k, _encode(v, tensors, f"{where}[{k!r}]")] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{where}: {type(obj).__name__} cannot be saved in a training state "
                    "(use tensors, arrays, numbers, strings, lists, tuples and dicts)")


def _decode(node: Any, tensors: dict[str, torch.Tensor], source: str) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors, source) for v in node]
    if not isinstance(node, dict):
        return node
    if _TENSOR in node or _ARRAY in node:
        key = node.get(_TENSOR, node.get(_ARRAY))
        if key not in tensors:
            raise CheckpointError(source, f"{STATE_JSON} refers to tensor {key!r}, which {STATE_TENSORS} lacks")
        if _TENSOR in node:
            return tensors[key]
        try:
            return tensors[key].numpy().astype(np.dtype(node["dtype"]))
        except (TypeError, KeyError) as e:
            raise CheckpointError(source, f"array {key!r}: bad dtype {node.get('dtype')!r} ({e})") from None
    if _TUPLE in node:
        return tuple(_decode(v, tensors, source) for v in node[_TUPLE])
    if _PAIRS in node:
        return {k: _decode(v, tensors, source) for k, v in node[_PAIRS]}
    return {k: _decode(v, tensors, source) for k, v in node.items()}


def _load_current(folder: Path) -> dict[str, Any]:
    source = str(folder / STATE_JSON)
    try:
        tree = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / STATE_TENSORS)) if (folder / STATE_TENSORS).exists() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError) as e:
        raise CheckpointError(source, f"cannot read the training state ({e}); resume from an earlier "
                              "checkpoint or start the run afresh") from None
    state = _decode(tree, tensors, source)
    if not isinstance(state, dict):
        raise CheckpointError(source, "the training state is not a mapping")
    return state


# What an earlier version's state.pt holds besides tensors and plain containers: numpy's RNG state
# (an ndarray of uint32 and numpy scalars). Nothing else is unpickled.
def _legacy_allow_list() -> list[Any]:
    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype]
    allowed += [type(np.dtype(t)) for t in ("uint32", "int64", "float64", "bool")]
    return allowed


def _load_legacy(path: Path) -> dict[str, Any]:
    try:
        with torch.serialization.safe_globals(_legacy_allow_list()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).splitlines()[0] if str(e) else "unsupported content"
        raise CheckpointError(str(path), f"refused: it holds objects outside the allow-list of a training "
                              f"state ({first[:200]}); it was not loaded. Resume only from checkpoints you "
                              "trust, or start the run afresh") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(str(path), f"cannot read the training state ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(str(path), "the training state is not a mapping")
    return state
