"""Views: the plain data that fixes every pixel one training sample shows.

A :class:`ViewSpec` holds the source frame indices, the crop box in source pixels, the horizontal flip
and the output size. Views are drawn by named *policies* (``VIEW_POLICIES``) from a generator derived
from ``(seed, clip id, view index)`` only, so the teacher cache can store them and training can replay
them exactly: the same view applied to the same decoded frames gives bit-identical pixels.

Policies:

- ``umt_train`` — UMT stage-1 augmentation (UMT code @4fb4049: single_modality/datasets/mae.py,
  transforms.py): TSN-style sparse sampling (T equal segments of ``n // T`` frames, one uniformly random
  frame per segment), the multi-scale crop with 13 fixed offsets (``GroupMultiScaleCrop(fix_crop,
  more_fix_crop)`` behaviour) and a p=0.5 flip.
- ``eval_center`` — segment midpoints, short-side resize and centre crop (UMT's validation view).

Pixels (:func:`apply_view`): crop the box, resize it to the output size with antialiased bilinear
interpolation in float64, round half to even, clamp to [0, 255], then flip.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from umt_distill.registry import VIEW_POLICIES

if TYPE_CHECKING:  # only the attributes num_frames / width / height are used
    from umt_distill.data.video_base import VideoInfo

__all__ = [
    "UMT_SCALES",
    "ViewError",
    "ViewSpec",
    "apply_view",
    "eval_center_view",
    "fixed_crop_offsets",
    "multiscale_crop_sizes",
    "resize_frames",
    "sample_view",
    "umt_train_view",
    "view_generator",
]

UMT_SCALES: tuple[float, ...] = (1.0, 0.875, 0.75, 0.66)
"""Crop side scales of UMT's multi-scale crop, relative to the frame's short side."""

_SNAP_PIXELS = 3  # a candidate crop side within this many pixels of the output side is snapped to it


class ViewError(ValueError):
    """A view cannot be drawn or applied (video too short, crop outside the frame, malformed spec)."""


# --------------------------------------------------------------------------------------------------
# ViewSpec


def _int_tuple(name: str, value: Any, length: int | None = None, minimum: int = 0) -> tuple[int, ...]:
    """``value`` as a tuple of Python ints ≥ ``minimum``; a ViewError naming ``name`` otherwise."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise ViewError(f"ViewSpec.{name}: expected a sequence of integers, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        # bool is an int subclass, but True as a frame index or pixel is always a bug
        if isinstance(item, (bool, np.bool_)) or not isinstance(item, (int, np.integer)):
            raise ViewError(f"ViewSpec.{name}[{i}]: expected an integer, got {item!r}")
        if item < minimum:
            raise ViewError(f"ViewSpec.{name}[{i}]: must be >= {minimum}, got {item}")
        out.append(int(item))
    if length is not None and len(out) != length:
        raise ViewError(f"ViewSpec.{name}: expected {length} integers, got {len(out)}")
    return tuple(out)


@dataclass(frozen=True)
class ViewSpec:
    """Everything that fixes the pixels of one sample; JSON-able and hashable.

    Sequences given as lists or numpy arrays are stored as tuples of Python ints, so a view read back
    from JSON compares equal to the view that was drawn.

    Attributes:
        frame_indices: The T source frame indices, into the whole video (not the clip's start/end range).
        crop: ``(x0, y0, w, h)`` crop box in source pixels; it must lie inside the frame.
        flip: Mirror horizontally after resizing.
        size: ``(H, W)`` output size.
    """

    frame_indices: tuple[int, ...]
    crop: tuple[int, int, int, int]
    flip: bool
    size: tuple[int, int]

    def __post_init__(self) -> None:
        frames = _int_tuple("frame_indices", self.frame_indices)
        if not frames:
            raise ViewError("ViewSpec.frame_indices: must name at least one frame")
        x0, y0, w, h = _int_tuple("crop", self.crop, length=4)
        if w < 1 or h < 1:
            raise ViewError(f"ViewSpec.crop: width and height must be >= 1, got (x0, y0, w, h)={self.crop}")
        size = _int_tuple("size", self.size, length=2, minimum=1)
        if not isinstance(self.flip, (bool, np.bool_)):
            raise ViewError(f"ViewSpec.flip: expected a bool, got {self.flip!r}")
        # frozen dataclass: normalise in place through object.__setattr__
        object.__setattr__(self, "frame_indices", frames)
        object.__setattr__(self, "crop", (x0, y0, w, h))
        object.__setattr__(self, "flip", bool(self.flip))
        object.__setattr__(self, "size", size)

    @property
    def num_frames(self) -> int:
        """T, the number of frames the view shows."""
        return len(self.frame_indices)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict: tuples become lists."""
        return {
            "frame_indices": list(self.frame_indices),
            "crop": list(self.crop),
            "flip": self.flip,
            "size": list(self.size),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViewSpec:
        """Inverse of :meth:`to_dict`; missing, unknown or malformed fields raise a ViewError naming them."""
        if not isinstance(d, dict):
            raise ViewError(f"ViewSpec: expected a dict, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in d]
        unknown = sorted(set(d) - set(names))
        if missing:
            raise ViewError(f"ViewSpec: missing field(s) {', '.join(missing)}")
        if unknown:
            raise ViewError(f"ViewSpec: unknown field(s) {', '.join(unknown)}")
        if not isinstance(d["flip"], bool):  # JSON true/false only; 0/1 or "False" are not accepted
            raise ViewError(f"ViewSpec.flip: expected true or false, got {d['flip']!r}")
        return cls(**{n: d[n] for n in names})

    def to_json(self) -> str:
        """Compact, key-sorted JSON (canonical: equal views give equal strings)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> ViewSpec:
        """Inverse of :meth:`to_json`."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ViewError(f"ViewSpec: invalid JSON: {e}") from None
        return cls.from_dict(d)


# --------------------------------------------------------------------------------------------------
# Randomness


def view_generator(seed: int, clip_id: str, view_index: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, clip_id, view_index)`` alone.

    The 64-bit seed is the first 8 bytes (big-endian) of ``sha256(f"{seed}:{clip_id}:{view_index}")``,
    so it is the same in every process and Python run (unlike ``hash()``, which is salted per process).
    """
    digest = hashlib.sha256(f"{seed}:{clip_id}:{view_index}".encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "big"))
    return gen


def view_offset(seed: int, clip_id: str, num_views: int) -> int:
    """Which view a clip shows in epoch 0: a stable hash of (seed, clip id), uniform over the K views."""
    digest = hashlib.sha256(f"{seed}:{clip_id}:offset".encode()).digest()
    return int.from_bytes(digest[:8], "little") % num_views


def epoch_view(seed: int, clip_id: str, epoch: int, num_views: int) -> int:
    """The view of ``clip_id`` shown in ``epoch``: ``(epoch + view_offset) mod K``.

    Every epoch shows every clip once, and K consecutive epochs show each of its K views once.
    """
    return (epoch + view_offset(seed, clip_id, num_views)) % num_views


def epoch_slot(seed: int, clip_id: str, view_index: int, num_views: int) -> int:
    """The epoch slot of a view: the ``e mod K`` of the epochs ``e`` that show it (inverse of
    :func:`epoch_view`). A WebDataset shard stores its samples grouped by slot, so an epoch reads one
    group: exactly the views it trains on."""
    return (view_index - view_offset(seed, clip_id, num_views)) % num_views


def _randint(high: int, gen: torch.Generator) -> int:
    """One uniform integer in [0, high)."""
    return int(torch.randint(high, (1,), generator=gen))


# --------------------------------------------------------------------------------------------------
# Geometry shared by the policies


def _output_size(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        out = (int(size), int(size))
    elif isinstance(size, Sequence) and len(size) == 2 and all(isinstance(s, (int, np.integer)) for s in size):
        out = (int(size[0]), int(size[1]))
    else:
        raise ViewError(f"size: expected an int or (H, W), got {size!r}")
    if min(out) < 1:
        raise ViewError(f"size: must be positive, got {size!r}")
    return out


def _frame_window(info: VideoInfo, num_frames: int, frame_range: tuple[int, int] | None) -> tuple[int, int]:
    """The [lo, hi) frames a view may use; a ViewError if it cannot hold ``num_frames`` frames."""
    if num_frames < 1:
        raise ViewError(f"num_frames must be >= 1, got {num_frames}")
    total = int(info.num_frames)
    lo, hi = (0, total) if frame_range is None else (int(frame_range[0]), int(frame_range[1]))
    if frame_range is not None and not 0 <= lo < hi <= total:
        raise ViewError(f"frame_range [{lo}, {hi}) is empty or outside the video's {total} frames")
    if hi - lo < num_frames:
        where = "video" if frame_range is None else f"frame range [{lo}, {hi})"
        raise ViewError(f"{where} has {hi - lo} frame(s), fewer than the {num_frames} the view needs")
    return lo, hi


def multiscale_crop_sizes(
    width: int, height: int, out_size: tuple[int, int], scales: Sequence[float] = UMT_SCALES, max_distort: int = 1
) -> list[tuple[int, int]]:
    """Candidate ``(crop_w, crop_h)`` pairs of the multi-scale crop, in UMT's order (duplicates kept).

    Each side is ``int(short_side * scale)``, snapped to the output side (H for heights, W for widths)
    when within 3 px of it; pairs take the height scale i and width scale j with ``|i - j| <= max_distort``.
    Unlike UMT (whose PIL crop pads with black), a side snapped past the frame, or below 1 px, is clamped
    into [1, frame side] so the box always lies inside the frame.
    """
    out_h, out_w = out_size
    base = min(width, height)
    sides = [int(base * s) for s in scales]

    def snap(side: int, target: int, limit: int) -> int:
        side = target if abs(side - target) < _SNAP_PIXELS else side
        return max(1, min(side, limit))

    crop_h = [snap(s, out_h, height) for s in sides]
    crop_w = [snap(s, out_w, width) for s in sides]
    return [(w, h) for i, h in enumerate(crop_h) for j, w in enumerate(crop_w) if abs(i - j) <= max_distort]


def fixed_crop_offsets(width: int, height: int, crop_w: int, crop_h: int) -> list[tuple[int, int]]:
    """The 13 ``(x0, y0)`` offsets of the fixed-position crop, on a grid of quarter steps.

    Steps are ``(width - crop_w) // 4`` and ``(height - crop_h) // 4`` (so when the slack is not a
    multiple of 4 the "right/bottom" positions stop up to 3 px short of the edge, as in UMT). Order:
    the 4 corners, centre, the 4 edge centres, the 4 quarter points. Positions may coincide.
    """
    ws, hs = (width - crop_w) // 4, (height - crop_h) // 4
    grid = [
        (0, 0), (4, 0), (0, 4), (4, 4), (2, 2),  # corners, centre
        (0, 2), (4, 2), (2, 4), (2, 0),  # left, right, bottom, top centres
        (1, 1), (3, 1), (1, 3), (3, 3),  # quarter points
    ]  # fmt: skip
    return [(gx * ws, gy * hs) for gx, gy in grid]


# --------------------------------------------------------------------------------------------------
# Policies: f(info, num_frames, size, generator, frame_range=None, **params) -> ViewSpec

ViewPolicy = Callable[..., ViewSpec]


@VIEW_POLICIES.register("umt_train")
def umt_train_view(
    info: VideoInfo,
    num_frames: int,
    size: int | tuple[int, int],
    generator: torch.Generator,
    frame_range: tuple[int, int] | None = None,
    scales: Sequence[float] = UMT_SCALES,
    max_distort: int = 1,
    flip: bool = True,
) -> ViewSpec:
    """UMT pretraining view: sparse frames, multi-scale crop at 13 fixed offsets, random flip.

    Draws, in this order from ``generator``: T segment offsets, the crop-size pair, the offset, the flip.

    Args:
        info: The video's frame count and frame size.
        num_frames: T; the usable frames are split into T segments of ``n // T`` frames (the last
            ``n % T`` frames are never drawn, as in UMT) and one frame is drawn uniformly in each.
        size: Output side or ``(H, W)``.
        generator: Source of every random choice.
        frame_range: ``[lo, hi)`` frames to sample inside (a manifest's start/end); None = whole video.
        scales: Crop side scales relative to the short side.
        max_distort: Largest allowed index gap between the width and the height scale.
        flip: Mirror with probability 0.5 (False: never).
    """
    out_size = _output_size(size)
    if not scales or not all(0 < float(s) <= 1 for s in scales):
        raise ViewError(f"scales: expected a non-empty list of values in (0, 1], got {scales!r}")
    if max_distort < 0:
        raise ViewError(f"max_distort must be >= 0, got {max_distort}")
    lo, hi = _frame_window(info, num_frames, frame_range)
    seg_len = (hi - lo) // num_frames  # >= 1, _frame_window checked hi - lo >= T
    offsets = torch.randint(seg_len, (num_frames,), generator=generator).tolist()
    frames = tuple(lo + i * seg_len + off for i, off in enumerate(offsets))

    width, height = int(info.width), int(info.height)
    pairs = multiscale_crop_sizes(width, height, out_size, scales, max_distort)
    crop_w, crop_h = pairs[_randint(len(pairs), generator)]
    positions = fixed_crop_offsets(width, height, crop_w, crop_h)
    x0, y0 = positions[_randint(len(positions), generator)]
    flipped = bool(flip) and bool(torch.rand((1,), generator=generator) < 0.5)
    return ViewSpec(frames, (x0, y0, crop_w, crop_h), flipped, out_size)


@VIEW_POLICIES.register("videomae_train")
def videomae_train_view(
    info: VideoInfo,
    num_frames: int,
    size: int | tuple[int, int],
    generator: torch.Generator,
    frame_range: tuple[int, int] | None = None,
    sampling_rate: int = 4,
    scales: Sequence[float] = UMT_SCALES,
    max_distort: int = 1,
    flip: bool = False,
) -> ViewSpec:
    """VideoMAE pretraining view: T consecutive frames every ``sampling_rate``-th, the same multi-scale crop.

    Frames (VideoMAE code @14ef8d8: kinetics.py, ``VideoMAE._sample_train_indices``, one segment): a start drawn
    uniformly in ``[lo, hi − T·rate]`` and frames ``start + i·rate``. A window shorter than ``T·rate``
    starts at ``lo`` and clamps the frames that fall past its end to its last frame (VideoMAE repeats its
    last reachable frame there). Crop as :func:`umt_train_view`; VideoMAE pretraining never flips
    (``flip=False`` by default). Draws, in order: the start, the crop-size pair, the offset, the flip.

    Args:
        sampling_rate: Stride between the T frames (VideoMAE K400: 4).
    """
    out_size = _output_size(size)
    if sampling_rate < 1:
        raise ViewError(f"sampling_rate must be >= 1, got {sampling_rate}")
    if not scales or not all(0 < float(s) <= 1 for s in scales):
        raise ViewError(f"scales: expected a non-empty list of values in (0, 1], got {scales!r}")
    lo, hi = _frame_window(info, 1, frame_range)
    slack = (hi - lo) - num_frames * sampling_rate
    start = lo + (_randint(slack + 1, generator) if slack >= 0 else 0)
    frames = tuple(min(start + i * sampling_rate, hi - 1) for i in range(num_frames))

    width, height = int(info.width), int(info.height)
    pairs = multiscale_crop_sizes(width, height, out_size, scales, max_distort)
    crop_w, crop_h = pairs[_randint(len(pairs), generator)]
    positions = fixed_crop_offsets(width, height, crop_w, crop_h)
    x0, y0 = positions[_randint(len(positions), generator)]
    flipped = bool(flip) and bool(torch.rand((1,), generator=generator) < 0.5)
    return ViewSpec(frames, (x0, y0, crop_w, crop_h), flipped, out_size)


@VIEW_POLICIES.register("eval_center")
def eval_center_view(
    info: VideoInfo,
    num_frames: int,
    size: int | tuple[int, int],
    generator: torch.Generator | None = None,
    frame_range: tuple[int, int] | None = None,
) -> ViewSpec:
    """Evaluation view: segment midpoints, short-side resize and centre crop, no flip (no randomness).

    Frames: the n usable frames are split into T segments of n/T frames (real-valued, covering the whole
    range) and frame i is ``lo + floor((2i + 1) · n / (2T))``, the midpoint of segment i rounded down
    (TSN's test sampling; computed in integers so it is exact).

    Crop: the frame is conceptually scaled by ``s = max(H_out / height, W_out / width)``, the smallest
    scale that covers the output (for a square output: short side → output side), and the output-sized
    centre is cut. In source pixels that is a box of ``round(W_out / s) × round(H_out / s)`` (exactly the
    full side along the limiting dimension), at offsets ``(width - w) // 2`` and ``(height - h) // 2``.
    E.g. 320×240 → 224: box (40, 0, 240, 240).

    Args:
        info: The video's frame count and frame size.
        num_frames: T.
        size: Output side or ``(H, W)``.
        generator: Unused (the view is deterministic); accepted so every policy has one signature.
        frame_range: ``[lo, hi)`` frames to sample inside; None = whole video.
    """
    out_h, out_w = _output_size(size)
    lo, hi = _frame_window(info, num_frames, frame_range)
    n = hi - lo
    frames = tuple(lo + (2 * i + 1) * n // (2 * num_frames) for i in range(num_frames))

    width, height = int(info.width), int(info.height)
    if out_w * height >= out_h * width:  # width limits: s = out_w / width
        crop_w = width
        crop_h = min(height, max(1, (2 * out_h * width + out_w) // (2 * out_w)))  # round(out_h * width / out_w)
    else:  # height limits: s = out_h / height
        crop_h = height
        crop_w = min(width, max(1, (2 * out_w * height + out_h) // (2 * out_h)))
    crop = ((width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h)
    return ViewSpec(frames, crop, False, (out_h, out_w))


def sample_view(
    policy: str,
    info: VideoInfo,
    num_frames: int,
    size: int | tuple[int, int],
    seed: int,
    clip_id: str,
    view_index: int,
    **policy_kwargs: Any,
) -> ViewSpec:
    """Draw view ``view_index`` of a clip with a registered policy.

    The result depends only on the arguments: the policy's randomness comes from
    :func:`view_generator` ``(seed, clip_id, view_index)``.

    Args:
        policy: A name in ``VIEW_POLICIES`` (``umt_train``, ``eval_center``).
        info: The video's ``VideoInfo`` (frame count, width, height).
        num_frames: T frames per view.
        size: Output side or ``(H, W)``.
        seed: The recipe seed.
        clip_id: The clip's stable corpus id.
        view_index: Which of the clip's views (0..K-1).
        **policy_kwargs: Passed to the policy, e.g. ``frame_range=(lo, hi)``, ``scales``, ``flip``.

    Raises:
        ViewError: The video (or frame range) has fewer than ``num_frames`` frames, or bad parameters.
    """
    draw: ViewPolicy = VIEW_POLICIES.get(policy)
    return draw(info, num_frames, size, view_generator(seed, clip_id, view_index), **policy_kwargs)


# --------------------------------------------------------------------------------------------------
# Pixels


# float64 values (input + output) per interpolate call, 32 MiB: 4 frames of a 480-px crop resized to 224,
# one 1080p frame.
RESIZE_CHUNK_VALUES = 1 << 22


def resize_frames(clip: torch.Tensor, size: tuple[int, int], chunk_values: int = RESIZE_CHUNK_VALUES) -> torch.Tensor:
    """uint8 ``[T, 3, h, w]`` → uint8 ``[T, 3, H, W]``: antialiased bilinear on float64, rounded half to even.

    Args:
        clip: The frames to resize.
        size: ``(H, W)``.
        chunk_values: At most this many float64 values (input and output of a chunk) per call; at least
            one frame per call.
    """
    t, c, h, w = clip.shape
    step = max(1, chunk_values // (c * (h * w + size[0] * size[1])))
    out = torch.empty((t, c, *size), dtype=torch.uint8)
    for i in range(0, t, step):
        # contiguous first: on the decoder's channels-last layout the batched kernel was slower than one
        # call per frame (0.68 against 0.59 ms for 8 crops to 64 px); contiguous it takes 0.43 ms
        x = F.interpolate(clip[i : i + step].contiguous().double(), size=size, mode="bilinear",
                          align_corners=False, antialias=True)  # fmt: skip
        out[i : i + step] = x.round_().clamp_(0, 255)  # exact integers: the cast to uint8 is exact
    return out


def apply_view(frames: np.ndarray, view: ViewSpec) -> torch.Tensor:
    """Cut, resize and flip the decoded frames of a view: same inputs → bit-identical output.

    Resizing: ``F.interpolate(mode="bilinear", antialias=True, align_corners=False)`` on float64 (so
    results do not hinge on float32 summation order), then round half to even and clamp to uint8.
    A crop already of the output size is not resampled (plain slicing). Frames are resized together,
    in chunks of at most :data:`RESIZE_CHUNK_VALUES` float64 values to bound memory; every frame's
    pixels are computed on their own, so the result does not depend on the chunking (tested against one
    frame at a time).

    Args:
        frames: uint8 ``[T, H, W, 3]``, the decoded ``view.frame_indices`` in order.
        view: The view to apply.

    Returns:
        uint8 ``[T, 3, H_out, W_out]``, C-contiguous.

    Raises:
        ViewError: Wrong dtype/shape, frame count differs from the view's, or the crop leaves the frame.
    """
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        desc = f"{frames.dtype} {tuple(frames.shape)}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise ViewError(f"apply_view: expected uint8 frames [T, H, W, 3], got {desc}")
    t, height, width, _ = frames.shape
    if t != view.num_frames:
        raise ViewError(f"apply_view: got {t} frames but the view has {view.num_frames} frame indices")
    x0, y0, w, h = view.crop
    if x0 + w > width or y0 + h > height:
        raise ViewError(f"apply_view: crop (x0, y0, w, h)={view.crop} does not fit in a {width}x{height} frame")

    crop = np.ascontiguousarray(frames[:, y0 : y0 + h, x0 : x0 + w])  # [T, h, w, 3]
    if not crop.flags.writeable:  # torch.from_numpy warns on read-only arrays (e.g. from a decoder)
        crop = crop.copy()
    clip = torch.from_numpy(crop).permute(0, 3, 1, 2)  # [T, 3, h, w]
    out_h, out_w = view.size
    if (h, w) != (out_h, out_w):
        clip = resize_frames(clip, (out_h, out_w))  # [T, 3, H_out, W_out]
    if view.flip:
        clip = clip.flip(-1)
    return clip.contiguous()
