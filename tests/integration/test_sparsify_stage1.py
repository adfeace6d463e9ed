"""Token sparsification in stage 1 on a real store: cached and online teacher rankings choose the same
tokens, and a sparse stage-1 run trains and records its ``sparsify`` keys."""

from __future__ import annotations

import pytest
import torch
import yaml

from umt_distill.config import RecipeError, load_recipe
from umt_distill.training.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cached_and_online_teacher_rankings_keep_the_same_tokens(shapes_corpus, tiny_store) -> None:
    from umt_distill.cache.datasets import CachedViewDataset
    from umt_distill.data.clipviews import OnlineViewDataset
    from umt_distill.data.corpus import read_corpus
    from umt_distill.models.sparsify import SparseSpec, prune
    from umt_distill.stages.parts import (
        mask_generator,
        sparse_scores,
        step_targets_attn,
    )
    from umt_distill.teachers.build import build_teacher

    store = tiny_store("zarr", "fp32", "full")
    cfg = load_recipe("stage1/tiny", [f"corpus.source={shapes_corpus}", f"cache.store={store}", "cache.codec=fp32",
                                      "sparsify.keep=0.5"])
    rows = read_corpus(shapes_corpus)
    cached, online = CachedViewDataset(store, cfg, {r.id: r for r in rows}), OnlineViewDataset(rows, cfg)
    batch_c = torch.utils.data.default_collate([cached[i] for i in range(4)])
    batch_o = torch.utils.data.default_collate([online[i] for i in range(4)])
    assert torch.equal(batch_c["pixels"], batch_o["pixels"])
    teacher, cpu, spec = build_teacher(cfg, torch.device("cpu")), torch.device("cpu"), SparseSpec.from_config(cfg.sparsify)
    kept, targets = [], []
    for batch, t in ((batch_c, None), (batch_o, teacher)):
        target, vis, attn = step_targets_attn(cfg, batch, batch["pixels"], t, mask_generator(0, 0, 0), cpu)
        scores = sparse_scores(spec, attn, vis)  # [B, T, n]
        tokens = torch.arange(vis.shape[1], dtype=torch.float32).expand(4, -1)[..., None]  # stand-ins
        _, pos = prune(tokens, scores, spec)
        kept.append(torch.gather(vis, 1, pos))  # flat (t, n) indices of the kept tokens
        targets.append(target.gather(2, pos[None, :, :, None].expand(target.shape[0], -1, -1, target.shape[-1])))
    assert torch.equal(kept[0], kept[1]), "cached and online attention must keep the same tokens"
    assert torch.allclose(targets[0], targets[1], atol=1e-5)


def test_a_sparse_stage1_run_trains_and_records_its_keys(shapes_corpus, tiny_store, tmp_path) -> None:
    from umt_distill.stages.stage1 import train

    store = tiny_store("zarr", "fp16", "full")
    out = tmp_path / "run"
    args = [f"corpus.source={shapes_corpus}", f"cache.store={store}", f"train.output_dir={out}", "train.max_steps=12",
            "train.ckpt_every=12", "sparsify.keep=0.5", "sparsify.after_block=1", "sparsify.source=student",
            "sparsify.fuse=true"]
    train(load_recipe("stage1/tiny", args))
    losses = [m["loss"] for m in read_metrics(out / "metrics.jsonl")]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    recorded = yaml.safe_load((out / "checkpoints" / "step-00000012" / "recipe.yaml").read_text())
    assert recorded["sparsify"] == {"keep": 0.5, "after_block": 1, "source": "student", "fuse": True}
    with pytest.raises(RecipeError, match="mask.type=tube or semantic"):
        train(load_recipe("stage1/tiny", [*args, "mask.type=random", f"train.output_dir={tmp_path / 'r2'}"]))


def test_keep_one_is_todays_run(shapes_corpus, tiny_store, tmp_path) -> None:
    """sparsify.keep=1 (the default) is off whatever the other keys say: the same losses to the last bit."""
    from umt_distill.stages.stage1 import train

    store = tiny_store("zarr", "fp16", "full")
    base = [f"corpus.source={shapes_corpus}", f"cache.store={store}", "train.max_steps=4", "train.ckpt_every=100"]
    train(load_recipe("stage1/tiny", [*base, f"train.output_dir={tmp_path / 'a'}"]))
    train(load_recipe("stage1/tiny", [*base, f"train.output_dir={tmp_path / 'b'}", "sparsify.after_block=2",
                                      "sparsify.source=student", "sparsify.fuse=true"]))
    a, b = (read_metrics(tmp_path / d / "metrics.jsonl") for d in "ab")
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
