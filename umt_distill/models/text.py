"""The stage-2 text side: a BERT whose upper layers also attend to vision tokens, plus its MLM head.

UMT (UMT code @4fb4049: multi_modality/models/backbones/bert/xbert.py) splits one BERT at ``fusion_layer``:
layers ``[0, fusion_layer)`` are plain text self-attention ("text mode", whose CLS feeds the contrastive
loss), layers ``[fusion_layer, L)`` add a cross-attention to the vision tokens after their self-attention
("fusion mode", used by the matching head and the MLM). The same weights run twice per step: text mode on the
caption, then fusion mode on the text-mode output. BERT-base splits at 9 (0-8 text, 9-11 fusion), BERT-large
at 19.

Parameter names follow Hugging Face's ``BertForMaskedLM`` (``bert.embeddings.*``,
``bert.encoder.layer.{l}.attention.self.query`` ..., ``cls.predictions.*``) and UMT's cross-attention
(``bert.encoder.layer.{l}.crossattention.*``, key/value taking the vision width), so both a Hugging Face
BERT checkpoint and an official UMT stage-2 file map onto this module by name (multi_modality/models/umt.py).

Two deliberate differences from ``BertForMaskedLM``: attention runs through
``F.scaled_dot_product_attention`` (the same maths as BERT's eager attention), and the MLM decoder has no
weight of its own — it multiplies by the word embeddings at call time. Tying by sharing a Parameter
would put one tensor under two names in ``state_dict()``, which safetensors refuses to save.

This module must not import ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig
from transformers.models.bert.modeling_bert import (
    BertEmbeddings,
    BertIntermediate,
    BertOutput,
    BertPredictionHeadTransform,
    BertSelfOutput,
)

TINY = "tiny"


class TextEncoderError(RuntimeError):
    """A BERT checkpoint cannot be used as the text encoder; the message names the source and keys."""


def tiny_bert_config(vocab_size: int, max_position_embeddings: int = 64) -> BertConfig:
    """A small random BERT for tests and the quickstart: width 64, 4 layers, 4 heads, MLP 256."""
    return BertConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=max_position_embeddings, type_vocab_size=2,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, pad_token_id=0,
    )


class MultiHeadAttention(nn.Module):
    """BERT attention projections (``query``/``key``/``value``); key/value may read another width.

    Args:
        hidden: Width of the queries (the text).
        num_heads: Heads; ``hidden`` must divide by it.
        kv_width: Width of the tokens attended to (the vision width for cross-attention).
        dropout: Dropout on the attention probabilities (training only).
    """

    def __init__(self, hidden: int, num_heads: int, kv_width: int, dropout: float) -> None:
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {num_heads} heads")
        self.num_heads, self.dropout = num_heads, dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)

    def forward(self, x: Tensor, context: Tensor, keep: Tensor | None) -> Tensor:
        """x [B, Lq, H] attends to context [B, Lk, Hk]; keep: bool [B, 1, 1, Lk] (True = attend) or None."""
        B, Lq, H = x.shape
        heads, d = self.num_heads, H // self.num_heads
        q = self.query(x).view(B, Lq, heads, d).transpose(1, 2)  # [B, h, Lq, d]
        k = self.key(context).view(B, -1, heads, d).transpose(1, 2)  # [B, h, Lk, d]
        v = self.value(context).view(B, -1, heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0)
        return out.transpose(1, 2).reshape(B, Lq, H)


class AttentionBlock(nn.Module):
    """``self`` (the projections) then ``output`` (dense → dropout → LayerNorm(· + input)), BERT's layout."""

    def __init__(self, config: BertConfig, kv_width: int) -> None:
        super().__init__()
        self.self = MultiHeadAttention(config.hidden_size, config.num_attention_heads, kv_width,
                                       config.attention_probs_dropout_prob)
        self.output = BertSelfOutput(config)

    def forward(self, x: Tensor, context: Tensor, keep: Tensor | None) -> Tensor:
        return self.output(self.self(x, context, keep), x)


class BertFusionLayer(nn.Module):
    """One BERT layer; with ``cross_attention`` it also attends to vision tokens (UMT's fusion layers)."""

    def __init__(self, config: BertConfig, cross_attention: bool, encoder_width: int) -> None:
        super().__init__()
        self.attention = AttentionBlock(config, config.hidden_size)
        self.has_cross_attention = cross_attention
        if cross_attention:
            self.crossattention = AttentionBlock(config, encoder_width)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: Tensor, keep: Tensor | None, vision: Tensor | None = None,
                vision_keep: Tensor | None = None) -> Tensor:
        x = self.attention(x, x, keep)
        if self.has_cross_attention:
            if vision is None:
                raise ValueError("a fusion layer needs the vision tokens")
            x = self.crossattention(x, vision, vision_keep)
        return self.output(self.intermediate(x), x)


class BertEncoderLayers(nn.Module):
    """``layer.{l}``: the BERT layer stack; layers ≥ ``fusion_layer`` carry cross-attention."""

    def __init__(self, config: BertConfig, fusion_layer: int, encoder_width: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            BertFusionLayer(config, i >= fusion_layer, encoder_width) for i in range(config.num_hidden_layers)
        )


class BertTextModel(nn.Module):
    """``bert``: embeddings + the layer stack, run in text or fusion mode."""

    def __init__(self, config: BertConfig, fusion_layer: int, encoder_width: int) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoderLayers(config, fusion_layer, encoder_width)


class BertMLMHead(nn.Module):
    """``cls.predictions``: transform (dense → act → LayerNorm) then the tied decoder with its own bias."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.predictions = nn.Module()
        self.predictions.transform = BertPredictionHeadTransform(config)
        self.predictions.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: Tensor, word_embeddings: Tensor) -> Tensor:
        """hidden [..., H] → logits [..., V] with ``word_embeddings`` [V, H] as the decoder weight."""
        return F.linear(self.predictions.transform(hidden), word_embeddings, self.predictions.bias)


class BertTextEncoder(nn.Module):
    """UMT's text encoder: ``bert`` (text layers, then fusion layers) and the MLM head ``cls``.

    Args:
        config: A Hugging Face ``BertConfig`` (sizes, dropout, vocabulary).
        fusion_layer: First layer with cross-attention; 1 ≤ fusion_layer < num_hidden_layers.
        encoder_width: Width of the vision tokens the fusion layers attend to.
        mlm_head: Build ``cls`` (pretraining); retrieval fine-tuning does without it.
        gradient_checkpointing: Recompute each layer in backward (UMT enables it for BERT).
    """

    def __init__(self, config: BertConfig, fusion_layer: int, encoder_width: int, mlm_head: bool = True,
                 gradient_checkpointing: bool = False) -> None:
        super().__init__()
        if not 1 <= fusion_layer < config.num_hidden_layers:
            raise ValueError(
                f"text.fusion_layer={fusion_layer} must leave at least one text and one fusion layer "
                f"(1 ≤ fusion_layer < {config.num_hidden_layers})"
            )
        self.config, self.fusion_layer, self.encoder_width = config, fusion_layer, encoder_width
        self.gradient_checkpointing = gradient_checkpointing
        self.bert = BertTextModel(config, fusion_layer, encoder_width)
        if mlm_head:
            self.cls = BertMLMHead(config)
        self.apply(self._init_weights)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def _init_weights(self, m: nn.Module) -> None:
        # BERT's init: N(0, initializer_range) for Linear/Embedding, zero biases, LayerNorm (1, 0).
        std = self.config.initializer_range
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                nn.init.zeros_(m.weight[m.padding_idx])
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def _run(self, layers: range, x: Tensor, keep: Tensor, vision: Tensor | None, vision_keep: Tensor | None) -> Tensor:
        for i in layers:
            layer = self.bert.encoder.layer[i]
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, keep, vision, vision_keep, use_reentrant=False)
            else:
                x = layer(x, keep, vision, vision_keep)
        return x

    def forward_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Text mode: embeddings and layers ``[0, fusion_layer)``.

        Args:
            input_ids: long [B, L].
            attention_mask: [B, L], 1 for real tokens, 0 for padding.

        Returns:
            [B, L, H]; ``[:, 0]`` is the CLS feature of the contrastive loss.
        """
        x = self.bert.embeddings(input_ids=input_ids)  # [B, L, H]
        return self._run(range(self.fusion_layer), x, _keep(attention_mask), None, None)

    def forward_fusion(self, text_hidden: Tensor, attention_mask: Tensor, vision: Tensor,
                       vision_mask: Tensor | None = None) -> Tensor:
        """Fusion mode: layers ``[fusion_layer, L)`` on text-mode output, cross-attending to ``vision``.

        Args:
            text_hidden: [B, L, H] from :meth:`forward_text`.
            attention_mask: [B, L] text padding mask.
            vision: [B, N_v, C_v] vision tokens (C_v = ``encoder_width``).
            vision_mask: optional [B, N_v] (1 = attend); UMT attends to every visible token.

        Returns:
            [B, L, H]; ``[:, 0]`` feeds the matching head, every position the MLM head.
        """
        keep_v = None if vision_mask is None else _keep(vision_mask)
        layers = range(self.fusion_layer, self.config.num_hidden_layers)
        return self._run(layers, text_hidden, _keep(attention_mask), vision.to(text_hidden.dtype), keep_v)

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """[..., H] → [..., V] vocabulary logits through ``cls`` and the tied word embeddings."""
        if not hasattr(self, "cls"):
            raise RuntimeError("this text encoder was built without the MLM head (mlm_head=False)")
        return self.cls(hidden, self.bert.embeddings.word_embeddings.weight)


def _keep(mask: Tensor) -> Tensor:
    """[B, L] 1/0 mask → bool [B, 1, 1, L] for SDPA (True = attend)."""
    return mask.bool()[:, None, None, :]


# --------------------------------------------------------------------------------------------------
# building and loading


def build_text_encoder(
    name_or_path: str,
    fusion_layer: int,
    encoder_width: int,
    vocab_size: int | None = None,
    mlm_head: bool = True,
    gradient_checkpointing: bool = False,
) -> BertTextEncoder:
    """A text encoder from a BERT checkpoint (hub id or local folder) or ``tiny`` (random, for tests).

    A checkpoint's self-attention, feed-forward, embedding and MLM-head weights are loaded; the
    cross-attention of the fusion layers is new (initialised as BERT initialises), as in UMT.

    Args:
        name_or_path: ``bert-base-uncased``, ``bert-large-uncased``, a local folder, or ``tiny``.
        fusion_layer: First fusion layer (UMT: 9 for BERT-base, 19 for BERT-large).
        encoder_width: Vision token width.
        vocab_size: Required for ``tiny`` (the tokenizer's size); for a checkpoint, checked against it.
        mlm_head: Keep the MLM head.
        gradient_checkpointing: See :class:`BertTextEncoder`.

    Raises:
        TextEncoderError: the checkpoint cannot be read, or its keys do not fit.
    """
    if name_or_path == TINY:
        if vocab_size is None:
            raise ValueError("a tiny text encoder needs vocab_size (the tokenizer's size)")
        return BertTextEncoder(tiny_bert_config(vocab_size), fusion_layer, encoder_width, mlm_head, gradient_checkpointing)
    from transformers import BertForMaskedLM

    try:
        config = BertConfig.from_pretrained(name_or_path)
        hf_state = BertForMaskedLM.from_pretrained(name_or_path).state_dict()
    except (OSError, ValueError) as e:
        hint = " (offline? pass a local folder with config.json and the weights)" if not Path(name_or_path).exists() else ""
        raise TextEncoderError(f"{name_or_path}: cannot load a BERT checkpoint: {e}{hint}") from None
    if vocab_size is not None and vocab_size > config.vocab_size:
        raise TextEncoderError(f"{name_or_path}: the tokenizer has {vocab_size} tokens, the model only {config.vocab_size}")
    model = BertTextEncoder(config, fusion_layer, encoder_width, mlm_head, gradient_checkpointing)
    load_bert_weights(model, hf_state, source=name_or_path)
    return model


def load_bert_weights(model: BertTextEncoder, state: Mapping[str, Tensor], source: str = "<state dict>") -> list[str]:
    """Copy a Hugging Face ``BertForMaskedLM`` (or ``BertModel``) state dict into ``model`` by name.

    Cross-attention parameters (absent from BERT) keep their fresh init; a tied decoder weight is
    checked against the word embeddings and dropped. Any other missing, unexpected or mis-shaped key
    is an error.

    Returns:
        The names left at their initial values (the cross-attention ones, and ``cls.*`` for a ``BertModel``).
    """
    state = dict(state)
    if not any(k.startswith("bert.") for k in state):  # a BertModel: no "bert." prefix
        state = {f"bert.{k}": v for k, v in state.items()}
    state = drop_tied_and_buffers(state, source, prefix="")
    for k in [k for k in state if k.startswith(("bert.pooler.", "cls.seq_relationship."))]:
        del state[k]  # next-sentence heads are not part of UMT's text encoder
    expected = model.state_dict()
    new = {k for k in expected if ".crossattention." in k}
    if not any(k.startswith("cls.") for k in state):
        new |= {k for k in expected if k.startswith("cls.")}
    if not hasattr(model, "cls"):
        state = {k: v for k, v in state.items() if not k.startswith("cls.")}
    missing = sorted(set(expected) - set(state) - new)
    unexpected = sorted(set(state) - set(expected))
    bad = [f"{k} {list(state[k].shape)} vs {list(expected[k].shape)}" for k in set(state) & set(expected)
           if state[k].shape != expected[k].shape]
    if missing or unexpected or bad:
        raise TextEncoderError(f"{source}: BERT weights do not fit the text encoder: missing {missing[:8]}, "
                               f"unexpected {unexpected[:8]}, shape mismatches {bad[:8]}")
    model.load_state_dict(state, strict=False)
    return sorted(new)


def drop_tied_and_buffers(state: dict[str, Tensor], source: str, prefix: str) -> dict[str, Tensor]:
    """Remove keys this module does not hold: ``position_ids`` (a constant buffer) and the tied decoder.

    ``prefix`` is what precedes ``bert.``/``cls.`` (``text_encoder.`` in a UMT stage-2 file). The decoder
    weight must equal the word embeddings and the decoder bias ``cls.predictions.bias``, otherwise the
    file holds an untied head this module cannot represent — an error, never a silent drop.
    """
    pos = state.pop(f"{prefix}bert.embeddings.position_ids", None)
    if pos is not None and not torch.equal(pos.flatten().long(), torch.arange(pos.numel())):
        raise TextEncoderError(f"{source}: {prefix}bert.embeddings.position_ids is not 0..{pos.numel() - 1}")
    state.pop(f"{prefix}bert.embeddings.token_type_ids", None)  # another constant buffer (transformers 5)
    dec_w = state.pop(f"{prefix}cls.predictions.decoder.weight", None)
    words = state.get(f"{prefix}bert.embeddings.word_embeddings.weight")
    if dec_w is not None and (words is None or not torch.equal(dec_w, words)):
        raise TextEncoderError(f"{source}: {prefix}cls.predictions.decoder.weight is not tied to the word embeddings")
    dec_b = state.pop(f"{prefix}cls.predictions.decoder.bias", None)
    bias_key = f"{prefix}cls.predictions.bias"
    if dec_b is not None:
        if bias_key not in state:
            state[bias_key] = dec_b
        elif not torch.equal(dec_b, state[bias_key]):
            raise TextEncoderError(f"{source}: {prefix}cls.predictions.decoder.bias differs from {bias_key}")
    return state

