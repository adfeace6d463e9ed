"""Quickstart step 7, evaluation: zero-shot retrieval of the stage-2 student (``quickstart/stage2.py``).

:func:`evaluate_zero_shot` tests retrieval on the test split with the same kind of captions as the
training ones, for the stage-2 student and for the teacher's own image-text model: the tiny CLIP's
image embedding of every frame against its text embedding of the caption, cosine averaged over
frames (how an image CLIP is applied to video).

Counting a hit (:data:`RULE`): many test clips share a caption (16 appearances × 6 motions), so the
queries are the *distinct* captions of the test clips, and a retrieved clip is correct when its caption
equals the query's (class-level retrieval: every clip with that caption is a true item and the
best-ranked one counts). Video→text ranks those distinct captions, the clip's own being the true one.
Two more columns read the two halves of a caption apart, so that an R@1 can be traced to knowing
what a clip shows or how it moves: :data:`APPEARANCE_RULE` (the best of all 96 captions has the clip's
appearance; chance 1/16) and :data:`MOTION_RULE` (which of the six captions with the clip's own
appearance fits best; chance 1/6 — an image model can at best tell the axis, never the direction).

The headline compares like with like: the student's contrastive (dual-encoder, ITC) scores against the
teacher's. The student's matching-head re-ranking (UMT's protocol, top ``k_test`` by ITC) is reported
beside it; the teacher has no matching head.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from umt_distill.config import Recipe
from umt_distill.data.corpus import read_corpus
from umt_distill.evaluation.probe import decode_eval_views
from umt_distill.evaluation.retrieval import (
    PAIR_BATCH,
    RECALL_AT,
    TextFeatures,
    encode_texts,
    encode_videos,
    ground_truth_ranks,
    rank_summary,
    score_retrieval,
)
from umt_distill.losses.vl import similarity
from umt_distill.quickstart.tiny_clip import QUICKSTART_CLIP, build_clip
from umt_distill.quickstart.world import MOTIONS, appearance_classes, read_labels
from umt_distill.stages.retrieval import load_vl_model
from umt_distill.teachers.build import build_teacher

K_TEST = 16  # texts (videos) per video (text) re-ranked by the matching head; UMT: 128 of 1000
STUDENT_ITC = "student (stage 2), contrastive"
STUDENT_ITM = "student (stage 2), matching-head re-rank"
TEACHER = "teacher (image CLIP, frame-averaged)"
CHANCE = "chance"
HEADLINE = (STUDENT_ITC, TEACHER)
RULE = ("class-level: the queries are the distinct captions of the test clips; a retrieved clip is correct when "
        "its caption equals the query's (the best-ranked such clip counts); video→text ranks the distinct captions, "
        "the clip's own is the true one")
APPEARANCE_RULE = ("each test clip scores all 96 captions (16 appearances × 6 motions); correct when "
                   "a caption with its own appearance scores highest (chance 1/16)")
MOTION_RULE = ("each test clip ranks the 6 captions with its own appearance (one per motion); "
               "correct when its own motion ranks first (chance 1/6)")


# --------------------------------------------------------------------------------------------------
# zero-shot retrieval


def caption_of(appearance: str, motion: str) -> str:
    """The toy world's caption format (``ClipPlan.caption``); checked against every test manifest row."""
    return f"a {appearance} {motion}"


def evaluate_zero_shot(cfg: Recipe, run: Path, world: dict, k_test: int = K_TEST,
                       test_pixels: torch.Tensor | None = None) -> dict:
    """Zero-shot retrieval of the stage-2 student in ``run`` and of the recipe's teacher on the test split.

    Returns:
        ``rows``, ``headline``, ``note``, ``rule``, ``appearance_rule``, ``motion_rule``, ``num_videos``,
        ``num_texts``, ``k_test``.
    """
    rows = read_corpus(world["splits"]["test"])
    labels = read_labels(world["labels"])["clips"]
    classes = [caption_of(a, m) for a in appearance_classes() for m in MOTIONS]  # every appearance × motion
    clip_class = []
    for r in rows:
        want = caption_of(labels[r.id]["appearance"], labels[r.id]["motion"])
        if list(r.captions) != [want]:
            raise ValueError(f"{r.id}: the test manifest gives captions {list(r.captions)!r}, the labels say {want!r}")
        clip_class.append(classes.index(want))
    clip_class_t = torch.tensor(clip_class)  # [Nv]
    present = torch.tensor(sorted(set(clip_class)))  # [Nt] the distinct test captions, as class indices
    positives = present[:, None] == clip_class_t[None, :]  # [Nt, Nv]
    if test_pixels is None:
        test_pixels = decode_eval_views(rows, cfg.views.num_frames, cfg.views.size, cfg.corpus.video_backend)
    if test_pixels.shape[0] != len(rows):
        raise ValueError(f"test_pixels holds {test_pixels.shape[0]} clips, the test manifest {len(rows)}")

    out_rows = {}
    for name, (v2t, t2v, per_class) in student_scores(cfg, run, test_pixels, classes, present, k_test).items():
        out_rows[name] = {**class_level_metrics(v2t, t2v, positives),
                          **class_view_metrics(per_class, clip_class_t, len(MOTIONS))}
    teacher = teacher_scores(cfg, test_pixels, classes)  # [Nv, 96]
    out_rows[TEACHER] = {**class_level_metrics(teacher[:, present], teacher[:, present].t(), positives),
                         **class_view_metrics(teacher, clip_class_t, len(MOTIONS))}
    out_rows[CHANCE] = chance_metrics(positives, len(appearance_classes()), len(MOTIONS))
    return {"rows": out_rows, "headline": {"student": HEADLINE[0], "teacher": HEADLINE[1],
                                           "why": "both are dual-encoder cosine scores; the teacher has no matching head"},
            "note": ("the teacher's text tower learnt from appearance-only captions, so motion words are untrained "
                     "tokens to it, and a frame average cannot tell a direction from its reverse: it can only rank by "
                     "appearance. That is the gap stage 2 is meant to close."),
            "rule": RULE, "appearance_rule": APPEARANCE_RULE, "motion_rule": MOTION_RULE,
            "num_videos": len(rows), "num_texts": int(len(present)), "k_test": k_test}


@torch.no_grad()
def student_scores(cfg: Recipe, run: Path, pixels: torch.Tensor, classes: list[str], present: torch.Tensor,
                   k_test: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The stage-2 model's scores, contrastive and re-ranked (UMT's protocol, :mod:`evaluation.retrieval`).

    Returns:
        By row name: (v2t [Nv, Nt] over the ``present`` captions, t2v [Nt, Nv], every clip against every
        class caption [Nv, C]: cosine for the contrastive row, the match logit for the re-ranked one).
    """
    device = torch.device("cpu")
    model, tokenizer = load_vl_model(cfg, run)
    model.eval()
    text_all = encode_texts(model, tokenizer, classes, cfg.text.max_length, device)
    text = TextFeatures(text_all.hidden[present], text_all.mask[present], text_all.embedding[present])
    video = encode_videos(model, pixels.split(32), device)  # [Nv, T, E], [Nv, T·N, C]
    scores = score_retrieval(model, video, text, k_test, device)
    Nv, C = len(pixels), len(classes)
    vi, ti = torch.arange(Nv).repeat_interleave(C), torch.arange(C).repeat(Nv)  # every (clip, class caption) pair
    match = torch.cat([model.match_logits(text_all.hidden[ti[s:s + PAIR_BATCH]], text_all.mask[ti[s:s + PAIR_BATCH]],
                                          video.tokens[vi[s:s + PAIR_BATCH]])[:, 1]
                       for s in range(0, len(vi), PAIR_BATCH)]).view(Nv, C)  # [Nv, C] match logits
    return {STUDENT_ITC: (scores["itc"], scores["itc"].t(), similarity(video.embedding, text_all.embedding)),
            STUDENT_ITM: (scores["itm_v2t"], scores["itm_t2v"], match)}


@torch.no_grad()
def teacher_scores(cfg: Recipe, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """The tiny CLIP's video–text scores: cosine of each frame's image embedding with the text embedding,
    averaged over frames (as the student's ITC averages over frames) → [Nv, Nt].

    The image side is :class:`~umt_distill.teachers.clip.ClipTeacher` (the teacher stage 1 learnt from,
    with the recipe's normalisation); the text side is the same open_clip model's text tower.
    """
    image_model = build_teacher(cfg, torch.device("cpu"))
    image = torch.cat([image_model(p).pooled for p in pixels.split(32)])  # [Nv, T, D]
    model, tokenizer = load_clip_text_tower(cfg)
    text = model.encode_text(tokenizer(texts))  # [Nt, D]
    return similarity(F.normalize(image, dim=-1), F.normalize(text, dim=-1))


def load_clip_text_tower(cfg: Recipe):
    """The whole tiny open_clip CLIP of ``teacher.pretrained`` (strict) and its tokenizer, in eval mode."""
    if cfg.teacher.name != QUICKSTART_CLIP or not cfg.teacher.pretrained:
        raise ValueError(f"the teacher's text tower is known only for {QUICKSTART_CLIP} with local weights, "
                         f"got teacher.name={cfg.teacher.name!r}, teacher.pretrained={cfg.teacher.pretrained!r}")
    model, tokenizer = build_clip()
    model.load_state_dict(load_file(cfg.teacher.pretrained), strict=True)
    return model.eval(), tokenizer


# --------------------------------------------------------------------------------------------------
# metrics


def class_level_metrics(v2t: torch.Tensor, t2v: torch.Tensor, positives: torch.Tensor) -> dict[str, float]:
    """Recall@1/5/10 (percent), median and mean rank both ways, and ``r_mean``, under :data:`RULE`.

    Args:
        v2t: [Nv, Nt] scores of every distinct caption for every clip query.
        t2v: [Nt, Nv] scores of every clip for every caption query.
        positives: bool [Nt, Nv], caption == the clip's caption.
    """
    out = {**rank_summary(ground_truth_ranks(t2v.float(), positives), "t2v"),
           **rank_summary(ground_truth_ranks(v2t.float(), positives.t()), "v2t")}
    out["r_mean"] = sum(out[f"{d}_r{k}"] for d in ("t2v", "v2t") for k in RECALL_AT) / (2 * len(RECALL_AT))
    return out


def class_view_metrics(scores: torch.Tensor, clip_class: torch.Tensor, motions: int) -> dict:
    """Appearance and motion read apart, from every clip's scores of every class caption.

    Args:
        scores: [Nv, A·M] scores of the captions ``caption_of(appearance a, motion m)`` at index a·M + m.
        clip_class: long [Nv], each clip's caption index.
        motions: M.

    Returns:
        Percent: ``appearance_top1`` (the clip's appearance holds its best caption score; chance 1/A) and
        :data:`MOTION_RULE`'s ``motion_given_appearance``, overall and per motion. Ties count against the
        clip (a constant scorer scores 0), as in the retrieval ranks.
    """
    by_appearance = scores.view(len(scores), -1, motions)  # [Nv, A, M]
    own_appearance, own_motion = clip_class // motions, clip_class % motions
    appearance_hit = _first(by_appearance.amax(2), own_appearance)
    motion_hit = _first(by_appearance[torch.arange(len(scores)), own_appearance], own_motion)  # among the 6 captions
    return {"appearance_top1": 100.0 * float(appearance_hit.mean()),
            "motion_given_appearance": 100.0 * float(motion_hit.mean()),
            "motion_given_appearance_per_motion": {m: 100.0 * float(motion_hit[own_motion == i].mean())
                                                   for i, m in enumerate(MOTIONS) if bool((own_motion == i).any())}}


def _first(scores: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """float [N]: 1 where ``truth`` strictly outscores every other column of ``scores`` [N, K]."""
    own = scores.gather(1, truth[:, None])  # [N, 1]
    beaten = ((scores >= own) & (torch.arange(scores.shape[1]) != truth[:, None])).any(1)
    return (~beaten).double()


def chance_metrics(positives: torch.Tensor, appearances: int, motions: int) -> dict[str, float]:
    """Expected scores (percent) of a random ranking: recalls under :data:`RULE`, 1/A and 1/M for the class view."""
    def hit_within(k: int, num_true: int, total: int) -> float:
        """P(at least one of ``num_true`` true items among the first ``k`` of ``total`` in random order)."""
        miss = math.prod((total - num_true - i) / (total - i) for i in range(min(k, total)))
        return 1.0 - miss

    Nt, Nv = positives.shape
    out = {}
    for k in RECALL_AT:
        out[f"t2v_r{k}"] = 100.0 * sum(hit_within(k, int(p), Nv) for p in positives.sum(1)) / Nt
        out[f"v2t_r{k}"] = 100.0 * hit_within(k, 1, Nt)
    out["r_mean"] = sum(out[f"{d}_r{k}"] for d in ("t2v", "v2t") for k in RECALL_AT) / (2 * len(RECALL_AT))
    out["appearance_top1"] = 100.0 / appearances
    out["motion_given_appearance"] = 100.0 / motions
    return out


__all__ = [
    "evaluate_zero_shot", "student_scores", "teacher_scores", "load_clip_text_tower", "class_level_metrics",
    "class_view_metrics", "chance_metrics", "caption_of",
    "RULE", "APPEARANCE_RULE", "MOTION_RULE", "HEADLINE", "STUDENT_ITC", "STUDENT_ITM", "TEACHER", "CHANCE", "K_TEST",
]
