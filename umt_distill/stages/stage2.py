"""Stage 2: video-text pretraining — UTA + VTC + VTM + MLM, with image-text co-training.

One explicit loop (``train``), sharing stage 1's parts (spec check, target gathering, optimizer groups,
schedule, checkpoints, metrics). Per step: pick the step's source (video or image, in proportion to
their sizes) → cached (or online) targets and a mask from the teacher's attention (video ``mask.ratio``,
image ``stage2.image_mask_ratio``) → student on the visible tokens + BERT on the captions →
weighted sum of the four losses (UMT code @4fb4049: multi_modality/models/umt.py,
multi_modality/tasks/pretrain.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from umt_distill.cache.datasets import batch_pixels
from umt_distill.cache.spec import SpecMismatchError, read_spec
from umt_distill.config import Recipe
from umt_distill.data.pixels import normalize_video
from umt_distill.data.text import prepare_tokenizer, special_ids, tokenize
from umt_distill.data.vl import source_schedule
from umt_distill.models.checkpoints import (
    load_umt_checkpoint,
    read_state_dict,
    select_student_keys,
    weights_file,
)
from umt_distill.models.classifier import inflate_patch_kernel
from umt_distill.models.frame_selector import save_selector
from umt_distill.models.text import build_text_encoder
from umt_distill.models.umt_vl import UMTVisionLanguage, load_umt_vl_checkpoint
from umt_distill.stages.parts import (
    SourceData,
    build_source,
    build_student,
    check_store_matches,
    mask_generator,
    sparse_scores,
    sparse_spec,
    step_targets_attn,
)
from umt_distill.stages.stage2_parts import (
    LOSS_NAMES,
    Stage2Objective,
    build_frame_selection,
    freeze_unused,
)
from umt_distill.teachers.build import build_teacher
from umt_distill.training import distributed as du
from umt_distill.training.checkpoint import find_resume_checkpoint
from umt_distill.training.loop import (
    NonFiniteLossError,
    micro_step,
    open_run,
    optimizer_step,
    step_budget,
)
from umt_distill.training.optim import amp_setup, build_adamw, set_lr


def train(cfg: Recipe, resume: str | Path | None = None) -> dict:
    """Run stage 2 as the recipe says; returns the last logged metrics. Resumes from ``train.output_dir``."""
    env = du.init_distributed()
    device = du.resolve_device(cfg.train.device, env)
    out_dir = Path(cfg.train.output_dir)
    weights = cfg.stage2.weights
    if weights["vtm"] > 0 and cfg.train.batch_size < 2:
        raise ValueError("train.batch_size must be >= 2 per process for VTM (it draws negatives within the batch)")

    sources = {name: build_source(cfg, name, env) for name in cfg.stage2.sources}
    teacher, teacher_dim = _teacher_and_dim(cfg, sources, device)
    tokenizer = _tokenizer(cfg, sources, out_dir, env)
    # Seeded after the teacher (an online one draws from the RNG): the same initial weights on every rank
    # and in cached and online mode.
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, teacher_dim, len(tokenizer)).to(device)
    freeze_unused(model, weights)
    sparse = sparse_spec(cfg, model.vision_encoder.encoder.depth, teacher_attn=weights["uta"] > 0)  # None: off
    # frame_select: k of T frames per video step (None: off); the learned selector trains inside the objective
    selection = build_frame_selection(cfg, sources["video"].cfg if "video" in sources else None, teacher, model,
                                      teacher_dim)
    selector = selection.selector if selection is not None else None
    objective = Stage2Objective(model, weights, cfg.stage2.mlm_prob, special_ids(tokenizer), cfg.stage2.vtm_hard_negatives,
                                gather=du.gather_with_grad, sparse=sparse, selector=selector)  # VTC over the global batch

    micro, accum = cfg.train.batch_size, cfg.train.accum_steps
    budget = step_budget(cfg, {name: src.clips_per_rank for name, src in sources.items()}, env.world_size)
    o = cfg.optim
    optimizer = build_adamw(model, budget.lr, o.weight_decay, o.betas, o.eps, skip=model.no_weight_decay())  # temp: no decay
    if selector is not None:  # its own group (no weight decay), before a resume loads the optimizer's state
        selector.module.to(device)
        optimizer.add_param_group({"params": list(selector.module.parameters()), "weight_decay": 0.0, "lr_scale": 1.0})
    ddp_objective = du.wrap_ddp(objective, env, device)
    run, step = open_run(cfg, "stage2", env, model, optimizer, find_resume_checkpoint(out_dir, resume), budget.total_steps)
    amp_dtype, scaler = amp_setup(cfg.train.amp, device)
    last: dict = {}
    while step < budget.total_steps:
        epoch, done_in_epoch = budget.position(step)
        # The same on every rank: all ranks train one source per step.
        order = source_schedule(budget.source_steps, cfg.seed, epoch)
        batches: dict = {}
        t_data = time.perf_counter()
        for source in order[done_in_epoch:done_in_epoch + budget.steps_left_in_epoch(step)]:
            src = sources[source]
            if source not in batches:  # resume mid-epoch: skip what this source already gave
                batches[source] = src.iterator(epoch, order[:done_in_epoch].count(source) * accum, micro)
            set_lr(optimizer, float(budget.lrs[step]))
            model.train()
            gen = mask_generator(cfg.seed, step, env.rank)  # masks, hard negatives and MLM masks of this step
            sums, data_time, t_step = dict.fromkeys(("loss", *LOSS_NAMES), 0.0), 0.0, time.perf_counter()
            for m in range(accum):
                batch = next(batches[source])
                data_time += time.perf_counter() - t_data
                pixels = batch_pixels(batch, device)  # [B, T, 3, H, W] uint8 (T = 1: images)
                targets, visible_idx, scores = None, None, None
                if weights["uta"] > 0:  # UMT: without UTA the student sees every token
                    targets, visible_idx, attn = step_targets_attn(src.cfg, batch, pixels, teacher, gen, device)  # [K, B, L, D], [B, L]
                    scores = sparse_scores(sparse, attn, visible_idx)  # [B, T, n] ranks tokens (sparsify.source=teacher)
                select = None
                if selection is not None and source == "video":  # the objective keeps only these frames' tokens
                    select = selection.step(batch, pixels, teacher, gen, device)
                text = {k: v.to(device) for k, v in tokenize(tokenizer, batch["caption"], cfg.text.max_length).items()}
                with micro_step(ddp_objective, m, accum, amp_dtype, device):
                    out = ddp_objective(normalize_video(pixels), visible_idx, targets, text["input_ids"],
                                        text["attention_mask"], batch["sample_id"].to(device), gen, scores, select)
                    scaler.scale(out["loss"] / accum).backward()
                for k, v in out.items():  # sync point: .item() per loss and micro-batch
                    sums[k] += v.item() / accum
                t_data = time.perf_counter()
            losses = du.mean_over_ranks({"loss": sums["loss"], **{f"loss_{k}": sums[k] for k in LOSS_NAMES if weights[k] > 0}},
                                        device)
            grad_norm = optimizer_step(losses["loss"], step, model, optimizer, scaler, o.grad_clip, out_dir)
            step += 1
            step_time = time.perf_counter() - t_step
            last = {"step": step, "epoch": epoch, "source": source, **losses, "temp": model.temp.item(),
                    "lr": float(budget.lrs[step - 1]), "grad_norm": grad_norm, "step_time": step_time,
                    "data_time": data_time, "samples_per_s": micro * accum * env.world_size / step_time}
            run.log_step(last)
            run.checkpoint_if_due(step, epoch, model, optimizer)
    run.close()
    if selector is not None and env.is_main:  # training-only module, not in the model's checkpoints: its last weights
        save_selector(selector.module, out_dir)
    return last


# --------------------------------------------------------------------------------------------------
# construction


def build_model(cfg: Recipe, teacher_dim: int, vocab_size: int):
    """The stage-2 model of the recipe, initialised from ``stage2.init`` or ``stage2.init_vision`` if given.

    Args:
        teacher_dim: Width of the teacher's tokens (the alignment heads' output).
        vocab_size: The tokenizer's size (a ``tiny`` text encoder's vocabulary; checked for a checkpoint).
    """
    s, t = cfg.stage2, cfg.text
    student = build_student(cfg, teacher_dim, **({"tubelet_size": s.tubelet_size} if s.tubelet_size else {}))
    if s.init_vision:
        init = weights_file(s.init_vision)
        if s.tubelet_size:  # a tubelet-1 file into a tubelet-T' encoder: the kernel spread over T' frames
            state, _ = select_student_keys(read_state_dict(init), str(init))
            init = inflate_patch_kernel(state, "encoder.patch_embed.proj.weight", s.tubelet_size, str(init))
        load_umt_checkpoint(student, init)  # strict: stage-1 (ours or UMT's) or stage-2 file
    text = build_text_encoder(t.encoder, t.fusion_layer, student.embed_dim, vocab_size,
                              gradient_checkpointing=t.gradient_checkpointing)
    model = UMTVisionLanguage(student, text, s.embed_dim, s.temp_init)
    if s.init:
        load_umt_vl_checkpoint(model, weights_file(s.init))
    return model


def _teacher_and_dim(cfg: Recipe, sources: dict[str, SourceData], device: torch.device):
    """Online: the frozen teacher. Cached: each source's store checked against its recipe view."""
    if cfg.teacher.mode == "online":
        teacher = build_teacher(cfg, device)  # frozen; never wrapped, never in the optimizer
        return teacher, teacher.embed_dim
    dims = {}
    for name, src in sources.items():
        spec = read_spec(src.cfg.cache.store)
        check_store_matches(spec, src.cfg)
        dims[name] = spec["teacher"]["D"]
    if len(set(dims.values())) != 1:
        raise SpecMismatchError(f"the sources' stores hold different teacher widths {dims}")
    return None, next(iter(dims.values()))


def _tokenizer(cfg: Recipe, sources: dict[str, SourceData], out_dir: Path, env: du.DistEnv):
    """Rank 0 builds (or finds) the run's tokenizer in ``<output_dir>/tokenizer``; the others then load it."""
    # Sorted: the trained vocabulary must not depend on the order clips were listed (cached vs online).
    captions = sorted(c for src in sources.values() for caps in src.captions.values() for c in caps)
    tok = None
    if env.is_main:
        tok = prepare_tokenizer(cfg.text.tokenizer, captions, out_dir / "tokenizer", cfg.text.tokenizer_vocab_size)
    du.barrier()
    if tok is None:
        tok = prepare_tokenizer(cfg.text.tokenizer, captions, out_dir / "tokenizer", cfg.text.tokenizer_vocab_size)
    return tok


__all__ = ["train", "build_model", "NonFiniteLossError", "SpecMismatchError"]
