"""Open-ended video QA evaluation as UMT does it: rank a fixed answer list, count exact matches.

For each question (UMT code @4fb4049: multi_modality/models/umt_qa.py ``rank_answer``, after ALBEF):

1. The decoder reads ``[CLS]`` given the question states; every answer of the list is scored by the
   probability of its first token, and the top ``k`` (``qa.k_test``, UMT: 128) are kept.
2. Those ``k`` answers are re-scored by their full sequence log-likelihood (every token after ``[CLS]``,
   the end token included) and the best is the prediction.

With ``k`` equal to the list size this is the argmax of the full log-likelihood over the whole list
(:func:`rank_answers_reference`, the test's plain reference). One difference from UMT: its re-score adds
the first token's log-probability a second time (the top-k probability and the sequence loss both hold
it); here each token counts once.

Accuracy is exact match: the prediction equals the question's most frequent annotated answer (either,
on a tie), both normalised like captions; reported overall and per question ``type`` when the
annotations give one. Each prediction is written as one JSONL line.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from umt_distill.config import Recipe
from umt_distill.data.clipviews import clip_frame_range
from umt_distill.data.pixels import normalize_video
from umt_distill.data.qa import QARow, clip_rows, read_qa
from umt_distill.data.text import tokenize
from umt_distill.data.video import open_video
from umt_distill.data.views import apply_view, sample_view
from umt_distill.training.loop import build_loader

DEFAULT_K = 128
SEQUENCE_BATCH = 256  # answer sequences per decoder forward


@torch.no_grad()
def first_token_probs(decoder, states: Tensor, mask: Tensor, answer_ids: Tensor) -> Tensor:
    """P(first answer token | ``[CLS]``, question) of every answer: [Q, A].

    Args:
        decoder: :class:`~umt_distill.models.qa.AnswerDecoder`.
        states, mask: question states [Q, Lq, H] and their padding mask [Q, Lq].
        answer_ids: long [A, La], each starting with ``[CLS]``.
    """
    start = answer_ids[:1, :1].expand(states.shape[0], 1)  # [Q, 1] the [CLS] id
    logits = decoder(start, torch.ones_like(start), states, mask)[:, 0].float()  # [Q, V]
    return logits.softmax(-1)[:, answer_ids[:, 1]]  # [Q, A]


@torch.no_grad()
def sequence_log_likelihood(decoder, states: Tensor, mask: Tensor, answer_ids: Tensor, answer_mask: Tensor,
                            question: Tensor, answer: Tensor, batch: int = SEQUENCE_BATCH) -> Tensor:
    """Full log-likelihood of answer ``answer[i]`` for question ``question[i]``, in decoder batches → [P]."""
    out = []
    for s in range(0, question.numel(), batch):
        q, a = question[s:s + batch], answer[s:s + batch]
        out.append(decoder.token_log_likelihood(answer_ids[a], answer_mask[a], states[q], mask[q]).float())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def rank_answers(decoder, states: Tensor, mask: Tensor, answer_ids: Tensor, answer_mask: Tensor,
                 k: int) -> tuple[Tensor, Tensor]:
    """UMT's ranking: top ``k`` answers by first-token probability, re-scored by full log-likelihood.

    Returns:
        (answer indices long [Q, k'], their log-likelihoods [Q, k']), best first; k' = min(k, A).
    """
    Q, A = states.shape[0], answer_ids.shape[0]
    k = min(k, A)
    top = first_token_probs(decoder, states, mask, answer_ids).topk(k, dim=1).indices  # [Q, k]
    question = torch.arange(Q, device=top.device).repeat_interleave(k)  # [Q·k]
    ll = sequence_log_likelihood(decoder, states, mask, answer_ids, answer_mask, question, top.reshape(-1)).view(Q, k)
    order = ll.argsort(dim=1, descending=True, stable=True)
    return top.gather(1, order.to(top.device)), ll.gather(1, order)


@torch.no_grad()
def rank_answers_reference(decoder, states: Tensor, mask: Tensor, answer_ids: Tensor, answer_mask: Tensor) -> Tensor:
    """One question and one answer at a time: the full log-likelihood of every answer → [Q, A]."""
    Q, A = states.shape[0], answer_ids.shape[0]
    out = torch.empty(Q, A)
    for q in range(Q):
        for a in range(A):
            out[q, a] = decoder.token_log_likelihood(answer_ids[a:a + 1], answer_mask[a:a + 1], states[q:q + 1],
                                                     mask[q:q + 1])[0]
    return out


# --------------------------------------------------------------------------------------------------
# metrics


def exact_match(predictions: Sequence[str], rows: Sequence[QARow]) -> list[bool]:
    """Whether each prediction equals its question's most frequent answer (either one on a tie)."""
    return [p in r.best_answers() for p, r in zip(predictions, rows)]


def accuracy_summary(correct: Sequence[bool], types: Sequence[str | None]) -> dict:
    """``accuracy`` (percent), ``num_questions`` and, when any question has a type, ``per_type``
    {type: {"accuracy", "num_questions"}} (questions without one under ``"(none)"``)."""
    out: dict = {"accuracy": 100.0 * sum(correct) / max(len(correct), 1), "num_questions": len(correct)}
    if any(t is not None for t in types):
        groups: dict[str, list[bool]] = defaultdict(list)
        for c, t in zip(correct, types):
            groups[t if t is not None else "(none)"].append(c)
        out["per_type"] = {t: {"accuracy": 100.0 * sum(v) / len(v), "num_questions": len(v)} for t, v in sorted(groups.items())}
    return out


# --------------------------------------------------------------------------------------------------
# a model on an annotation file


class _ClipEvalViews(torch.utils.data.Dataset):
    """uint8 [T, 3, H, W]: each clip's ``eval_center`` view (segment midpoints, centre crop), UMT's test view."""

    def __init__(self, clips, cfg: Recipe) -> None:
        self.clips, self.cfg = clips, cfg

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> Tensor:
        row, v = self.clips[i], self.cfg.views
        with open_video(row.path, backend=self.cfg.corpus.video_backend) as video:
            view = sample_view("eval_center", video.info, v.num_frames, v.size, self.cfg.seed, row.id, 0,
                               frame_range=clip_frame_range(row, video.info))
            frames = video.get_frames(list(view.frame_indices))
        return apply_view(frames, view)


def tokenize_answers(tokenizer, answers: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
    """``[CLS] answer [SEP]`` ids and mask, long [A, max_length]; an answer needs at least one token."""
    tok = tokenize(tokenizer, list(answers), max_length)
    return tok["input_ids"], tok["attention_mask"]


@torch.no_grad()
def predict(model, tokenizer, cfg: Recipe, rows: list[QARow], answers: list[str], device: torch.device,
            k: int, pixel_batches=None, encode=None) -> tuple[list[int], list[list[tuple[int, float]]]]:
    """The predicted answer index of every question, and its top five (index, log-likelihood).

    Args:
        pixel_batches: uint8 [b, T, 3, H, W] batches of the distinct clips in ``clip_rows(rows)`` order
            (decoded here with ``eval_center`` when None), or whatever ``encode`` reads.
        encode: batch → vision tokens [b, N, C]; default: the model's video encoder on the normalised pixels.
    """
    if encode is None:
        def encode(pixels: Tensor) -> Tensor:
            return model.vision_tokens(normalize_video(pixels.to(device)))

    clips = list(clip_rows(rows).values())
    by_clip: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_clip[r.video_id].append(i)
    a_ids, a_mask = (t.to(device) for t in tokenize_answers(tokenizer, answers, cfg.qa.answer_max_length))
    if pixel_batches is None:
        pixel_batches = build_loader(_ClipEvalViews(clips, cfg), cfg.finetune.eval_batch_size, cfg.train.num_workers, cfg.seed)
    best: list[int] = [0] * len(rows)
    top5: list[list[tuple[int, float]]] = [[] for _ in rows]
    done = 0
    for pixels in pixel_batches:
        batch_clips = clips[done:done + pixels.shape[0]]
        done += pixels.shape[0]
        vision = encode(pixels)  # [b, N, C]
        qs = [(j, i) for j, c in enumerate(batch_clips) for i in by_clip[c.id]]
        for s in range(0, len(qs), SEQUENCE_BATCH):
            part = qs[s:s + SEQUENCE_BATCH]
            tok = {n: v.to(device) for n, v in tokenize(tokenizer, [rows[i].question for _, i in part],
                                                         cfg.qa.question_max_length).items()}
            clip_of = torch.tensor([j for j, _ in part], device=device)
            states = model.question_states(tok["input_ids"], tok["attention_mask"], vision[clip_of])
            ids, ll = rank_answers(model.text_decoder, states, tok["attention_mask"], a_ids, a_mask, k)
            for n, (_, i) in enumerate(part):
                best[i] = int(ids[n, 0])
                top5[i] = [(int(a), float(v)) for a, v in zip(ids[n, :5], ll[n, :5])]
    if done != len(clips):
        raise ValueError(f"the pixel batches held {done} clips, the questions ask about {len(clips)}")
    return best, top5


def evaluate_qa_model(model, tokenizer, cfg: Recipe, source: str | Path, answers: list[str], device: torch.device,
                      k: int | None = None, predictions: str | Path | None = None) -> dict:
    """Exact-match accuracy of ``model`` on an annotation file, ranking ``answers``.

    Returns:
        ``accuracy`` (percent), ``num_questions``, ``per_type`` (when typed), ``k_test``,
        ``answers_in_list`` (percent of questions whose right answer is in the list: the ceiling).
    """
    rows = read_qa(source, cfg.corpus.root)
    k = k or cfg.qa.k_test
    was_training = model.training
    model.eval()
    try:
        best, top5 = predict(model, tokenizer, cfg, rows, answers, device, k)
    finally:
        model.train(was_training)
    pred = [answers[i] for i in best]
    correct = exact_match(pred, rows)
    listed = set(answers)
    out = {**accuracy_summary(correct, [r.type for r in rows]), "k_test": min(k, len(answers)),
           "answers_in_list": 100.0 * sum(bool(r.best_answers() & listed) for r in rows) / len(rows)}
    if predictions is not None:
        write_predictions(predictions, rows, pred, correct, [[(answers[a], v) for a, v in t] for t in top5])
    return out


def write_predictions(path: str | Path, rows: Sequence[QARow], predictions: Sequence[str], correct: Sequence[bool],
                      top: Sequence[Sequence[tuple[str, float]]]) -> None:
    """One JSON line per question: id, video_id, question, type, answers, prediction, correct, top (answer, log-lik.)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": r.id, "video_id": r.video_id, "question": r.question, "type": r.type,
                                "answers": r.answers, "prediction": p, "correct": c,
                                "top": [[a, round(v, 4)] for a, v in t]}, ensure_ascii=False) + "\n" for r, p, c, t in zip(rows, predictions, correct, top))


__all__ = [
    "DEFAULT_K",
    "accuracy_summary",
    "evaluate_qa_model",
    "exact_match",
    "first_token_probs",
    "predict",
    "rank_answers",
    "rank_answers_reference",
    "sequence_log_likelihood",
    "tokenize_answers",
    "write_predictions",
]
