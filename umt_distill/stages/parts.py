"""Parts the stage loops share: the spec check, the student, the data of a stage (one source, or one of
stage 2's captioned sources), per-step masks and targets."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset

from umt_distill.cache.datasets import (
    CachedViewDataset,
    ElasticStreamingViewDataset,
    StreamingViewDataset,
    device_targets,
    jpeg_device,
    target_codec,
)
from umt_distill.cache.spec import check_spec
from umt_distill.config import Recipe, RecipeError
from umt_distill.data.clipviews import OnlineViewDataset
from umt_distill.data.corpus import read_corpus
from umt_distill.data.samplers import ElasticSampler, EpochSampler
from umt_distill.data.video import preload_video_backend
from umt_distill.data.vl import (
    CaptionedDataset,
    CaptionedStream,
    CaptionError,
    source_recipe,
)
from umt_distill.masking import gather_visible
from umt_distill.models.sparsify import SparseSpec, teacher_scores
from umt_distill.registry import MASKS, STUDENTS, load_all_parts
from umt_distill.training.distributed import DistEnv
from umt_distill.training.loop import build_loader, epoch_batches


def check_store_matches(spec: dict, cfg: Recipe) -> None:
    """Refuse a store whose targets were made differently from what the recipe asks for."""
    t = cfg.teacher
    stored = {
        "teacher": {k: spec["teacher"].get(k) for k in ("name", "pretrained", "layers", "layer_interval", "normalize")},
        "teacher.input_size": spec["teacher"].get("input_size"),
        "views.num_frames": spec["views"]["num_frames"],
        "views.size": spec["views"]["size"],
        # Cached training uses the stored views; a recipe that asks for other ones (e.g. no flips for
        # direction labels) must not silently get them.
        "views": {k: spec["views"].get(k) for k in ("policy", "flip", "scales", "max_distort")},
        "cache.codec": spec["codec"]["name"],
    }
    wanted = {
        "teacher": {"name": t.name, "pretrained": t.pretrained, "layers": t.layers, "layer_interval": t.layer_interval,
                    "normalize": t.normalize},
        # null in the recipe means "the model's own", which the spec records as a number
        "teacher.input_size": t.input_size if t.input_size is not None else spec["teacher"].get("input_size"),
        "views.num_frames": cfg.views.num_frames,
        "views.size": cfg.views.size,
        "views": {"policy": cfg.views.policy, "flip": cfg.views.flip, "scales": list(cfg.views.scales),
                  "max_distort": cfg.views.max_distort},
        "cache.codec": cfg.cache.codec,
    }
    if spec.get("status") != "complete":
        raise ValueError(f"{cfg.cache.store}: the store is not complete (status {spec.get('status')!r}); finish cache-teacher first")
    check_spec(stored, wanted, f"cannot train from {cfg.cache.store}")


def build_student(cfg: Recipe, teacher_dim: int, **overrides) -> torch.nn.Module:
    """The recipe's student; ``overrides`` (e.g. ``tubelet_size``) replace its size's defaults."""
    load_all_parts()
    s = cfg.student
    return STUDENTS.get(s.name)(
        teacher_dim=teacher_dim, num_align_layers=cfg.teacher.layers, align_interval=s.align_interval,
        drop_path_rate=s.drop_path_rate, use_checkpoint=s.use_checkpoint, checkpoint_num=s.checkpoint_num,
        **overrides,
    )


def build_data(cfg: Recipe, env: DistEnv, targets: bool = True):
    """(dataset, sampler or None, make_loader, clips per rank and epoch) for the recipe's target source.

    Random-access sources use an :class:`EpochSampler`; a WebDataset store streams (sampler None) and
    the loop skips already-consumed batches on resume. ``targets=False``: the views' pixels only,
    decoded from the corpus (pixel reconstruction needs no teacher).
    """
    rows = []
    online = cfg.teacher.mode == "online" or not targets
    if online or cfg.train.pixels_from == "video":
        rows = read_corpus(cfg.corpus.source, cfg.corpus.root)
        preload_video_backend(cfg.corpus.video_backend)  # once here, not in every worker of every epoch
    sampler, stream = None, not online and cfg.cache.layout == "wds"
    if stream:  # batches are assembled in the workers, targets in their stored dtypes
        dataset = StreamingViewDataset(cfg.cache.store, cfg, {r.id: r for r in rows}, jpeg_device=jpeg_device(cfg))
        per_rank = dataset.clips_per_rank(env.world_size)
    else:
        if online:
            dataset = OnlineViewDataset(rows, cfg)
        else:
            dataset = CachedViewDataset(cfg.cache.store, cfg, {r.id: r for r in rows})
        sampler = EpochSampler(len(dataset), cfg.seed, env.rank, env.world_size)
        per_rank = sampler.per_rank()
    return dataset, sampler, _loader_factory(cfg, dataset, sampler, stream), per_rank


def build_elastic_data(cfg: Recipe, env: DistEnv):
    """Stage 1's data in the global sample stream (``data.samplers``): (dataset, an ElasticSampler or None
    for a stream, make_loader, N samples per epoch). One loader reads the rest of the run
    (``training.loop.stream_batches``); the order is the same at any world size and number of workers."""
    rows = []
    online = cfg.teacher.mode == "online"
    if online or cfg.train.pixels_from == "video":
        rows = read_corpus(cfg.corpus.source, cfg.corpus.root)
        preload_video_backend(cfg.corpus.video_backend)
    if not online and cfg.cache.layout == "wds":
        dataset = ElasticStreamingViewDataset(cfg.cache.store, cfg, {r.id: r for r in rows}, jpeg_device=jpeg_device(cfg))
        return dataset, None, _loader_factory(cfg, dataset, None, True), dataset.epoch_samples
    dataset = OnlineViewDataset(rows, cfg) if online else CachedViewDataset(cfg.cache.store, cfg, {r.id: r for r in rows})
    sampler = ElasticSampler(len(dataset), cfg.seed, env.rank, env.world_size)
    return dataset, sampler, _loader_factory(cfg, dataset, sampler, False), len(dataset)


def sample_mask_generators(seed: int, epochs: list[int], clip_ids: list[str]) -> list[torch.Generator]:
    """One generator per sample, from (seed, epoch, clip id): a sample's mask is the same at any world size,
    rank, batch or step it lands in (stage 1's elastic order; the clip at an epoch's position is fixed)."""
    gens = []
    for epoch, clip in zip(epochs, clip_ids):
        digest = hashlib.sha256(f"{seed}:mask:{epoch}:{clip}".encode()).digest()
        gens.append(torch.Generator().manual_seed(int.from_bytes(digest[:8], "little")))
    return gens


def mask_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """Masks of step ``step`` on ``rank``: a pure function of (seed, step, rank), so resume is exact."""
    digest = hashlib.sha256(f"{seed}:mask:{step}:{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def step_targets(cfg: Recipe, batch: dict, pixels: torch.Tensor, teacher, gen: torch.Generator | list[torch.Generator], device: torch.device):
    """Teacher targets at the visible positions, and those positions.

    Returns:
        targets [K, B, L_vis, D] (float32) and visible_idx [B, L_vis] (sorted flat (t, n) indices).
    """
    targets, visible_idx, _ = step_targets_attn(cfg, batch, pixels, teacher, gen, device)
    return targets, visible_idx


def step_targets_attn(cfg: Recipe, batch: dict, pixels: torch.Tensor, teacher, gen: torch.Generator | list[torch.Generator],
                      device: torch.device):
    """:func:`step_targets` plus the teacher's attention ``attn [B, T, N]`` float32 (what ranks tokens for
    ``sparsify.source=teacher``): the cached one, or the online teacher's on the same pixels."""
    if teacher is not None:  # online: the teacher sees exactly the pixels the student sees
        out = teacher(pixels)
        tokens, attn = out.tokens.float(), out.attn.float()  # [B, K, T, N, D], [B, T, N]
    else:
        tokens = device_targets(batch, target_codec(str(cfg.cache.store), cfg.cache.codec), device)  # [B, K, T, N(_vis), D] float32
        attn = batch["attn"].to(device, non_blocking=True).float()
    B, T, N = attn.shape
    if "visible_idx" in batch:  # mode visible: the mask was drawn at cache time; tokens are [B, K, T, N_vis, D]
        vis = batch["visible_idx"].to(device, non_blocking=True).long()  # [B, T, N_vis]
        visible_idx = (vis + torch.arange(T, device=device).view(1, T, 1) * N).flatten(1)  # [B, T*N_vis]
        return tokens.flatten(2, 3).transpose(0, 1), visible_idx, attn
    # A CPU generator keeps masks reproducible on any device; the noise it draws moves to `device`.
    draw = MASKS.get(cfg.mask.type)
    # `gen`: one generator for the batch, or one per sample (sample_mask_generators): row i's noise then comes
    # from generator i alone, in one batched draw (masking.py).
    visible_idx = draw(B, T, N, cfg.mask.ratio, gen, attn=attn, device=device)  # [B, L_vis]
    flat = tokens.flatten(2, 3).transpose(0, 1)  # [K, B, T*N, D]
    return gather_visible(flat, visible_idx), visible_idx, attn


def sparse_spec(cfg: Recipe, depth: int, teacher_attn: bool = True) -> SparseSpec | None:
    """The recipe's token sparsification (None: off, ``sparsify.keep`` = 1), checked against the student.

    Args:
        teacher_attn: Whether the loop reads the teacher's attention (stage 2 does only with UTA).
    """
    spec = SparseSpec.from_config(cfg.sparsify)
    if spec is None:
        return None
    if spec.source == "teacher" and not teacher_attn:
        raise RecipeError("sparsify.source=teacher ranks tokens by the teacher's attention, which this run does not read "
                          "(stage2.loss_weights.uta=0): use sparsify.source=student")
    if spec.after_block >= depth:
        raise RecipeError(f"sparsify.after_block={spec.after_block}: the student has {depth} blocks (0..{depth - 1})")
    if cfg.mask.type == "random" and not (cfg.teacher.mode == "cached" and cfg.cache.mode == "visible"):
        raise RecipeError("sparsify.keep < 1 keeps the top tokens of each frame and needs the same visible count in "
                          "every frame: set mask.type=tube or semantic (random masks give frames different counts)")
    return spec


def sparse_scores(spec: SparseSpec | None, attn: torch.Tensor, visible_idx: torch.Tensor | None) -> torch.Tensor | None:
    """What ranks the visible tokens: the teacher's attention at them [B, T, n] (``source=teacher``), else None."""
    if spec is None or spec.source != "teacher":
        return None
    return teacher_scores(attn, visible_idx)


@dataclass
class SourceData:
    """One source's data for the loop: its recipe view, dataset, sampler (None = stream) and loader."""

    name: str
    cfg: Recipe
    dataset: Dataset
    sampler: object | None
    make_loader: Callable[[], DataLoader]
    clips_per_rank: int
    captions: dict[str, tuple[str, ...]]

    def batches_per_epoch(self, batch_size: int) -> int:
        return self.clips_per_rank // batch_size

    def iterator(self, epoch: int, consumed: int, batch_size: int) -> Iterator[dict]:
        """Batches of ``epoch`` after the first ``consumed`` (resume mid-epoch)."""
        return epoch_batches(self.dataset, self.sampler, self.make_loader, epoch, consumed, batch_size)


def build_source(cfg: Recipe, source: str, env: DistEnv) -> SourceData:
    """Dataset, sampler and loader of one source (``video`` or ``image``) for this rank.

    Raises:
        CaptionError: a clip that will be trained on has no caption in the manifest.
    """
    scfg = source_recipe(cfg, source)
    rows = read_corpus(scfg.corpus.source, scfg.corpus.root)  # captions always come from the manifest
    by_id = {r.id: r for r in rows}
    sampler = None
    stream = scfg.teacher.mode == "cached" and scfg.cache.layout == "wds"
    if stream:  # yields whole batches (targets in stored dtypes)
        base = StreamingViewDataset(scfg.cache.store, scfg, by_id, jpeg_device=jpeg_device(scfg))
        clip_ids = sorted({c for s in base.shards for c, _ in s["records"]})
        per_rank = base.clips_per_rank(env.world_size)
    else:
        base = OnlineViewDataset(rows, scfg) if scfg.teacher.mode == "online" else CachedViewDataset(scfg.cache.store, scfg, by_id)
        clip_ids = base.clip_ids
        sampler = EpochSampler(len(base), scfg.seed, env.rank, env.world_size)
        per_rank = sampler.per_rank()
    missing = [c for c in clip_ids if c not in by_id or not by_id[c].captions]
    if missing:
        raise CaptionError(f"{scfg.corpus.source}: {len(missing)} {source} clip(s) have no caption "
                           f"(first: {missing[0]!r}); stage 2 needs at least one caption per clip")
    captions = {c: by_id[c].captions for c in clip_ids}
    wrapper = CaptionedStream if sampler is None else CaptionedDataset
    dataset = wrapper(base, captions, source, scfg.seed)
    return SourceData(source, scfg, dataset, sampler, _loader_factory(cfg, dataset, sampler, stream), per_rank, captions)


def _loader_factory(cfg: Recipe, dataset: Dataset, sampler, stream: bool) -> Callable[[], DataLoader]:
    """A fresh loader per epoch; a stream yields whole batches (assembled in the workers)."""
    t = cfg.train
    return partial(build_loader, dataset, None if stream else t.batch_size, t.num_workers, cfg.seed, sampler,
                   drop_last=not stream)
