"""Stage-2 data: captioned video and image sources over the same cache stores as stage 1, mixed per step.

A *source* is a corpus with captions plus its teacher store: ``video`` is the recipe's ``corpus`` and
``cache`` sections; ``image`` is ``stage2.image_corpus`` and ``stage2.image_store`` — images are 1-frame
videos with their own cached targets (a store made by ``cache-teacher`` with ``views.num_frames=1``).
:func:`source_recipe` gives each source its own view of the recipe, so the stage-1 parts (spec check,
datasets, target gathering) apply unchanged; ``stages.parts.build_source`` builds a source's loader.

Every item gets one of its clip's captions per epoch, drawn by a generator seeded by (seed, source,
clip, epoch), and a globally unique ``sample_id`` that decides contrastive positives.

As in UMT's ``MetaLoader``, each step trains on one source, and an epoch holds as many steps of each
source as that source fills; :func:`source_schedule` shuffles that list with a generator seeded by
(seed, epoch), so every rank computes the same order without communication.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, IterableDataset

from umt_distill.config import Recipe

SOURCES = ("video", "image")


class CaptionError(ValueError):
    """A clip of a stage-2 source has no caption; names the manifest and the clip."""


def source_recipe(cfg: Recipe, source: str) -> Recipe:
    """The recipe as one source sees it: its corpus, store, frame count and mask ratio."""
    if source == "video":
        return cfg
    if source != "image":
        raise ValueError(f"unknown stage-2 source {source!r} (valid: {', '.join(SOURCES)})")
    s = cfg.stage2
    if not (s.image_corpus and s.image_store):
        raise ValueError("stage2.sources includes image: set stage2.image_corpus and stage2.image_store")
    return cfg.model_copy(update={
        "corpus": cfg.corpus.model_copy(update={"source": s.image_corpus, "root": s.image_corpus_root}),
        "cache": cfg.cache.model_copy(update={"store": s.image_store, "layout": s.image_layout}),
        "views": cfg.views.model_copy(update={"num_frames": 1}),
        "mask": cfg.mask.model_copy(update={"ratio": s.image_mask_ratio}),
    })


def sample_id(source: str, clip_id: str) -> int:
    """A 63-bit id unique to (source, clip): equal ids are the same sample, on every rank and in every
    source (a per-dataset row index would repeat across the video and image sources)."""
    digest = hashlib.sha256(f"{source}\x00{clip_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def caption_index(seed: int, source: str, clip_id: str, epoch: int, num_captions: int) -> int:
    """Which caption of a clip epoch ``epoch`` shows: uniform, from its own seeded generator."""
    digest = hashlib.sha256(f"{seed}:caption:{source}:{clip_id}:{epoch}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return int(torch.randint(num_captions, (1,), generator=gen))


def source_schedule(steps: dict[str, int], seed: int, epoch: int) -> list[str]:
    """The source of every step of an epoch: ``steps[s]`` entries of each source, shuffled."""
    names = [name for name in sorted(steps) for _ in range(steps[name])]
    gen = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:schedule:{epoch}".encode()).digest()[:8], "little"))
    return [names[i] for i in torch.randperm(len(names), generator=gen).tolist()]


def _caption(item: dict, captions: dict[str, tuple[str, ...]], source: str, seed: int, epoch: int) -> dict:
    clip = item["clip_id"]
    options = captions[clip]
    item["caption"] = options[caption_index(seed, source, clip, epoch, len(options))]
    item["sample_id"] = sample_id(source, clip)
    return item


class CaptionedDataset(Dataset):
    """A stage-1 view dataset (cached or online) whose items also carry this epoch's caption."""

    def __init__(self, base: Dataset, captions: dict[str, tuple[str, ...]], source: str, seed: int) -> None:
        self.base, self.captions, self.source, self.seed = base, captions, source, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        return _caption(self.base[i], self.captions, self.source, self.seed, self.epoch)

    def __getitems__(self, indices: list[int]) -> list[dict]:
        getitems = getattr(self.base, "__getitems__", None)  # a cached base reads a batch at once
        items = getitems(indices) if getitems is not None else [self.base[i] for i in indices]
        return [_caption(item, self.captions, self.source, self.seed, self.epoch) for item in items]


class CaptionedStream(IterableDataset):
    """:class:`~umt_distill.cache.datasets.StreamingViewDataset` (WebDataset) batches with captions."""

    def __init__(self, base, captions: dict[str, tuple[str, ...]], source: str, seed: int) -> None:
        self.base, self.captions, self.source, self.seed = base, captions, source, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.base.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.base:
            items = [_caption({"clip_id": c}, self.captions, self.source, self.seed, self.epoch) for c in batch["clip_id"]]
            batch["caption"] = [it["caption"] for it in items]
            batch["sample_id"] = torch.tensor([it["sample_id"] for it in items])
            yield batch
