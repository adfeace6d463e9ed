"""The quickstart's toy world: short H.264 clips where appearance is in every frame and motion is not.

Each clip shows one object — a disc in a colour with a surface pattern (plain, striped, barred,
checked) — over a static, grainy background. The object either translates (left, right, up, down) or
changes size (growing, shrinking). So

- *appearance* (``"red striped disc"``) can be read from any single frame, and
- *motion* needs several frames in order: the set of frames of a clip moving left is, in distribution,
  the set of frames of a clip moving right played backwards (start points are drawn symmetrically),
  and likewise for growing vs shrinking. A model that averages per-frame embeddings can at best tell
  the *axis* of change (horizontal, vertical or size), not its direction.

Everything is a function of ``(seed, clip index)``: the same settings write identical frames. The
world is written as MP4 files plus

- ``manifest.csv`` (all clips) and ``train.csv`` / ``val.csv`` / ``test.csv``: corpus manifests
  (``id, path, label, captions``; ``label`` is the motion class index, the caption names both);
- ``labels.json``: class names and, per clip, split, pattern, colour, appearance and motion labels, and
  the object's centre and radius per frame (what tests check motion against);
- ``world.json``: the settings the world was generated with (a re-run with other settings refuses
  to mix worlds).
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from umt_distill.io import atomic_write_text
from umt_distill.testing.media import write_video

# Appearance is colour x pattern, where each pattern is a coarse light/dark layout of the disc. A
# patch-16 ViT tells these apart in a few hundred steps; fine textures (stripes vs checks) and outlines
# of objects about one patch wide (circle vs square) took it thousands -- too long for a quickstart.
PATTERNS: tuple[str, ...] = ("plain", "ringed", "banded", "two-tone")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 45, 40),
    "green": (40, 200, 70),
    "blue": (55, 95, 235),
    "yellow": (235, 215, 45),
}
MOTIONS: tuple[str, ...] = ("moving left", "moving right", "moving up", "moving down", "growing", "shrinking")
SPLITS: tuple[str, ...] = ("train", "val", "test")
_SUPERSAMPLE = 3  # sub-pixels per pixel side: anti-aliased edges, so size changes are smooth, not 1-px jumps


class ToyWorldError(ValueError):
    """A toy world on disk does not match the requested settings, or the settings are impossible."""


@dataclass(frozen=True)
class WorldSettings:
    """How the toy world is generated.

    Attributes:
        clips: Total number of clips (split by ``split_fractions``).
        seed: Everything random follows from it.
        num_frames: Frames per clip.
        size: Frame side in pixels.
        fps: Frame rate written into the MP4s.
        travel: Distance in pixels a translating object covers over the clip (a fraction of it is
            drawn per clip in [0.8, 1.2] × travel).
        radius: Base object radius in pixels (drawn per clip in [0.85, 1.15] × radius).
        scale_range: A growing object's radius goes from ``scale_range[0]`` to ``scale_range[1]`` × its
            base radius (shrinking: the reverse).
        split_fractions: Fractions of clips in train, val and test.
        crf: x264 constant rate factor (lower = closer to the drawn frames).
    """

    clips: int = 480
    seed: int = 0
    num_frames: int = 16
    size: int = 64
    fps: int = 8
    travel: float = 28.0
    radius: float = 11.0
    scale_range: tuple[float, float] = (0.6, 1.4)
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    crf: int = 18

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # tuples → lists, as read back from world.json


@dataclass(frozen=True)
class ClipPlan:
    """One clip's labels and the object's trajectory (centre x, y and radius per frame, in pixels)."""

    id: str
    split: str
    pattern: str
    colour: str
    motion: str
    centres: tuple[tuple[float, float], ...]
    radii: tuple[float, ...]
    background_seed: int

    @property
    def appearance(self) -> str:
        return f"{self.colour} {self.pattern} disc"

    @property
    def caption(self) -> str:
        """Appearance and motion, e.g. ``"a red square moving left"``."""
        return f"a {self.appearance} {self.motion}"


def appearance_classes() -> list[str]:
    """Appearance class names (colour × pattern), index = class id."""
    return [f"{colour} {pattern} disc" for colour in COLOURS for pattern in PATTERNS]


def appearance_caption(appearance: str) -> str:
    """The caption an *image* model is trained on: appearance only, as a photo would be described."""
    return f"a {appearance}"


def plan_world(settings: WorldSettings) -> list[ClipPlan]:
    """Labels and trajectories of every clip; balanced over motion × appearance, split by clip.

    Labels cycle over all (motion, colour, pattern) combinations in a shuffled order, so every class is
    (nearly) equally frequent in the whole world; the split is drawn per combination block so each
    split is balanced too.
    """
    s = settings
    if s.clips < len(SPLITS):
        raise ToyWorldError(f"a toy world needs at least {len(SPLITS)} clips, got {s.clips}")
    if abs(sum(s.split_fractions) - 1.0) > 1e-6 or min(s.split_fractions) < 0:
        raise ToyWorldError(f"split_fractions must be >= 0 and sum to 1, got {s.split_fractions}")
    rng = np.random.default_rng([s.seed, 0])  # labels and splits; per-clip draws use [seed, 1, index]
    combos = [(m, c, pa) for m in MOTIONS for c in COLOURS for pa in PATTERNS]
    labels = []
    while len(labels) < s.clips:
        labels.extend(combos[i] for i in rng.permutation(len(combos)))
    labels = labels[: s.clips]
    counts = np.floor(np.array(s.split_fractions) * s.clips).astype(int)
    counts[0] += s.clips - counts.sum()
    splits = np.repeat(np.arange(len(SPLITS)), counts)
    # Interleave splits over the label sequence so each split draws from every block of combinations.
    order = np.argsort((np.arange(s.clips) * 0.6180339887) % 1.0, kind="stable")
    split_of = np.empty(s.clips, dtype=int)
    split_of[order] = splits
    return [_plan_clip(s, i, SPLITS[split_of[i]], *labels[i]) for i in range(s.clips)]


def _plan_clip(s: WorldSettings, index: int, split: str, motion: str, colour: str, pattern: str) -> ClipPlan:
    rng = np.random.default_rng([s.seed, 1, index])
    t = np.linspace(0.0, 1.0, s.num_frames)  # [T] progress through the clip
    base = s.radius * rng.uniform(0.85, 1.15)
    margin = 1.0
    if motion in ("growing", "shrinking"):
        lo, hi = s.scale_range
        radii = base * (lo + (hi - lo) * (t if motion == "growing" else 1.0 - t))
        reach = base * max(lo, hi) + margin
        cx, cy = rng.uniform(reach, s.size - reach, size=2)
        centres = np.stack([np.full_like(t, cx), np.full_like(t, cy)], axis=1)
    else:
        radii = np.full_like(t, base)
        travel = s.travel * rng.uniform(0.8, 1.2)
        reach = base + margin
        if s.size - 2 * reach < travel:
            raise ToyWorldError(f"travel {travel:.1f} px does not fit a {s.size}-px frame with radius {base:.1f}")
        # The start is uniform over the positions from which the whole path stays inside, so the
        # distribution of positions visited is the same for opposite directions.
        start = rng.uniform(reach, s.size - reach - travel)
        along = start + travel * t  # [T]
        if motion in ("moving left", "moving up"):
            along = along[::-1]
        across = np.full_like(t, rng.uniform(reach, s.size - reach))
        centres = np.stack([along, across] if motion in ("moving left", "moving right") else [across, along], axis=1)
    return ClipPlan(
        id=f"toy{index:05d}", split=split, pattern=pattern, colour=colour, motion=motion,
        centres=tuple((float(x), float(y)) for x, y in centres), radii=tuple(float(r) for r in radii),
        background_seed=int(rng.integers(2**31)),
    )


# --------------------------------------------------------------------------------------------------
# rendering


def _pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the disc shows its full colour (True) or its dark shade (False).

    ``(u, v)`` are offsets from the centre in radii (v points down), so a growing disc keeps its
    pattern. Every pattern is left-right symmetric: a horizontal flip keeps the appearance class.
    """
    shape = np.broadcast_shapes(u.shape, v.shape)
    if pattern == "plain":
        return np.ones(shape, dtype=bool)
    if pattern == "ringed":  # a light ring around a dark centre
        return u * u + v * v > 0.55**2
    if pattern == "banded":  # a dark band across the middle
        return np.broadcast_to(np.abs(v) > 0.3, shape)
    if pattern == "two-tone":  # light top half, dark bottom half
        return np.broadcast_to(v < 0, shape)
    raise ToyWorldError(f"unknown pattern {pattern!r} (known: {', '.join(PATTERNS)})")


DARK_SHADE = 0.35  # the pattern's dark parts: this fraction of the object's colour


def _background(size: int, seed: int) -> np.ndarray:
    """A static, smooth, dim background with fine grain: float32 [H, W, 3] in 0..255."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(35, 80, size=3).astype(np.float32)
    tilt = rng.uniform(-25, 25, size=(2, 3)).astype(np.float32)
    image = base + xs[..., None] * tilt[0] + ys[..., None] * tilt[1]
    grain = rng.normal(0.0, 6.0, size=(size, size, 1)).astype(np.float32)
    return image + grain


def draw_object(background: np.ndarray, pattern: str, colour: str, centre: tuple[float, float], radius: float) -> np.ndarray:
    """Composite one patterned disc onto a float [H, W, 3] background; returns uint8 [H, W, 3]."""
    size = background.shape[0]
    ss = _SUPERSAMPLE
    cx, cy = centre
    image = background.copy()
    # Only the disc's bounding box is supersampled (the rest of the frame is background).
    x0, x1 = max(0, int(np.floor(cx - radius)) - 1), min(size, int(np.ceil(cx + radius)) + 1)
    y0, y1 = max(0, int(np.floor(cy - radius)) - 1), min(size, int(np.ceil(cy + radius)) + 1)
    if x1 > x0 and y1 > y0:
        dx = (np.arange(x0 * ss, x1 * ss, dtype=np.float32) + 0.5) / ss - cx  # [w*ss] sub-pixel offsets
        dy = (np.arange(y0 * ss, y1 * ss, dtype=np.float32) + 0.5) / ss - cy  # [h*ss]
        dx, dy = dx[None, :], dy[:, None]
        inside = dx * dx + dy * dy <= radius * radius  # [h*ss, w*ss]
        light = inside & _pattern_mask(pattern, dx / radius, dy / radius)
        h, w = y1 - y0, x1 - x0
        # Coverage of each pixel by the disc and by its light parts: anti-aliased edges and pattern.
        cover = inside.reshape(h, ss, w, ss).mean(axis=(1, 3))[..., None]  # [h, w, 1]
        bright = light.reshape(h, ss, w, ss).mean(axis=(1, 3))[..., None]  # [h, w, 1]
        full = np.array(COLOURS[colour], dtype=np.float32)
        box = image[y0:y1, x0:x1]
        image[y0:y1, x0:x1] = box * (1.0 - cover) + full * bright + DARK_SHADE * full * (cover - bright)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def render_clip(plan: ClipPlan, size: int) -> np.ndarray:
    """Draw one clip: uint8 [T, H, W, 3]."""
    background = _background(size, plan.background_seed)  # [H, W, 3]
    frames = np.empty((len(plan.radii), size, size, 3), dtype=np.uint8)
    for t, (centre, radius) in enumerate(zip(plan.centres, plan.radii)):
        frames[t] = draw_object(background, plan.pattern, plan.colour, centre, radius)
    return frames


def sample_images(count: int, settings: WorldSettings, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Independent still images of the toy world's objects and their appearance: the image corpus.

    An image CLIP is trained on photos, not on the frames of the videos it will later teach from; these
    stills are that corpus: any appearance, anywhere in the frame, at any size a clip can show.

    Returns:
        uint8 [count, H, W, 3] and the appearance name of each image.
    """
    size, lo, hi = settings.size, min(settings.scale_range), max(settings.scale_range)
    colours, images, names = list(COLOURS), [], []
    for _ in range(count):
        pattern, colour = PATTERNS[rng.integers(len(PATTERNS))], colours[rng.integers(len(colours))]
        radius = settings.radius * rng.uniform(0.85, 1.15) * rng.uniform(lo, hi)
        centre = rng.uniform(radius * 0.5, size - radius * 0.5, size=2)  # may be cut by the frame edge
        background = _background(size, int(rng.integers(2**31)))
        images.append(draw_object(background, pattern, colour, (float(centre[0]), float(centre[1])), radius))
        names.append(f"{colour} {pattern} disc")
    return np.stack(images), names


# --------------------------------------------------------------------------------------------------
# on disk


def write_world(folder: str | Path, settings: WorldSettings = WorldSettings()) -> dict:
    """Generate the toy world into ``folder``, or reuse it if it was generated with the same settings.

    Returns:
        ``{"reused": bool, "manifest": path, "splits": {split: manifest path}, "labels": path,
        "clips": n}``.

    Raises:
        ToyWorldError: ``folder`` holds a world generated with different settings.
    """
    folder = Path(folder)
    info_path = folder / "world.json"
    result = {
        "manifest": folder / "manifest.csv",
        "splits": {split: folder / f"{split}.csv" for split in SPLITS},
        "labels": folder / "labels.json",
        "clips": settings.clips,
    }
    if info_path.exists():  # world.json is written last: its presence means the world is complete
        found = json.loads(info_path.read_text())
        if found != settings.to_json():
            diff = sorted(k for k in set(found) | set(settings.to_json()) if found.get(k) != settings.to_json().get(k))
            raise ToyWorldError(
                f"{folder} holds a toy world made with other settings ({', '.join(diff)} differ); "
                "use another output folder or delete it"
            )
        return {**result, "reused": True}
    plans = plan_world(settings)
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    # The same bytes every time: with x264's own threads two fresh worlds of 480 clips came out in 3
    # different byte streams out of 6, and even on one thread its macroblock-tree rate control encoded 1-3
    # of 120 clips differently when the same process encoded them again (decoded pixels up to 33 levels
    # apart), so every number downstream of a fresh world moved. One thread and mbtree=0 gave identical
    # bytes in every repeat tried (tests/unit/quickstart/test_toyworld.py), and the world is written faster (4.6 s, not 7.1).
    options = {"crf": str(settings.crf), "preset": "veryfast", "g": str(settings.num_frames), "threads": "1",
               "x264-params": "mbtree=0"}
    for plan in plans:
        write_video(folder / "videos" / f"{plan.id}.mp4", render_clip(plan, settings.size), fps=settings.fps, options=options)
    _write_manifest(result["manifest"], plans)
    for split in SPLITS:
        _write_manifest(result["splits"][split], [p for p in plans if p.split == split])
    labels = {
        "appearance_classes": appearance_classes(),
        "motion_classes": list(MOTIONS),
        "clips": {
            p.id: {"split": p.split, "pattern": p.pattern, "colour": p.colour, "appearance": p.appearance, "motion": p.motion,
                   "appearance_label": appearance_classes().index(p.appearance), "motion_label": MOTIONS.index(p.motion),
                   "centres": [list(c) for c in p.centres], "radii": list(p.radii)}
            for p in plans
        },
    }
    atomic_write_text(result["labels"], json.dumps(labels))
    atomic_write_text(info_path, json.dumps(settings.to_json(), indent=1))
    return {**result, "reused": False}


def read_labels(folder_or_file: str | Path) -> dict:
    """``labels.json`` of a toy world (a folder or the file itself)."""
    path = Path(folder_or_file)
    if path.is_dir():
        path = path / "labels.json"
    return json.loads(path.read_text())


def _write_manifest(path: Path, plans: list[ClipPlan]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "path", "label", "captions"])
        for p in plans:
            writer.writerow([p.id, f"videos/{p.id}.mp4", MOTIONS.index(p.motion), p.caption])
    tmp.replace(path)


def centroid_track(frames: np.ndarray, background: np.ndarray | None = None) -> np.ndarray:
    """Centre of the object per frame, from pixels: float [T, 2] (x, y).

    The object is whatever differs from the per-pixel median over time (the static background) by a
    clear margin; used by tests to check that the labelled motion is what the decoded video shows.
    """
    frames = frames.astype(np.float32)  # [T, H, W, 3]
    background = np.median(frames, axis=0) if background is None else background.astype(np.float32)
    diff = np.abs(frames - background).sum(axis=-1)  # [T, H, W]
    ys, xs = np.mgrid[0 : frames.shape[1], 0 : frames.shape[2]].astype(np.float32)
    out = np.zeros((len(frames), 2), dtype=np.float32)
    for t, d in enumerate(diff):
        weight = d * (d > 60)
        total = max(float(weight.sum()), 1e-6)
        out[t] = (float((weight * xs).sum()) / total, float((weight * ys).sum()) / total)
    return out


def object_area(frames: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Pixels that differ clearly from ``background`` per frame: float [T] (a size proxy)."""
    diff = np.abs(frames.astype(np.float32) - background.astype(np.float32)).sum(axis=-1)  # [T, H, W]
    return (diff > 60).sum(axis=(1, 2)).astype(np.float32)


def background_of(plan: ClipPlan, size: int) -> np.ndarray:
    """The clip's static background as uint8 [H, W, 3] (to measure the object against)."""
    return np.clip(_background(size, plan.background_seed) + 0.5, 0, 255).astype(np.uint8)


__all__ = [
    "COLOURS", "MOTIONS", "PATTERNS", "SPLITS", "ClipPlan", "ToyWorldError", "WorldSettings", "appearance_caption",
    "appearance_classes", "background_of", "centroid_track", "object_area", "plan_world", "read_labels",
    "render_clip", "sample_images", "write_world", "draw_object",
]
