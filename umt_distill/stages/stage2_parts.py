"""Parts of the stage-2 loop (``stages/stage2.py``), also used by retrieval fine-tuning: the objective that
DDP wraps, which parameters train, and VTM's hard-negative pairs.

Hard negatives are drawn by inverse-CDF sampling from an explicit ``torch.Generator`` (UMT code
@4fb4049: multi_modality/models/umt.py draws them with ``torch.multinomial`` from the global RNG).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from umt_distill.losses.uta import uta_loss
from umt_distill.losses.vl import mlm_loss, no_gather, similarity, vtc_loss, vtm_loss
from umt_distill.masking import IGNORE_INDEX, mlm_mask

LOSS_NAMES = ("uta", "vtc", "vtm", "mlm")


class VTMError(ValueError):
    """A batch offers no negative for some sample (e.g. one sample per rank, or one repeated id)."""


# --------------------------------------------------------------------------------------------------
# VTM's matching batch: positives and hard negatives


def negative_weights(sim: Tensor, ids_rows: Tensor, ids_cols: Tensor) -> Tensor:
    """softmax over each row of ``sim`` with positives set to 0 (float64, not renormalised)."""
    weights = F.softmax(sim.double(), dim=1)
    weights = weights.masked_fill(ids_rows[:, None] == ids_cols[None, :], 0.0)
    empty = (weights.sum(1) <= 0).nonzero().flatten()
    if len(empty):
        raise VTMError(f"sample {int(empty[0])} of the batch has no negative (batch of {len(ids_cols)} with "
                       f"{len(set(ids_cols.tolist()))} distinct ids); VTM needs at least 2 distinct samples per rank")
    return weights


def sample_rows(weights: Tensor, generator: torch.Generator) -> Tensor:
    """One column per row drawn ∝ ``weights`` [R, C] (≥ 0) by inverse CDF; zero-weight columns never.

    Uniforms come from ``generator`` (on its device); the result is long [R] on ``weights``' device.
    """
    w = weights.double().cpu()  # tiny [R, C]; one host transfer keeps the draw device-independent
    cdf = w.cumsum(1)  # [R, C]
    u = torch.rand(w.shape[0], generator=generator, dtype=torch.float64, device=generator.device).cpu()
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)  # first cdf > u·total
    last_positive = (w > 0).cumsum(1).argmax(1)  # rounding guard: never past the last positive column
    return torch.minimum(idx, last_positive).to(weights.device)


def sample_rows_reference(weights: Tensor, u: Sequence[float]) -> list[int]:
    """Plain inverse-CDF sampling with given uniforms (the same ``u`` :func:`sample_rows` draws)."""
    out = []
    for r, ur in enumerate(u):
        row = [float(x) for x in weights[r]]
        target, acc, choice = ur * sum(row), 0.0, None
        for c, x in enumerate(row):
            acc += x
            if x > 0 and acc > target:
                choice = c
                break
        if choice is None:  # rounding: the last positive column
            choice = max(c for c, x in enumerate(row) if x > 0)
        out.append(choice)
    return out


def vtm_pairs(sim: Tensor, ids: Tensor, generator: torch.Generator, hard: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """UMT's matching batch: B positives, one hard negative video per text, one hard negative text per video.

    Args:
        sim: [B, B] vision→text similarities (already divided by the temperature), no gradient needed.
        ids: long [B] sample ids.
        generator: Draws the negatives.
        hard: Draw ∝ softmax(sim) (UMT); False: uniformly among the non-positives.

    Returns:
        (vision_index [3B], text_index [3B], labels [3B]) with labels 1 for the first B pairs, 0 after.
    """
    B = sim.shape[0]
    if not hard:
        sim = torch.zeros_like(sim)  # softmax of a constant row: uniform
    with torch.no_grad():
        neg_text = sample_rows(negative_weights(sim, ids, ids), generator)  # [B] per video
        neg_video = sample_rows(negative_weights(sim.t(), ids, ids), generator)  # [B] per text
    ar = torch.arange(B, device=sim.device)
    vision_index = torch.cat([ar, neg_video, ar])
    text_index = torch.cat([ar, ar, neg_text])
    labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)]).to(sim.device)
    return vision_index, text_index, labels


# --------------------------------------------------------------------------------------------------
# the stage-2 objective


class Stage2Objective(nn.Module):
    """UTA + VTC + VTM + MLM for one homogeneous batch (all video or all image); DDP wraps this module.

    Args:
        model: A :class:`~umt_distill.models.umt_vl.UMTVisionLanguage`.
        weights: Loss weights by name (``uta``, ``vtc``, ``vtm``, ``mlm``); a 0 weight skips the loss.
        mlm_prob: Fraction of text tokens chosen for MLM (UMT: 0.5).
        special_ids: ``pad``, ``cls`` and ``mask`` token ids of the tokenizer.
        hard_negatives: VTM negatives ∝ similarity (UMT) or uniform.
        gather: VTC's gather over ranks; the loop passes
            :func:`~umt_distill.training.distributed.gather_with_grad` (default: this rank's batch only).
    """

    def __init__(self, model: nn.Module, weights: Mapping[str, float], mlm_prob: float,
                 special_ids: Mapping[str, int], hard_negatives: bool = True,
                 gather: Callable[[Tensor], Tensor] = no_gather) -> None:
        super().__init__()
        self.model = model
        self.gather = gather
        self.weights = {k: float(weights.get(k, 0.0)) for k in LOSS_NAMES}
        self.mlm_prob = mlm_prob
        self.special = dict(special_ids)
        self.hard_negatives = hard_negatives

    def forward(self, pixels: Tensor, visible_idx: Tensor | None, targets: Tensor | None, input_ids: Tensor,
                text_mask: Tensor, ids: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """Weighted total ``loss`` and the unweighted parts.

        Args:
            pixels: float [B, 3, T, H, W] normalised pixels.
            visible_idx: long [B, L_vis] visible tokens (None: all).
            targets: [K, B, L_vis, D] teacher tokens at the visible positions (needed for UTA).
            input_ids, text_mask: long [B, L] caption tokens and padding mask.
            ids: long [B] sample ids.
            generator: Hard negatives and MLM masks.
        """
        m, w = self.model, self.weights
        m.clamp_temp()
        vision = m.vision_encoder(pixels, visible_idx, align=w["uta"] > 0)
        text_hidden = m.text_encoder.forward_text(input_ids, text_mask)  # [B, L, H]
        parts: dict[str, Tensor] = {}
        if w["uta"] > 0:
            parts["uta"] = uta_loss(vision.aligned.float(), targets)[0]
        v_emb = m.vision_embedding(vision.pooled)  # [B, T', E]
        t_emb = m.text_embedding(text_hidden)  # [B, E]
        if w["vtc"] > 0:
            parts["vtc"] = vtc_loss(v_emb, t_emb, ids, m.temp, self.gather)
        if w["vtm"] > 0:  # local batch only, as in UMT
            with torch.no_grad():
                sim = similarity(v_emb.float(), t_emb.float()) / m.temp
            vi, ti, labels = vtm_pairs(sim, ids, generator, self.hard_negatives)
            logits = m.match_logits(text_hidden[ti], text_mask[ti], vision.tokens[vi])  # [3B, 2]
            parts["vtm"] = vtm_loss(logits, labels)
        if w["mlm"] > 0:
            s = self.special
            masked, labels = mlm_mask(input_ids, self.mlm_prob, s["pad"], s["cls"], s["mask"],
                                      m.text_encoder.vocab_size, generator)
            hidden = m.text_encoder.forward_text(masked, text_mask)
            fused = m.text_encoder.forward_fusion(hidden, text_mask, vision.tokens)  # [B, L, H]
            chosen = labels != IGNORE_INDEX
            # Logits only where a label exists: [M, V] instead of [B, L, V] (same loss, far less memory).
            parts["mlm"] = mlm_loss(m.text_encoder.mlm_logits(fused[chosen]), labels[chosen])
        total = sum(w[k] * v for k, v in parts.items())
        return {"loss": total, **parts}


def freeze_unused(model: nn.Module, weights: Mapping[str, float]) -> list[str]:
    """Turn off gradients of parameters that no loss with a positive weight uses.

    DDP (without ``find_unused_parameters``) needs every trainable parameter to get a gradient each
    step; the optimizer then skips the frozen ones as well.

    Returns:
        The frozen parameter names.
    """
    w = {k: float(weights.get(k, 0.0)) for k in LOSS_NAMES}
    prefixes = []
    if w["uta"] <= 0:
        prefixes.append("vision_encoder.clip_decoder.")
    if w["vtc"] <= 0:  # VTM still uses the projections for its sampling, without gradients
        prefixes += ["vision_proj.", "text_proj.", "temp", "vision_encoder.pool_norm."]
    if w["vtm"] <= 0:
        prefixes.append("itm_head.")
    if w["mlm"] <= 0:
        prefixes.append("text_encoder.cls.")
    if w["vtm"] <= 0 and w["mlm"] <= 0:
        fusion = model.text_encoder.fusion_layer
        prefixes += [f"text_encoder.bert.encoder.layer.{i}." for i in range(fusion, model.text_encoder.config.num_hidden_layers)]
    frozen = []
    for name, p in model.named_parameters():
        if any(name == pre or name.startswith(pre) for pre in prefixes):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen
