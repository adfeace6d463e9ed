"""Retrieval fine-tuning: VTC + VTM on captioned videos, then UMT's retrieval protocol (UMT code
@4fb4049: multi_modality/tasks/retrieval.py, multi_modality/exp/finetuning/ret_msrvtt/).

One explicit loop (``train``): captioned videos decoded directly (no teacher, no cache, no mask) →
one fresh ``views.policy`` view per clip and epoch and one of its captions → the stage-2 model on all
tokens, pooled per frame (UMT keeps frames apart when nothing is masked: ``keep_temporal`` in
multi_modality/models/umt.py) → VTC + VTM (UTA and
MLM are off, as in UMT's downstream recipes) → AdamW with a per-iteration cosine schedule. After
training, :mod:`umt_distill.evaluation.retrieval` tests the model (ITC top-k re-ranked by the matching
head), plus multiple-choice accuracy when a multiple-choice manifest is configured.

The model, losses, hard-negative sampling, optimizer groups, schedule and checkpoints are the stage-2
parts; only the data (no cached targets) and the objective's pooling differ.

Differences from UMT: training items are clips (a caption drawn per epoch), not (clip, caption) pairs;
views use the ``umt_train`` multi-scale crop rather than RandomResizedCrop(0.5, 1).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from umt_distill.config import Recipe, RecipeError
from umt_distill.data.clipviews import OnlineViewDataset
from umt_distill.data.corpus import read_corpus
from umt_distill.data.pixels import normalize_video
from umt_distill.data.samplers import EpochSampler
from umt_distill.data.text import TRAIN_ON_CORPUS, load_tokenizer, prepare_tokenizer, tokenize
from umt_distill.data.vl import CaptionedDataset, CaptionError
from umt_distill.evaluation.retrieval import evaluate_multiple_choice_model, evaluate_retrieval_model
from umt_distill.losses.vl import no_gather, similarity, vtc_loss, vtm_loss
from umt_distill.models.checkpoints import read_state_dict, unwrap_state_dict, weights_file
from umt_distill.models.umt_vl import load_umt_vl_checkpoint
from umt_distill.stages.parts import mask_generator
from umt_distill.stages.stage2 import build_model
from umt_distill.stages.stage2_parts import freeze_unused, vtm_pairs
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

WEIGHTS = {"uta": 0.0, "vtc": 1.0, "vtm": 1.0, "mlm": 0.0}


def train(cfg: Recipe, resume: str | Path | None = None) -> dict:
    """Fine-tune for retrieval as the recipe says; returns the last logged metrics (with ``test_*`` if tested).

    Data: ``corpus.source`` (captioned videos), views from ``views.*`` (UMT: 12 frames); initialisation
    from ``stage2.init`` (a stage-2 model) or ``stage2.init_vision`` (a stage-1 student); ``text.*``
    and ``stage2.embed_dim``/``temp_init``/``vtm_hard_negatives`` as in stage 2. Resumes from
    ``train.output_dir`` (or ``resume``) mid-epoch.
    """
    env = du.init_distributed()
    device = du.resolve_device(cfg.train.device, env)
    out_dir = Path(cfg.train.output_dir)
    if cfg.train.batch_size < 2:
        raise ValueError("train.batch_size must be >= 2 per process for VTM (it draws negatives within the batch)")
    rows = sorted(read_corpus(cfg.corpus.source, cfg.corpus.root), key=lambda r: r.id)
    missing = [r.id for r in rows if not r.captions]
    if missing:
        raise CaptionError(f"{cfg.corpus.source}: {len(missing)} clip(s) have no caption (first: {missing[0]!r})")
    captions = {r.id: r.captions for r in rows}
    tokenizer = init_tokenizer(cfg, sorted(c for caps in captions.values() for c in caps), out_dir, env)
    torch.manual_seed(cfg.seed)  # the same fresh heads on every rank
    model = build_retrieval_model(cfg, len(tokenizer)).to(device)
    freeze_unused(model, WEIGHTS)  # alignment heads and the MLM head: no loss uses them
    objective = RetrievalObjective(model, cfg.stage2.vtm_hard_negatives, gather=du.gather_with_grad)

    dataset = CaptionedDataset(OnlineViewDataset(rows, cfg, fresh_views=True), captions, "video", cfg.seed)
    sampler = EpochSampler(len(dataset), cfg.seed, env.rank, env.world_size)
    micro, accum = cfg.train.batch_size, cfg.train.accum_steps
    budget = step_budget(cfg, sampler.per_rank(), env.world_size)
    o = cfg.optim
    optimizer = build_adamw(model, budget.lr, o.weight_decay, o.betas, o.eps, skip=model.no_weight_decay())
    ddp_objective = du.wrap_ddp(objective, env, device)
    run, step = open_run(cfg, "retrieval", env, model, optimizer, find_resume_checkpoint(out_dir, resume),
                         budget.total_steps)
    amp_dtype, scaler = amp_setup(cfg.train.amp, device)
    make_loader = partial(build_loader, dataset, micro, cfg.train.num_workers, cfg.seed, sampler, drop_last=True)
    last: dict = {}
    while step < budget.total_steps:
        epoch, done_in_epoch = budget.position(step)
        batches = epoch_batches(dataset, sampler, make_loader, epoch, done_in_epoch * accum, micro)
        t_data = time.perf_counter()
        for _ in range(budget.steps_left_in_epoch(step)):
            set_lr(optimizer, float(budget.lrs[step]))
            model.train()
            gen = mask_generator(cfg.seed, step, env.rank)  # the step's hard negatives
            sums, data_time, t_step = {"loss": 0.0, "vtc": 0.0, "vtm": 0.0}, 0.0, time.perf_counter()
            for m in range(accum):
                batch = next(batches)
                data_time += time.perf_counter() - t_data
                pixels = batch["pixels"].to(device, non_blocking=True)  # [B, T, 3, H, W] uint8
                text = {k: v.to(device) for k, v in tokenize(tokenizer, batch["caption"], cfg.text.max_length).items()}
                with micro_step(ddp_objective, m, accum, amp_dtype, device):
                    out = ddp_objective(normalize_video(pixels), text["input_ids"], text["attention_mask"],
                                        batch["sample_id"].to(device), gen)
                    scaler.scale(out["loss"] / accum).backward()
                for k, v in out.items():  # sync point: .item() per loss and micro-batch
                    sums[k] += v.item() / accum
                t_data = time.perf_counter()
            losses = du.mean_over_ranks({"loss": sums["loss"], "loss_vtc": sums["vtc"], "loss_vtm": sums["vtm"]}, device)
            grad_norm = optimizer_step(losses["loss"], step, model, optimizer, scaler, o.grad_clip, out_dir)
            step += 1
            step_time = time.perf_counter() - t_step
            last = {"step": step, "epoch": epoch, **losses, "temp": model.temp.item(), "lr": float(budget.lrs[step - 1]),
                    "grad_norm": grad_norm, "step_time": step_time, "data_time": data_time,
                    "samples_per_s": micro * accum * env.world_size / step_time}
            run.log_step(last)
            run.checkpoint_if_due(step, epoch, model, optimizer)
    test = evaluate_after_training(model, tokenizer, cfg, device, step)
    if test:
        run.metrics.log(test)
        last = {**last, **test}
    run.close()
    return last


def evaluate_after_training(model, tokenizer, cfg: Recipe, device: torch.device, step: int) -> dict:
    """``test_*`` retrieval metrics on ``finetune.test_source`` (else ``val_source``); {} without one."""
    source = cfg.finetune.test_source or cfg.finetune.val_source
    result: dict = {}
    if source:
        result.update(evaluate_retrieval_model(model, tokenizer, cfg, source, device))
    mc_source = cfg.retrieval.mc_source
    if mc_source:
        result.update(evaluate_multiple_choice_model(model, tokenizer, cfg, mc_source, device))
    return {"step": step, **{f"test_{k}": v for k, v in result.items()}} if result else {}


# --------------------------------------------------------------------------------------------------
# parts


class RetrievalObjective(nn.Module):
    """VTC + VTM of one batch on all tokens, pooled per frame; DDP wraps this module.

    Args:
        model: A :class:`~umt_distill.models.umt_vl.UMTVisionLanguage`.
        hard_negatives: VTM negatives ∝ similarity (UMT) or uniform.
        gather: VTC's gather over ranks; the loop passes
            :func:`~umt_distill.training.distributed.gather_with_grad` (default: this rank's batch only).
    """

    def __init__(self, model: nn.Module, hard_negatives: bool = True,
                 gather: Callable[[Tensor], Tensor] = no_gather) -> None:
        super().__init__()
        self.model, self.hard_negatives, self.gather = model, hard_negatives, gather

    def forward(self, pixels: Tensor, input_ids: Tensor, text_mask: Tensor, ids: Tensor,
                generator: torch.Generator) -> dict[str, Tensor]:
        """``loss`` = VTC + VTM, and both parts. pixels float [B, 3, T, H, W]; text long [B, L]; ids long [B]."""
        m = self.model
        m.clamp_temp()
        vision = m.vision_encoder(pixels, None, align=False, keep_temporal=True)  # pooled [B, T, C]
        text_hidden = m.text_encoder.forward_text(input_ids, text_mask)  # [B, L, H]
        v_emb, t_emb = m.vision_embedding(vision.pooled), m.text_embedding(text_hidden)  # [B, T, E], [B, E]
        vtc = vtc_loss(v_emb, t_emb, ids, m.temp, self.gather)
        with torch.no_grad():
            sim = similarity(v_emb.float(), t_emb.float()) / m.temp  # [B, B], local batch as in UMT
        vi, ti, labels = vtm_pairs(sim, ids, generator, self.hard_negatives)
        vtm = vtm_loss(m.match_logits(text_hidden[ti], text_mask[ti], vision.tokens[vi]), labels)
        return {"loss": vtc + vtm, "vtc": vtc, "vtm": vtm}


_ANY_HEAD = re.compile(r"(^|\.)clip_decoder\.(\d+)\.head\.weight$")


def build_retrieval_model(cfg: Recipe, vocab_size: int):
    """The stage-2 model, from ``stage2.init`` (whole model) or ``stage2.init_vision`` (student) or random.

    The alignment heads are unused here but kept so the weights load strictly and the result is a
    complete stage-2 checkpoint; their width and count come from the init file.
    """

    s = cfg.stage2
    teacher_dim, heads, state = s.embed_dim, cfg.teacher.layers, None
    if s.init or s.init_vision:
        file = weights_file(s.init or s.init_vision)
        state = unwrap_state_dict(read_state_dict(file), str(file))
        if s.init:
            teacher_dim, heads, vocab = vl_shapes(state, str(file))
            if vocab != vocab_size:
                raise ValueError(f"{file}: the text encoder has {vocab} tokens, the tokenizer {vocab_size}; use the "
                                 "tokenizer the model was trained with (its run's tokenizer/ folder or text.tokenizer)")
        else:
            found = {int(mt.group(2)): v.shape[0] for k, v in state.items() if (mt := _ANY_HEAD.search(k))}
            if found:
                teacher_dim, heads = next(iter(found.values())), len(found)
    bare = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"layers": heads}),
                                  "stage2": s.model_copy(update={"init": None})})
    model = build_model(bare, teacher_dim, vocab_size)  # loads init_vision (strict) if given
    if s.init:
        load_umt_vl_checkpoint(model, state)
    return model


def init_tokenizer(cfg: Recipe, captions: list[str], out_dir: Path, env: du.DistEnv):
    """The init model's tokenizer (its run's ``tokenizer/``) if it has one, else ``text.tokenizer``; saved
    in ``<output_dir>/tokenizer`` by rank 0, then loaded by the others (the fine-tuning stages that start
    from a stage-2 model: retrieval, qa)."""
    init = cfg.stage2.init
    spec = str(find_tokenizer_dir(init) or cfg.text.tokenizer) if init else cfg.text.tokenizer
    tok = None
    if env.is_main:
        tok = prepare_tokenizer(spec, captions, out_dir / "tokenizer", cfg.text.tokenizer_vocab_size)
    du.barrier()
    if tok is None:
        tok = prepare_tokenizer(spec, captions, out_dir / "tokenizer", cfg.text.tokenizer_vocab_size)
    return tok


__all__ = ["train", "evaluate_after_training", "RetrievalObjective", "build_retrieval_model", "init_tokenizer", "WEIGHTS"]


# --------------------------------------------------------------------------------------------------
# evaluating a finished run or checkpoint (`umt-distill eval`)


def find_tokenizer_dir(checkpoint: str | Path) -> Path | None:
    """The ``tokenizer/`` folder a run saved beside its checkpoints (run dir, checkpoints/, step dir)."""
    path = Path(checkpoint).resolve()
    for folder in [path, *list(path.parents)[:3]]:
        if (folder / "tokenizer" / "tokenizer_config.json").exists():
            return folder / "tokenizer"
    return None


_HEAD = re.compile(r"^vision_encoder\.clip_decoder\.(\d+)\.head\.weight$")


def vl_shapes(state: dict[str, Tensor], source: str) -> tuple[int, int, int]:
    """(teacher width, number of alignment heads, vocabulary size) a stage-2 state dict was built with."""
    heads = {int(m.group(1)): v.shape[0] for k, v in state.items() if (m := _HEAD.match(k))}
    words = state.get("text_encoder.bert.embeddings.word_embeddings.weight")
    if not heads or words is None:
        raise ValueError(f"{source}: not a stage-2 vision-language checkpoint (no vision_encoder.clip_decoder.* "
                         "or text_encoder.bert.embeddings.word_embeddings.weight)")
    return next(iter(heads.values())), len(heads), int(words.shape[0])


def load_vl_model(cfg: Recipe, checkpoint: str | Path):
    """The stage-2 model of the recipe with ``checkpoint``'s weights (strict), and its tokenizer.

    The teacher width, head count and vocabulary come from the checkpoint; the tokenizer from the run's
    ``tokenizer/`` folder, else ``text.tokenizer``.
    """
    file = weights_file(checkpoint)
    state = unwrap_state_dict(read_state_dict(file), str(file))
    model = vl_model_for(cfg, state, str(file))
    load_umt_vl_checkpoint(model, state)
    return model, checkpoint_tokenizer(cfg, checkpoint)


def vl_model_for(cfg: Recipe, state, name: str):
    """The recipe's stage-2 model at the shapes of ``state`` (teacher width, head count, vocabulary), with
    fresh weights: no init checkpoint is read (the caller loads ``state``)."""
    teacher_dim, heads, vocab = vl_shapes(state, name)
    bare = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"layers": heads}),
                                  "stage2": cfg.stage2.model_copy(update={"init": None, "init_vision": None})})
    return build_model(bare, teacher_dim, vocab)


def checkpoint_tokenizer(cfg: Recipe, checkpoint: str | Path):
    """The tokenizer a checkpoint was trained with: its run's ``tokenizer/`` folder, else ``text.tokenizer``."""
    tok_dir = find_tokenizer_dir(checkpoint)
    if tok_dir is None and cfg.text.tokenizer == TRAIN_ON_CORPUS:
        raise FileNotFoundError(f"{checkpoint}: no tokenizer/ folder beside the checkpoint, and text.tokenizer="
                                f"{TRAIN_ON_CORPUS} cannot rebuild the training vocabulary; pass text.tokenizer=PATH")
    return load_tokenizer(tok_dir or cfg.text.tokenizer)


def evaluate(cfg: Recipe, checkpoint: str | Path) -> dict:
    """Retrieval evaluation of a checkpoint (and multiple-choice accuracy when ``retrieval.mc_source`` is set).

    Args:
        cfg: The recipe: test manifest ``finetune.test_source`` (else ``val_source``), test view
            ``views.num_frames``/``views.size``, ``text.max_length``, ``finetune.eval_batch_size``;
            results go to ``<train.output_dir>/eval/<checkpoint name>/retrieval.json``.
        checkpoint: Our stage-2 or retrieval run/checkpoint folder, or an official UMT stage-2 file.

    Returns:
        The metrics and ``output``.
    """
    env = du.init_distributed()
    device = du.resolve_device(cfg.train.device, env)
    ft = cfg.finetune
    source = ft.test_source or ft.val_source
    if not source:
        raise RecipeError("retrieval evaluation needs finetune.test_source (a manifest with captions)")
    model, tokenizer = load_vl_model(cfg, checkpoint)
    model.to(device)
    result = evaluate_retrieval_model(model, tokenizer, cfg, source, device)
    mc_source = cfg.retrieval.mc_source
    if mc_source:
        result.update(evaluate_multiple_choice_model(model, tokenizer, cfg, mc_source, device))
    name = Path(str(checkpoint).rstrip("/")).name or "checkpoint"
    out = Path(cfg.train.output_dir) / "eval" / name
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "retrieval.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"{source}: t2v R@1 {result['t2v_r1']:.1f}  v2t R@1 {result['v2t_r1']:.1f}  r_mean "
              f"{result['r_mean']:.1f}  (ITC only: {result['emb_r_mean']:.1f}; k={result['k_test']})", file=sys.stderr, flush=True)  # stdout: the JSON summary
    return {**result, "output": str(out)}
