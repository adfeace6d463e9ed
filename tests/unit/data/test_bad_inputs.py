"""The bad-input zoo through the real cache-teacher pipeline.

Documented behaviour (README, "Bad input"): a clip that cannot be decoded or sampled gets one line in
failures.jsonl naming its id, path and reason, the rest of the corpus is cached, and the command exits
3. Manifest-level problems (malformed row, duplicate id, bad encoding) stop the run before any work
with an error naming the file and line. A variable frame rate is not a failure: frames are addressed by their position in presentation order.
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

from umt_distill.cache.pipeline import cache_teacher
from umt_distill.config import load_recipe
from umt_distill.testing.media import moving_shapes_video, write_image, write_video


def _vfr_video(path: Path) -> None:
    """H.264 whose frame durations alternate 1 and 3 ticks (a variable frame rate)."""
    from fractions import Fraction

    frames = moving_shapes_video(10, 64, 80, seed=5)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 80, 64, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 30)
        pts = 0
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 30)
            pts += 1 if i % 2 == 0 else 3
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


def _audio_only(path: Path) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for _ in range(4):
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A manifest mixing good clips with every kind of bad file; returns it and the expected outcome per id."""
    d = tmp_path_factory.mktemp("zoo")
    good = moving_shapes_video(12, 64, 80, seed=1)
    write_video(d / "good.mp4", good, fps=10)
    (d / "zero.mp4").write_bytes(b"")
    data = (d / "good.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (d / "text.mp4").write_text("hello, I am not a video\n")
    _audio_only(d / "audio_only.mp4")
    write_video(d / "gray16.mkv", good, codec="ffv1", pix_fmt="gray16le")
    write_video(d / "one_frame.mp4", good[:1], fps=10)
    write_video(d / "three_frames.mp4", good[:3], fps=10)
    _vfr_video(d / "vfr.mp4")
    write_video(d / "large.mp4", moving_shapes_video(4, 1080, 1920, seed=2), fps=10, options={"preset": "ultrafast"})
    write_image(d / "ok.jpg", good[0])
    jpeg = (d / "ok.jpg").read_bytes()
    (d / "corrupt.jpg").write_bytes(jpeg[:20] + b"\x00" * 64)
    expected = {
        "good": "ok", "zero": "fail", "truncated": "fail", "text": "fail", "audio_only": "fail",
        "gray16": "ok", "one_frame": "fail", "three_frames": "fail", "vfr": "ok", "large": "ok",
        "missing": "fail", "corrupt_jpeg": "fail",
    }
    paths = {"missing": "does_not_exist.mp4", "corrupt_jpeg": "corrupt.jpg", "gray16": "gray16.mkv"}
    lines = [json.dumps({"id": k, "path": paths.get(k, f"{k}.mp4")}) for k in expected]
    (d / "zoo.jsonl").write_text("\n".join(lines) + "\n")
    return d / "zoo.jsonl", expected


@pytest.mark.parametrize("backend", ["decord", "torchcodec"])
def test_every_bad_clip_is_a_named_failure_and_the_rest_is_cached(zoo, tmp_path: Path, backend: str) -> None:
    manifest, expected = zoo
    store = tmp_path / "store"
    # The zoo is mostly broken on purpose: it allows every clip to fail (corpus.max_failed_fraction=1).
    cfg = load_recipe("stage1/tiny", [f"corpus.source={manifest}", f"cache.store={store}", "cache.clips_per_shard=3",
                                      f"corpus.video_backend={backend}", "corpus.max_failed_fraction=1"])
    summary = cache_teacher(cfg, progress=False)
    failures = {json.loads(x)["id"]: json.loads(x) for x in (store / "failures.jsonl").read_text().splitlines()}
    assert set(failures) == {k for k, v in expected.items() if v == "fail"}
    for line in failures.values():
        assert line["reason"] and line["path"] and line["shard"]
    assert "fewer than the 4" in failures["one_frame"]["reason"] and "fewer than the 4" in failures["three_frames"]["reason"]
    index = json.loads((store / "index.json").read_text())
    cached = {clip for s in index["shards"] for clip, _ in s["records"]}
    assert cached == {k for k, v in expected.items() if v == "ok"}
    assert summary["failures"] == len(failures)


def _cli(*args: str):
    from typer.testing import CliRunner

    from umt_distill.cli import app

    return CliRunner().invoke(app, list(args), env={"COLUMNS": "400"})


def test_exit_status_3_when_clips_fail(zoo, tmp_path: Path) -> None:
    manifest, _ = zoo
    result = _cli("cache-teacher", "stage1/tiny", f"corpus.source={manifest}", f"cache.store={tmp_path / 's'}", "cache.limit=3",
                  "corpus.max_failed_fraction=1")
    assert result.exit_code == 3, result.output
    assert "failures.jsonl" in result.stderr


def test_past_the_failed_fraction_the_cache_run_fails_in_one_line_after_recording_every_clip(zoo, tmp_path: Path) -> None:
    manifest, expected = zoo
    store = tmp_path / "s"
    result = _cli("cache-teacher", "stage1/tiny", f"corpus.source={manifest}", f"cache.store={store}")
    failed = sum(v == "fail" for v in expected.values())
    assert result.exit_code == 1 and "Traceback" not in result.stderr, result.output
    assert (f"{manifest}: {failed} of {len(expected)} clips cannot be used ({failed / len(expected):.1%}, more than "
            f"corpus.max_failed_fraction=0.5); see the reasons in {store / 'failures.jsonl'}") in result.stderr
    assert len((store / "failures.jsonl").read_text().splitlines()) == failed  # nothing done is lost


@pytest.mark.parametrize(
    "content, needle",
    [
        ('{"id": "a", "path": "a.mp4"}\n{"id": "a", "path": "b.mp4"}\n', "m.jsonl:2:"),
        ('{"id": "a", "path": "a.mp4"}\n{"id": "b", "path": \n', "m.jsonl:2:"),
        (b'{"id": "a", "path": "a.mp4", "captions": ["caf\xe9"]}\n', "m.jsonl:1:"),
        ('{"path": "a.mp4"}\n', "m.jsonl:1:"),
    ],
    ids=["duplicate-id", "malformed-row", "non-utf8-caption", "missing-column"],
)
def test_manifest_problems_stop_before_any_work(tmp_path: Path, content, needle: str) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = _cli("cache-teacher", "stage1/tiny", f"corpus.source={manifest}", f"cache.store={tmp_path / 's'}")
    assert result.exit_code == 1, result.output
    assert str(manifest) in result.stderr and needle in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "s").exists(), "nothing is written for a bad manifest"
