"""Stage 2 with frame selection on real stores (frame_select): text-guided selection from the cached scores
trains, keeping every frame equals no selection, the learned selector trains, and a store cached before
captions still trains (with a method that needs none) and names the fix for one that does."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from umt_distill.cache.pipeline import cache_teacher
from umt_distill.config import RecipeError, load_recipe
from umt_distill.models.frame_selector import SELECTOR_FILE
from umt_distill.stages.stage2 import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COLOURS = ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    from umt_distill.testing.media import moving_shapes_video, write_video

    root = tmp_path_factory.mktemp("smaug_frames")
    rows = []
    for i, colour in enumerate(COLOURS):
        write_video(root / f"v{i}.mp4", moving_shapes_video(8, 64, 80, seed=400 + i), fps=8)
        rows.append({"id": f"v{i}", "path": f"v{i}.mp4", "captions": [f"a {colour} disc", f"{colour} ball moving"]})
    (root / "videos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = {"corpus": root / "videos.jsonl", "captions": root / "with", "plain": root / "plain"}
    for name, extra in (("captions", []), ("plain", ["frame_select.cache_captions=false"])):
        cache_teacher(load_recipe("stage2/tiny", [f"corpus.source={out['corpus']}", f"cache.store={out[name]}",
                                                  "cache.codec=fp32", *extra]), progress=False)
    return out


def run(stores, tmp_path: Path, store: str, *extra: str) -> dict:
    cfg = load_recipe("stage2/tiny", [f"corpus.source={stores['corpus']}", f"cache.store={stores[store]}",
                                      "cache.codec=fp32", "stage2.sources=[video]", "train.max_steps=2",
                                      f"train.output_dir={tmp_path / 'run'}", *extra])
    return train(cfg)


def test_text_guided_selection_trains(stores, tmp_path) -> None:
    last = run(stores, tmp_path, "captions", "frame_select.method=text_guided", "frame_select.keep_frames=2",
               "frame_select.per_segment=true")
    assert last["step"] == 2 and all(math.isfinite(last[k]) for k in ("loss_uta", "loss_vtc", "loss_vtm", "loss_mlm"))


def test_a_store_without_captions_trains_and_names_what_it_lacks(stores, tmp_path) -> None:
    last = run(stores, tmp_path, "plain", "frame_select.method=uniform", "frame_select.keep_frames=2")
    assert last["step"] == 2 and math.isfinite(last["loss"])
    with pytest.raises(RecipeError, match="cached without captions.*uniform or random"):
        run(stores, tmp_path / "b", "plain", "frame_select.method=text_guided", "frame_select.keep_frames=2")


@pytest.mark.slow
def test_keeping_every_frame_equals_no_selection(stores, tmp_path) -> None:
    plain = run(stores, tmp_path / "a", "captions")
    kept = run(stores, tmp_path / "b", "captions", "frame_select.method=text_guided", "frame_select.keep_frames=4")
    assert kept["loss"] == plain["loss"] and kept["loss_uta"] == plain["loss_uta"]


@pytest.mark.slow
def test_the_learned_selector_trains(stores, tmp_path) -> None:
    last = run(stores, tmp_path, "captions", "frame_select.method=learned", "frame_select.keep_frames=2")
    assert last["step"] == 2 and math.isfinite(last["loss"])
    assert (tmp_path / "run" / SELECTOR_FILE).is_file()  # the selector's weights beside the run


@pytest.mark.slow
@pytest.mark.parametrize("method", ["text_guided", "learned"])
def test_frame_selection_with_token_sparsification_trains(stores, tmp_path, method: str) -> None:
    last = run(stores, tmp_path, "captions", f"frame_select.method={method}", "frame_select.keep_frames=2",
               "sparsify.keep=0.5", "sparsify.fuse=true")
    assert last["step"] == 2 and math.isfinite(last["loss"])


def test_the_benchmark_world_and_its_precision_rows() -> None:
    """benchmarks/smaug_frames.py: half of each clip's frames show the captioned disc; a scorer that knows
    them has precision 1, uniform and random selection 0.5 on average."""
    import numpy as np

    from benchmarks.smaug_frames import frame_world, precision_rows

    clips = frame_world(6, 8, seed=0, split="t")
    shows = np.stack([c["shows"] for c in clips])
    assert (shows.sum(1) == 4).all() and all(len(set(c["per_frame"])) == 2 for c in clips)
    for c in clips:  # frames showing the captioned disc differ from the distractor frames
        on, off = c["frames"][c["shows"]], c["frames"][~c["shows"]]
        assert np.abs(on.astype(int).mean(0) - off.astype(int).mean(0)).max() > 20
    rows = precision_rows({"shows": shows, "scores": shows.astype(np.float32)}, 4, seeds=3)
    assert rows["text_guided"] == 1.0 and abs(rows["uniform"] - 0.5) < 0.2 and abs(rows["random"] - 0.5) < 0.15
