"""Quickstart step 8: toy video QA -- can the stage-2 student answer questions about what it sees and how it moves?

Every toy clip gets two questions (annotation files in ``<output>/qa/``, in the format of docs/qa.md):

- *appearance*: "what colour is the disc?" → red, green, blue or yellow (readable from any frame);
- *motion*: "how does the disc move?" → left, right, up, down, growing or shrinking (needs frame order).

The answer list holds the ten answers. Three models are compared by exact match per question type on the
test split (binomial standard error beside each):

- **student (stage 2)**: :mod:`umt_distill.models.qa` (answer decoder copied from the stage-2 fusion layers)
  from the finished stage-2 run; its text side is fine-tuned with UMT's weighted answer loss over the frozen
  video encoder's tokens (``quickstart.qa.train_video`` trains the video encoder too); answers ranked as
  ``umt-distill eval`` ranks them (:mod:`umt_distill.evaluation.qa`);
- **image teacher**: the same text side, from the same stage-2 start, over the frozen tiny image CLIP's
  last-layer tokens of every frame, mapped to the text width by a learnt linear layer; trained the same
  way. Frames carry no time position, so direction is out of its reach;
- **blind**: the most frequent training answer of each question -- the best any model that reads only the
  question can do here, since every question of a type has the same words.

Speed: the clips' ``eval_center`` views (the test view) are decoded once and serve as the training views
too (no augmentation), and the frozen encoders' tokens are computed once; the loop is the stage's
(``stages/qa.py``: model, loss, optimizer groups), without its per-epoch decoding and validation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from umt_distill.config import QAConfig, Recipe, load_recipe
from umt_distill.data.corpus import read_corpus
from umt_distill.data.pixels import normalize_video
from umt_distill.data.qa import QARow, collate_qa, read_answer_list, read_qa
from umt_distill.data.text import load_tokenizer
from umt_distill.evaluation.probe import decode_eval_views
from umt_distill.evaluation.qa import accuracy_summary, exact_match, predict
from umt_distill.io import atomic_write_text
from umt_distill.models.checkpoints import run_recipe_file, weights_file
from umt_distill.models.qa import UMTQuestionAnswering
from umt_distill.quickstart.settings import QASettings
from umt_distill.quickstart.world import COLOURS, MOTIONS
from umt_distill.stages.qa import build_qa_model, freeze_unused, qa_text_inputs
from umt_distill.stages.retrieval import find_tokenizer_dir
from umt_distill.teachers.build import build_teacher
from umt_distill.training.optim import build_adamw, set_lr

QUESTIONS = {"appearance": "what colour is the disc?", "motion": "how does the disc move?"}
STUDENT, IMAGE_TEACHER, BLIND = "student (stage 2)", "image teacher", "blind (question only)"
DONE_FILE = "qa_done.json"  # the step's result and what it was computed from (a re-run with the same reuses it)


def motion_answer(motion: str) -> str:
    """``"moving left"`` → ``left``; ``"growing"`` stays."""
    return motion.removeprefix("moving ").strip()


def write_qa_files(world: dict, folder: Path) -> dict[str, Path]:
    """The toy questions as QA annotation files (``train/val/test.jsonl``) and ``answers.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = json.loads(Path(world["labels"]).read_text(encoding="utf-8"))["clips"]
    colours = sorted({c["colour"] for c in labels.values()})
    motions = sorted({motion_answer(c["motion"]) for c in labels.values()})
    paths = {"answers": folder / "answers.json"}
    paths["answers"].write_text(json.dumps(colours + motions) + "\n", encoding="utf-8")
    for split, manifest in world["splits"].items():
        lines = []
        for row in read_corpus(manifest):
            clip = labels[row.id]
            for qtype, answer in (("appearance", clip["colour"]), ("motion", motion_answer(clip["motion"]))):
                lines.append(json.dumps({"id": f"{row.id}-{qtype}", "video": row.path, "video_id": row.id,
                                         "question": QUESTIONS[qtype], "answers": {answer: 1}, "type": qtype}))
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def qa_recipe(stage2_run: Path, files: dict[str, Path], output_dir: Path, settings: QASettings) -> Recipe:
    """The stage-2 run's own recipe turned into a QA one: same student, text encoder and views, ``stage2.init``
    = the run."""
    s2 = load_recipe(run_recipe_file(stage2_run))
    return s2.model_copy(update={
        "train": s2.train.model_copy(update={"stage": "qa", "output_dir": str(output_dir), "batch_size": settings.batch_size,
                                             "pixels_from": "video", "max_steps": settings.steps}),
        "stage2": s2.stage2.model_copy(update={"init": str(stage2_run), "init_vision": None}),
        "qa": QAConfig(train_source=str(files["train"]), val_source=str(files["val"]), test_source=str(files["test"]),
                       answer_list=str(files["answers"]), k_test=128, question_max_length=12, answer_max_length=5),
    })


class TokenQA(UMTQuestionAnswering):
    """The QA text side (encoder + decoder) over precomputed, frozen vision tokens.

    ``vision_tokens`` takes the tokens [B, L, D] as they were stored and, with ``project``, maps them by a
    learnt linear layer to the width the fusion layers cross-attend to (the image teacher's tokens are
    narrower than the student's).
    """

    def __init__(self, qa: UMTQuestionAnswering, token_dim: int, project: bool) -> None:
        nn.Module.__init__(self)
        self.text_encoder, self.text_decoder = qa.text_encoder, qa.text_decoder
        self.proj = nn.Linear(token_dim, qa.text_encoder.encoder_width) if project else nn.Identity()

    def vision_tokens(self, tokens: Tensor) -> Tensor:
        return self.proj(tokens)


@torch.no_grad()
def student_tokens(model: UMTQuestionAnswering, pixels: Tensor, batch: int = 32) -> Tensor:
    """The stage-2 video encoder's final-norm tokens of every clip: uint8 [N, T, 3, H, W] → [N, T·N_tok, C]."""
    model.eval()
    return torch.cat([model.vision_tokens(normalize_video(p)) for p in pixels.split(batch)])


@torch.no_grad()
def teacher_tokens(cfg: Recipe, pixels: Tensor, batch: int = 32) -> Tensor:
    """The frozen teacher's last returned layer for every frame: uint8 [N, T, 3, H, W] → [N, T·N_tok, D]."""
    teacher = build_teacher(cfg, torch.device("cpu"))
    return torch.cat([teacher(p).tokens[:, -1].flatten(1, 2) for p in pixels.split(batch)])


def fine_tune(model: nn.Module, vision: Tensor, clip_index: dict[str, int], rows: list[QARow], tokenizer, cfg: Recipe,
              settings: QASettings, seed: int) -> list[float]:
    """``settings.steps`` AdamW steps of the answer loss over random batches of questions; returns the losses.

    ``vision``: what the model's ``vision_tokens`` reads per clip (uint8 pixels for the student, teacher
    tokens for the image-teacher model), indexed by ``clip_index[video_id]``.
    """
    device = torch.device("cpu")
    o = cfg.optim
    optimizer = build_adamw(model, settings.lr, o.weight_decay, o.betas, o.eps, skip=model.no_weight_decay())
    gen = torch.Generator().manual_seed(seed)
    order, losses, warm = torch.randperm(len(rows), generator=gen), [], max(1, settings.steps // 10)
    model.train()
    for step in range(settings.steps):
        t = (step - warm) / max(1, settings.steps - warm)
        scale = (step + 1) / warm if step < warm else 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))
        set_lr(optimizer, settings.lr * scale)
        start = (step * settings.batch_size) % len(rows)
        if start + settings.batch_size > len(rows):
            order, start = torch.randperm(len(rows), generator=gen), 0
        items = []
        for i in order[start:start + settings.batch_size].tolist():
            answers, weights = zip(*rows[i].weights())
            items.append({"pixels": vision[clip_index[rows[i].video_id]], "question": rows[i].question,
                          "answers": list(answers), "weights": list(weights), "index": i})
        batch = collate_qa(items)
        inputs = batch["pixels"]  # uint8 pixels (normalised here), or teacher tokens as they are
        loss = model(normalize_video(inputs) if inputs.dtype == torch.uint8 else inputs,
                     *qa_text_inputs(batch, tokenizer, cfg, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def blind_predictions(train: list[QARow], test: list[QARow]) -> list[str]:
    """The most frequent training answer of each question text (ties: the alphabetically first)."""
    counts: dict[str, dict[str, int]] = {}
    for r in train:
        for a, n in r.answers.items():
            counts.setdefault(r.question, {}).setdefault(a, 0)
            counts[r.question][a] += n
    best = {q: min(c, key=lambda a: (-c[a], a)) for q, c in counts.items()}
    return [best.get(r.question, "") for r in test]


def summarise(name: str, correct: list[bool], rows: list[QARow], extra: dict | None = None) -> dict:
    """Accuracy (fraction) and binomial standard error, overall and per question type."""
    out = accuracy_summary(correct, [r.type for r in rows])
    row = {"accuracy": out["accuracy"] / 100, "se": _se(out["accuracy"] / 100, out["num_questions"]),
           "num_questions": out["num_questions"]}
    for qtype, v in out.get("per_type", {}).items():
        row[qtype] = {"accuracy": v["accuracy"] / 100, "se": _se(v["accuracy"] / 100, v["num_questions"]),
                      "num_questions": v["num_questions"]}
    return {"name": name, **row, **(extra or {})}


def _se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def run_toy_qa(output: Path, world: dict, stage2_run: Path, settings: QASettings, test_pixels: Tensor | None = None) -> dict:
    """Write the toy QA files, fine-tune the student and the image-teacher model, score them and the blind
    baseline on the test questions.

    Returns:
        ``appearance``, ``motion`` (accuracy and standard error of each model), ``blind`` (the blind
        baseline's row), ``models`` (full rows), ``answers``, ``num_questions``, ``steps``, ``seconds``,
        ``files``, ``reused`` (an earlier result of the same stage-2 weights, settings and questions).
    """
    t0 = time.perf_counter()
    files = write_qa_files(world, output / "qa")
    identity = {"stage2_weights_sha256": hashlib.sha256(weights_file(stage2_run).read_bytes()).hexdigest(),
                "settings": dataclasses.asdict(settings),
                "questions": {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in sorted(files.items())}}
    done = output / "qa" / DONE_FILE
    if done.is_file():
        saved = json.loads(done.read_text(encoding="utf-8"))
        if saved.get("identity") == identity:
            return {**saved["result"], "reused": True}
    cfg = qa_recipe(stage2_run, files, output / "runs" / "qa", settings)
    answers = read_answer_list(files["answers"])
    train, test = read_qa(files["train"]), read_qa(files["test"])
    tok_dir = find_tokenizer_dir(stage2_run)
    if tok_dir is None:
        raise FileNotFoundError(f"{stage2_run}: the stage-2 run has no tokenizer/ folder")
    tokenizer = load_tokenizer(tok_dir)
    v = cfg.views
    train_rows, test_rows = read_corpus(world["splits"]["train"]), read_corpus(world["splits"]["test"])
    train_pixels = decode_eval_views(train_rows, v.num_frames, v.size, cfg.corpus.video_backend)
    if test_pixels is None:
        test_pixels = decode_eval_views(test_rows, v.num_frames, v.size, cfg.corpus.video_backend)
    train_index = {r.id: i for i, r in enumerate(train_rows)}
    cpu = torch.device("cpu")
    models, losses = {}, {}

    torch.manual_seed(cfg.seed)
    student = build_qa_model(cfg, len(tokenizer))
    freeze_unused(student)
    if settings.train_video:  # UMT's way: the video encoder is fine-tuned too (about 3x the time here)
        train_in, test_in, encode = train_pixels, test_pixels.split(32), None
    else:  # frozen video encoder: its tokens once, the text side trained over them
        train_in, test_in = student_tokens(student, train_pixels), student_tokens(student, test_pixels).split(32)
        student = TokenQA(student, train_in.shape[-1], project=False)
        encode = student.vision_tokens
    losses[STUDENT] = fine_tune(student, train_in, train_index, train, tokenizer, cfg, settings, cfg.seed)
    pred, _ = predict(student, tokenizer, cfg, test, answers, cpu, cfg.qa.k_test, pixel_batches=test_in, encode=encode)
    models[STUDENT] = summarise(STUDENT, exact_match([answers[i] for i in pred], test), test)

    torch.manual_seed(cfg.seed)
    base = build_qa_model(cfg, len(tokenizer))  # the same stage-2 start for the text side
    train_tokens, test_tokens = teacher_tokens(cfg, train_pixels), teacher_tokens(cfg, test_pixels)
    teacher_qa = TokenQA(base, train_tokens.shape[-1], project=True)
    losses[IMAGE_TEACHER] = fine_tune(teacher_qa, train_tokens, train_index, train, tokenizer, cfg, settings, cfg.seed)
    pred, _ = predict(teacher_qa, tokenizer, cfg, test, answers, cpu, cfg.qa.k_test,
                      pixel_batches=test_tokens.split(32), encode=teacher_qa.vision_tokens)
    models[IMAGE_TEACHER] = summarise(IMAGE_TEACHER, exact_match([answers[i] for i in pred], test), test)

    models[BLIND] = summarise(BLIND, exact_match(blind_predictions(train, test), test), test)
    for name, seq in losses.items():
        models[name].update(first_loss=seq[0], final_loss=sum(seq[-10:]) / len(seq[-10:]))
    per_type = {qtype: {name: {k: m[qtype][k] for k in ("accuracy", "se")} for name, m in models.items()}
                for qtype in QUESTIONS}
    result = {**per_type, "blind": {k: models[BLIND][k] for k in ("accuracy", "se")} | {q: per_type[q][BLIND] for q in QUESTIONS},
            "models": models, "questions": QUESTIONS, "answers": answers,
            "num_questions": {q: models[STUDENT][q]["num_questions"] for q in QUESTIONS},
            "chance": {"appearance": 1 / len(COLOURS), "motion": 1 / len(MOTIONS)},
            "steps": settings.steps, "batch_size": settings.batch_size, "lr": settings.lr, "train_video": settings.train_video,
            "stage2_run": str(stage2_run), "files": {k: str(p) for k, p in files.items()},
            "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_text(done, json.dumps({"identity": identity, "result": result}, indent=1) + "\n")
    return {**result, "reused": False}


__all__ = [
    "BLIND",
    "IMAGE_TEACHER",
    "QUESTIONS",
    "STUDENT",
    "QASettings",
    "TokenQA",
    "blind_predictions",
    "run_toy_qa",
    "write_qa_files",
]


# --------------------------------------------------------------------------------------------------
# the report


def qa_rows(result: dict) -> list[tuple[str, str, str, str]]:
    """(model, appearance, motion, all) cells: accuracy ± standard error, and the chance row."""
    rows = []
    for name, m in result["models"].items():
        rows.append((name, *(f"{m[k]['accuracy']:.3f} ± {m[k]['se']:.3f}" for k in QUESTIONS),
                     f"{m['accuracy']:.3f} ± {m['se']:.3f}"))
    chance = result["chance"]
    rows.append(("chance", f"{chance['appearance']:.3f}", f"{chance['motion']:.3f}", ""))
    return rows


def qa_table(result: dict):
    """A rich table of the toy QA rows (exact match on the test questions)."""
    from rich.table import Table

    n = result["num_questions"]
    table = Table(title=f"toy QA, exact match ± standard error ({n['appearance']} + {n['motion']} test questions)")
    for col in ("model", "appearance", "motion", "all"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for row in qa_rows(result):
        table.add_row(*row)
    return table


def qa_markdown(result: dict) -> list[str]:
    """The toy QA section of ``report.md``."""
    n = result["num_questions"]
    appearance = ", ".join(a for a in result["answers"] if a in COLOURS)
    motion = ", ".join(a for a in result["answers"] if a not in COLOURS)
    setting = (f"Questions: \"{QUESTIONS['appearance']}\" (appearance; {appearance}) and \"{QUESTIONS['motion']}\" "
               f"(motion; {motion}), one of each per clip; answers ranked from the list of {len(result['answers'])} as "
               f"`umt-distill eval` ranks them. Test: {n['appearance']} + {n['motion']} questions; each model fine-tuned "
               f"{result['steps']} steps of {result['batch_size']} questions (lr {result['lr']:g}). Exact match ± "
               "binomial standard error.")
    lines = ["## Toy video QA (stage 2 → QA fine-tuning)", "", setting,
             "", "| model | appearance | motion | all |", "|---|---:|---:|---:|"]
    lines += [f"| {' | '.join(row)} |" for row in qa_rows(result)]
    blind, student = result["models"][BLIND], result["models"][STUDENT]
    gap = student["appearance"]["accuracy"] - blind["appearance"]["accuracy"]
    noise = math.hypot(student["appearance"]["se"], blind["appearance"]["se"])
    verdict = "above the blind baseline." if gap > 2 * noise else "not clearly above the blind baseline (within 2 × noise)."
    lines += ["", f"- Appearance, student vs blind: {gap:+.3f} (noise ±{noise:.3f}); {verdict}",
              ("- Motion is reported as it comes out: the image teacher's frame tokens carry no time position, so it "
               "cannot tell a direction from its reverse; the student's can, if stage 2 taught it."),
              (f"- Student: the QA model of `train.stage=qa` from `{result['stage2_run']}` (decoder copied from the "
               "fusion layers), " + ("video encoder fine-tuned too" if result["train_video"] else
                                     "text side fine-tuned over the frozen video encoder's tokens")
               + ". Image teacher: the same text side over the frozen tiny CLIP's frame tokens (a learnt linear map). "
               "Blind: the most frequent training answer of each question."),
              (f"- Files: `{Path(result['files']['train']).parent}` (annotations in the documented format, "
               "docs/qa.md); results.json: `qa`.")]
    return lines
