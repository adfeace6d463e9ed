"""Video classification data for fine-tuning: labels, UMT's frame sampling, clip-consistent augmentation.

Training (UMT code @4fb4049: single_modality/datasets/kinetics_sparse.py), per decoded video and repeated
``num_sample`` times on the same frames (repeated augmentation): timm's RandAugment with the *same* ops and
magnitudes on every frame → one random-resized crop for the whole clip → horizontal flip (off for SSv2) →
ImageNet normalisation → timm's random erasing (one box per frame, as UMT applies it). Mixup/CutMix act on the
batch (:class:`VideoMixup`).

Testing: ``num_clips`` temporal clips × ``num_crops`` square crops along the long side of the
short-side-resized frames; every view of a video comes from one decode.

Randomness: timm's transforms draw from the global ``random``/``numpy``/``torch`` generators. Each call
runs inside :func:`seeded_global_rngs`, seeded from ``(seed, epoch, clip id, sample)``, and the global
states are restored afterwards — so every augmentation is a function of those values, in any worker.
Crop boxes, flips and frame indices are drawn from explicit ``torch.Generator`` objects.

A note on the order: UMT crops after normalising float frames (plain bilinear); here the crop is cut
from the uint8 frames by :func:`~umt_distill.data.views.apply_view` (antialiased bilinear, rounded),
which keeps one exact, tested resize path in the package.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from umt_distill.data.clipviews import clip_frame_range
from umt_distill.data.corpus import ClipRow, read_corpus
from umt_distill.data.pixels import IMAGENET_MEAN, normalize_video
from umt_distill.data.video import open_video
from umt_distill.data.video_base import VideoDecodeError
from umt_distill.data.views import ViewSpec, apply_view


class LabelError(ValueError):
    """A clip's label is missing, unknown or out of range; names the manifest and the clip id."""


# --------------------------------------------------------------------------------------------------
# labels


def read_label_map(path: str | Path) -> dict[str, int]:
    """Class name → index from a text file (one name per line, line i = class i) or JSON (list or dict)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, list):
            return {str(name): i for i, name in enumerate(data)}
        if isinstance(data, dict) and all(isinstance(v, int) for v in data.values()):
            return {str(k): v for k, v in data.items()}
        raise LabelError(f"{path}: expected a JSON list of class names or a dict name -> index")
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(set(names)) != len(names):
        raise LabelError(f"{path}: class names repeat")
    return {name: i for i, name in enumerate(names)}


def resolve_labels(rows: Sequence[ClipRow], num_classes: int, source: str,
                   label_map: dict[str, int] | None = None) -> list[int]:
    """Integer class of every row: int labels as they are, names through ``label_map``.

    Raises:
        LabelError: A row without a label, a name not in the map, or an index outside [0, num_classes).
    """
    labels = []
    for row in rows:
        label = row.label
        if label is None:
            raise LabelError(f"{source}: clip {row.id!r} has no label")
        if isinstance(label, str):
            if label_map is None:
                raise LabelError(f"{source}: clip {row.id!r} has the class name {label!r}; "
                                 "set finetune.label_map to a file listing the class names")
            if label not in label_map:
                raise LabelError(f"{source}: clip {row.id!r}: class {label!r} is not in the label map")
            label = label_map[label]
        if not 0 <= label < num_classes:
            raise LabelError(f"{source}: clip {row.id!r}: label {label} is outside [0, {num_classes})")
        labels.append(int(label))
    return labels


def read_labelled_corpus(source: str, root: str | None, num_classes: int,
                         label_map: str | None = None) -> tuple[list[ClipRow], list[int]]:
    """Rows of a labelled manifest and their integer classes."""
    rows = read_corpus(source, root)
    mapping = read_label_map(label_map) if label_map else None
    return rows, resolve_labels(rows, num_classes, source, mapping)


# --------------------------------------------------------------------------------------------------
# randomness


def sample_seed(*parts: object) -> int:
    """A 63-bit seed from any values, the same in every process (sha256 of their text)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's (CPU) global generators for a block, then restore them.

    For library code (timm) that draws from the global generators: its output becomes a function of
    ``seed`` and the caller's global state is left exactly as it was.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


# --------------------------------------------------------------------------------------------------
# frame sampling (single_modality/datasets/kinetics_sparse.py)


def sparse_train_indices(num_frames: int, clip_len: int, gen: torch.Generator) -> list[int]:
    """UMT's sparse training sampling: frame i uniform in [round(s·i), round(s·(i+1))], s = (n−1)/T."""
    seg = max(0.0, (num_frames - 1) / clip_len)
    out = []
    for i in range(clip_len):
        start, end = int(np.round(seg * i)), int(np.round(seg * (i + 1)))
        out.append(min(start + int(torch.randint(end - start + 1, (1,), generator=gen)), num_frames - 1))
    return out


def sparse_test_indices(num_frames: int, clip_len: int, clip: int, num_clips: int) -> list[int]:
    """UMT's test clip ``clip`` of ``num_clips``: frame i = round(s·i) + int(s/(K+1)·(clip+1))."""
    seg = max(0.0, (num_frames - 1) / clip_len)
    shift = int(seg / (num_clips + 1) * (clip + 1))
    return [min(int(np.round(seg * i)) + shift, num_frames - 1) for i in range(clip_len)]


def segment_train_indices(num_frames: int, clip_len: int, gen: torch.Generator) -> list[int]:
    """TSN segment sampling (SSv2): T equal segments, one uniformly random frame in each."""
    span = num_frames // clip_len
    if span == 0:  # shorter than T: spread the frames evenly, with repeats (UMT repeats frame 0)
        return [i * num_frames // clip_len for i in range(clip_len)]
    return [i * span + int(torch.randint(span, (1,), generator=gen)) for i in range(clip_len)]


def segment_test_indices(num_frames: int, clip_len: int, clip: int, num_clips: int) -> list[int]:
    """TSN test views (SSv2): one clip = segment midpoints (UMT's validation view); K clips = offsets
    ``tick·c/K`` into each segment (K = 2: segment starts, then midpoints, as UMT's 2 test views)."""
    tick = num_frames / clip_len
    offset = tick / 2 if num_clips == 1 else tick * clip / num_clips
    return [min(int(offset + tick * i), num_frames - 1) for i in range(clip_len)]


def train_indices(sampling: str, num_frames: int, clip_len: int, gen: torch.Generator) -> list[int]:
    if sampling == "sparse":
        return sparse_train_indices(num_frames, clip_len, gen)
    if sampling == "segment":
        return segment_train_indices(num_frames, clip_len, gen)
    raise ValueError(f"unknown frame sampling {sampling!r} (sparse | segment)")


def eval_indices(sampling: str, num_frames: int, clip_len: int, clip: int, num_clips: int) -> list[int]:
    if sampling == "sparse":
        return sparse_test_indices(num_frames, clip_len, clip, num_clips)
    if sampling == "segment":
        return segment_test_indices(num_frames, clip_len, clip, num_clips)
    raise ValueError(f"unknown frame sampling {sampling!r} (sparse | segment)")


# --------------------------------------------------------------------------------------------------
# spatial views


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                            gen: torch.Generator, attempts: int = 10) -> tuple[int, int, int, int]:
    """Inception-style crop box ``(x0, y0, w, h)``: area fraction uniform in ``scale``, aspect ratio
    log-uniform in ``ratio``; after ``attempts`` misses, the largest centred box within ``ratio``."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        u = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y0 = int(torch.randint(height - h + 1, (1,), generator=gen))
            x0 = int(torch.randint(width - w + 1, (1,), generator=gen))
            return x0, y0, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def eval_crop_boxes(width: int, height: int, size: int, num_crops: int) -> list[tuple[int, int, int, int]]:
    """UMT's test crops as boxes in source pixels: the frame's short side resized to ``size``, then
    ``num_crops`` size×size crops spread along the long side (1 crop: the centre)."""
    short, long = min(width, height), max(width, height)
    resized_long = int(long * size / short)  # the long side after the short-side resize
    if num_crops == 1:
        starts = [int((resized_long - size) / 2)]
    else:
        step = (resized_long - size) / (num_crops - 1)
        starts = [int(split * step) for split in range(num_crops)]
    boxes = []
    for start in starts:
        offset = min(int(round(start * short / size)), long - short)  # back to source pixels
        boxes.append((offset, 0, short, short) if width >= height else (0, offset, short, short))
    return boxes


# --------------------------------------------------------------------------------------------------
# augmentation


def build_rand_augment(config: str, size: int):
    """timm's RandAugment (e.g. ``rand-m7-n4-mstd0.5-inc1``) for frames of a ``size`` crop, bicubic."""
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform

    hparams = {
        "translate_const": int(size * 0.45),
        "img_mean": tuple(round(255 * m) for m in IMAGENET_MEAN),
        "interpolation": Image.BICUBIC,
    }
    return rand_augment_transform(config, hparams)


def rand_augment_clip(transform, frames: np.ndarray, seed: int) -> np.ndarray:
    """Apply one RandAugment draw to every frame: the same ops and magnitudes on each.

    timm's RandAugment draws its ops (numpy) and magnitudes/probabilities (``random``) per call; the
    generators are re-seeded with the same ``seed`` before each frame, so each frame replays the draw.

    Args:
        transform: From :func:`build_rand_augment`.
        frames: uint8 [T, H, W, 3].
        seed: The clip's augmentation seed.

    Returns:
        uint8 [T, H, W, 3].
    """
    from PIL import Image

    out = np.empty_like(frames)
    for t, frame in enumerate(frames):
        with seeded_global_rngs(seed):
            out[t] = np.asarray(transform(Image.fromarray(frame)))
    return out


def build_random_erasing(probability: float, mode: str, count: int):
    """timm's RandomErasing; called on [T, 3, H, W] it erases each frame independently (as UMT)."""
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(probability, mode=mode, max_count=count, num_splits=0, device="cpu")


class VideoMixup:
    """timm's Mixup/CutMix on video batches, with one lambda and one CutMix box per clip for all frames.

    timm cuts the box out of the last two dimensions of a 4-D image batch; a 5-D video batch
    ``[B, C, T, H, W]`` would be cut along T and H. The clip is therefore viewed as ``[B, C·T, H, W]``:
    the box then covers the same (y, x) window in every channel of every frame.

    Args:
        num_classes: Classes of the soft targets.
        mixup_alpha: Beta parameter of Mixup (0: off).
        cutmix_alpha: Beta parameter of CutMix (0: off).
        prob: Probability to mix a batch at all.
        switch_prob: Probability of CutMix instead of Mixup when both are on.
        mode: ``batch`` (one lambda/box per batch, UMT), ``pair`` or ``elem``.
        label_smoothing: Folded into the soft targets.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, mode: str = "batch", label_smoothing: float = 0.1) -> None:
        from timm.data import Mixup

        self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob,
                           mode=mode, label_smoothing=label_smoothing, num_classes=num_classes)

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix a batch in place.

        Args:
            x: float [B, C, T, H, W] (B even).
            labels: long [B].
            seed: Seeds this batch's lambda, mode and box.

        Returns:
            The mixed clips (the same tensor) and soft targets [B, num_classes].
        """
        if x.ndim != 5:
            raise ValueError(f"VideoMixup expects [B, C, T, H, W], got {tuple(x.shape)}")
        if x.shape[0] % 2:
            raise ValueError(f"Mixup/CutMix needs an even batch, got {x.shape[0]} clips (batch_size × num_sample)")
        B, C, T, H, W = x.shape
        flat = x.view(B, C * T, H, W)  # a view: timm mixes in place
        with seeded_global_rngs(seed):
            _, targets = self.mixup(flat, labels)
        return x, targets


# --------------------------------------------------------------------------------------------------
# datasets


def _read_clip(row: ClipRow, backend: str, choose: Callable[[int], list[int]]) -> tuple[np.ndarray, list[int]]:
    """Open a video once: ``choose(n)`` picks frame positions within the row's window of n frames.

    Returns:
        (uint8 frames [len(indices), H, W, 3] in the chosen order, the chosen source frame indices).

    Raises:
        VideoDecodeError: Unreadable video, or an empty start/end window. Training stops on it rather
            than substituting another clip; filter broken videos out of the manifest beforehand.
    """
    with open_video(row.path, backend=backend) as video:
        lo, hi = clip_frame_range(row, video.info) or (0, video.info.num_frames)
        if hi <= lo:
            raise VideoDecodeError(row.path, f"no frames in [{row.start}, {row.end}) s")
        indices = [lo + j for j in choose(hi - lo)]
        unique = sorted(set(indices))
        frames = video.get_frames(unique)  # [U, H, W, 3]; each distinct frame decoded once
    pos = {f: i for i, f in enumerate(unique)}
    return frames[[pos[f] for f in indices]], indices


def _read_window(row: ClipRow, backend: str) -> tuple[np.ndarray, int]:
    """Every frame of a row's window, decoded once: (uint8 [n, H, W, 3], index of its first frame)."""
    with open_video(row.path, backend=backend) as video:
        lo, hi = clip_frame_range(row, video.info) or (0, video.info.num_frames)
        if hi <= lo:
            raise VideoDecodeError(row.path, f"no frames in [{row.start}, {row.end}) s")
        return video.get_frames(list(range(lo, hi))), lo


class VideoClassificationTrainSet(Dataset):
    """Augmented training clips: ``num_sample`` augmentations of one decode per item.

    Item ``i`` of epoch ``e`` is a function of (seed, e, clip id) only.

    Args:
        rows: Corpus rows.
        labels: Their classes.
        ft: The recipe's ``finetune`` section (frames, size, sampling, augmentation).
        seed: The recipe seed.
        backend: Video backend.
        preload: Decode every video's window once, here, and sample frames from memory afterwards
            (``finetune.preload``): the same items (a test proves it), without decoding every epoch;
            for corpora that fit in memory (the quickstart's 288 toy clips: 57 MB).

    Items: ``{"pixels": float32 [S, 3, T, H, W] (normalised), "label": long [S], "clip_id": str}``.
    """

    def __init__(self, rows: Sequence[ClipRow], labels: Sequence[int], ft, seed: int, backend: str = "decord",
                 preload: bool = False) -> None:
        self.rows, self.labels, self.ft, self.seed, self.backend = list(rows), list(labels), ft, seed, backend
        self.epoch = 0
        # Decoded before the loader forks, so workers share the frames (copy-on-write) instead of decoding.
        self.windows = [_read_window(row, backend) for row in self.rows] if preload else None
        self.rand_augment = build_rand_augment(ft.randaug, ft.size) if ft.randaug else None
        self.erasing = build_random_erasing(ft.reprob, ft.remode, ft.recount) if ft.reprob > 0 else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row, ft = self.rows[i], self.ft
        gen = torch.Generator().manual_seed(sample_seed(self.seed, "finetune", self.epoch, row.id))

        def choose(n: int) -> list[int]:
            return train_indices(ft.sampling, n, ft.num_frames, gen)

        if self.windows is None:
            frames, indices = _read_clip(row, self.backend, choose)
        else:
            window, lo = self.windows[i]  # [n, H, W, 3]
            indices = [lo + j for j in choose(len(window))]
            frames = window[[k - lo for k in indices]]
        height, width = frames.shape[1:3]  # frames: [T, H, W, 3]
        clips = [self.augment(frames, indices, width, height, gen) for _ in range(ft.num_sample)]
        return {"pixels": torch.stack(clips), "label": torch.full((ft.num_sample,), self.labels[i], dtype=torch.long),
                "clip_id": row.id}

    def augment(self, frames: np.ndarray, indices: Sequence[int], width: int, height: int,
                gen: torch.Generator) -> torch.Tensor:
        """One augmented clip: uint8 [T, H, W, 3] → normalised float32 [3, T, size, size]."""
        ft = self.ft
        ra_seed, erase_seed = (int(s) for s in torch.randint(2**62, (2,), generator=gen))
        if self.rand_augment is not None:
            frames = rand_augment_clip(self.rand_augment, frames, ra_seed)
        box = random_resized_crop_box(width, height, tuple(ft.train_scale), tuple(ft.train_ratio), gen)
        flip = ft.flip and bool(torch.rand((1,), generator=gen) < 0.5)
        pixels = apply_view(frames, ViewSpec(tuple(indices), box, flip, (ft.size, ft.size)))  # [T, 3, S, S] uint8
        x = normalize_video(pixels[None])[0]  # [3, T, S, S]
        if self.erasing is not None:
            with seeded_global_rngs(erase_seed):
                x = self.erasing(x.transpose(0, 1).contiguous()).transpose(0, 1)  # per-frame boxes on [T, 3, S, S]
        return x.contiguous()


class VideoClassificationTestSet(Dataset):
    """All test views of a video from one decode: ``num_clips`` temporal clips × ``num_crops`` crops.

    Items: ``{"pixels": uint8 [V, T, 3, S, S], "views": long [V, 2] (clip, crop), "label": int,
    "clip_id": str}`` with V = clips × crops, clip-major.
    """

    def __init__(self, rows: Sequence[ClipRow], labels: Sequence[int], ft, num_clips: int, num_crops: int,
                 backend: str = "decord") -> None:
        self.rows, self.labels, self.ft, self.backend = list(rows), list(labels), ft, backend
        self.num_clips, self.num_crops = num_clips, num_crops

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row, ft = self.rows[i], self.ft
        def all_clips(n: int) -> list[int]:  # clip-major: K clips of T frames
            return [f for c in range(self.num_clips) for f in eval_indices(ft.sampling, n, ft.num_frames, c, self.num_clips)]

        frames, flat = _read_clip(row, self.backend, all_clips)  # [K·T, H, W, 3]
        height, width = frames.shape[1:3]
        frames = frames.reshape(self.num_clips, ft.num_frames, *frames.shape[1:])  # [K, T, H, W, 3]
        clips = [flat[c * ft.num_frames:(c + 1) * ft.num_frames] for c in range(self.num_clips)]
        boxes = eval_crop_boxes(width, height, ft.size, self.num_crops)
        views, keys = [], []
        for c, clip in enumerate(clips):
            for s, box in enumerate(boxes):
                views.append(apply_view(frames[c], ViewSpec(tuple(clip), box, False, (ft.size, ft.size))))
                keys.append((c, s))
        return {"pixels": torch.stack(views), "views": torch.tensor(keys, dtype=torch.long),
                "label": self.labels[i], "clip_id": row.id}


def collate_train(items: list[dict]) -> dict:
    """Flatten the repeated samples: pixels [B·S, 3, T, H, W], label [B·S] (a video's samples adjacent)."""
    return {"pixels": torch.cat([it["pixels"] for it in items]), "label": torch.cat([it["label"] for it in items]),
            "clip_id": [it["clip_id"] for it in items]}


def collate_test(items: list[dict]) -> dict:
    """Keep each video's views: pixels [B, V, T, 3, S, S]."""
    return {"pixels": torch.stack([it["pixels"] for it in items]), "views": torch.stack([it["views"] for it in items]),
            "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
            "clip_id": [it["clip_id"] for it in items]}


__all__ = [
    "LabelError", "VideoClassificationTestSet", "VideoClassificationTrainSet", "VideoMixup", "build_rand_augment",
    "build_random_erasing", "collate_test", "collate_train", "rand_augment_clip", "random_resized_crop_box",
    "read_label_map", "read_labelled_corpus", "resolve_labels", "sample_seed", "seeded_global_rngs",
    "sparse_test_indices", "sparse_train_indices", "eval_crop_boxes", "eval_indices", "train_indices",
]
