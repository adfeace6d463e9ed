"""A user's mistake ends in one line naming the file, key or row and the fix, never a traceback (the real
CLI in a subprocess; `--debug` adds the traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest



@pytest.fixture(scope="module")
def world(tiny_store, shapes_corpus, tmp_path_factory) -> dict[str, Path]:
    # the session's 8-clip corpus and its zarr fp16 store (cache.frames=none)
    return {"root": tmp_path_factory.mktemp("user_errors"), "corpus": shapes_corpus, "store": tiny_store()}


def _cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "umt_distill", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def _one_line(done: subprocess.CompletedProcess, code: int, message: str) -> None:
    assert done.returncode == code, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], done.stderr[-2000:]


def _train(world, *extra: str) -> list[str]:
    return ["train", "stage1/tiny", f"corpus.source={world['corpus']}", f"cache.store={world['store']}",
            f"train.output_dir={world['root'] / 'run'}", "train.max_steps=1", *extra]


def test_a_corpus_smaller_than_one_batch(world) -> None:
    _one_line(_cli(*_train(world, "train.batch_size=16")), 1,
              "8 clips per rank are fewer than one step of train.batch_size=16 x train.accum_steps=1; lower "
              "train.batch_size")


def test_pixels_from_a_store_without_frames(world) -> None:
    _one_line(_cli(*_train(world, "train.pixels_from=store")), 2,
              "the store holds no view frames (cached with cache.frames=none), so train.pixels_from=store has "
              "nothing to read; train with train.pixels_from=video")


def test_an_output_folder_that_cannot_be_written(world, tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = _cli(*_train(world)[:-2], f"train.output_dir={blocker / 'run'}", "train.max_steps=1")
    _one_line(done, 1, f"train.output_dir={blocker / 'run'} is not writable (Not a directory); choose another "
                       "train.output_dir")


def test_a_pretrained_tag_offline_fails_within_seconds_naming_the_local_file_alternative(world, tmp_path) -> None:
    start = time.monotonic()
    done = _cli("cache-teacher", "stage1/tiny", f"corpus.source={world['corpus']}", f"cache.store={tmp_path / 's'}",
                "teacher.name=ViT-B-16", "teacher.pretrained=openai", env={"HF_HUB_OFFLINE": "1"})
    assert time.monotonic() - start < 60  # start-up included; open_clip's own retries took ~51 s more
    _one_line(done, 1, "pretrained='openai' of 'ViT-B-16' must be downloaded (hf-hub:timm/vit_base_patch16_clip_224"
                       ".openai), but HF_HUB_OFFLINE is set")
    assert "teacher.pretrained=/path/to/open_clip_pytorch_model.bin" in done.stderr


def test_a_corrupt_teacher_weights_file(world, tmp_path) -> None:
    bad = tmp_path / "clip.safetensors"
    bad.write_bytes(b"\xff" * 64)
    done = _cli("cache-teacher", "stage1/tiny", f"corpus.source={world['corpus']}", f"cache.store={tmp_path / 's'}",
                f"teacher.pretrained={bad}")
    _one_line(done, 1, f"{bad}: cannot read the teacher weights (SafetensorError")


def test_debug_adds_the_traceback_to_a_user_error(world, tmp_path) -> None:
    args = ["cache-teacher", "stage1/tiny", f"corpus.source={world['corpus']}", f"cache.store={tmp_path / 's'}",
            "teacher.input_size=65"]
    _one_line(_cli(*args), 1, "teacher input_size 65 is not a multiple of the patch size (16, 16)")
    debug = _cli("--debug", *args)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_an_unforeseen_error_is_one_line_unless_debug(world, tmp_path) -> None:
    """A stage that fails in a way no check foresaw (here: a stand-in stage module that raises)."""
    (tmp_path / "failing_stage.py").write_text("def train(cfg, resume=None):\n    raise RuntimeError('boom')\n")
    code = ("import sys\n"
            "from umt_distill import stages\n"
            "stages.STAGES[0] = stages.Stage('stage1', 'fails', 'failing_stage', reads_store=True)\n"
            "from umt_distill.cli import main\n"
            "sys.argv = ['umt-distill', *sys.argv[1:]]\n"
            "main()\n")
    base = [sys.executable, "-c", code, *_train(world)]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(base, capture_output=True, text=True, timeout=300, env=env)
    _one_line(done, 1, "RuntimeError: boom")
    assert "run again with --debug for the traceback" in done.stderr
    debug = subprocess.run(base[:3] + ["--debug"] + base[3:], capture_output=True, text=True, timeout=300, env=env)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "RuntimeError: boom" in debug.stderr


def test_a_manifest_that_does_not_match_the_store(world, tmp_path) -> None:
    lines = world["corpus"].read_text().splitlines()
    other = tmp_path / "other.csv"
    other.write_text("\n".join(lines[:3]).replace("v0.mp4", str(world["corpus"].parent / "v0.mp4"))
                     .replace("v1.mp4", str(world["corpus"].parent / "v1.mp4")) + "\n")
    done = _cli("train", "stage1/tiny", f"corpus.source={other}", f"cache.store={world['store']}",
                f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1")
    _one_line(done, 1, f"{world['store']}: 6 cached clip(s) are not in the corpus {other} (first: 'v2'); train with "
                       "the manifest the store was cached from, or with train.pixels_from=store")


def test_a_damaged_spec_json(world, tmp_path) -> None:
    import shutil

    store = tmp_path / "store"
    shutil.copytree(world["store"], store)
    (store / "spec.json").write_text("{not json")
    done = _cli(*_train({**world, "store": store}))
    _one_line(done, 1, f"{store / 'spec.json'}: spec.json is not valid JSON")
    assert "restore it from a copy, or cache into a new store" in done.stderr
