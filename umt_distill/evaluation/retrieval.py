"""Video-text retrieval and multiple-choice evaluation with UMT's stage-2 protocol (UMT code @4fb4049:
multi_modality/tasks/retrieval_utils.py).

1. Every caption through the text-mode BERT layers ([Nt, L, H] + padding mask + CLS embedding).
2. Every video on one canonical view (``eval_center``: segment midpoints, centre crop) through the
   vision encoder without a mask, pooled per frame (``keep_temporal``: [Nv, T, E]) and all its tokens
   ([Nv, T·N, C], kept on the CPU).
3. Contrastive (ITC) scores: cosine of the projections averaged over frames, no temperature.
4. Re-ranking: for each video its top-k texts by ITC, and for each text its top-k videos, are scored by
   the matching head (raw "match" logit of the fusion CLS); everything outside the top-k ranks last.
   The final ranking uses the matching logit only, as UMT does.
5. Recall@1/5/10, median and mean rank (1-based) in both directions; with several true items (a video's
   captions) the best-ranked one counts. ``r_mean`` is the mean of the six recalls.

Ties are broken against the true item (a true item ranks below every other item with the same score),
so a constant scorer cannot look good. UMT breaks ties by array order.

Multiple-choice QA as retrieval (UMT's MSRVTT-MC): each candidate text (question + answer) is scored
against its video; UMT's score blends 0.7 × the matching probability with 0.3 × a softmax over the
candidates of the contrastive similarity / temperature (:func:`blended_mc_scores`); the matching logit
alone and the contrastive score alone are reported beside it. The prediction is the best candidate.

Under torchrun every rank encodes everything (as UMT does) and re-ranks every world_size-th row; the
score matrices are summed across ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from umt_distill.config import Recipe
from umt_distill.data.clipviews import clip_frame_range
from umt_distill.data.corpus import read_corpus
from umt_distill.data.pixels import normalize_video
from umt_distill.data.text import tokenize
from umt_distill.data.video import open_video
from umt_distill.data.views import apply_view, sample_view
from umt_distill.losses.vl import similarity
from umt_distill.training.distributed import rank_world, sum_over_ranks
from umt_distill.training.loop import build_loader
from umt_distill.training.progress import track

DEFAULT_K_TEST = 128
RECALL_AT = (1, 5, 10)
PAIR_BATCH = 32  # fusion passes per forward, as UMT batches them


# --------------------------------------------------------------------------------------------------
# metrics


def ground_truth_ranks(scores: Tensor, positives: Tensor) -> Tensor:
    """1-based rank of the best-ranked true item of every query.

    Args:
        scores: [Q, C] higher = better (may hold -inf for items left out of re-ranking).
        positives: bool [Q, C], at least one True per row.

    Returns:
        long [Q]: 1 + the number of false items scoring at least as high as the best true item.
    """
    if not bool(positives.any(1).all()):
        row = int((~positives.any(1)).nonzero()[0])
        raise ValueError(f"query {row} has no true item")
    best = scores.masked_fill(~positives, float("-inf")).max(1, keepdim=True).values  # [Q, 1]
    return 1 + ((scores >= best) & ~positives).sum(1)


def rank_summary(ranks: Tensor, prefix: str) -> dict[str, float]:
    """Recall@1/5/10 (percent), median and mean rank of 1-based ``ranks`` [Q]."""
    out = {f"{prefix}_r{k}": 100.0 * float((ranks <= k).double().mean()) for k in RECALL_AT}
    out[f"{prefix}_medr"] = float(ranks.double().quantile(0.5))  # the mean of the middle two for an even count
    out[f"{prefix}_meanr"] = float(ranks.double().mean())
    return out


def retrieval_metrics(v2t_scores: Tensor, t2v_scores: Tensor, text_to_video: Tensor) -> dict[str, float]:
    """Both directions' metrics.

    Args:
        v2t_scores: [Nv, Nt] scores of every text for every video query.
        t2v_scores: [Nt, Nv] scores of every video for every text query.
        text_to_video: long [Nt], the video each text describes.

    Returns:
        ``v2t_r1 … v2t_meanr``, ``t2v_r1 … t2v_meanr`` and ``r_mean``.
    """
    num_videos = v2t_scores.shape[0]
    positives = text_to_video[:, None] == torch.arange(num_videos)[None, :]  # [Nt, Nv]
    out = {**rank_summary(ground_truth_ranks(v2t_scores.float(), positives.t()), "v2t"),
           **rank_summary(ground_truth_ranks(t2v_scores.float(), positives), "t2v")}
    out["r_mean"] = sum(out[f"{d}_r{k}"] for d in ("v2t", "t2v") for k in RECALL_AT) / (2 * len(RECALL_AT))
    return out


def multiple_choice_accuracy(scores: Tensor, answers: Tensor) -> float:
    """Fraction of questions whose highest-scoring candidate is the answer: scores [N, A], answers long [N]."""
    return float((scores.argmax(1) == answers).double().mean())


MC_ITM_WEIGHT = 0.7  # UMT's multiple-choice blend: 0.7 matching probability + 0.3 contrastive softmax


def blended_mc_scores(itm_logits: Tensor, itc_sim: Tensor, temp: float, itm_weight: float = MC_ITM_WEIGHT) -> Tensor:
    """UMT's multiple-choice score (UMT code @4fb4049: multi_modality/tasks/retrieval_mc.py).

    Args:
        itm_logits: [N, A, 2] matching-head logits of every (question, candidate); index 1 = match.
        itc_sim: [N, A] contrastive cosine, averaged over frames (no temperature).
        temp: The model's contrastive temperature.
        itm_weight: Weight of the matching probability; the contrastive part gets ``1 − itm_weight``.

    Returns:
        [N, A]: ``itm_weight · softmax(itm_logits)[..., 1] + (1 − itm_weight) · softmax_A(itc_sim / temp)``.
    """
    match = itm_logits.float().softmax(-1)[..., 1]  # [N, A], each candidate on its own
    contrast = (itc_sim.float() / temp).softmax(-1)  # [N, A], across the candidates
    return itm_weight * match + (1.0 - itm_weight) * contrast


def multiple_choice_texts(question: str, answers: Sequence[str]) -> list[str]:
    """The candidate texts of one question: ``question answer`` each (just the answers without a question)."""
    return [f"{question} {a}".strip() for a in answers]


# --------------------------------------------------------------------------------------------------
# top-k re-ranking


def rerank_top_k(coarse: Tensor, k: int, score_pairs: Callable[[Tensor, Tensor], Tensor],
                 rank: int = 0, world_size: int = 1) -> tuple[Tensor, Tensor]:
    """Re-score each row's top-``k`` columns of ``coarse`` with ``score_pairs``; the rest become -inf.

    Args:
        coarse: [R, C] first-stage scores (ITC).
        k: Candidates per row (capped at C).
        score_pairs: (rows long [P], cols long [P]) → float [P], the second-stage score of those pairs.
        rank, world_size: This process scores rows ``rank, rank + world_size, …``; the others stay 0
            until the caller sums the matrices over ranks (see :func:`~umt_distill.training.distributed.sum_over_ranks`).

    Returns:
        (scores float32 [R, C]: this rank's rows re-scored at their top-k, 0 elsewhere;
        in_top bool [R, C]: the top-k of every row). :func:`finish_rerank` turns them into the ranking.
    """
    R, C = coarse.shape
    k = min(k, C)
    top = coarse.topk(k, dim=1).indices  # [R, k]
    mine = torch.arange(rank, R, world_size)
    rows = mine[:, None].expand(-1, k).reshape(-1)  # [P]
    cols = top[mine].reshape(-1)  # [P]
    scores = torch.zeros(R, C, dtype=torch.float32)
    if rows.numel():
        scores[rows, cols] = score_pairs(rows, cols).float().cpu()
    in_top = torch.zeros(R, C, dtype=torch.bool)
    in_top.scatter_(1, top, True)
    return scores, in_top


def finish_rerank(scores: Tensor, in_top: Tensor) -> Tensor:
    """Items outside each row's top-k rank last (after the cross-rank sum)."""
    return scores.masked_fill(~in_top, float("-inf"))


def rerank_top_k_reference(coarse: Tensor, k: int, score: Callable[[int, int], float]) -> Tensor:
    """One row at a time: sort, keep the first ``k``, score each with ``score(row, col)``; -inf elsewhere."""
    R, C = coarse.shape
    out = torch.full((R, C), float("-inf"))
    for r in range(R):
        order = sorted(range(C), key=lambda c: -float(coarse[r, c]))
        for c in order[: min(k, C)]:
            out[r, c] = score(r, c)
    return out


# --------------------------------------------------------------------------------------------------
# features


@dataclass
class TextFeatures:
    hidden: Tensor  # [Nt, L, H] text-mode output (fusion input)
    mask: Tensor  # long [Nt, L]
    embedding: Tensor  # [Nt, E] unit norm


@dataclass
class VideoFeatures:
    embedding: Tensor  # [Nv, T, E] unit norm, per frame
    tokens: Tensor  # [Nv, T·N, C] final-norm tokens (CPU)


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], max_length: int, device: torch.device,
                 batch_size: int = 256) -> TextFeatures:
    """Text-mode features of ``texts`` (cleaned and tokenised as in training)."""
    hidden, mask, emb = [], [], []
    for i in range(0, len(texts), batch_size):
        tok = {k: v.to(device) for k, v in tokenize(tokenizer, texts[i : i + batch_size], max_length).items()}
        h = model.text_encoder.forward_text(tok["input_ids"], tok["attention_mask"])  # [b, L, H]
        hidden.append(h.float().cpu())
        mask.append(tok["attention_mask"].cpu())
        emb.append(model.text_embedding(h).float().cpu())
    return TextFeatures(torch.cat(hidden), torch.cat(mask), torch.cat(emb))


@torch.no_grad()
def encode_videos(model, batches, device: torch.device) -> VideoFeatures:
    """Per-frame embeddings and all tokens of videos given as uint8 [B, T, 3, H, W] batches, in order."""
    emb, tokens = [], []
    for pixels in batches:
        out = model.vision_encoder(normalize_video(pixels.to(device)), None, align=False, keep_temporal=True)
        emb.append(model.vision_embedding(out.pooled).float().cpu())  # [B, T, E]
        tokens.append(out.tokens.float().cpu())  # [B, T·N, C]
    return VideoFeatures(torch.cat(emb), torch.cat(tokens))


def _pair_scorer(model, video: VideoFeatures, text: TextFeatures, device: torch.device,
                 batch_size: int = PAIR_BATCH) -> Callable[[Tensor, Tensor], Tensor]:
    """(video index [P], text index [P]) → matching logit [P], in fusion batches of ``batch_size``."""

    @torch.no_grad()
    def score(vi: Tensor, ti: Tensor) -> Tensor:
        out = []
        for s in range(0, vi.numel(), batch_size):
            v, t = vi[s : s + batch_size], ti[s : s + batch_size]
            logits = model.match_logits(text.hidden[t].to(device), text.mask[t].to(device),
                                        video.tokens[v].to(device))  # [b, 2]
            out.append(logits[:, 1].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    return score


def score_retrieval(model, video: VideoFeatures, text: TextFeatures, k_test: int, device: torch.device,
                    rank: int = 0, world_size: int = 1) -> dict[str, Tensor]:
    """ITC scores and the ITM re-ranked scores of every (video, text) pair.

    Returns:
        ``itc`` [Nv, Nt]; ``itm_v2t`` [Nv, Nt] (rows = video queries); ``itm_t2v`` [Nt, Nv].
    """
    itc = similarity(video.embedding, text.embedding)  # [Nv, Nt], no temperature
    score = _pair_scorer(model, video, text, device)
    v2t, v2t_top = rerank_top_k(itc, k_test, score, rank, world_size)
    t2v, t2v_top = rerank_top_k(itc.t(), k_test, lambda t, v: score(v, t), rank, world_size)
    return {"itc": itc, "itm_v2t": finish_rerank(sum_over_ranks(v2t), v2t_top),
            "itm_t2v": finish_rerank(sum_over_ranks(t2v), t2v_top)}


# --------------------------------------------------------------------------------------------------
# data: one canonical view per video


class _EvalViews(torch.utils.data.Dataset):
    """uint8 [T, 3, H, W] of each row's ``eval_center`` view (recipe ``views.num_frames``/``views.size``)."""

    def __init__(self, rows, cfg: Recipe) -> None:
        self.rows, self.cfg = rows, cfg

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Tensor:
        row, v = self.rows[i], self.cfg.views
        with open_video(row.path, backend=self.cfg.corpus.video_backend) as video:
            view = sample_view("eval_center", video.info, v.num_frames, v.size, self.cfg.seed, row.id, 0,
                               frame_range=clip_frame_range(row, video.info))
            frames = video.get_frames(list(view.frame_indices))
        return apply_view(frames, view)


def _video_batches(rows, cfg: Recipe, batch_size: int):
    return build_loader(_EvalViews(rows, cfg), batch_size, cfg.train.num_workers, cfg.seed)  # in row order


def _tracked_video_batches(rows, cfg: Recipe):
    """The test videos in batches, with live progress on rank 0 (encoding them is the long part)."""
    size = cfg.finetune.eval_batch_size
    return track(_video_batches(rows, cfg, size), "eval videos", math.ceil(len(rows) / size),
                 enabled=rank_world()[0] == 0)


def k_test_of(cfg: Recipe) -> int:
    """The recipe's ``retrieval.k_test`` (UMT: 128)."""
    return cfg.retrieval.k_test


@torch.no_grad()
def evaluate_retrieval_model(model, tokenizer, cfg: Recipe, source: str | Path, device: torch.device,
                             k_test: int | None = None) -> dict[str, float]:
    """Retrieval metrics of ``model`` on a captioned manifest; each caption is one text query.

    Returns:
        ITM re-ranked metrics (``v2t_r1`` …, ``r_mean``) and the ITC-only ones prefixed ``emb_``, plus
        ``num_videos``, ``num_texts`` and ``k_test``.
    """
    rows = read_corpus(source, cfg.corpus.root)
    missing = [r.id for r in rows if not r.captions]
    if missing:
        raise ValueError(f"{source}: {len(missing)} clip(s) have no caption (first: {missing[0]!r}); "
                         "retrieval needs at least one caption per clip")
    texts = [c for r in rows for c in r.captions]
    text_to_video = torch.tensor([i for i, r in enumerate(rows) for _ in r.captions])
    k = k_test or k_test_of(cfg)
    was_training = model.training
    model.eval()
    try:
        text = encode_texts(model, tokenizer, texts, cfg.text.max_length, device)
        video = encode_videos(model, _tracked_video_batches(rows, cfg), device)
        scores = score_retrieval(model, video, text, k, device, *rank_world())
    finally:
        model.train(was_training)
    out = retrieval_metrics(scores["itm_v2t"], scores["itm_t2v"], text_to_video)
    emb = retrieval_metrics(scores["itc"], scores["itc"].t(), text_to_video)
    return {**out, **{f"emb_{n}": v for n, v in emb.items()}, "num_videos": len(rows), "num_texts": len(texts),
            "k_test": k}


@torch.no_grad()
def evaluate_multiple_choice_model(model, tokenizer, cfg: Recipe, source: str | Path,
                                   device: torch.device) -> dict[str, float]:
    """Multiple-choice accuracy on a manifest whose rows give the candidate texts as ``captions``
    (question and answer already joined, see :func:`multiple_choice_texts`) and the index of the right
    one as ``label``.

    Returns:
        ``mc_blend_accuracy`` (UMT's score, :func:`blended_mc_scores`), beside ``mc_accuracy`` (the raw
        matching logit alone) and ``mc_emb_accuracy`` (ITC alone), and ``num_questions``.
    """
    rows = read_corpus(source, cfg.corpus.root)
    for r in rows:
        if len(r.captions) < 2 or not isinstance(r.label, int) or not 0 <= r.label < len(r.captions):
            raise ValueError(f"{source}: row {r.id!r} needs >= 2 candidate captions and an integer label "
                             f"indexing them (got {len(r.captions)} captions, label {r.label!r})")
    sizes = {len(r.captions) for r in rows}
    if len(sizes) != 1:
        raise ValueError(f"{source}: every question needs the same number of candidates, found {sorted(sizes)}")
    A = sizes.pop()
    was_training = model.training
    model.eval()
    try:
        text = encode_texts(model, tokenizer, [c for r in rows for c in r.captions], cfg.text.max_length, device)
        video = encode_videos(model, _tracked_video_batches(rows, cfg), device)
        vi = torch.arange(len(rows)).repeat_interleave(A)  # [N·A]: candidate j of question i is text i·A + j
        ti = torch.arange(len(rows) * A)
        itm_logits = torch.cat([model.match_logits(text.hidden[ti[s:s + PAIR_BATCH]].to(device),
                                                   text.mask[ti[s:s + PAIR_BATCH]].to(device),
                                                   video.tokens[vi[s:s + PAIR_BATCH]].to(device)).float().cpu()
                                for s in range(0, len(vi), PAIR_BATCH)]).view(len(rows), A, 2)
        itc = torch.einsum("nte,nae->nat", video.embedding, text.embedding.view(len(rows), A, -1)).mean(-1)  # [N, A]
        temp = float(model.temp)
    finally:
        model.train(was_training)
    answers = torch.tensor([r.label for r in rows])
    return {"mc_accuracy": multiple_choice_accuracy(itm_logits[..., 1], answers),
            "mc_blend_accuracy": multiple_choice_accuracy(blended_mc_scores(itm_logits, itc, temp), answers),
            "mc_emb_accuracy": multiple_choice_accuracy(itc, answers), "num_questions": len(rows)}


__all__ = [
    "DEFAULT_K_TEST", "ground_truth_ranks", "rank_summary", "retrieval_metrics", "multiple_choice_accuracy",
    "multiple_choice_texts", "blended_mc_scores", "MC_ITM_WEIGHT", "rerank_top_k", "finish_rerank",
    "rerank_top_k_reference", "encode_texts",
    "encode_videos", "score_retrieval", "evaluate_retrieval_model", "evaluate_multiple_choice_model",
    "k_test_of",
]
