"""Token sparsification in stage 2's vision pass and the recipe checks of the stages."""

from __future__ import annotations

import pytest
import torch

from umt_distill.config import RecipeError, load_recipe
from umt_distill.masking import gather_visible, sample_semantic_mask
from umt_distill.models.sparse_vl import sparse_vision_forward
from umt_distill.models.sparsify import SparseSpec, teacher_scores

B, T, N = 2, 4, 16


@pytest.fixture(scope="module")
def vl_model():
    from umt_distill.stages.stage2 import build_model

    torch.manual_seed(0)
    return build_model(load_recipe("stage2/tiny"), 32, 500).eval()


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    x, attn = torch.randn(B, 3, T, 64, 64, generator=g), torch.rand(B, T, N, generator=g)
    return x, attn, sample_semantic_mask(B, T, N, 0.5, g, attn=attn)


def test_stage2_vision_pass_at_keep_one_is_the_dense_pass(vl_model) -> None:
    x, _attn, vis = _inputs(0)
    with torch.no_grad():
        dense = vl_model.vision_encoder(x, vis)
        sparse, kept = sparse_vision_forward(vl_model.vision_encoder, x, vis, SparseSpec(1.0, 2, "student"))
    assert torch.equal(kept, torch.arange(vis.shape[1]).expand(B, -1))
    for a, b in ((sparse.aligned, dense.aligned), (sparse.tokens, dense.tokens), (sparse.pooled, dense.pooled)):
        assert torch.allclose(a, b, atol=1e-6)


def test_stage2_vision_pass_keeps_the_top_tokens_and_fuses_the_rest(vl_model) -> None:
    x, attn, vis = _inputs(1)
    spec = SparseSpec(0.5, 0, "teacher", fuse=True)
    with torch.no_grad():
        out, kept = sparse_vision_forward(vl_model.vision_encoder, x, vis, spec, teacher_scores(attn, vis))
        plain = vl_model.vision_encoder(x, gather_visible(vis, kept))  # before block 0, unfused: the smaller mask
        unfused, _ = sparse_vision_forward(vl_model.vision_encoder, x, vis, SparseSpec(0.5, 0, "teacher"),
                                           teacher_scores(attn, vis))
    assert out.aligned.shape == (2, B, T * 4, 32) and out.tokens.shape[1] == T * 4 + T  # + one fused token per frame
    assert torch.allclose(unfused.aligned, plain.aligned, atol=1e-6) and torch.allclose(unfused.tokens, plain.tokens, atol=1e-6)


def test_objective_slices_the_targets_to_the_kept_tokens(vl_model) -> None:
    from umt_distill.losses.uta import uta_loss
    from umt_distill.stages.stage2_parts import Stage2Objective

    x, attn, vis = _inputs(2)
    targets = torch.randn(2, B, vis.shape[1], 32)
    spec = SparseSpec(0.5, 1, "teacher")
    special = {"pad": 0, "cls": 1, "mask": 2}
    obj = Stage2Objective(vl_model, {"uta": 1.0, "vtc": 0.0, "vtm": 0.0, "mlm": 0.0}, 0.5, special, sparse=spec)
    ids, mask = torch.randint(3, 500, (B, 8)), torch.ones(B, 8, dtype=torch.long)
    with torch.no_grad():
        out = obj(x, vis, targets, ids, mask, torch.arange(B), torch.Generator(), teacher_scores(attn, vis))
        vision, kept = sparse_vision_forward(vl_model.vision_encoder, x, vis, spec, teacher_scores(attn, vis))
    assert torch.allclose(out["uta"], uta_loss(vision.aligned, gather_visible(targets, kept))[0])


def test_recipes_refuse_what_sparsification_cannot_do() -> None:
    from umt_distill.stages.parts import sparse_spec
    from umt_distill.stages.videomae_parts import check_videomae_recipe

    assert sparse_spec(load_recipe("stage1/tiny"), 4) is None  # the default is off
    with pytest.raises(RecipeError, match="after_block=4"):
        sparse_spec(load_recipe("stage1/tiny", ["sparsify.keep=0.5", "sparsify.after_block=4"]), 4)
    with pytest.raises(RecipeError, match="source=student"):
        sparse_spec(load_recipe("stage2/tiny", ["sparsify.keep=0.5"]), 4, teacher_attn=False)
    with pytest.raises(RecipeError, match="train.stage=videomae"):
        check_videomae_recipe(load_recipe("videomae/tiny", ["sparsify.keep=0.5"]))
    with pytest.raises(RecipeError, match="sparsify.keep"):
        load_recipe("stage1/tiny", ["sparsify.keep=0"])
