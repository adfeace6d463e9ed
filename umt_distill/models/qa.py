"""Video question answering as UMT does it: answers are *generated* by a BERT decoder, not classified.

Layout (UMT code @4fb4049: multi_modality/models/umt_qa.py, after SINGULARITY's VQA model):

- ``vision_encoder``: the stage-2 model's video encoder, run on all tokens (no mask);
- ``text_encoder``: the stage-2 BERT; the question runs through its text layers, then its fusion layers
  cross-attending the video tokens ("question states", [B, L_q, H]);
- ``text_decoder``: a BERT language-model head model with ``L - fusion_layer`` layers, each with causal
  self-attention and a cross-attention to the question states; it generates the answer from ``[CLS]``.

The decoder is initialised from the stage-2 model's *fusion layers* (layer ``fusion_layer + i`` →
decoder layer ``i``), its embeddings and its MLM head, as UMT's QA set-up copies them
(multi_modality/tasks/vqa.py, ``setup_model``: text_encoder keys of a layer ≥ fusion_layer are renamed to
``text_decoder`` with the layer shifted down; UMT shifts by a hard-coded 9, right for BERT-base only —
here the shift is ``fusion_layer``). The fusion layers' cross-attention read the vision
tokens; the decoder's read the question states, so the copy needs the vision width to equal the BERT
width (B/16 + BERT-base: 768 and 768; L/16 + BERT-large: 1024 and 1024).

The loss (:func:`answer_loss`) is the summed token cross-entropy of each answer, weighted by the
answer's share of its question's annotations, summed and divided by the number of questions.

This module must not import ``torch.distributed``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from umt_distill.models.checkpoints import load_exact
from umt_distill.models.text import (
    BertMLMHead,
    BertTextEncoder,
    BertTextModel,
    _keep,
    drop_tied_and_buffers,
)
from umt_distill.models.umt_vl import VisionEncoder

IGNORE = -100  # target id of padding: no loss


class AnswerDecoder(nn.Module):
    """``text_decoder``: ``bert.{embeddings,encoder.layer.*}`` and ``cls`` (Hugging Face names, like the encoder).

    Every layer has causal self-attention over the answer and a cross-attention to the question states.

    Args:
        text_encoder: The stage-2 text encoder whose config (width, heads, vocabulary) the decoder shares;
            the decoder has ``num_hidden_layers - fusion_layer`` layers. Weights are fresh here;
            :func:`copy_fusion_layers` copies them.
        gradient_checkpointing: Recompute each layer in backward.
    """

    def __init__(self, text_encoder: BertTextEncoder, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        base = text_encoder.config
        self.config = copy.deepcopy(base)
        self.config.num_hidden_layers = base.num_hidden_layers - text_encoder.fusion_layer
        self.gradient_checkpointing = gradient_checkpointing
        # fusion_layer=0: every layer cross-attends, to question states of the BERT width.
        self.bert = BertTextModel(self.config, 0, base.hidden_size)
        self.cls = BertMLMHead(self.config)
        self.apply(text_encoder._init_weights)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def forward(self, input_ids: Tensor, attention_mask: Tensor, question_states: Tensor, question_mask: Tensor) -> Tensor:
        """Next-token logits of every answer position.

        Args:
            input_ids: long [B, La], starting with ``[CLS]``.
            attention_mask: [B, La], 1 for real tokens.
            question_states: [B, Lq, H] the text encoder's fusion output.
            question_mask: [B, Lq] question padding mask.

        Returns:
            [B, La, V]: position ``i`` predicts token ``i + 1``.
        """
        La = input_ids.shape[1]
        causal = torch.ones(La, La, dtype=torch.bool, device=input_ids.device).tril()  # [La, La]
        keep = causal[None, None] & attention_mask.bool()[:, None, None, :]  # [B, 1, La, La]
        q_keep = _keep(question_mask)
        x = self.bert.embeddings(input_ids=input_ids)  # [B, La, H]
        states = question_states.to(x.dtype)
        for layer in self.bert.encoder.layer:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, keep, states, q_keep, use_reentrant=False)
            else:
                x = layer(x, keep, states, q_keep)
        return self.cls(x, self.bert.embeddings.word_embeddings.weight)

    def token_log_likelihood(self, input_ids: Tensor, attention_mask: Tensor, question_states: Tensor,
                             question_mask: Tensor) -> Tensor:
        """Sum over each answer's tokens after ``[CLS]`` (end token included, padding not) of log p → [B]."""
        logits = self(input_ids, attention_mask, question_states, question_mask)[:, :-1].float()  # [B, La-1, V]
        targets = answer_targets(input_ids, attention_mask)[:, 1:]  # [B, La-1]
        logp = -F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")  # [B, La-1]
        return logp.sum(1)


def answer_targets(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The answer ids with padding replaced by :data:`IGNORE` (no loss on it)."""
    return input_ids.masked_fill(attention_mask == 0, IGNORE)


def answer_loss(log_likelihood: Tensor, weights: Tensor, num_questions: int) -> Tensor:
    """UMT's answer loss: −Σ weight · log p(answer | question, video), divided by the questions.

    Args:
        log_likelihood: [N_answers] summed token log-likelihood of every (question, answer) pair.
        weights: [N_answers] each answer's share of its question's annotations (a question's sum to 1).
        num_questions: B, the batch's questions.
    """
    return -(weights * log_likelihood).sum() / num_questions


class UMTQuestionAnswering(nn.Module):
    """UMT's QA model: ``vision_encoder``, ``text_encoder`` (question × video) and ``text_decoder`` (answers).

    Args:
        vision_encoder: The stage-2 :class:`~umt_distill.models.umt_vl.VisionEncoder` (its alignment heads
            and ``pool_norm`` are kept so stage-2 weights load strictly; nothing here uses them).
        text_encoder: The stage-2 :class:`BertTextEncoder` (its MLM head, if any, is dropped).
        gradient_checkpointing: For the decoder (the encoder keeps its own setting).
    """

    def __init__(self, vision_encoder: VisionEncoder, text_encoder: BertTextEncoder,
                 gradient_checkpointing: bool = False) -> None:
        super().__init__()
        if text_encoder.encoder_width != vision_encoder.embed_dim:
            raise ValueError(f"text encoder cross-attends to width {text_encoder.encoder_width}, "
                             f"the vision encoder is {vision_encoder.embed_dim} wide")
        self.vision_encoder = vision_encoder
        if hasattr(text_encoder, "cls"):
            del text_encoder.cls  # the question side needs no MLM head; the decoder has its own
        self.text_encoder = text_encoder
        self.text_decoder = AnswerDecoder(text_encoder, gradient_checkpointing)

    def vision_tokens(self, pixels: Tensor) -> Tensor:
        """float [B, 3, T, H, W] → final-norm tokens [B, T·N, C] (all tokens, no mask)."""
        return self.vision_encoder(pixels, None, align=False).tokens

    def question_states(self, input_ids: Tensor, attention_mask: Tensor, vision: Tensor) -> Tensor:
        """Question [B, Lq] through the text layers, then the fusion layers attending ``vision`` → [B, Lq, H]."""
        hidden = self.text_encoder.forward_text(input_ids, attention_mask)
        return self.text_encoder.forward_fusion(hidden, attention_mask, vision)

    def forward(self, pixels: Tensor, question_ids: Tensor, question_mask: Tensor, answer_ids: Tensor,
                answer_mask: Tensor, answer_question: Tensor, weights: Tensor) -> Tensor:
        """The answer loss of one batch.

        Args:
            pixels: float [B, 3, T, H, W].
            question_ids, question_mask: long [B, Lq].
            answer_ids, answer_mask: long [N, La], every annotated answer of every question.
            answer_question: long [N], the question each answer belongs to.
            weights: [N], each answer's share of its question's annotations.
        """
        states = self.question_states(question_ids, question_mask, self.vision_tokens(pixels))  # [B, Lq, H]
        ll = self.text_decoder.token_log_likelihood(answer_ids, answer_mask, states[answer_question],
                                                    question_mask[answer_question])  # [N]
        return answer_loss(ll, weights.to(ll.dtype), pixels.shape[0])

    def no_weight_decay(self) -> set[str]:
        """Full names without weight decay: every 1-D parameter."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1}


# --------------------------------------------------------------------------------------------------
# initialisation from a stage-2 model (ours or UMT's official file: the names are the same)

_TEACHER = "clip_teacher."
_STAGE2_ONLY = ("vision_proj.", "text_proj.", "itm_head.", "temp")  # contrastive and matching heads: unused by QA
_LAYER = re.compile(r"^text_encoder\.bert\.encoder\.layer\.(\d+)\.(.*)$")


def qa_state_from_stage2(state: Mapping[str, Tensor], fusion_layer: int, source: str = "<state dict>") -> dict[str, Tensor]:
    """A stage-2 state dict (ours, or UMT's multi_modality/tasks/pretrain.py file) → the QA model's names.

    Kept as they are: ``vision_encoder.*`` and ``text_encoder.bert.*``. Copied into the decoder:
    ``text_encoder.bert.embeddings.*`` → ``text_decoder.bert.embeddings.*``, the fusion layers
    ``text_encoder.bert.encoder.layer.{l ≥ fusion_layer}.*`` → ``text_decoder.bert.encoder.layer.{l −
    fusion_layer}.*`` and ``text_encoder.cls.*`` → ``text_decoder.cls.*`` (the MLM head leaves the encoder).
    Dropped by rule: ``clip_teacher.*``, the contrastive/matching heads and ``temp``, the ``position_ids``
    buffer and the tied decoder weight (both checked by :func:`~umt_distill.models.text.drop_tied_and_buffers`).
    """
    state = {k: v for k, v in state.items() if not k.startswith(_TEACHER) and not k.startswith(_STAGE2_ONLY)}
    state = drop_tied_and_buffers(state, source, prefix="text_encoder.")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("text_encoder.cls."):
            out["text_decoder." + key[len("text_encoder."):]] = value
            continue
        out[key] = value
        if key.startswith("text_encoder.bert.embeddings."):
            out["text_decoder." + key[len("text_encoder."):]] = value
        elif (m := _LAYER.match(key)) and int(m.group(1)) >= fusion_layer:
            out[f"text_decoder.bert.encoder.layer.{int(m.group(1)) - fusion_layer}.{m.group(2)}"] = value
    return out


def load_qa_state(model: UMTQuestionAnswering, state: Mapping[str, Tensor], source: str = "<state dict>") -> int:
    """Load a QA state dict strictly (every key, name and shape); returns the number of tensors loaded.

    Raises:
        CheckpointMismatchError: missing, unexpected or mis-shaped keys (all listed).
    """
    return load_exact(model, state, source)


def is_qa_state(state: Mapping[str, object]) -> bool:
    """Whether a state dict is a QA model's (it has a decoder) rather than a stage-2 model's."""
    return any(k.startswith("text_decoder.") for k in state)


__all__ = [
    "IGNORE",
    "AnswerDecoder",
    "UMTQuestionAnswering",
    "answer_loss",
    "answer_targets",
    "is_qa_state",
    "load_qa_state",
    "qa_state_from_stage2",
]
