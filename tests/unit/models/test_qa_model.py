"""The QA model: the decoder starts as the stage-2 fusion layers, UMT's official stage-2 layout maps onto
it, the decoder is causal, and the loss weighs each answer by its share of the annotations."""

from __future__ import annotations

import pytest
import torch

from umt_distill.config import load_recipe

TINY = ["text.tokenizer_vocab_size=50"]
C, H, V, F_LAYER, LAYERS = 64, 64, 50, 2, 4  # the tiny parts: vision and BERT 64 wide, fusion from layer 2 of 4


def _qa_model(**extra):
    from umt_distill.stages.qa import build_qa_model

    cfg = load_recipe("qa/tiny", [*TINY, *(f"{k}={v}" for k, v in extra.items())])
    torch.manual_seed(0)
    return build_qa_model(cfg, V), cfg


def _official_text_keys() -> dict[str, tuple[int, ...]]:
    """UMT's stage-2 text-side names and shapes (UMT code @4fb4049: multi_modality/models/umt.py with
    multi_modality/models/backbones/bert/xbert.py), written out by hand for the tiny sizes."""
    t = "text_encoder.bert."
    keys = {t + "embeddings.position_ids": (1, 64), t + "embeddings.word_embeddings.weight": (V, H),
            t + "embeddings.position_embeddings.weight": (64, H), t + "embeddings.token_type_embeddings.weight": (2, H),
            t + "embeddings.LayerNorm.weight": (H,), t + "embeddings.LayerNorm.bias": (H,)}
    for layer in range(LAYERS):
        p = f"{t}encoder.layer.{layer}."
        for blk in ["attention"] + (["crossattention"] if layer >= F_LAYER else []):
            kv = C if blk == "crossattention" else H
            keys |= {f"{p}{blk}.self.query.weight": (H, H), f"{p}{blk}.self.query.bias": (H,),
                     f"{p}{blk}.self.key.weight": (H, kv), f"{p}{blk}.self.key.bias": (H,),
                     f"{p}{blk}.self.value.weight": (H, kv), f"{p}{blk}.self.value.bias": (H,),
                     f"{p}{blk}.output.dense.weight": (H, H), f"{p}{blk}.output.dense.bias": (H,),
                     f"{p}{blk}.output.LayerNorm.weight": (H,), f"{p}{blk}.output.LayerNorm.bias": (H,)}
        keys |= {p + "intermediate.dense.weight": (256, H), p + "intermediate.dense.bias": (256,),
                 p + "output.dense.weight": (H, 256), p + "output.dense.bias": (H,),
                 p + "output.LayerNorm.weight": (H,), p + "output.LayerNorm.bias": (H,)}
    c = "text_encoder.cls.predictions."
    keys |= {c + "bias": (V,), c + "transform.dense.weight": (H, H), c + "transform.dense.bias": (H,),
             c + "transform.LayerNorm.weight": (H,), c + "transform.LayerNorm.bias": (H,),
             c + "decoder.weight": (V, H), c + "decoder.bias": (V,)}
    return keys | {"vision_proj.weight": (32, C), "vision_proj.bias": (32,), "text_proj.weight": (32, H),
                   "text_proj.bias": (32,), "itm_head.weight": (2, H), "itm_head.bias": (2,), "temp": ()}


def test_decoder_starts_as_the_fusion_layers_it_was_copied_from(tmp_path) -> None:
    """A stage-2 model saved, then QA built from it: decoder layer i == fusion layer F + i, bit for bit."""
    from umt_distill.stages.retrieval import build_retrieval_model
    from umt_distill.training.checkpoint import save_checkpoint

    cfg = load_recipe("qa/tiny", TINY)
    torch.manual_seed(3)
    vl = build_retrieval_model(cfg, V)
    save_checkpoint(tmp_path / "s2", 1, vl, {"step": 1}, "")
    model, _ = _qa_model(**{"stage2.init": tmp_path / "s2"})
    stage2 = vl.state_dict()
    assert model.text_decoder.num_layers == LAYERS - F_LAYER
    for i in range(LAYERS - F_LAYER):
        copied = model.text_decoder.bert.encoder.layer[i].state_dict()
        assert copied, i
        for name, value in copied.items():
            assert torch.equal(value, stage2[f"text_encoder.bert.encoder.layer.{F_LAYER + i}.{name}"]), (i, name)
    for name, value in model.text_decoder.bert.embeddings.state_dict().items():
        assert torch.equal(value, stage2[f"text_encoder.bert.embeddings.{name}"]), name
    for name, value in model.text_decoder.cls.state_dict().items():
        assert torch.equal(value, stage2[f"text_encoder.cls.{name}"]), name
    # The question side keeps every encoder weight; the MLM head left it for the decoder.
    for name, value in model.text_encoder.state_dict().items():
        assert torch.equal(value, stage2[f"text_encoder.{name}"]), name
    assert not hasattr(model.text_encoder, "cls")
    for name, value in model.vision_encoder.state_dict().items():
        assert torch.equal(value, stage2[f"vision_encoder.{name}"]), name
    # The copies are separate tensors: training the decoder leaves the encoder's fusion layers alone.
    layer = model.text_decoder.bert.encoder.layer[0].attention.self.query.weight
    assert layer.data_ptr() != model.text_encoder.bert.encoder.layer[F_LAYER].attention.self.query.weight.data_ptr()


def test_official_stage2_layout_maps_onto_the_qa_model(tmp_path) -> None:
    """UMT's stage-2 names (hand-written above) → our QA names, as UMT's vqa set-up renames them."""
    from umt_distill.models.qa import qa_state_from_stage2

    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(s, generator=g) for k, s in _official_text_keys().items()}
    state["text_encoder.bert.embeddings.position_ids"] = torch.arange(64)[None]
    state["text_encoder.cls.predictions.decoder.weight"] = state["text_encoder.bert.embeddings.word_embeddings.weight"]
    state["text_encoder.cls.predictions.decoder.bias"] = state["text_encoder.cls.predictions.bias"]
    state["clip_teacher.conv1.weight"] = torch.zeros(8, 3, 1, 16, 16)
    state["vision_encoder.encoder.norm.weight"] = torch.ones(C)
    mapped = qa_state_from_stage2(state, F_LAYER, "official")
    t, d = "text_encoder.bert.encoder.layer.", "text_decoder.bert.encoder.layer."
    assert torch.equal(mapped[d + "0.crossattention.self.key.weight"], state[t + "2.crossattention.self.key.weight"])
    assert torch.equal(mapped[d + "1.output.LayerNorm.bias"], state[t + "3.output.LayerNorm.bias"])
    assert torch.equal(mapped["text_decoder.cls.predictions.transform.dense.weight"],
                       state["text_encoder.cls.predictions.transform.dense.weight"])
    assert torch.equal(mapped["text_decoder.bert.embeddings.word_embeddings.weight"],
                       state["text_encoder.bert.embeddings.word_embeddings.weight"])
    assert not any(k.startswith(("clip_teacher.", "vision_proj.", "text_proj.", "itm_head.", "text_encoder.cls."))
                   for k in mapped) and "temp" not in mapped
    assert not any("position_ids" in k or "predictions.decoder." in k for k in mapped)
    assert not any(k.startswith(d + "2.") for k in mapped)  # only the 2 fusion layers become decoder layers
    assert "vision_encoder.encoder.norm.weight" in mapped and t + "0.attention.self.query.weight" in mapped
    # Every mapped name is one of the QA model's, with its shape.
    model, _ = _qa_model()
    ours = model.state_dict()
    text_side = {k: v for k, v in mapped.items() if k.startswith(("text_encoder.", "text_decoder."))}
    assert set(text_side) == {k for k in ours if k.startswith(("text_encoder.", "text_decoder."))}
    assert all(ours[k].shape == v.shape for k, v in text_side.items())
    # An untied MLM decoder cannot be represented: an error, not a silent drop.
    from umt_distill.models.text import TextEncoderError

    untied = {**state, "text_encoder.cls.predictions.decoder.weight": torch.zeros(V, H)}
    with pytest.raises(TextEncoderError, match="not tied"):
        qa_state_from_stage2(untied, F_LAYER, "official")


def test_decoder_is_causal_and_the_loss_weighs_answers() -> None:
    from umt_distill.models.qa import answer_loss

    model, _ = _qa_model()
    model.eval()
    dec = model.text_decoder
    g = torch.Generator().manual_seed(2)
    states, qmask = torch.randn(2, 5, H, generator=g), torch.ones(2, 5, dtype=torch.long)
    ids = torch.randint(5, V, (2, 4), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a = dec(ids, mask, states, qmask)
        changed = ids.clone()
        changed[:, 3] = 7
        b = dec(changed, mask, states, qmask)
        c = dec(ids, mask, states.flip(1).contiguous() * 2, qmask)
    torch.testing.assert_close(a[:, :3], b[:, :3])  # a later token changes no earlier prediction
    assert not torch.allclose(a[:, 3], b[:, 3]) and not torch.allclose(a, c)  # ... and the question matters
    # Log-likelihood by hand from the logits; padding after the answer does not count.
    mask[1, 3] = 0
    with torch.no_grad():
        ll = dec.token_log_likelihood(ids, mask, states, qmask)
        logp = dec(ids, mask, states, qmask).log_softmax(-1)
    want0 = sum(float(logp[0, i, ids[0, i + 1]]) for i in range(3))
    want1 = sum(float(logp[1, i, ids[1, i + 1]]) for i in range(2))
    assert ll.tolist() == pytest.approx([want0, want1], abs=1e-5)
    # Two questions: the first with answers weighted 2/3 and 1/3, the second with one.
    lls = torch.tensor([-1.0, -4.0, -2.0])
    assert float(answer_loss(lls, torch.tensor([2 / 3, 1 / 3, 1.0]), 2)) == pytest.approx((2 / 3 + 4 / 3 + 2) / 2)


def test_qa_forward_backward_reaches_every_trained_part() -> None:
    from umt_distill.stages.qa import freeze_unused

    model, _ = _qa_model()
    freeze_unused(model)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 4, 32, 32, generator=g)
    q = torch.randint(5, V, (2, 6), generator=g)
    a = torch.randint(5, V, (3, 4), generator=g)
    loss = model(pixels, q, torch.ones_like(q), a, torch.ones_like(a), torch.tensor([0, 0, 1]), torch.tensor([0.5, 0.5, 1.0]))
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    # token types: BERT's second segment is never used; everything else trains.
    assert all("token_type_embeddings" in n for n in no_grad), no_grad
