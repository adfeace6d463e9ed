"""Open-ended video QA fine-tuning (``train.stage=qa``) and its evaluation, as UMT does it (UMT code
@4fb4049: multi_modality/tasks/vqa.py, multi_modality/models/umt_qa.py, multi_modality/exp/finetuning/qa_*).

One explicit loop (``train``): questions (``qa.train_source``) → the clip's view for the epoch (decoded
fresh per epoch, or the stored frames of a zarr cache store with ``train.pixels_from=store``) → the
video encoder on all tokens → the question through the BERT text and fusion layers → the answer decoder
(initialised from the stage-2 fusion layers, :mod:`umt_distill.models.qa`) → answer loss weighted by each
answer's share of the annotations → AdamW, per-iteration cosine.

At the end of every epoch with ``qa.val_source`` the model ranks the answer list on the validation
questions (:mod:`umt_distill.evaluation.qa`); the best epoch's weights go to ``<output_dir>/best``. The
test (``qa.test_source``) is evaluated once, on the best weights, after training. UMT's QA configs pick
the best epoch on the *test* split; here the test never chooses anything.

Initialisation: ``stage2.init`` — a stage-2 run of this toolkit or UMT's official stage-2 file (the names
are the same; ``clip_teacher.*`` and the contrastive/matching heads are set aside).
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

from umt_distill.config import Recipe, RecipeError
from umt_distill.data.corpus import ClipRow
from umt_distill.data.pixels import normalize_video
from umt_distill.data.qa import (
    ClipPixels,
    QADataset,
    clip_rows,
    collate_qa,
    read_answer_list,
    read_qa,
)
from umt_distill.data.samplers import EpochSampler
from umt_distill.data.text import tokenize
from umt_distill.evaluation.qa import evaluate_qa_model
from umt_distill.models.checkpoints import (
    read_state_dict,
    unwrap_state_dict,
    weights_file,
)
from umt_distill.models.qa import (
    UMTQuestionAnswering,
    is_qa_state,
    load_qa_state,
    qa_state_from_stage2,
)
from umt_distill.stages.retrieval import (
    build_retrieval_model,
    checkpoint_tokenizer,
    init_tokenizer,
    vl_model_for,
)
from umt_distill.training import distributed as du
from umt_distill.training.checkpoint import find_resume_checkpoint
from umt_distill.training.loop import (
    build_loader,
    epoch_batches,
    micro_step,
    open_run,
    optimizer_step,
    step_budget,
)
from umt_distill.training.optim import amp_setup, build_adamw, set_lr

BEST = "best"


def train(cfg: Recipe, resume: str | Path | None = None) -> dict:
    """Fine-tune for QA as the recipe says; returns the last logged metrics, ``val_*`` of the best epoch and
    ``test_*`` when ``qa.test_source`` is set."""
    env = du.init_distributed()
    device = du.resolve_device(cfg.train.device, env)
    out_dir = Path(cfg.train.output_dir)
    q = cfg.qa
    if not q.train_source or not q.answer_list:
        raise RecipeError("train.stage=qa needs qa.train_source (questions) and qa.answer_list (docs/qa.md)")
    rows = read_qa(q.train_source, cfg.corpus.root)
    answers = read_answer_list(q.answer_list)
    texts = sorted({r.question for r in rows} | {a for r in rows for a in r.answers} | set(answers))
    tokenizer = init_tokenizer(cfg, texts, out_dir, env)
    torch.manual_seed(cfg.seed)  # the same fresh weights on every rank
    model = build_qa_model(cfg, len(tokenizer)).to(device)
    freeze_unused(model)

    dataset = QADataset(rows, ClipPixels(clip_rows(rows), cfg, store_dataset(cfg, clip_rows(rows))))
    sampler = EpochSampler(len(dataset), cfg.seed, env.rank, env.world_size)
    micro, accum = cfg.train.batch_size, cfg.train.accum_steps
    budget = step_budget(cfg, sampler.per_rank(), env.world_size, what="questions")
    o = cfg.optim
    optimizer = build_adamw(model, budget.lr, o.weight_decay, o.betas, o.eps, skip=model.no_weight_decay())
    ddp_model = du.wrap_ddp(model, env, device)
    run, step = open_run(cfg, "qa", env, model, optimizer, find_resume_checkpoint(out_dir, resume), budget.total_steps)
    best = _read_best(out_dir)
    amp_dtype, scaler = amp_setup(cfg.train.amp, device)
    make_loader = partial(build_loader, dataset, micro, cfg.train.num_workers, cfg.seed, sampler,
                          collate_fn=collate_qa, drop_last=True)
    last: dict = {}
    while step < budget.total_steps:
        epoch, done_in_epoch = budget.position(step)
        batches = epoch_batches(dataset, sampler, make_loader, epoch, done_in_epoch * accum, micro)
        t_data = time.perf_counter()
        for _ in range(budget.steps_left_in_epoch(step)):
            set_lr(optimizer, float(budget.lrs[step]))
            model.train()
            total, data_time, t_step = 0.0, 0.0, time.perf_counter()
            for m in range(accum):
                batch = next(batches)
                data_time += time.perf_counter() - t_data
                with micro_step(ddp_model, m, accum, amp_dtype, device):
                    loss = ddp_model(*qa_inputs(batch, tokenizer, cfg, device))
                    scaler.scale(loss / accum).backward()
                total += loss.item() / accum
                t_data = time.perf_counter()
            losses = du.mean_over_ranks({"loss": total}, device)
            grad_norm = optimizer_step(losses["loss"], step, model, optimizer, scaler, o.grad_clip, out_dir)
            step += 1
            step_time = time.perf_counter() - t_step
            last = {"step": step, "epoch": epoch, **losses, "lr": float(budget.lrs[step - 1]), "grad_norm": grad_norm,
                    "step_time": step_time, "data_time": data_time,
                    "samples_per_s": micro * accum * env.world_size / step_time}
            run.log_step(last)
            run.checkpoint_if_due(step, epoch, model, optimizer)
        if q.val_source and (step % budget.steps_per_epoch == 0 or step == budget.total_steps):
            val = evaluate_qa_model(model, tokenizer, cfg, q.val_source, answers, device)
            record = {"step": step, "epoch": epoch, **{f"val_{k}": v for k, v in val.items()}}
            run.metrics.log(record)
            if best is None or val["accuracy"] > best["val_accuracy"]:
                best = record
                if env.is_main:
                    _save_best(out_dir, model, best)
            du.barrier()
    if best is not None:
        last = {**last, **{k: v for k, v in best.items() if k.startswith("val_")}, "best_step": best["step"]}
    if q.test_source:
        if best is not None:  # the test sees the weights validation chose
            load_qa_state(model, dict(read_state_dict(out_dir / BEST / "model.safetensors")), str(out_dir / BEST))
        preds = out_dir / "eval" / (BEST if best is not None else "last") / "test_predictions.jsonl"
        test = evaluate_qa_model(model, tokenizer, cfg, q.test_source, answers, device,
                                 predictions=preds if env.is_main else None)
        run.metrics.log({"step": step, **{f"test_{k}": v for k, v in test.items()}})
        last = {**last, **{f"test_{k}": v for k, v in test.items()}}
    run.close()
    return last


def qa_inputs(batch: dict, tokenizer, cfg: Recipe, device: torch.device) -> tuple:
    """The model's arguments for a collated batch (:func:`~umt_distill.data.qa.collate_qa`)."""
    return (normalize_video(batch["pixels"].to(device, non_blocking=True)), *qa_text_inputs(batch, tokenizer, cfg, device))


def qa_text_inputs(batch: dict, tokenizer, cfg: Recipe, device: torch.device) -> tuple:
    """Question ids and mask, answer ids and mask, ``answer_question`` and ``weights`` of a collated batch."""
    question = tokenize(tokenizer, batch["question"], cfg.qa.question_max_length)
    answer = tokenize(tokenizer, batch["answers"], cfg.qa.answer_max_length)
    return (question["input_ids"].to(device), question["attention_mask"].to(device),
            answer["input_ids"].to(device), answer["attention_mask"].to(device),
            batch["answer_question"].to(device), batch["weights"].to(device))


# --------------------------------------------------------------------------------------------------
# parts


def build_qa_model(cfg: Recipe, vocab_size: int) -> UMTQuestionAnswering:
    """The QA model from ``stage2.init`` (a stage-2 run or UMT's stage-2 file; random without one):
    the stage-2 model is built and loaded strictly, then its fusion layers, embeddings and MLM head are
    copied into the decoder (:func:`~umt_distill.models.qa.qa_state_from_stage2`)."""
    vl = build_retrieval_model(cfg, vocab_size)
    state = qa_state_from_stage2(vl.state_dict(), cfg.text.fusion_layer, "stage-2 model")
    model = UMTQuestionAnswering(vl.vision_encoder, vl.text_encoder, cfg.text.gradient_checkpointing)
    load_qa_state(model, state, str(cfg.stage2.init or "a fresh stage-2 model"))
    return model


def freeze_unused(model: UMTQuestionAnswering) -> None:
    """No loss reaches the stage-2 alignment heads or ``pool_norm``: out of the optimizer (and of DDP's wait)."""
    for module in (model.vision_encoder.clip_decoder, model.vision_encoder.pool_norm):
        module.requires_grad_(False)


def store_dataset(cfg: Recipe, clips: dict[str, ClipRow]):
    """With ``train.pixels_from=store``, the stage-1 loader over the zarr store (view frames, no decoding)."""
    if cfg.train.pixels_from != "store":
        return None
    if cfg.cache.layout != "zarr":
        raise RecipeError(f"train.pixels_from=store for QA reads clips in question order and needs cache.layout=zarr "
                          f"({cfg.cache.store} is {cfg.cache.layout}); or use train.pixels_from=video")
    from umt_distill.cache.datasets import CachedViewDataset

    return CachedViewDataset(cfg.cache.store, cfg, clips, pixels=True)


def _save_best(out_dir: Path, model: torch.nn.Module, record: dict) -> None:
    folder = out_dir / BEST
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "model.safetensors.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(folder / "model.safetensors")
    (folder / "best.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def _read_best(out_dir: Path) -> dict | None:
    """The best validation record so far (a resumed run keeps comparing against it)."""
    f = out_dir / BEST / "best.json"
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None


# --------------------------------------------------------------------------------------------------
# `umt-distill eval`


def load_qa_model(cfg: Recipe, checkpoint: str | Path) -> tuple[UMTQuestionAnswering, object]:
    """A QA checkpoint (run folder, its ``best/``, a checkpoint folder or file) and its tokenizer.

    A stage-2 file is accepted too (its decoder is then the copied fusion layers, untrained).
    """
    path = Path(checkpoint)
    file = path / BEST / "model.safetensors" if (path / BEST / "model.safetensors").is_file() else weights_file(path)
    state = dict(unwrap_state_dict(read_state_dict(file), str(file)))
    if not is_qa_state(state):
        state = qa_state_from_stage2(state, cfg.text.fusion_layer, str(file))
    tokenizer = checkpoint_tokenizer(cfg, path)
    vl = vl_model_for(cfg, state, str(file))
    model = UMTQuestionAnswering(vl.vision_encoder, vl.text_encoder, cfg.text.gradient_checkpointing)
    load_qa_state(model, state, str(file))
    return model, tokenizer


def evaluate(cfg: Recipe, checkpoint: str | Path) -> dict:
    """Exact-match accuracy (overall and per question type) of a QA checkpoint on ``qa.test_source`` (else
    ``qa.val_source``); metrics to ``<train.output_dir>/eval/<name>/qa.json``, predictions beside them
    (``predictions.jsonl``)."""
    env = du.init_distributed()
    device = du.resolve_device(cfg.train.device, env)
    q = cfg.qa
    source = q.test_source or q.val_source
    if not source or not q.answer_list:
        raise RecipeError("QA evaluation needs qa.test_source (questions) and qa.answer_list")
    model, tokenizer = load_qa_model(cfg, checkpoint)
    model.to(device)
    name = Path(str(checkpoint).rstrip("/")).name or "checkpoint"
    out = Path(cfg.train.output_dir) / "eval" / name
    result = evaluate_qa_model(model, tokenizer, cfg, source, read_answer_list(q.answer_list), device,
                               predictions=out / "predictions.jsonl" if env.is_main else None)
    if env.is_main:
        (out / "qa.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        types = "  ".join(f"{t} {v['accuracy']:.1f}" for t, v in result.get("per_type", {}).items())
        print(f"{source}: accuracy {result['accuracy']:.1f} ({result['num_questions']} questions, k={result['k_test']})"
              + (f"; {types}" if types else ""), file=sys.stderr, flush=True)
    return {**result, "output": str(out)}


__all__ = ["BEST", "build_qa_model", "evaluate", "freeze_unused", "load_qa_model", "qa_inputs", "qa_text_inputs", "train"]
