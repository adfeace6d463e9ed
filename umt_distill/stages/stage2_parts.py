"""Parts of the stage-2 loop (``stages/stage2.py``), also used by retrieval fine-tuning: the objective that
DDP wraps, which parameters train, and VTM's hard-negative pairs.

Hard negatives are drawn by inverse-CDF sampling from an explicit ``torch.Generator`` (UMT code
@4fb4049: multi_modality/models/umt.py draws them with ``torch.multinomial`` from the global RNG).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from umt_distill.cache.captions import OnlineCaptions, read_caption_table
from umt_distill.cache.spec import read_spec
from umt_distill.cache.stores import read_index
from umt_distill.config import Recipe, RecipeError
from umt_distill.data.corpus import read_corpus
from umt_distill.data.frame_select import (
    random_frames,
    restrict_to_frames,
    topk_frames,
    uniform_frames,
)
from umt_distill.losses.uta import uta_loss
from umt_distill.losses.vl import mlm_loss, no_gather, similarity, vtc_loss, vtm_loss
from umt_distill.masking import IGNORE_INDEX, gather_visible, mlm_mask
from umt_distill.models.frame_selector import (
    FrameSelector,
    frame_features,
    perturbed_topk,
    sparse_forward_kept,
)
from umt_distill.models.sparse_vl import sparse_vision_forward
from umt_distill.models.sparsify import SparseSpec

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
                 gather: Callable[[Tensor], Tensor] = no_gather, sparse: SparseSpec | None = None,
                 selector: FrameSelectorSpec | None = None) -> None:
        super().__init__()
        self.model = model
        # the learned frame selector (frame_select.method=learned): a submodule, so DDP syncs its gradients
        self.selector = None if selector is None else selector.module
        self.selector_spec = selector
        self.sparse = sparse  # token sparsification (docs/smaug.md); None: every visible token
        self.gather = gather
        self.weights = {k: float(weights.get(k, 0.0)) for k in LOSS_NAMES}
        self.mlm_prob = mlm_prob
        self.special = dict(special_ids)
        self.hard_negatives = hard_negatives

    def forward(self, pixels: Tensor, visible_idx: Tensor | None, targets: Tensor | None, input_ids: Tensor,
                text_mask: Tensor, ids: Tensor, generator: torch.Generator,
                scores: Tensor | None = None, select: FrameStep | None = None) -> dict[str, Tensor]:
        """Weighted total ``loss`` and the unweighted parts.

        Args:
            pixels: float [B, 3, T, H, W] normalised pixels.
            visible_idx: long [B, L_vis] visible tokens (None: all).
            targets: [K, B, L_vis, D] teacher tokens at the visible positions (needed for UTA).
            input_ids, text_mask: long [B, L] caption tokens and padding mask.
            ids: long [B] sample ids.
            generator: Hard negatives and MLM masks.
            scores: [B, T', n] teacher attention at the visible tokens (``sparsify.source=teacher``).
            select: The step's frame selection (``frame_select``, video steps): the kept frames, or the
                learned selector's inputs.
        """
        m, w = self.model, self.weights
        m.clamp_temp()
        kept_frames = None
        if select is not None:  # only the kept frames' tokens, targets and token scores
            pixels, visible_idx, targets, scores, kept_frames = self._select_frames(pixels, visible_idx, targets, scores,
                                                                                   select, generator)
        if self.sparse is None:
            vision = m.vision_encoder(pixels, visible_idx, align=w["uta"] > 0)
        else:  # the blocks after sparsify.after_block see each frame's top tokens; UTA at the kept ones
            vision, kept = sparse_vision_forward(m.vision_encoder, pixels, visible_idx, self.sparse, scores, w["uta"] > 0) \
                if kept_frames is None else sparse_forward_kept(m.vision_encoder, pixels, visible_idx, self.sparse, scores,
                                                                w["uta"] > 0, kept_frames)
            targets = gather_visible(targets, kept) if targets is not None else None
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
        if self.selector is not None and select is None:  # DDP: every parameter gets a gradient each step
            total = total + 0.0 * sum(p.sum() for p in self.selector.parameters())
        return {"loss": total, **parts}

    def _select_frames(self, pixels: Tensor, visible_idx: Tensor | None, targets: Tensor | None, scores: Tensor | None,
                       select: FrameStep, generator: torch.Generator):
        """Restrict the step to its kept frames. ``learned``: score the frames with the selector and keep the
        top k (perturbed top-k, straight-through: the gate is exactly 1 on kept frames and 0 elsewhere; its
        gradient reaches the selector through the pixels)."""
        frames = select.frames
        if frames is None:
            spec, T = self.selector_spec, pixels.shape[2]
            with torch.no_grad():  # the selector's own features: the student's patch embedding, per frame
                feats = frame_features(self.model.vision_encoder.encoder.patch_embed(pixels), T)  # [B, T, C]
            frame_scores = self.selector(feats.float(), select.text.float())  # [B, T]
            frames, gate = perturbed_topk(frame_scores, spec.k, spec.sigma, spec.samples, generator)
            pixels = pixels * gate.to(pixels.dtype)[:, None, :, None, None]
            select.frames = frames.detach()  # what the step kept (for the caller's records)
        visible_idx, targets = restrict_to_frames(frames, visible_idx, targets, select.tokens_per_frame)
        if scores is not None:  # sparsify's token scores [B, T, n] -> the kept frames' [B, k, n]
            scores = scores.gather(1, frames[:, :, None].expand(-1, -1, scores.shape[2]))
        return pixels, visible_idx, targets, scores, frames.shape[1]


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


# --------------------------------------------------------------------------------------------------
# frame selection (frame_select; docs/smaug.md "Frame selection")


@dataclass
class FrameSelectorSpec:
    """The learned selector and its perturbed top-k settings."""

    module: FrameSelector
    k: int
    sigma: float
    samples: int


@dataclass
class FrameStep:
    """A video step's frame selection: the kept frames, or (learned) the selector's input, which the objective
    runs inside DDP and then records the frames it kept here."""

    frames: Tensor | None  # long [B, k] ascending; None: the learned selector chooses
    text: Tensor | None  # [B, D] the captions' CLIP text embeddings (learned)
    tokens_per_frame: int


class FrameSelection:
    """``frame_select`` in the stage-2 loop: which k frames each video step keeps.

    ``text_guided``, ``uniform`` and ``random`` choose here, before the objective; ``learned`` hands the
    objective the captions' embeddings and it runs the selector (so DDP syncs it). The objective then
    restricts the step's mask, targets and sparsify scores to the kept frames
    (``data.frame_select.restrict_to_frames``). Built by :func:`build_frame_selection`.
    """

    def __init__(self, method: str, k: int, per_segment: bool, tokens_per_frame: int, table,
                 selector: FrameSelectorSpec | None) -> None:
        self.method, self.k, self.per_segment, self.N = method, k, per_segment, tokens_per_frame
        self.table, self.selector = table, selector

    def scores(self, batch: dict, pixels: Tensor, teacher, device: torch.device) -> Tensor:
        """[B, T] CLIP frame-caption cosines: cached at cache time, or from the online teacher's ``pooled``."""
        if teacher is None:
            return self.table.batch_scores(batch["clip_id"], batch["view_index"].tolist(), batch["caption"]).to(device)
        text = self.table.batch_embeddings(batch["clip_id"], batch["caption"]).to(device)  # [B, D] unit
        pooled = F.normalize(teacher(pixels).pooled.float(), dim=-1)  # [B, T, D]
        return (pooled @ text[:, :, None]).squeeze(-1)

    def step(self, batch: dict, pixels: Tensor, teacher, generator: torch.Generator, device: torch.device) -> FrameStep:
        """The frame selection of a video step (uint8 ``pixels`` [B, T, 3, H, W])."""
        B, T = pixels.shape[:2]
        if self.method == "learned":
            text = self.table.batch_embeddings(batch["clip_id"], batch["caption"]).to(device)
            return FrameStep(None, text, self.N)
        if self.method == "uniform":
            frames = uniform_frames(B, T, self.k, device)
        elif self.method == "random":
            frames = random_frames(B, T, self.k, generator, device)
        else:
            frames = topk_frames(self.scores(batch, pixels, teacher, device), self.k, self.per_segment)
        return FrameStep(frames, None, self.N)


def build_frame_selection(cfg: Recipe, video_cfg: Recipe | None, teacher, model: nn.Module,
                          text_dim: int) -> FrameSelection | None:
    """The recipe's frame selection (None: ``frame_select.method=none``, or no video source).

    Args:
        video_cfg: The video source's recipe view (None without a video source).
        teacher: The online teacher (None: cached; the store's caption files are read).
        text_dim: Width of the teacher's joint space (the caption embeddings).

    Raises:
        RecipeError: k larger than the views' frames, a tubelet of several frames, a ``random`` mask, token
            sparsification at the same time, or a store cached without captions.
    """
    fs = cfg.frame_select
    if fs.method == "none" or video_cfg is None:
        return None
    T, size = video_cfg.views.num_frames, video_cfg.views.size
    if fs.keep_frames > T:
        raise RecipeError(f"frame_select.keep_frames={fs.keep_frames}: the views have {T} frames (views.num_frames)")
    t, h, w = model.vision_encoder.encoder.patch_embed.grid(T, size, size)
    if t != T:
        raise RecipeError(f"frame_select keeps frames, but the student's tokens span {T // t} frames "
                          "(stage2.tubelet_size): use tubelet_size 1 with frame selection")
    if cfg.mask.type == "random" and not (cfg.teacher.mode == "cached" and cfg.cache.mode == "visible"):
        raise RecipeError("frame_select needs a mask with the same count in every frame: mask.type semantic or tube")
    table = None
    if fs.method in ("text_guided", "learned"):
        if teacher is not None:
            table = OnlineCaptions(read_corpus(video_cfg.corpus.source, video_cfg.corpus.root), teacher)
        else:
            store = video_cfg.cache.store
            table = read_caption_table(store, read_spec(store), [s["name"] for s in read_index(store)["shards"]])
            if table is None:
                raise RecipeError(f"{store}: the store was cached without captions, which frame_select.method="
                                  f"{fs.method} needs: cache-teacher into a new store (frame_select.cache_captions="
                                  "true, a teacher with a text tower), or use frame_select.method=uniform or random")
    selector = None
    if fs.method == "learned":
        module = FrameSelector(model.vision_encoder.embed_dim, text_dim, fs.selector_hidden)
        selector = FrameSelectorSpec(module, fs.keep_frames, fs.selector_sigma, fs.selector_samples)
    return FrameSelection(fs.method, fs.keep_frames, fs.per_segment, h * w, table, selector)
