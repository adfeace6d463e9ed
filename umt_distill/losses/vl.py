"""Stage-2 vision-text losses: contrastive (VTC), matching (VTM) and masked language modelling (MLM).

Each loss has a vectorised implementation used in training and a plain-loop ``*_reference`` kept for
the parity tests. What feeds them lives elsewhere: the stage-2 objective, VTM's hard-negative pairs and
``freeze_unused`` in :mod:`umt_distill.stages.stage2_parts`, MLM's token masking in
:mod:`umt_distill.masking`, sample ids in :mod:`umt_distill.data.vl`.

Differences from UMT's code (UMT code @4fb4049: multi_modality/models/criterions.py), on purpose:

- VTC over the global batch takes the cross-rank gather as an argument; the loops pass
  :func:`umt_distill.training.distributed.gather_with_grad`, whose backward sums the gradient over
  ranks (UMT's leaves the contrastive gradient divided by the world size).
- Positives are decided by a globally unique sample id (a hash of source and clip id), not by the
  per-dataset row index, which repeats across the video and image datasets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def no_gather(x: Tensor) -> Tensor:
    """The default gather of :func:`vtc_loss`: this rank's batch only (one process needs nothing else)."""
    return x


# --------------------------------------------------------------------------------------------------
# VTC


def similarity(vision: Tensor, text: Tensor) -> Tensor:
    """Cosine similarities averaged over pooled frames: vision [Bv, T', E], text [Bt, E] (unit norm) → [Bv, Bt]."""
    return torch.einsum("vte,ne->vnt", vision, text).mean(-1)


def positive_targets(ids_rows: Tensor, ids_cols: Tensor) -> Tensor:
    """Row-normalised ``ids_rows[i] == ids_cols[j]`` (soft targets; repeated ids share the mass)."""
    pos = (ids_rows[:, None] == ids_cols[None, :]).float()  # [R, C]
    return pos / pos.sum(1, keepdim=True).clamp_min(1.0)


def vtc_loss(vision: Tensor, text: Tensor, ids: Tensor, temp: Tensor,
             gather: Callable[[Tensor], Tensor] = no_gather) -> Tensor:
    """Symmetric contrastive loss over the global batch.

    Args:
        vision: [B, T', E] unit-norm vision embeddings of this rank.
        text: [B, E] unit-norm text embeddings.
        ids: long [B] sample ids (equal id = positive pair).
        temp: scalar temperature.
        gather: Concatenates a tensor [B, ...] over ranks in rank order → [W·B, ...], gradients flowing
            back to each rank's slice (:func:`umt_distill.training.distributed.gather_with_grad`).
            Default: this rank's batch only.

    Returns:
        ½ (CE(vision→text) + CE(text→vision)) with soft targets from the ids, averaged over the global batch.
    """
    vision, text, ids = gather(vision), gather(text), gather(ids)
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


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the chosen tokens: logits [M, V] at the chosen positions, labels [M].

    With no chosen token (possible for tiny batches) the loss is 0 and stays in the graph, so every rank
    still runs the same backward.
    """
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels)
