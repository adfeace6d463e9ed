"""Name registries for swappable parts.

Recipes pick parts by name (``teacher.name``, ``cache.codec``, ``mask.type`` ...); each kind of part has
one :class:`Registry`. ``umt-distill ls`` prints them all.
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown name was looked up in a registry."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class Registry(Generic[T]):
    """A mapping from names to parts of one kind (teachers, codecs, masks ...).

    Args:
        kind: What the registry holds, used in messages (``"codec"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._families: list[tuple[re.Pattern, str, Callable[[re.Match], T], str]] = []
        self._built: dict[str, T] = {}  # parts of families, by full name

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator."""

        def add(item: T) -> T:
            if name in self._items and self._items[name] is not item:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = item
            return item

        return add if obj is None else add(obj)

    def register_family(self, pattern: str, label: str, make: Callable[[re.Match], T], doc: str = "") -> None:
        """Register parametrised names (``pca64``, ``jpca768i4``): ``make(match)`` builds the part of a name
        that fully matches ``pattern`` (it may raise ``ValueError`` for bad parameters); ``label`` (e.g.
        ``pca<r>``) stands for the family in listings. Built parts are kept, so a name gives one object."""
        self._families.append((re.compile(pattern), label, make, doc))

    def get(self, name: str) -> T:
        """Return the part registered as ``name``; an unknown name names the closest valid ones."""
        try:
            return self._items[name] if name in self._items else self._built[name]
        except (KeyError, TypeError):
            for pattern, _, make, _ in self._families:
                match = pattern.fullmatch(name) if isinstance(name, str) else None
                if match:
                    try:
                        item = make(match)
                    except ValueError as e:
                        raise RegistryError(f"{self.kind} {name!r}: {e}") from None
                    self._built[name] = item
                    return item
            known = sorted(self._items) + [label for _, label, _, _ in self._families]
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise RegistryError(f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(known) or '(none)'}") from None

    def __contains__(self, name: object) -> bool:
        try:
            self.get(name)  # type: ignore[arg-type]
        except RegistryError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)

    def describe(self) -> dict[str, str]:
        """Name → first line of the part's docstring (a family: its label → the label's docstring)."""
        out = {}
        for name in self.names():
            doc = (getattr(self._items[name], "__doc__", None) or "").strip().splitlines()
            out[name] = doc[0] if doc else ""
        for _, label, _, doc in self._families:
            out[label] = doc
        return out


TEACHERS: Registry = Registry("teacher")
STUDENTS: Registry = Registry("student")
MASKS: Registry = Registry("mask")
CODECS: Registry = Registry("codec")
STORES: Registry = Registry("store layout")
VIEW_POLICIES: Registry = Registry("view policy")
VIDEO_BACKENDS: Registry = Registry("video backend")

ALL_REGISTRIES: dict[str, Registry] = {
    "teachers": TEACHERS,
    "students": STUDENTS,
    "masks": MASKS,
    "codecs": CODECS,
    "stores": STORES,
    "view policies": VIEW_POLICIES,
    "video backends": VIDEO_BACKENDS,
}

# What the registries hold once their modules are imported: names, and the patterns of parametrised
# families. Checking a recipe's part names against it needs no torch (`umt-distill validate` stays fast);
# tests/unit/test_config.py keeps it equal to the registries themselves.
CATALOG: dict[str, tuple[tuple[str, ...], tuple[tuple[str, str], ...]]] = {
    "teachers": (("open_clip",), ()),
    "students": (("umt_base_patch16", "umt_large_patch16", "umt_small_patch16", "umt_test_tiny"), ()),
    "masks": (("random", "semantic", "tube"), ()),
    "codecs": (("bf16", "fp16", "fp32", "int4", "int8"), (("(j?)pca([0-9]+)(i4)?", "pca<r>[i4], jpca<r>[i4]"),)),
    "stores": (("wds", "zarr"), ()),
    "view policies": (("eval_center", "umt_train", "videomae_train"), ()),
    "video backends": (("decord", "pyav", "torchcodec"), ()),
}


def catalog_registry(kind: str) -> Registry:
    """A registry of :data:`CATALOG`'s names for ``kind`` (the parts themselves are not imported): its
    ``get`` accepts and refuses the names the real registry does, with the same messages, but does not
    check a family's parameters (that happens when the part is built)."""
    names, families = CATALOG[kind]
    registry: Registry = Registry(ALL_REGISTRIES[kind].kind)
    for name in names:
        registry.register(name, name)
    for pattern, label in families:
        registry.register_family(pattern, label, lambda match: match.group(0))
    return registry


# Modules whose import fills the registries. Imported lazily so `import umt_distill` stays cheap.
_PART_MODULES = (
    "umt_distill.data.video",
    "umt_distill.data.views",
    "umt_distill.teachers.clip",
    "umt_distill.cache.codecs",
    "umt_distill.cache.stores",
    "umt_distill.masking",
    "umt_distill.models.vit",
)


def load_all_parts() -> None:
    """Import every module that registers parts (missing modules are skipped)."""
    for mod in _PART_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name != mod:
                raise
