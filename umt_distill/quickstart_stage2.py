"""The quickstart's stage 2 and zero-shot retrieval: does video-text training teach the student motion words?

After stage 1 (``quickstart.py``), :func:`run_stage2_retrieval`

1. **caches** the same tiny CLIP over the training clips on *unflipped* views (``<output>/cache-stage2``;
   why not the stage-1 store: ``recipes/quickstart/stage2.yaml``), or reuses that store;
2. **trains stage 2** (``stages/stage2.py``: UTA + VTC + VTM + MLM) on the training captions, which name
   appearance and motion (``"a red ringed disc moving left"``), from the finished stage-1 weights — or
   reuses a finished run of the same recipe, stage-1 weights, teacher and world;
3. **evaluates zero-shot retrieval** on the test split with the same kind of captions, for the stage-2
   student and for the teacher's own image-text model: the tiny CLIP's image embedding of every frame
   against its text embedding of the caption, cosine averaged over frames (how an image CLIP is
   applied to video).

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

import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from umt_distill.config import Recipe, RecipeError, load_recipe, recipe_to_yaml

RECIPE = "quickstart/stage2"
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


def run_stage2_retrieval(output: str | Path, cfg_stage1: Recipe, world: dict, teacher: dict, stage1_run: str | Path,
                         console: Console | None = None, overrides: Sequence[str] = (), k_test: int = K_TEST,
                         test_pixels: torch.Tensor | None = None) -> dict:
    """Stage 2 on the toy training captions, then zero-shot retrieval on the test split (see the module doc).

    Args:
        output: The quickstart's output folder (``cache-stage2`` and ``runs/stage2-<teacher mode>`` go there).
        cfg_stage1: The stage-1 recipe that was run (paths, teacher, student and views are taken from it).
        world: :func:`~umt_distill.data.toyworld.write_world`'s result (``splits``, ``labels``).
        teacher: :func:`~umt_distill.teachers.tiny_clip.train_tiny_clip`'s summary (``weights``,
            ``weights_sha256``).
        stage1_run: The finished stage-1 run folder (the vision encoder starts from its latest checkpoint).
        console: Progress goes here.
        overrides: ``key=value`` overrides of ``recipes/quickstart/stage2.yaml``.
        k_test: Candidates per query re-ranked by the matching head.
        test_pixels: The test clips' ``eval_center`` views, uint8 [N, T, 3, H, W] in test-manifest order,
            if the caller decoded them already (the probes do); decoded here otherwise.

    Returns:
        ``rows`` (metrics by model, percent: ``t2v_r1/r5/r10``, ``v2t_r1/r5/r10``, ``r_mean``, medians
        and mean ranks, ``motion_given_appearance`` and per motion), ``headline`` (the student row and
        the teacher row to compare), ``rule``, ``motion_rule``, ``num_videos``, ``num_texts``,
        ``k_test``, ``reused`` (the training run), ``cache_reused``, ``run``, ``train`` (last logged
        metrics), and ``seconds`` (total) with ``seconds_parts``.
    """
    console = console or Console()
    output = Path(output)
    t_start = time.perf_counter()
    cfg = make_stage2_recipe(output, cfg_stage1, stage1_run, overrides)
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    cache_reused = None
    if cfg.teacher.mode == "cached":
        from umt_distill.quickstart import ensure_cache

        console.print(f"  caching the teacher on unflipped views ({cfg.cache.num_views} per clip) → {cfg.cache.store}")
        cache_reused, _ = ensure_cache(cfg, console)
        if cache_reused:
            console.print("  [green]reusing the finished stage-2 cache[/]")
    seconds["cache"] = time.perf_counter() - t

    t = time.perf_counter()
    identity = run_identity(cfg, world, teacher, stage1_run)
    losses = " + ".join(k.upper() for k, w in cfg.stage2.weights.items() if w > 0)
    console.print(f"  stage 2 ({losses}, {cfg.train.epochs} epochs) → {cfg.train.output_dir}")
    reused, run, last = ensure_stage2(cfg, identity, console)
    if reused:
        console.print("  [green]reusing the finished stage-2 run[/]")
    seconds["train"] = time.perf_counter() - t

    t = time.perf_counter()
    result = evaluate_zero_shot(cfg, run, world, k_test, test_pixels)
    seconds["retrieval"] = time.perf_counter() - t
    result.update(reused=reused, cache_reused=cache_reused, run=str(run), recipe=RECIPE,
                  train={k: last.get(k) for k in ("step", "epoch", "loss", "loss_uta", "loss_vtc", "loss_vtm", "loss_mlm", "temp")},
                  seconds=round(time.perf_counter() - t_start, 1), seconds_parts={k: round(v, 1) for k, v in seconds.items()})
    return result


# --------------------------------------------------------------------------------------------------
# the recipe and the run


def make_stage2_recipe(output: Path, cfg_stage1: Recipe, stage1_run: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """``recipes/quickstart/stage2.yaml`` with the stage-1 run's paths, teacher mode, frames and size; overrides come last.

    Raises:
        RecipeError: The teacher, student, frames or size differ from stage 1's (naming the key): the
            vision encoder is initialised from stage 1 and UTA must align it to the same teacher.
    """
    s1 = cfg_stage1
    taken = {"corpus.source": s1.corpus.source, "corpus.video_backend": s1.corpus.video_backend,
             "teacher.pretrained": s1.teacher.pretrained, "teacher.model_config_path": s1.teacher.model_config_path,
             "teacher.mode": s1.teacher.mode, "views.num_frames": s1.views.num_frames, "views.size": s1.views.size,
             "cache.store": (Path(output) / "cache-stage2").resolve(),
             "stage2.init_vision": Path(stage1_run).resolve(),
             "train.output_dir": (Path(output) / "runs" / f"stage2-{s1.teacher.mode}").resolve()}  # one run per teacher mode
    cfg = load_recipe(RECIPE, [*(f"{k}={v}" for k, v in taken.items() if v is not None), *overrides])
    differ = [f"{section}.{k}: stage 2 has {v!r}, stage 1 has {getattr(getattr(s1, section), k)!r}"
              for section in ("teacher", "student") for k, v in getattr(cfg, section).model_dump().items()
              if v != getattr(getattr(s1, section), k)]
    differ += [f"views.{k}: stage 2 has {getattr(cfg.views, k)!r}, stage 1 has {getattr(s1.views, k)!r}"
               for k in ("num_frames", "size") if getattr(cfg.views, k) != getattr(s1.views, k)]
    if differ:
        raise RecipeError("the quickstart's stage 2 must use stage 1's teacher, student and frames:\n  " + "\n  ".join(differ))
    return cfg


def run_identity(cfg: Recipe, world: dict, teacher: dict, stage1_run: str | Path) -> dict:
    """What a finished stage-2 run must share to be reused: recipe, stage-1 weights, teacher weights, world."""
    from umt_distill.training.checkpoint import weights_file

    stage1 = hashlib.sha256(weights_file(stage1_run).read_bytes()).hexdigest()
    world_json = Path(world["labels"]).parent / "world.json"
    return {"recipe": recipe_to_yaml(cfg), "stage1_weights_sha256": stage1, "teacher_sha256": teacher["weights_sha256"],
            "world": json.loads(world_json.read_text(encoding="utf-8"))}


def ensure_stage2(cfg: Recipe, identity: dict, console: Console) -> tuple[bool, Path, dict]:
    """Train stage 2, resume an interrupted run of the same identity, or reuse a finished one
    (``quickstart.ensure_run``).

    Returns:
        (reused, run folder, last logged metrics).
    """
    from umt_distill.quickstart import ensure_run
    from umt_distill.stages.stage2 import train

    run = Path(cfg.train.output_dir)
    reused, last = ensure_run(run, identity, lambda: train(cfg), console, "stage 2")
    return reused, run, last


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
    from umt_distill.data.corpus import read_corpus
    from umt_distill.data.toyworld import MOTIONS, appearance_classes, read_labels
    from umt_distill.evaluation.probe import decode_eval_views

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
    from umt_distill.evaluation.retrieval import (
        PAIR_BATCH, TextFeatures, encode_texts, encode_videos, load_vl_model, score_retrieval,
    )
    from umt_distill.losses_vl import similarity

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
    from umt_distill.cache.pipeline import build_teacher
    from umt_distill.losses_vl import similarity

    image_model = build_teacher(cfg, torch.device("cpu"))
    image = torch.cat([image_model(p).pooled for p in pixels.split(32)])  # [Nv, T, D]
    model, tokenizer = load_clip_text_tower(cfg)
    text = model.encode_text(tokenizer(texts))  # [Nt, D]
    return similarity(F.normalize(image, dim=-1), F.normalize(text, dim=-1))


def load_clip_text_tower(cfg: Recipe):
    """The whole tiny open_clip CLIP of ``teacher.pretrained`` (strict) and its tokenizer, in eval mode."""
    from safetensors.torch import load_file

    from umt_distill.teachers.tiny_clip import QUICKSTART_CLIP, build_clip

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
    from umt_distill.evaluation.retrieval import RECALL_AT, ground_truth_ranks, rank_summary

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
    from umt_distill.data.toyworld import MOTIONS

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
    from umt_distill.evaluation.retrieval import RECALL_AT

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


# --------------------------------------------------------------------------------------------------
# report helpers (for the quickstart's terminal table and report.md)

_COLUMNS = (("t2v_r1", "t2v R@1"), ("t2v_r5", "t2v R@5"), ("v2t_r1", "v2t R@1"), ("v2t_r5", "v2t R@5"),
            ("r_mean", "mean recall"), ("appearance_top1", "appearance"), ("motion_given_appearance", "motion given appearance"))


def retrieval_checks(result: dict) -> list[dict]:
    """The issue's bar, in the quickstart report's check format: the headline student's R@1 above the
    teacher's in both directions on motion captions. ``noise`` is two binomial standard errors of the
    difference (queries: the distinct captions for t2v, the clips for v2t); ``clear`` says whether the
    difference exceeds it — one seed and one run per model, so a smaller difference is not a result."""
    s, t = (result["rows"][result["headline"][k]] for k in ("student", "teacher"))
    out = []
    for d, n in (("t2v", result["num_texts"]), ("v2t", result["num_videos"])):
        a, b = s[f"{d}_r1"], t[f"{d}_r1"]
        noise = 200.0 * math.sqrt((a / 100 * (1 - a / 100) + b / 100 * (1 - b / 100)) / n)
        out.append({"model": result["headline"]["student"], "check": f"zero-shot {d} R@1 > teacher's",
                    "value": f"{a:.1f} vs {b:.1f} (noise ±{noise:.1f})", "ok": a > b, "clear": a - b > noise,
                    "noise": noise})
    return out


def retrieval_reading(result: dict) -> list[str]:
    """What the headline rows say and do not say, in sentences (noise: two binomial standard errors)."""
    s, t = (result["rows"][result["headline"][k]] for k in ("student", "teacher"))
    chance, n = result["rows"][CHANCE], result["num_videos"]

    def noise(a: float, b: float) -> float:  # of the difference of two percentages over n clips each
        return 200.0 * math.sqrt((a / 100 * (1 - a / 100) + b / 100 * (1 - b / 100)) / n)

    m, c = s["motion_given_appearance"], chance["motion_given_appearance"]
    m_noise = 200.0 * math.sqrt(c / 100 * (1 - c / 100) / n)
    motion = (f"picks the right motion among the captions with the clip's appearance {m:.1f} % of the time "
              f"(chance {c:.1f} %, noise ±{m_noise:.1f})")
    motion += (": stage 2 taught it some of the motion words." if m - c > m_noise else
               ": indistinguishable from chance, so stage 2 did not teach the motion words at this budget.")
    a, b = s["appearance_top1"], t["appearance_top1"]
    appearance = (f"Appearance: {a:.1f} % vs the teacher's {b:.1f} % (noise ±{noise(a, b):.1f})"
                  + ("." if abs(a - b) > noise(a, b) else ", within the noise."))
    checks = retrieval_checks(result)
    r1 = ", ".join(f"{c['check'].split()[1]} {c['value']}" for c in checks)
    verdict = ("clearly above the teacher's" if all(c["clear"] for c in checks) else
               "above the teacher's" if all(c["ok"] for c in checks) else "not above the teacher's in both directions")
    return [f"The student {motion}", appearance,
            f"R@1 on motion captions (student vs teacher): {r1}: {verdict}"
            + ("." if all(c["clear"] for c in checks) else "; differences inside the noise are not results.")]


def retrieval_table(result: dict) -> Table:
    """A rich table of the retrieval rows (percent); the headline rows in bold."""
    table = Table(title=f"zero-shot retrieval on motion captions ({result['num_videos']} test clips, "
                        f"{result['num_texts']} distinct captions; class-level hits)")
    table.add_column("model")
    for _, title in _COLUMNS:
        table.add_column(title, justify="right")
    headline = set(result["headline"][k] for k in ("student", "teacher"))
    for name, m in result["rows"].items():
        style = "bold" if name in headline else ("dim" if name == CHANCE else "")
        table.add_row(name, *(f"{m[key]:.1f}" for key, _ in _COLUMNS), style=style)
    return table


def retrieval_markdown(result: dict) -> str:
    """The retrieval rows as a markdown section (headline rows in bold), with the counting rules."""
    head = set(result["headline"][k] for k in ("student", "teacher"))
    h = result["headline"]
    lines = ["## Zero-shot retrieval on motion captions (stage 2)", "",
             f"{result['num_videos']} test clips, {result['num_texts']} distinct captions. Rule: {result['rule']}. "
             f"Appearance column: {result['appearance_rule']}. Motion column: {result['motion_rule']}. "
             f"Headline: **{h['student']}** vs **{h['teacher']}** ({h['why']}). Re-ranking: top {result['k_test']}.", "",
             "| model | " + " | ".join(t for _, t in _COLUMNS) + " |", "|---|" + "---:|" * len(_COLUMNS)]
    for name, m in result["rows"].items():
        label = f"**{name}**" if name in head else name
        lines.append(f"| {label} | " + " | ".join(f"{m[k]:.1f}" for k, _ in _COLUMNS) + " |")
    lines.append("")
    for c in retrieval_checks(result):
        verdict = "PASS" if c["ok"] else "FAIL"
        lines.append(f"- {verdict}: {c['model']}: {c['check']}: {c['value']}"
                     f"{'' if c['clear'] else ' — within the noise, not a result'}")
    lines += ["", *(f"- {sentence}" for sentence in retrieval_reading(result)), "", f"Note: {result['note']}"]
    return "\n".join(lines) + "\n"


__all__ = [
    "run_stage2_retrieval", "make_stage2_recipe", "run_identity", "ensure_stage2", "evaluate_zero_shot",
    "student_scores", "teacher_scores", "load_clip_text_tower", "class_level_metrics", "class_view_metrics",
    "chance_metrics", "retrieval_checks", "retrieval_reading", "retrieval_table", "retrieval_markdown", "caption_of",
    "RULE", "APPEARANCE_RULE", "MOTION_RULE", "HEADLINE", "STUDENT_ITC", "STUDENT_ITM", "TEACHER", "CHANCE", "K_TEST",
]
