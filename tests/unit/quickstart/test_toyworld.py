"""The quickstart's toy world: deterministic, balanced, and the labels are what the decoded videos show."""

from __future__ import annotations

import json

import numpy as np
import pytest

from umt_distill.data.corpus import read_corpus
from umt_distill.quickstart.world import (
    MOTIONS,
    PATTERNS,
    ToyWorldError,
    WorldSettings,
    appearance_classes,
    background_of,
    centroid_track,
    object_area,
    plan_world,
    read_labels,
    render_clip,
    sample_images,
    write_world,
)
from umt_distill.data.video import open_video

SMALL = WorldSettings(clips=30, num_frames=8, seed=3)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    return folder, write_world(folder, SMALL)


def test_plan_is_deterministic_and_seed_dependent() -> None:
    assert plan_world(SMALL) == plan_world(SMALL)
    other = plan_world(WorldSettings(clips=30, num_frames=8, seed=4))
    assert [p.centres for p in other] != [p.centres for p in plan_world(SMALL)]
    plan = plan_world(SMALL)[0]
    assert np.array_equal(render_clip(plan, SMALL.size), render_clip(plan, SMALL.size))


def test_labels_are_balanced_and_every_split_sees_every_motion() -> None:
    plans = plan_world(WorldSettings(clips=192))  # two full cycles of motion x colour x pattern
    appearances = [p.appearance for p in plans]
    assert {a: appearances.count(a) for a in set(appearances)} == {a: 12 for a in appearance_classes()}
    for split in ("train", "val", "test"):
        assert {p.motion for p in plans if p.split == split} == set(MOTIONS)
    assert sum(p.split == "train" for p in plans) == int(0.6 * 192) + 1  # rounding goes to train


def test_manifests_read_as_corpora_and_match_the_labels(world) -> None:
    folder, info = world
    labels = read_labels(folder)
    rows = read_corpus(info["manifest"])
    assert len(rows) == SMALL.clips and [r.id for r in rows] == sorted(labels["clips"])
    split_ids = [r.id for s in ("train", "val", "test") for r in read_corpus(info["splits"][s])]
    assert sorted(split_ids) == sorted(labels["clips"])  # the splits partition the world
    for row in rows:
        clip = labels["clips"][row.id]
        assert row.label == MOTIONS.index(clip["motion"]) == clip["motion_label"]
        assert row.captions == (f"a {clip['appearance']} {clip['motion']}",)
        assert clip["appearance"] == appearance_classes()[clip["appearance_label"]]


def test_motion_is_what_the_decoded_video_shows(world) -> None:
    """Centroid and size measured on decoded H.264 frames move the way each clip's label says."""
    folder, _ = world
    labels = read_labels(folder)["clips"]
    plans = {p.id: p for p in plan_world(SMALL)}
    seen = set()
    for clip_id, clip in labels.items():
        with open_video(folder / "videos" / f"{clip_id}.mp4", backend="pyav") as video:
            assert video.info.num_frames == SMALL.num_frames and video.info.width == SMALL.size
            frames = video.get_frames(range(SMALL.num_frames))  # [T, H, W, 3]
        background = background_of(plans[clip_id], SMALL.size)
        (dx, dy), area = centroid_track(frames, background)[[0, -1]].T @ [-1, 1], object_area(frames, background)
        motion = clip["motion"]
        expected = {"moving left": dx < -15, "moving right": dx > 15, "moving up": dy < -15, "moving down": dy > 15,
                    "growing": area[-1] > 2.5 * area[0], "shrinking": area[0] > 2.5 * area[-1]}
        assert expected[motion], (clip_id, motion, dx, dy, area[[0, -1]])
        if motion.startswith("moving"):  # the other axis stays put
            assert abs(dy if motion in ("moving left", "moving right") else dx) < 3, (clip_id, motion, dx, dy)
        seen.add(motion)
    assert seen == set(MOTIONS)


def test_opposite_directions_visit_the_same_positions() -> None:
    """Left vs right differ only in time order: the start is uniform over positions that keep the path inside."""
    plans = plan_world(WorldSettings(clips=960))
    spans = {m: np.array([(min(x for x, _ in p.centres), max(x for x, _ in p.centres)) for p in plans if p.motion == m])
             for m in ("moving left", "moving right")}
    assert abs(spans["moving left"].mean() - spans["moving right"].mean()) < 1.5


def test_reuse_and_refusal(world, tmp_path) -> None:
    folder, info = world
    again = write_world(folder, SMALL)
    assert again["reused"] and not info["reused"]
    with pytest.raises(ToyWorldError, match="clips"):
        write_world(folder, WorldSettings(clips=31, num_frames=8, seed=3))
    assert json.loads((folder / "world.json").read_text())["clips"] == SMALL.clips


def test_impossible_settings_are_named() -> None:
    with pytest.raises(ToyWorldError, match="travel"):
        plan_world(WorldSettings(clips=6, travel=60.0))
    with pytest.raises(ToyWorldError, match="split_fractions"):
        plan_world(WorldSettings(clips=6, split_fractions=(0.5, 0.5, 0.5)))


def test_still_images_cover_every_appearance_deterministically() -> None:
    images, names = sample_images(64, SMALL, np.random.default_rng(0))
    again, names_again = sample_images(64, SMALL, np.random.default_rng(0))
    assert images.shape == (64, SMALL.size, SMALL.size, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again) and names == names_again
    assert set(names) <= set(appearance_classes()) and len({n.split()[1] for n in names}) == len(PATTERNS)


def test_patterns_survive_a_horizontal_flip() -> None:
    """The training views flip frames; a flipped object must keep its appearance class."""
    from umt_distill.quickstart.world import _pattern_mask

    u = np.linspace(-1.0, 1.0, 64)[None, :]  # symmetric about 0
    v = np.linspace(-1.0, 1.0, 40)[:, None]
    for pattern in PATTERNS:
        mask = np.broadcast_to(_pattern_mask(pattern, u, v), (40, 64))
        agree = (mask == mask[:, ::-1]).mean()
        assert agree == 1.0, (pattern, agree)


def test_the_videos_are_the_same_bytes_every_time(tmp_path) -> None:
    # x264's own threads and its macroblock-tree rate control each encoded a few clips differently from run
    # to run (decoded pixels up to 33 levels apart): two worlds written by one process used to differ.
    settings = WorldSettings(clips=120, seed=5)
    first, second = write_world(tmp_path / "a", settings), write_world(tmp_path / "b", settings)
    videos = sorted((tmp_path / "a" / "videos").glob("*.mp4"))
    assert len(videos) == 120 and first["manifest"] != second["manifest"]
    differ = [v.name for v in videos if v.read_bytes() != (tmp_path / "b" / "videos" / v.name).read_bytes()]
    assert differ == []
