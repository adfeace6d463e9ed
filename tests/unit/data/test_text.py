"""Text side of stage 2: caption cleaning, tokenizers, and the BERT encoder with fusion layers."""

from __future__ import annotations

import pytest
import torch

from umt_distill.data.text import (
    TRAIN_ON_CORPUS,
    TokenizerError,
    load_tokenizer,
    pre_text,
    prepare_tokenizer,
    special_ids,
    tokenize,
    train_wordpiece_tokenizer,
)
from umt_distill.models.text import BertTextEncoder, TextEncoderError, build_text_encoder, load_bert_weights, tiny_bert_config


pytestmark = pytest.mark.usefixtures("one_torch_thread")


CAPTIONS = [
    "A red disc moves to the left.",
    "A blue disc moves to the right!",
    "The green disc moves up; slowly.",
    "Close-up of a yellow/orange ball moving down",
    "a person walks (quickly) across the street",
]


def test_pre_text_follows_umt() -> None:
    assert pre_text("A Red-ball, moves/left!  (fast) ") == "a red ball moves left fast"
    assert pre_text('He said: "hi"; ok~ #tag *x*') == "he said hi ok tag x"
    assert pre_text("<person> runs far away", max_words=2) == "person runs"


def test_trained_tokenizer_round_trip_and_saved_vocabulary(tmp_path) -> None:
    tok = train_wordpiece_tokenizer(CAPTIONS * 3, vocab_size=200)
    assert tok.get_vocab() == train_wordpiece_tokenizer(CAPTIONS * 3, vocab_size=200).get_vocab(), "deterministic ids"
    assert tok.tokenize("a disc slides") == ["a", "disc", "s", "##l", "##i", "##d", "##e", "##s"]  # spelt from pieces
    ids = special_ids(tok)
    assert ids["pad"] == 0 and len(set(ids.values())) == 3
    out = tokenize(tok, ["A red disc moves up.", "ball"], max_length=10)
    assert out["input_ids"].shape == (2, 10) and out["input_ids"].dtype == torch.long
    assert out["input_ids"][:, 0].tolist() == [ids["cls"]] * 2
    assert out["attention_mask"][1].tolist() == [1, 1, 1] + [0] * 7  # [CLS] ball [SEP] + padding
    assert tok.decode(out["input_ids"][0], skip_special_tokens=True) == "a red disc moves up"
    # Built once per run, then always re-read from the run folder (resume/eval use the same vocabulary).
    first = prepare_tokenizer(TRAIN_ON_CORPUS, CAPTIONS, tmp_path / "tok", vocab_size=200)
    again = prepare_tokenizer(TRAIN_ON_CORPUS, ["entirely different words here"], tmp_path / "tok", vocab_size=200)
    assert first.get_vocab() == again.get_vocab()
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


def test_missing_tokenizer_names_the_source(tmp_path) -> None:
    with pytest.raises(TokenizerError, match="no-such-tokenizer"):
        load_tokenizer(tmp_path / "no-such-tokenizer")


def _hf_bert(tmp_path, vocab: int = 60, layers: int = 4):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=24)
    hf = BertForMaskedLM(config).eval()
    hf.save_pretrained(tmp_path / "bert")
    return hf


def test_text_mode_equals_transformers_bert(tmp_path) -> None:
    """Our layers, loaded from a Hugging Face checkpoint folder, compute what BertModel computes."""
    hf = _hf_bert(tmp_path)
    ours = build_text_encoder(str(tmp_path / "bert"), fusion_layer=3, encoder_width=48).eval()
    ids = torch.randint(1, 60, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        ref = hf.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        text = ours.forward_text(ids, mask)
        logits = ours.mlm_logits(ref.last_hidden_state)
        hf_logits = hf(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert torch.allclose(text[keep], ref.hidden_states[3][keep], atol=1e-5)  # output of layer 2 = text mode
    assert torch.allclose(logits, hf_logits, atol=1e-4)  # MLM head mapped (decoder tied to the embeddings)


def test_fusion_layers_cross_attend_and_every_parameter_learns() -> None:
    torch.manual_seed(0)
    enc = BertTextEncoder(tiny_bert_config(vocab_size=40), fusion_layer=2, encoder_width=48)
    names = [k for k in enc.state_dict() if ".crossattention." in k]
    assert {int(k.split(".")[3]) for k in names} == {2, 3}, "cross-attention only in the fusion layers"
    assert enc.state_dict()["bert.encoder.layer.2.crossattention.self.key.weight"].shape == (64, 48)
    ids = torch.randint(5, 40, (2, 7))
    mask = torch.ones_like(ids)
    vision = torch.randn(2, 5, 48)
    text = enc.forward_text(ids, mask)
    fused = enc.forward_fusion(text, mask, vision)
    assert not torch.allclose(fused, enc.forward_fusion(text, mask, vision + 1.0)), "fusion reads the vision tokens"
    (fused.sum() + enc.mlm_logits(fused).logsumexp(-1).sum()).backward()
    no_grad = [n for n, p in enc.named_parameters() if p.grad is None]
    # Row 1 of the token types is unused but still gets a (zero) gradient; nothing is left out.
    assert no_grad == [], no_grad


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    config = tiny_bert_config(vocab_size=40)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0  # comparable in training mode
    torch.manual_seed(0)
    plain = BertTextEncoder(config, 2, 48)
    ckpt = BertTextEncoder(config, 2, 48, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    ids, vision = torch.randint(5, 40, (2, 6)), torch.randn(2, 4, 48)
    grads = []
    for m in (plain, ckpt):
        out = m.forward_fusion(m.forward_text(ids, torch.ones_like(ids)), torch.ones_like(ids), vision)
        out.square().mean().backward()
        grads.append(m.bert.encoder.layer[0].attention.self.query.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bad_bert_checkpoints_fail_naming_the_keys(tmp_path) -> None:
    hf = _hf_bert(tmp_path)
    with pytest.raises(ValueError, match="fusion_layer=4"):
        build_text_encoder(str(tmp_path / "bert"), fusion_layer=4, encoder_width=32)
    with pytest.raises(TextEncoderError, match="tokenizer has 99 tokens"):
        build_text_encoder(str(tmp_path / "bert"), 2, 32, vocab_size=99)
    with pytest.raises(TextEncoderError, match="no-bert-here"):
        build_text_encoder(str(tmp_path / "no-bert-here"), 2, 32)
    state = hf.state_dict()
    ours = BertTextEncoder(hf.config, 2, 32)
    untied = {**state, "cls.predictions.decoder.weight": state["cls.predictions.decoder.weight"] + 1}
    with pytest.raises(TextEncoderError, match="not tied"):
        load_bert_weights(ours, untied)
    extra = {**state, "bert.encoder.layer.9.output.dense.weight": torch.zeros(1)}
    with pytest.raises(TextEncoderError, match="layer.9"):
        load_bert_weights(ours, extra)
    new = load_bert_weights(ours, state)
    assert new and all(".crossattention." in k for k in new)


def test_module_runs_on_one_torch_thread() -> None:
    assert torch.get_num_threads() == 1  # conftest's one_torch_thread, opted in by pytestmark
