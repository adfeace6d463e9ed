"""``spec.json``: the provenance of a cache store, and the checks made against it.

The spec says everything that decides the stored numbers (teacher, weights, views, mode, codec ...).
Resuming into a store, or training from one, compares these *identity* fields with the recipe and
refuses any difference, naming the field.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

SPEC_FORMAT = 1
SPEC_FILE = "spec.json"

# Fields of the spec that do not identify the data: they change as the run progresses.
_VOLATILE = ("created", "updated", "status", "counts", "versions", "recipe", "shards")
# Fields derived from the identity fields by the run itself: a recipe cannot give them, so they are not
# compared with one. ``basis`` (pca codecs: the fitted basis file's digest) is checked against the file
# instead (``cache/basis.py``).
_DERIVED = ("basis",)


class SpecMismatchError(ValueError):
    """A store's spec differs from what the recipe asks for."""


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("umt-distill", "torch", "open_clip_torch", "numpy", "zarr", "webdataset", "numcodecs", "av", "decord"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_spec(root: str | Path) -> dict:
    path = Path(root) / SPEC_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no spec.json — not a umt-distill cache store (or not finished)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: spec.json is not valid JSON ({e})") from None


def identity(spec: dict) -> dict:
    """The part of a spec that must match for two runs to write into the same store."""
    return {k: v for k, v in spec.items() if k not in _VOLATILE and k not in _DERIVED}


def _diff(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key, "<missing>"), b.get(key, "<missing>"), f"{prefix}{key}.")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return [] if a == b else [f"{prefix.rstrip('.')}: store has {a!r}, recipe gives {b!r}"]


def spec_differences(stored: dict, wanted: dict, fields: tuple[str, ...] | None = None) -> list[str]:
    """Human-readable differences between two specs' identity fields (optionally only ``fields``)."""
    a, b = identity(stored), identity(wanted)
    if fields is not None:
        a = {k: a.get(k) for k in fields}
        b = {k: b.get(k) for k in fields}
    return _diff(a, b, "")


def check_spec(stored: dict, wanted: dict, what: str, fields: tuple[str, ...] | None = None) -> None:
    """Raise :class:`SpecMismatchError` naming every differing field."""
    diffs = spec_differences(stored, wanted, fields)
    if diffs:
        raise SpecMismatchError(f"{what}: the store's spec does not match the recipe:\n  " + "\n  ".join(diffs))
