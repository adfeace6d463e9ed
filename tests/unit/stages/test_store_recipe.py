"""`train RECIPE cache.store=PATH` takes the store's settings from its spec; a command-line value that
contradicts the store is refused naming both (the visible-mode mask ratio included)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from umt_distill.testing.corpora import write_shapes_corpus

from umt_distill.cache.pipeline import cache_teacher
from umt_distill.config import RecipeError, load_recipe
from umt_distill.stages.store_recipe import adopt_store_spec

# How the store was cached; the recipe file (stage1/tiny) says fp16, full, ratio 0.5, 2 views, flip on.
CACHED = ["cache.codec=int8", "cache.mode=visible", "cache.mask_ratio=0.75", "cache.num_views=3", "views.flip=false"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("store_recipe")
    corpus = write_shapes_corpus(root, 4, seed=7)
    store = root / "store"
    cache_teacher(load_recipe("stage1/tiny", [f"corpus.source={corpus}", f"cache.store={store}", *CACHED]),
                  progress=False)
    return corpus, store


def _recipe(corpus: Path, store: Path, *extra: str):
    return load_recipe("stage1/tiny", [f"corpus.source={corpus}", f"cache.store={store}", *extra])


def test_the_store_settings_replace_the_recipe_files(store) -> None:
    corpus, path = store
    cfg, notes = adopt_store_spec(_recipe(corpus, path))
    assert (cfg.cache.codec, cfg.cache.mode, cfg.cache.mask_ratio, cfg.cache.num_views) == ("int8", "visible", 0.75, 3)
    assert cfg.views.flip is False
    assert cfg.mask.ratio == 0.75  # the masks were drawn at cache time with this ratio
    assert 'cache.codec="int8" from the store (the recipe said "fp16")' in notes
    assert len(notes) == 6  # codec, mode, mask_ratio, num_views, flip, mask.ratio


def test_a_store_without_spec_leaves_the_recipe_alone(tmp_path) -> None:
    cfg = load_recipe("stage1/tiny", [f"cache.store={tmp_path}"])
    assert adopt_store_spec(cfg) == (cfg, [])


@pytest.mark.parametrize("override,named", [("cache.codec=fp16", 'cache.codec="fp16" (the store has "int8")'),
                                            ("mask.ratio=0.9", "mask.ratio=0.9 (the store has 0.75)")])
def test_an_explicit_value_that_contradicts_the_store_is_refused(store, override, named) -> None:
    corpus, path = store
    with pytest.raises(RecipeError, match="contradicts how the store was cached") as err:
        adopt_store_spec(_recipe(corpus, path, override), {override.split("=")[0]})
    assert named in str(err.value)


def test_explicit_values_that_agree_with_the_store_pass(store) -> None:
    corpus, path = store
    cfg, _ = adopt_store_spec(_recipe(corpus, path, "cache.codec=int8"), {"cache.codec"})
    assert cfg.cache.codec == "int8"


def _train(corpus: Path, store: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["train", "stage1/tiny", f"corpus.source={corpus}", f"cache.store={store}", f"train.output_dir={out}",
            "train.max_steps=2", *extra]
    return subprocess.run([sys.executable, "-m", "umt_distill", *args], capture_output=True, text=True, timeout=300)


def test_train_on_a_store_without_repeating_its_settings(store, tmp_path) -> None:
    corpus, path = store
    done = _train(corpus, path, tmp_path / "run")
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'note: cache.codec="int8" from the store (the recipe said "fp16")' in done.stderr
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_train_refuses_an_override_that_contradicts_the_store_in_one_line(store, tmp_path) -> None:
    corpus, path = store
    done = _train(corpus, path, tmp_path / "run", "cache.mode=full")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert f'error: {path}: cache.mode="full" (the store has "visible") contradicts how the store was cached' \
        in done.stderr
