"""Parts the stage loops share: the spec check, student and data construction, per-step targets."""

from __future__ import annotations

import functools
import hashlib

import torch
from torch.utils.data import DataLoader

from umt_distill.cache.spec import check_spec
from umt_distill.config import Recipe
from umt_distill.training.distributed import DistEnv


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; training stops and the last good checkpoint stays."""


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
    from umt_distill.registry import STUDENTS, load_all_parts

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
    from umt_distill.data.corpus import read_corpus
    from umt_distill.data.targets import CachedViewDataset, EpochSampler, OnlineViewDataset, StreamingViewDataset

    rows = []
    online = cfg.teacher.mode == "online" or not targets
    if online or cfg.train.pixels_from == "video":
        from umt_distill.data.video import preload_video_backend

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
    workers = cfg.train.num_workers

    def make_loader() -> DataLoader:
        # Its own generator: creating an iterator must not consume the global RNG (resume exactness).
        return DataLoader(dataset, batch_size=None if stream else cfg.train.batch_size, sampler=sampler,
                          num_workers=workers, drop_last=not stream, pin_memory=torch.cuda.is_available(),
                          generator=torch.Generator().manual_seed(cfg.seed),
                          persistent_workers=False, prefetch_factor=4 if workers else None)

    return dataset, sampler, make_loader, per_rank


def jpeg_device(cfg: Recipe) -> str | None:
    """Where JPEG view frames are decoded: on the training GPU (nvJPEG) when there is one, else in the
    DataLoader workers (a CPU step would otherwise decode in the training process)."""
    device = cfg.train.device
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return "cuda" if device == "auto" else device
    return None


def target_codec(store: str, name: str):
    """The codec that dequantises a store's targets in the step, bound to its basis where it has one
    (``name`` is the recipe's ``cache.codec``, checked against the spec). Built once per version of the
    store's ``spec.json``: a store rebuilt at the same path (another basis) is not decoded with a stale one."""
    import os

    spec = os.path.join(str(store), "spec.json")
    return _target_codec(str(store), name, os.stat(spec).st_mtime_ns if os.path.exists(spec) else 0)


@functools.lru_cache(maxsize=8)
def _target_codec(store: str, name: str, spec_version: int):
    from umt_distill.cache.basis import codec_for_store

    codec = codec_for_store(store)
    if codec.name != name:
        raise ValueError(f"{store}: targets are {codec.name}, the recipe says cache.codec={name}")
    return codec


def device_targets(batch: dict, codec, device: torch.device) -> torch.Tensor:
    """The batch's cached tokens, moved in their stored dtype and decoded to float32 on ``device``.

    The parts are the record's stored arrays (``tokens`` or ``tokens.<part>``, see ``cache/record.py``);
    only their bytes cross to the device.
    """
    from umt_distill.cache.record import part_name

    parts = {p: batch[part_name("tokens", p)].to(device, non_blocking=True) for p in codec.parts}
    return codec.decode_torch(parts)


def mask_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """Masks of step ``step`` on ``rank``: a pure function of (seed, step, rank), so resume is exact."""
    digest = hashlib.sha256(f"{seed}:mask:{step}:{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def step_targets(cfg: Recipe, batch: dict, pixels: torch.Tensor, teacher, gen: torch.Generator, device: torch.device):
    """Teacher targets at the visible positions, and those positions.

    Returns:
        targets [K, B, L_vis, D] (float32) and visible_idx [B, L_vis] (sorted flat (t, n) indices).
    """
    from umt_distill.losses import gather_visible
    from umt_distill.registry import MASKS

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
        return tokens.flatten(2, 3).transpose(0, 1), visible_idx
    # A CPU generator keeps masks reproducible on any device; the noise it draws moves to `device`.
    visible_idx = MASKS.get(cfg.mask.type)(B, T, N, cfg.mask.ratio, gen, attn=attn, device=device)  # [B, L_vis]
    flat = tokens.flatten(2, 3).transpose(0, 1)  # [K, B, T*N, D]
    return gather_visible(flat, visible_idx), visible_idx
