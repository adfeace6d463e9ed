"""Quickstart step 3: ``cache-teacher`` over K augmented views of every training clip (stage 2 reuses it
for its own unflipped store); skipped with ``teacher.mode=online``."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from rich.console import Console

from umt_distill.cache.pipeline import build_spec, cache_teacher
from umt_distill.cache.spec import SpecMismatchError, check_spec, read_spec
from umt_distill.config import Recipe
from umt_distill.data.corpus import corpus_digest, read_corpus
from umt_distill.teachers.build import build_teacher


def ensure_cache(cfg: Recipe, console: Console) -> tuple[bool, dict]:
    """Cache the teacher over the training clips, or reuse a finished store made the same way.

    A store left by another teacher or other settings lives inside the quickstart's own output, so it
    is rebuilt (with a message) rather than refused.

    Returns:
        (reused, the store's counts: ``records``, ``failures`` ...).
    """
    store = Path(cfg.cache.store)
    if (store / "spec.json").exists():
        rows = read_corpus(cfg.corpus.source, cfg.corpus.root)
        wanted = build_spec(cfg, build_teacher(cfg, torch.device("cpu")), rows, corpus_digest(rows))
        stored = read_spec(store)
        try:
            check_spec(stored, wanted, f"cache {store}")
        except SpecMismatchError as e:
            console.print(f"  [yellow]{e}[/]\n  rebuilding the cache", highlight=False)
            shutil.rmtree(store)
        else:
            if stored.get("status") == "complete":
                return True, stored.get("counts", {})
    summary = cache_teacher(cfg, progress=True)
    return False, summary
