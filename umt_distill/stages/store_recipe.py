"""Training from a store takes the store's settings: its spec is the record of how the targets were made.

``umt-distill train RECIPE cache.store=PATH`` need not repeat the layout, codec, mode, views and teacher
the store was cached with: :func:`adopt_store_spec` copies them from ``spec.json`` into the recipe,
noting each value it changes. A value given on the command line that contradicts the store is refused,
naming both values. In ``visible`` mode the masks were drawn at cache time, so the store's mask ratio
is the one training uses (``mask.ratio`` included).
"""

from __future__ import annotations

import json
from typing import Any

from umt_distill import storage
from umt_distill.cache.spec import SPEC_FILE, read_spec
from umt_distill.config import Recipe, RecipeError, recipe_from_dict

# recipe key -> where spec.json holds it
STORE_KEYS: dict[str, tuple[str, ...]] = {
    "cache.layout": ("layout",),
    "cache.codec": ("codec", "name"),
    "cache.mode": ("mode", "mode"),
    "cache.num_views": ("views", "num_views"),
    "cache.frames": ("frames",),
    "views.policy": ("views", "policy"),
    "views.num_frames": ("views", "num_frames"),
    "views.size": ("views", "size"),
    "views.scales": ("views", "scales"),
    "views.max_distort": ("views", "max_distort"),
    "views.flip": ("views", "flip"),
    "teacher.name": ("teacher", "name"),
    "teacher.pretrained": ("teacher", "pretrained"),
    "teacher.layers": ("teacher", "layers"),
    "teacher.layer_interval": ("teacher", "layer_interval"),
    "teacher.normalize": ("teacher", "normalize"),
}
VISIBLE_KEYS: dict[str, tuple[str, ...]] = {
    "cache.mask_ratio": ("mode", "mask_ratio"),
    "cache.masks_per_view": ("mode", "masks_per_view"),
    "mask.ratio": ("mode", "mask_ratio"),  # the ratio the stored masks were drawn with
}


def adopt_store_spec(cfg: Recipe, explicit: set[str] | frozenset[str] = frozenset()) -> tuple[Recipe, list[str]]:
    """``cfg`` with the settings of its store (``cache.store``) where they differ.

    Args:
        cfg: The training recipe (cached mode).
        explicit: Keys the user set on the command line: one that contradicts the store is an error.

    Returns:
        The recipe and one note per value taken from the store (nothing if the store has no spec yet:
        the stage then says what is missing).

    Raises:
        RecipeError: an explicit value contradicts the store, naming both.
    """
    store = storage.store_root(cfg.cache.store)  # a URL stays a URL
    if not storage.exists(storage.join(store, SPEC_FILE)):
        return cfg, []
    spec = read_spec(store)
    if cfg.train.pixels_from == "store" and spec.get("frames", "none") == "none":
        raise RecipeError(f"{store}: the store holds no view frames (cached with cache.frames=none), so "
                          "train.pixels_from=store has nothing to read; train with train.pixels_from=video, or "
                          "cache a store with cache.frames=jpeg")
    keys = dict(STORE_KEYS)
    if _lookup(spec, ("mode", "mode")) == "visible":
        keys.update(VISIBLE_KEYS)
    data = cfg.model_dump(mode="json")
    notes, conflicts = [], []
    for key, where in keys.items():
        stored = _lookup(spec, where)
        if stored is None:
            continue  # an older spec without this field: the stage's own check decides
        current = _lookup(data, tuple(key.split(".")))
        if _same(current, stored):
            continue
        if key in explicit:
            conflicts.append(f"{key}={json.dumps(current)} (the store has {json.dumps(stored)})")
        else:
            section, field = key.split(".")
            data[section][field] = stored
            notes.append(f"{key}={json.dumps(stored)} from the store (the recipe said {json.dumps(current)})")
    if conflicts:
        raise RecipeError(f"{store}: {'; '.join(conflicts)} contradicts how the store was cached; drop the "
                          "override to train on this store, or cache a new store with these settings")
    return (recipe_from_dict(data, f"recipe + {storage.join(store, SPEC_FILE)}") if notes else cfg), notes


def _lookup(tree: Any, where: tuple[str, ...]) -> Any:
    for part in where:
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # tuples and lists alike
