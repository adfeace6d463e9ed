"""Views: JSON round-trip, determinism (also across processes), UMT sampling rules, exact pixels."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from umt_distill.data.video_base import VideoInfo
from umt_distill.data.views import (
    UMT_SCALES,
    ViewError,
    ViewSpec,
    apply_view,
    fixed_crop_offsets,
    multiscale_crop_sizes,
    resize_frames,
    sample_view,
    view_generator,
)
from umt_distill.registry import VIEW_POLICIES, RegistryError


def info(n: int = 100, width: int = 320, height: int = 240) -> VideoInfo:
    return VideoInfo(num_frames=n, fps=25.0, width=width, height=height)


def gradient_frames(t: int, height: int, width: int) -> np.ndarray:
    """uint8 [t, height, width, 3]: R varies with x, G with y, B with x + y and the frame index."""
    y, x = np.mgrid[0:height, 0:width]
    frames = np.empty((t, height, width, 3), dtype=np.uint8)
    for i in range(t):
        frames[i, ..., 0] = (x * 7) % 256
        frames[i, ..., 1] = (y * 5) % 256
        frames[i, ..., 2] = (x + y + 31 * i) % 256
    return frames


# --------------------------------------------------------------------------------------------------
# ViewSpec


def test_viewspec_json_round_trip() -> None:
    view = ViewSpec(frame_indices=[3, 17, 40], crop=np.array([4, 5, 100, 90]), flip=True, size=(64, 48))
    assert view.frame_indices == (3, 17, 40) and view.crop == (4, 5, 100, 90)
    assert all(type(v) is int for v in view.frame_indices + view.crop + view.size)
    d = view.to_dict()
    assert d == {"frame_indices": [3, 17, 40], "crop": [4, 5, 100, 90], "flip": True, "size": [64, 48]}
    assert ViewSpec.from_dict(json.loads(json.dumps(d))) == view
    text = view.to_json()
    assert ViewSpec.from_json(text) == view and ViewSpec.from_json(text.encode()) == view
    assert ViewSpec.from_json(text).to_json() == text
    assert hash(ViewSpec.from_json(text)) == hash(view)  # usable as a dict key / in sets


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"crop": [0, 0, 10]}, "crop"),
        ({"crop": [0, 0, 0, 10]}, "crop"),
        ({"crop": [-1, 0, 10, 10]}, "crop[0]"),
        ({"frame_indices": []}, "frame_indices"),
        ({"frame_indices": [1, 2.5]}, "frame_indices[1]"),
        ({"frame_indices": [True]}, "frame_indices[0]"),
        ({"frame_indices": "12"}, "frame_indices"),
        ({"flip": "False"}, "flip"),
        ({"flip": 0}, "flip"),
        ({"size": [0, 224]}, "size[0]"),
        ({"size": [224]}, "size"),
        ({"extra": 1}, "extra"),
    ],
)
def test_viewspec_from_dict_rejects_bad_fields_by_name(change: dict, field: str) -> None:
    d = {"frame_indices": [0, 1], "crop": [0, 0, 10, 10], "flip": False, "size": [8, 8], **change}
    with pytest.raises(ViewError, match=field.replace("[", r"\[").replace("]", r"\]")):
        ViewSpec.from_dict(d)


def test_viewspec_from_dict_names_missing_field_and_bad_json() -> None:
    with pytest.raises(ViewError, match="missing field.*crop"):
        ViewSpec.from_dict({"frame_indices": [0], "flip": False, "size": [8, 8]})
    with pytest.raises(ViewError, match="invalid JSON"):
        ViewSpec.from_json("{not json")


# --------------------------------------------------------------------------------------------------
# Determinism


def test_view_generator_seed_is_sha256_of_key() -> None:
    expected = int.from_bytes(hashlib.sha256(b"7:clip/a:3").digest()[:8], "big")
    assert view_generator(7, "clip/a", 3).initial_seed() == expected
    a = torch.rand(5, generator=view_generator(7, "clip/a", 3))
    assert torch.equal(a, torch.rand(5, generator=view_generator(7, "clip/a", 3)))


@pytest.mark.parametrize("policy", ["umt_train", "eval_center"])
def test_sample_view_is_a_function_of_its_arguments(policy: str) -> None:
    args = (policy, info(), 8, 224, 0, "vid-1", 2)
    assert sample_view(*args) == sample_view(*args)


def test_different_keys_give_different_views() -> None:
    def draw(seed: int, clip: str, k: int) -> ViewSpec:
        return sample_view("umt_train", info(1000, 340, 256), 8, 224, seed, clip, k)

    by_index = {draw(0, "a", k) for k in range(20)}
    by_clip = {draw(0, f"clip{c}", 0) for c in range(20)}
    by_seed = {draw(s, "a", 0) for s in range(20)}
    # 8 frames from 125-frame segments: a collision among 20 draws is astronomically unlikely
    assert len(by_index) == len(by_clip) == len(by_seed) == 20


def test_views_are_identical_in_another_process() -> None:
    keys = [(0, "vid-1", 0), (123, "some/clip id", 5), (2**40, "ü", 1)]
    here = [sample_view("umt_train", info(301, 340, 256), 8, 224, *k).to_json() for k in keys]
    code = (
        "import json, sys\n"
        "from umt_distill.data.views import sample_view\n"
        "from umt_distill.data.video_base import VideoInfo\n"
        "keys = json.loads(sys.argv[1])\n"
        "vi = VideoInfo(num_frames=301, fps=25.0, width=340, height=256)\n"
        "print(json.dumps([sample_view('umt_train', vi, 8, 224, *k).to_json() for k in keys]))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a different str hash salt must not matter
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(keys)], capture_output=True, text=True, env=env, check=True
    )
    assert json.loads(out.stdout) == here


# --------------------------------------------------------------------------------------------------
# umt_train: frames


@pytest.mark.parametrize(("n", "t"), [(8, 8), (9, 8), (100, 8), (1000, 16), (37, 4), (5, 1)])
def test_umt_train_frames_fall_in_their_segments(n: int, t: int) -> None:
    seg = n // t
    for k in range(30):
        frames = sample_view("umt_train", info(n), t, 32, 1, "c", k).frame_indices
        assert len(frames) == t
        for i, f in enumerate(frames):
            assert i * seg <= f < (i + 1) * seg
        assert list(frames) == sorted(frames)


def test_umt_train_draws_every_frame_of_a_segment() -> None:
    seen = {sample_view("umt_train", info(24), 8, 32, 0, "c", k).frame_indices[2] for k in range(200)}
    assert seen == {6, 7, 8}  # segment 2 of 24 frames in 8 segments


def test_frame_range_restricts_sampling() -> None:
    for k in range(30):
        frames = sample_view("umt_train", info(200), 4, 32, 0, "c", k, frame_range=(50, 90)).frame_indices
        assert all(50 + 10 * i <= f < 60 + 10 * i for i, f in enumerate(frames))
    ev = sample_view("eval_center", info(200), 4, 32, 0, "c", 0, frame_range=(50, 90))
    assert ev.frame_indices == (55, 65, 75, 85)


def test_short_videos_and_bad_ranges_raise_view_error() -> None:
    for policy in ("umt_train", "eval_center"):
        with pytest.raises(ViewError, match="7 frame.*fewer than the 8"):
            sample_view(policy, info(7), 8, 224, 0, "c", 0)
        with pytest.raises(ViewError, match=r"frame range \[10, 13\) has 3"):
            sample_view(policy, info(100), 4, 224, 0, "c", 0, frame_range=(10, 13))
        with pytest.raises(ViewError, match="outside the video"):
            sample_view(policy, info(100), 4, 224, 0, "c", 0, frame_range=(90, 120))
        with pytest.raises(ViewError, match="empty"):
            sample_view(policy, info(100), 4, 224, 0, "c", 0, frame_range=(20, 20))


def test_images_are_one_frame_views() -> None:
    image = info(1, 300, 200)
    for policy in ("umt_train", "eval_center"):
        assert sample_view(policy, image, 1, 64, 0, "img", 0).frame_indices == (0,)
        with pytest.raises(ViewError, match="1 frame"):
            sample_view(policy, image, 2, 64, 0, "img", 0)


# --------------------------------------------------------------------------------------------------
# umt_train: crop and flip


def test_multiscale_crop_sizes_hand_computed() -> None:
    # short side 255: int(255·s) = 255, 223, 191, 168; 223 is within 3 px of 224 → snapped to 224
    sides = [255, 224, 191, 168]
    pairs = multiscale_crop_sizes(400, 255, (224, 224), UMT_SCALES, max_distort=1)
    expected = [(sides[j], sides[i]) for i in range(4) for j in range(4) if abs(i - j) <= 1]
    assert pairs == expected and len(pairs) == 10
    # non-square output: heights snap to H_out, widths to W_out; a snap past the frame is clamped
    assert multiscale_crop_sizes(300, 222, (224, 160), (1.0,), 0) == [(222, 222)]
    assert multiscale_crop_sizes(300, 162, (224, 160), (1.0,), 0) == [(160, 162)]  # only the width snaps
    # both sides snap to 224; the height is clamped back to the 222-px frame (UMT would pad 2 black rows)
    assert multiscale_crop_sizes(300, 222, (224, 224), (1.0,), 0) == [(224, 222)]
    assert multiscale_crop_sizes(3, 1, (8, 8), (0.66,), 0) == [(1, 1)]  # int(0.66) = 0 → 1 px


def test_fixed_crop_offsets_hand_computed() -> None:
    # 320×240 frame, 224×224 crop: steps 96 // 4 = 24 and 16 // 4 = 4
    assert fixed_crop_offsets(320, 240, 224, 224) == [
        (0, 0), (96, 0), (0, 16), (96, 16), (48, 8),
        (0, 8), (96, 8), (48, 16), (48, 0),
        (24, 4), (72, 4), (24, 12), (72, 12),
    ]  # fmt: skip
    # slack 97 is not a multiple of 4: the right edge stops 1 px short (UMT behaviour)
    assert max(x for x, _ in fixed_crop_offsets(321, 240, 224, 240)) == 96


def test_umt_train_crops_are_candidates_at_fixed_offsets() -> None:
    vi = info(64, 400, 255)
    sides = [255, 224, 191, 168]  # see test_multiscale_crop_sizes_hand_computed
    pairs, boxes = set(), set()
    for k in range(600):
        view = sample_view("umt_train", vi, 4, 224, 3, "c", k)
        x0, y0, w, h = view.crop
        assert abs(sides.index(w) - sides.index(h)) <= 1  # aspect jitter at most one scale step
        assert (x0, y0) in fixed_crop_offsets(400, 255, w, h)
        assert x0 + w <= 400 and y0 + h <= 255
        assert view.size == (224, 224)
        pairs.add((w, h))
        boxes.add(view.crop)
    assert pairs == set(multiscale_crop_sizes(400, 255, (224, 224)))  # every candidate is reachable
    assert len(boxes) > 60


def test_max_distort_zero_gives_square_crops() -> None:
    for k in range(50):
        _, _, w, h = sample_view("umt_train", info(), 2, 112, 0, "c", k, max_distort=0).crop
        assert w == h


def test_flip_frequency_and_flip_off() -> None:
    flips = [sample_view("umt_train", info(), 2, 32, 0, "c", k).flip for k in range(400)]
    assert 0.42 < sum(flips) / len(flips) < 0.58
    assert not any(sample_view("umt_train", info(), 2, 32, 0, "c", k, flip=False).flip for k in range(50))
    # turning flip off leaves frames and crop unchanged (the flip is drawn last)
    on = sample_view("umt_train", info(), 2, 32, 0, "c", 9)
    off = sample_view("umt_train", info(), 2, 32, 0, "c", 9, flip=False)
    assert (on.frame_indices, on.crop) == (off.frame_indices, off.crop)


def test_policy_parameter_errors() -> None:
    with pytest.raises(ViewError, match="scales"):
        sample_view("umt_train", info(), 2, 32, 0, "c", 0, scales=(1.2,))
    with pytest.raises(ViewError, match="size"):
        sample_view("umt_train", info(), 2, (32, 0), 0, "c", 0)
    with pytest.raises(RegistryError, match="umt_train"):
        sample_view("umt_trian", info(), 2, 32, 0, "c", 0)
    assert {"umt_train", "eval_center"} <= set(VIEW_POLICIES.names())


# --------------------------------------------------------------------------------------------------
# eval_center


def test_eval_center_hand_computed() -> None:
    view = sample_view("eval_center", info(100, 320, 240), 8, 224, 0, "c", 0)
    # frame i = floor((2i + 1) · 100 / 16)
    assert view.frame_indices == (6, 18, 31, 43, 56, 68, 81, 93)
    assert view.crop == (40, 0, 240, 240) and view.size == (224, 224) and view.flip is False
    assert sample_view("eval_center", info(8, 240, 320), 8, 224, 0, "c", 0).crop == (0, 40, 240, 240)
    assert sample_view("eval_center", info(8, 240, 320), 8, 224, 0, "c", 0).frame_indices == tuple(range(8))
    assert sample_view("eval_center", info(16, 321, 240), 2, 224, 0, "c", 0).crop == (40, 0, 240, 240)
    # (H, W) = (112, 224) on 320×240: width limits, s = 0.7 → 320 × 160 box
    assert sample_view("eval_center", info(), 1, (112, 224), 0, "c", 0).crop == (0, 40, 320, 160)
    # (H, W) = (224, 112) on 320×240: height limits, s = 14/15 → 120 × 240 box
    assert sample_view("eval_center", info(), 1, (224, 112), 0, "c", 0).crop == (100, 0, 120, 240)
    # independent of seed, clip and view index
    assert sample_view("eval_center", info(), 4, 64, 5, "x", 3) == sample_view("eval_center", info(), 4, 64, 0, "y", 0)


# --------------------------------------------------------------------------------------------------
# apply_view


def test_apply_view_without_resize_is_slicing_and_flip_reverses_columns() -> None:
    frames = gradient_frames(3, 40, 50)
    view = ViewSpec((0, 1, 2), crop=(7, 5, 30, 20), flip=False, size=(20, 30))
    out = apply_view(frames, view)
    assert out.dtype == torch.uint8 and out.shape == (3, 3, 20, 30) and out.is_contiguous()
    expected = frames[:, 5:25, 7:37].transpose(0, 3, 1, 2)  # [T, 3, h, w]
    np.testing.assert_array_equal(out.numpy(), expected)
    flipped = apply_view(frames, ViewSpec((0, 1, 2), (7, 5, 30, 20), True, (20, 30)))
    np.testing.assert_array_equal(flipped.numpy(), expected[..., ::-1])


def test_apply_view_resize_properties() -> None:
    frames = gradient_frames(2, 60, 80)
    view = ViewSpec((0, 1), crop=(10, 4, 48, 48), flip=False, size=(24, 24))
    out = apply_view(frames, view)
    assert out.shape == (2, 3, 24, 24)
    assert torch.equal(out, apply_view(frames.copy(), view))  # same view twice → identical pixels
    # flip commutes with the (symmetric) bilinear resize up to rounding of exact halves
    flipped = apply_view(frames, ViewSpec((0, 1), (10, 4, 48, 48), True, (24, 24)))
    assert torch.equal(flipped, out.flip(-1))
    # a constant image stays constant; upsampling works too
    const = np.full((1, 30, 40, 3), 77, dtype=np.uint8)
    assert (apply_view(const, ViewSpec((0,), (3, 2, 20, 25), False, (64, 48))) == 77).all()


def test_resize_frames_in_chunks_equals_one_frame_at_a_time() -> None:
    # the plain reference: each frame resized on its own, as apply_view did before frames were batched
    gen = torch.Generator().manual_seed(0)
    contiguous = torch.randint(0, 256, (7, 3, 53, 71), dtype=torch.uint8, generator=gen)
    channels_last = contiguous.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # as apply_view has it
    for clip, size in [(c, s) for c in (contiguous, channels_last) for s in ((24, 24), (64, 48), (53, 30))]:
        reference = torch.stack([
            F.interpolate(f[None].double(), size=size, mode="bilinear", align_corners=False, antialias=True)[0]
            .round_().clamp_(0, 255).to(torch.uint8) for f in clip])
        for chunk in (1, 3 * (53 * 71 + size[0] * size[1]) * 2, 1 << 22):  # 1 frame, 2 frames, all at once
            out = resize_frames(clip, size, chunk_values=chunk)
            assert out.dtype == torch.uint8 and out.shape == (7, 3, *size)
            assert torch.equal(out, reference), (size, chunk)


def test_apply_view_downscale_by_two_matches_hand_computed_triangle_filter() -> None:
    # antialiased bilinear at scale 1/2 is a triangle filter of radius 2 input pixels: output o is centred
    # at input 2o + 0.5, taps 2o-1 .. 2o+2 weigh 1/8, 3/8, 3/8, 1/8; taps outside the image are dropped
    # and the rest renormalised (edges: 3/7, 3/7, 1/7)
    def shrink(x: np.ndarray, axis: int) -> np.ndarray:
        x = np.moveaxis(x, axis, 0)
        n = x.shape[0]
        out = []
        for o in range(n // 2):
            taps = [(j, 1 - abs(j - (2 * o + 0.5)) / 2) for j in range(2 * o - 1, 2 * o + 3) if 0 <= j < n]
            total = sum(w for _, w in taps)
            out.append(sum(w * x[j] for j, w in taps) / total)
        return np.moveaxis(np.stack(out), 0, axis)

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(1, 16, 12, 3), dtype=np.uint8)
    out = apply_view(frames, ViewSpec((0,), (0, 0, 12, 16), False, (8, 6))).numpy()[0].transpose(1, 2, 0)
    reference = shrink(shrink(frames[0].astype(np.float64), 0), 1)  # [8, 6, 3]
    assert np.abs(out - reference).max() <= 0.5 + 1e-9  # rounding to nearest (ties either way)


def test_apply_view_is_close_to_umt_pil_bilinear() -> None:
    # UMT resizes with PIL bilinear (which antialiases when shrinking); ours should agree within 1-2 levels
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
    ours = apply_view(frame[None], ViewSpec((0,), (10, 5, 77, 70), False, (32, 40)))[0].numpy().transpose(1, 2, 0)
    pil = np.asarray(Image.fromarray(frame[5:75, 10:87]).resize((40, 32), Image.BILINEAR))
    diff = np.abs(ours.astype(int) - pil.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.6


def test_apply_view_errors() -> None:
    frames = gradient_frames(2, 40, 50)
    with pytest.raises(ViewError, match="got 2 frames but the view has 3"):
        apply_view(frames, ViewSpec((0, 1, 2), (0, 0, 10, 10), False, (10, 10)))
    with pytest.raises(ViewError, match="does not fit in a 50x40 frame"):
        apply_view(frames, ViewSpec((0, 1), (45, 0, 10, 10), False, (10, 10)))
    with pytest.raises(ViewError, match="uint8 frames"):
        apply_view(frames.astype(np.float32), ViewSpec((0, 1), (0, 0, 10, 10), False, (10, 10)))
    with pytest.raises(ViewError, match="uint8 frames"):
        apply_view(frames[..., 0], ViewSpec((0, 1), (0, 0, 10, 10), False, (10, 10)))


def test_apply_view_accepts_read_only_frames_without_warning() -> None:
    frames = gradient_frames(1, 20, 20)
    frames.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = apply_view(frames, ViewSpec((0,), (2, 2, 16, 16), False, (16, 16)))
    assert out.shape == (1, 3, 16, 16)


def test_sampled_views_apply_end_to_end() -> None:
    vi = info(30, 96, 72)
    frames_all = gradient_frames(30, 72, 96)
    for policy in ("umt_train", "eval_center"):
        for k in range(5):
            view = sample_view(policy, vi, 4, 48, 11, "clip", k)
            pix = apply_view(frames_all[list(view.frame_indices)], view)
            assert pix.shape == (4, 3, 48, 48)
            replayed = ViewSpec.from_json(view.to_json())
            assert torch.equal(pix, apply_view(frames_all[list(replayed.frame_indices)], replayed))
