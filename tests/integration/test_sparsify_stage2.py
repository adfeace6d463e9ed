"""A stage-2 run with token sparsification trains from a real store and records its keys."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from umt_distill.config import load_recipe
from umt_distill.training.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_sparse_stage2_run_trains(tmp_path) -> None:
    from umt_distill.cache.pipeline import cache_teacher
    from umt_distill.stages.stage2 import train
    from umt_distill.testing.media import moving_shapes_video, write_video

    rows = []
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        write_video(tmp_path / f"v{i}.mp4", moving_shapes_video(8, 64, 80, seed=300 + i), fps=8)
        rows.append({"id": f"v{i}", "path": f"v{i}.mp4", "captions": [f"a {colour} disc"]})
    corpus = tmp_path / "videos.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store, out = tmp_path / "store", tmp_path / "run"
    base = [f"corpus.source={corpus}", f"cache.store={store}", "stage2.sources=[video]"]
    cache_teacher(load_recipe("stage2/tiny", base), progress=False)
    sparse = ["sparsify.keep=0.5", "sparsify.after_block=1", "sparsify.source=teacher", "sparsify.fuse=true"]
    train(load_recipe("stage2/tiny", [*base, *sparse, f"train.output_dir={out}", "train.max_steps=4",
                                      "train.ckpt_every=4"]))
    logged = read_metrics(out / "metrics.jsonl")
    assert len(logged) == 4
    assert all(torch.isfinite(torch.tensor([m[k] for k in ("loss", "loss_uta", "loss_vtc", "loss_vtm", "loss_mlm")])).all()
               for m in logged)
    recorded = yaml.safe_load((out / "checkpoints" / "step-00000004" / "recipe.yaml").read_text())
    assert recorded["sparsify"] == {"keep": 0.5, "after_block": 1, "source": "teacher", "fuse": True}
