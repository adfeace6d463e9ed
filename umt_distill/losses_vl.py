"""Stage-2 vision-text losses: contrastive (VTC), matching (VTM) and masked language modelling (MLM).

Each loss has a vectorised implementation used in training and a plain-loop ``*_reference`` kept for
the parity tests. :class:`Stage2Objective` combines them with the UTA loss for one batch; the stage-2
loop wraps it in DDP, so every parameter it uses is seen by one ``forward``.

Differences from UMT's code (UMT code @4fb4049: multi_modality/models/criterions.py, ``AllGather`` in
multi_modality/models/utils.py), on purpose:

- The cross-rank gather of the contrastive embeddings sums the gradient over ranks in backward.
  UMT's gather returns only the local slice, which after DDP's averaging leaves the contrastive
  gradient divided by the world size.
- Positives are decided by a globally unique sample id (a hash of source and clip id), not by the
  per-dataset row index, which repeats across the video and image datasets.
- Hard negatives are drawn by inverse-CDF sampling from an explicit ``torch.Generator``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from umt_distill.losses import uta_loss

IGNORE_INDEX = -100
LOSS_NAMES = ("uta", "vtc", "vtm", "mlm")


class VTMError(ValueError):
    """A batch offers no negative for some sample (e.g. one sample per rank, or one repeated id)."""


# --------------------------------------------------------------------------------------------------
# sample ids and the cross-rank gather


def sample_id(source: str, clip_id: str) -> int:
    """A 63-bit id unique to (source, clip): equal ids are the same sample, on every rank."""
    digest = hashlib.sha256(f"{source}\x00{clip_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums every rank's gradient for the local slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, world = _world()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # Every rank's loss depends on every rank's rows: d(Σ_r loss_r)/d(local rows) is the sum over
        # ranks of each rank's gradient for those rows. DDP then averages parameter gradients over
        # ranks; since every rank computes the same global contrastive loss, the result is exactly the
        # single-process gradient of that loss.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # sync point
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` [B, ...] from all ranks in rank order → [W·B, ...], gradients kept (see above)."""
    if _world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` [B, ...] from all ranks (ids, masks): no gradient."""
    if _world()[1] == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_world()[1])]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


# --------------------------------------------------------------------------------------------------
# VTC


def similarity(vision: Tensor, text: Tensor) -> Tensor:
    """Cosine similarities averaged over pooled frames: vision [Bv, T', E], text [Bt, E] (unit norm) → [Bv, Bt]."""
    return torch.einsum("vte,ne->vnt", vision, text).mean(-1)


def positive_targets(ids_rows: Tensor, ids_cols: Tensor) -> Tensor:
    """Row-normalised ``ids_rows[i] == ids_cols[j]`` (soft targets; repeated ids share the mass)."""
    pos = (ids_rows[:, None] == ids_cols[None, :]).float()  # [R, C]
    return pos / pos.sum(1, keepdim=True).clamp_min(1.0)


def vtc_loss(vision: Tensor, text: Tensor, ids: Tensor, temp: Tensor, gather: bool = True) -> Tensor:
    """Symmetric contrastive loss over the global batch.

    Args:
        vision: [B, T', E] unit-norm vision embeddings of this rank.
        text: [B, E] unit-norm text embeddings.
        ids: long [B] sample ids (equal id = positive pair).
        temp: scalar temperature.
        gather: Gather embeddings and ids from all ranks (no-op in one process).

    Returns:
        ½ (CE(vision→text) + CE(text→vision)) with soft targets from the ids, averaged over the global batch.
    """
    if gather:
        vision, text, ids = gather_with_grad(vision), gather_with_grad(text), gather_no_grad(ids)
    sim = similarity(vision.float(), text.float()) / temp  # [N, N], rows = videos
    targets = positive_targets(ids, ids)  # [N, N]
    v2t = -(F.log_softmax(sim, dim=1) * targets).sum(1).mean()
    t2v = -(F.log_softmax(sim.t(), dim=1) * targets.t()).sum(1).mean()
    return (v2t + t2v) / 2


def vtc_loss_reference(vision: Tensor, text: Tensor, ids: Sequence[int], temp: float) -> Tensor:
    """One pair at a time, in float64: the definition :func:`vtc_loss` must equal (one process)."""
    n = len(ids)
    sim = [[sum(float(torch.dot(vision[i, t].double(), text[j].double())) for t in range(vision.shape[1]))
            / vision.shape[1] / temp for j in range(n)] for i in range(n)]

    def direction(s: list[list[float]]) -> float:
        total = 0.0
        for i in range(n):
            log_z = math.log(sum(math.exp(v) for v in s[i]))
            pos = [j for j in range(n) if ids[j] == ids[i]]
            total += -sum(s[i][j] - log_z for j in pos) / len(pos)
        return total / n

    transposed = [[sim[j][i] for j in range(n)] for i in range(n)]
    return torch.tensor((direction(sim) + direction(transposed)) / 2, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# VTM


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


def vtm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of the 2-way matching head: logits [P, 2], labels long [P]."""
    return F.cross_entropy(logits.float(), labels)


def vtm_loss_reference(logits: Tensor, labels: Sequence[int]) -> Tensor:
    total = 0.0
    for row, y in zip(logits.double().tolist(), labels):
        total += math.log(sum(math.exp(v) for v in row)) - row[y]
    return torch.tensor(total / len(labels), dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# MLM


def draw_mlm_noise(shape: tuple[int, int], vocab_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The randomness of one MLM masking: uniforms [B, L, 3] and random token ids [B, L] (CPU)."""
    u = torch.rand((*shape, 3), generator=generator, device=generator.device).cpu()
    random_ids = torch.randint(vocab_size, shape, generator=generator, device=generator.device).cpu()
    return u, random_ids


def apply_mlm_mask(input_ids: Tensor, noise: tuple[Tensor, Tensor], prob: float, pad_id: int, cls_id: int,
                   mask_id: int) -> tuple[Tensor, Tensor]:
    """BERT masking with UMT's rate: each token but PAD/CLS is chosen with ``prob``; of those 80 % become
    [MASK], 10 % a random id, 10 % stay (SEP can be chosen, as in UMT).

    Returns:
        (masked input ids [B, L], labels [B, L]: the original id where chosen, -100 elsewhere).
    """
    u, random_ids = (t.to(input_ids.device) for t in noise)
    eligible = (input_ids != pad_id) & (input_ids != cls_id)
    chosen = eligible & (u[..., 0] < prob)
    to_mask = chosen & (u[..., 1] < 0.8)
    to_random = chosen & ~to_mask & (u[..., 2] < 0.5)
    out = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    out = torch.where(to_random, random_ids, out)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return out, labels


def apply_mlm_mask_reference(input_ids: Tensor, noise: tuple[Tensor, Tensor], prob: float, pad_id: int,
                             cls_id: int, mask_id: int) -> tuple[Tensor, Tensor]:
    u, random_ids = noise
    out, labels = input_ids.clone(), torch.full_like(input_ids, IGNORE_INDEX)
    for b in range(input_ids.shape[0]):
        for i in range(input_ids.shape[1]):
            tok = int(input_ids[b, i])
            if tok in (pad_id, cls_id) or not float(u[b, i, 0]) < prob:
                continue
            labels[b, i] = tok
            if float(u[b, i, 1]) < 0.8:
                out[b, i] = mask_id
            elif float(u[b, i, 2]) < 0.5:
                out[b, i] = int(random_ids[b, i])
    return out, labels


def mlm_mask(input_ids: Tensor, prob: float, pad_id: int, cls_id: int, mask_id: int, vocab_size: int,
             generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """:func:`apply_mlm_mask` with fresh noise from ``generator``."""
    return apply_mlm_mask(input_ids, draw_mlm_noise(tuple(input_ids.shape), vocab_size, generator), prob, pad_id,
                          cls_id, mask_id)


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the chosen tokens: logits [M, V] at the chosen positions, labels [M].

    With no chosen token (possible for tiny batches) the loss is 0 and stays in the graph, so every rank
    still runs the same backward.
    """
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels)


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
    """

    def __init__(self, model: nn.Module, weights: Mapping[str, float], mlm_prob: float,
                 special_ids: Mapping[str, int], hard_negatives: bool = True) -> None:
        super().__init__()
        self.model = model
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
            parts["vtc"] = vtc_loss(v_emb, t_emb, ids, m.temp)
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
