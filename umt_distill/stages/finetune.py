"""Fine-tuning for action recognition, and its multi-view evaluation (UMT code @4fb4049:
single_modality/run_class_finetuning.py, single_modality/engines/engine_for_finetuning.py).

One explicit loop (``train``): labelled videos → clip-consistent augmentation (``num_sample`` clips per
decoded video) → Mixup/CutMix with one box per clip → classifier → soft-target cross-entropy (label
smoothing folded in) → AdamW with layer-wise LR decay and a per-iteration cosine schedule. Validation
on one centre view every ``finetune.eval_every`` epochs; after training, the multi-view test
(clips × crops, softmax averaged per video). ``evaluate`` runs that test on any fine-tuned checkpoint.
"""

from __future__ import annotations

import math
import sys
import time
from functools import partial
from pathlib import Path

import torch
import yaml
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch.utils.data import Subset

from umt_distill.config import Recipe, RecipeError, load_recipe
from umt_distill.data.admission import (
    check_failed_fraction,
    screen_clips,
    write_failures,
)
from umt_distill.data.classification import (
    VideoClassificationTestSet,
    VideoClassificationTrainSet,
    VideoMixup,
    collate_test,
    collate_train,
    read_label_map,
    read_labelled_corpus,
    sample_seed,
)
from umt_distill.data.pixels import IMAGENET_MEAN, IMAGENET_STD, normalize_video
from umt_distill.data.samplers import EpochSampler
from umt_distill.evaluation.multiview import (
    classification_report,
    merge_views,
    write_report,
)
from umt_distill.models.checkpoints import CheckpointError, latest_checkpoint
from umt_distill.models.classifier import (
    ClassifierLoadReport,
    ImageTeacherClassifier,
    backbone_config,
    checkpoint_tubelet,
    create_classifier,
    load_classifier_weights,
    read_weights,
)
from umt_distill.teachers.build import build_teacher
from umt_distill.training import distributed as du
from umt_distill.training.checkpoint import find_resume_checkpoint
from umt_distill.training.layer_decay import layer_decay_lr_scale
from umt_distill.training.loop import (
    build_loader,
    epoch_batches,
    micro_step,
    open_run,
    optimizer_step,
    step_budget,
)
from umt_distill.training.optim import amp_setup, build_adamw, set_lr
from umt_distill.training.progress import track


def train(cfg: Recipe, resume: str | Path | None = None) -> dict:
    """Fine-tune as the recipe says; returns the last logged metrics (with ``test_*`` if tested).

    Resumes from ``train.output_dir`` (or ``resume``) mid-epoch, exactly.
    """
    env = du.init_distributed()
    device = du.resolve_device(cfg.train.device, env)
    ft, out_dir = cfg.finetune, Path(cfg.train.output_dir)
    torch.manual_seed(cfg.seed)  # identical initial head (and drop-path stream start) on every rank
    ckpt = find_resume_checkpoint(out_dir, resume)
    model, report = build_classifier(cfg, load_init=ckpt is None)  # a resumed run loads its own weights below
    model.to(device)
    if env.is_main and report is not None:
        print(f"init: {report.layout} weights from {report.source} ({report.loaded} tensors; fresh: {report.fresh}"
              + (f"; inflated: {report.inflated}" if report.inflated else "") + ")", flush=True)

    rows, labels = read_labelled_corpus(ft.train_source, cfg.corpus.root, ft.num_classes, ft.label_map)
    rows, labels = usable_clips(rows, labels, cfg, ft.train_source, out_dir, "finetune", env)
    dataset = VideoClassificationTrainSet(rows, labels, ft, cfg.seed, cfg.corpus.video_backend, preload=ft.preload)
    sampler = EpochSampler(len(dataset), cfg.seed, env.rank, env.world_size)
    B, A = cfg.train.batch_size, cfg.train.accum_steps
    # UMT scales LRs by every clip in the step, repeated samples included.
    budget = step_budget(cfg, sampler.per_rank(), env.world_size, what="videos", clips_per_item=ft.num_sample)
    o = cfg.optim
    optimizer = build_adamw(model, budget.lr, o.weight_decay, o.betas, o.eps, skip=model.no_weight_decay(),
                            lr_scale=layer_decay_lr_scale(ft.layer_decay, model.depth))
    mixup = build_mixup(cfg)
    criterion = build_criterion(cfg, mixup is not None)
    ddp_model = du.wrap_ddp(model, env, device)
    run, step = open_run(cfg, "finetune", env, model, optimizer, ckpt, budget.total_steps)
    amp_dtype, scaler = amp_setup(cfg.train.amp, device)
    make_loader = partial(build_loader, dataset, B, cfg.train.num_workers, cfg.seed, sampler, collate_train, drop_last=True)
    last: dict = {}
    while step < budget.total_steps:
        epoch, done_in_epoch = budget.position(step)
        batches = epoch_batches(dataset, sampler, make_loader, epoch, done_in_epoch * A, B)
        t_data = time.perf_counter()
        for _ in range(budget.steps_left_in_epoch(step)):
            set_lr(optimizer, float(budget.lrs[step]))
            ddp_model.train()
            loss_sum, correct, seen, data_time, t_step = 0.0, 0, 0, 0.0, time.perf_counter()
            for micro in range(A):
                batch = next(batches)
                data_time += time.perf_counter() - t_data
                x = batch["pixels"].to(device, non_blocking=True)  # [B·S, 3, T, H, W] normalised
                y = batch["label"].to(device)  # [B·S]
                # One lambda and one CutMix box per batch, shared by all frames; a function of (seed, step, rank, micro).
                targets = mixup(x, y, sample_seed(cfg.seed, "mixup", step, env.rank, micro))[1] if mixup else y
                with micro_step(ddp_model, micro, A, amp_dtype, device):
                    logits = ddp_model(x)  # [B·S, num_classes]
                    loss = criterion(logits.float(), targets)
                    scaler.scale(loss / A).backward()
                loss_sum += loss.item() / A  # sync point: one .item() per micro-batch
                correct += int((logits.argmax(1) == y).sum())
                seen += y.numel()
                t_data = time.perf_counter()
            # train_top1 compares with the unmixed labels (a rough signal while Mixup is on)
            means = du.mean_over_ranks({"loss": loss_sum, "train_top1": correct / seen}, device)
            grad_norm = optimizer_step(means["loss"], step, model, optimizer, scaler, o.grad_clip, out_dir)
            step += 1
            step_time = time.perf_counter() - t_step
            last = {"step": step, "epoch": epoch, "loss": means["loss"], "lr": float(budget.lrs[step - 1]),
                    "grad_norm": grad_norm, "train_top1": means["train_top1"], "step_time": step_time,
                    "data_time": data_time, "clips_per_s": seen * env.world_size / step_time}
            run.log_step(last)
            epoch_done = step % budget.steps_per_epoch == 0
            if ft.val_source and ft.eval_every and epoch_done and (epoch + 1) % ft.eval_every == 0 and step < budget.total_steps:
                val = evaluate_model(model, cfg, ft.val_source, env, device, num_clips=1, num_crops=1)[0]
                run.metrics.log({"step": step, "epoch": epoch, **{f"val_{k}": v for k, v in val.summary().items()}})
            run.checkpoint_if_due(step, epoch, model, optimizer)
    source = ft.test_source or ft.val_source
    if source:  # the final model on the full multi-view protocol (UMT tests the best checkpoint instead)
        report_, files = evaluate_model(model, cfg, source, env, device, ft.test_num_clips, ft.test_num_crops,
                                        out_dir=out_dir / "eval" / "final")
        test = {"step": step, **{f"test_{k}": v for k, v in report_.summary().items()}}
        run.metrics.log(test)
        last = {**last, **test}
    run.close()
    return last


def evaluate(cfg: Recipe, checkpoint: str | Path) -> dict:
    """Multi-view test of a fine-tuned checkpoint on ``finetune.test_source`` (else ``val_source``).

    Args:
        cfg: The recipe (model size, classes, frames, test views; ``train.output_dir`` receives
            ``eval/<checkpoint name>/`` with metrics.json, predictions.jsonl and confusion.png).
        checkpoint: A fine-tuning run dir or checkpoint dir of ours, or an official fine-tuned UMT file;
            ``finetune.head_slice`` applies (K710 head evaluated on K400).

    Returns:
        The scalar metrics (top1, top5, mean_class_accuracy, num_videos, num_views) and ``output``.
    """
    env = du.init_distributed()
    device = du.resolve_device(cfg.train.device, env)
    ft = cfg.finetune
    source = ft.test_source or ft.val_source
    if not source:
        raise RecipeError("evaluate needs finetune.test_source (or finetune.val_source)")
    if ft.drop_head:
        raise RecipeError("finetune.drop_head=true would evaluate an untrained head; unset it for evaluation")
    model, report = build_classifier(cfg, init=checkpoint)
    if report is not None and report.layout != "finetuned":
        raise CheckpointError(str(checkpoint), f"a {report.layout} pretraining checkpoint has no trained head; "
                                               "fine-tune it first (umt-distill train) or use a fine-tuned file")
    model.to(device)
    name = Path(str(checkpoint).rstrip("/")).name or "checkpoint"
    out = Path(cfg.train.output_dir) / "eval" / name
    result, files = evaluate_model(model, cfg, source, env, device, ft.test_num_clips, ft.test_num_crops, out_dir=out)
    summary = {**result.summary(), "output": str(out)}
    if env.is_main:
        print(f"{source}: top-1 {result.top1:.4f}  top-5 {result.top5:.4f}  "
              f"mean class acc {result.mean_class_accuracy:.4f}  ({result.num_videos} videos × {result.num_views} views)", file=sys.stderr, flush=True)  # stdout: the JSON summary
    return summary


def finetune_toy(train_source: str | Path, test_source: str | Path, output_dir: str | Path,
                 init: str | Path | None = None, backbone: str = "student", overrides: list[str] | tuple = ()) -> dict:
    """Fine-tune the tiny CPU recipe (``finetune/tiny``) on labelled toy clips and test it: the quickstart hook.

    Args:
        train_source: Labelled training manifest.
        test_source: Labelled test manifest (multi-view tested after training).
        output_dir: Run folder; a finished run there is resumed (so re-running only re-tests).
        init: A stage-1 run/checkpoint of ``stage1/tiny`` for the student; None = random init.
        backbone: ``student`` or ``image_teacher`` (the tiny CLIP tower of the recipe, per frame).
        overrides: Further ``key=value`` recipe overrides (e.g. ``finetune.num_classes=4``).

    Returns:
        ``{"top1", "top5", "mean_class_accuracy", "output_dir"}`` of the multi-view test.
    """
    args = [f"finetune.train_source={train_source}", f"finetune.test_source={test_source}",
            f"train.output_dir={output_dir}", f"finetune.backbone={backbone}"]
    if init is not None:
        args.append(f"finetune.init={init}")
    cfg = load_recipe("finetune/tiny", [*args, *overrides])
    last = train(cfg)
    return {"top1": last["test_top1"], "top5": last["test_top5"],
            "mean_class_accuracy": last["test_mean_class_accuracy"], "output_dir": str(output_dir)}


# --------------------------------------------------------------------------------------------------
# parts


def build_classifier(cfg: Recipe, init: str | Path | None = None, load_init: bool = True):
    """The recipe's classifier and, when weights were loaded, what was loaded.

    Args:
        cfg: The recipe (``finetune.backbone``, ``student.*``, ``finetune.*``, ``teacher.*`` for the baseline).
        init: Weights to load instead of ``finetune.init`` (``evaluate`` passes the checkpoint).
        load_init: False: build only (a resumed run restores its own weights).

    Returns:
        (model, :class:`~umt_distill.models.classifier.ClassifierLoadReport` or None).
    """
    ft, s = cfg.finetune, cfg.student
    init = (ft.init if init is None else init) if load_init else None
    if ft.backbone == "image_teacher":
        if ft.tubelet_size is not None:
            raise RecipeError(f"finetune.tubelet_size={ft.tubelet_size} applies to the student; the image teacher "
                             "(finetune.backbone=image_teacher) embeds every frame on its own")
        model = _image_teacher_classifier(cfg)
        if init is None:
            return model, None
        state, source = read_weights(init)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(source, f"not an image-teacher classifier checkpoint: missing {missing[:8]}, unexpected {unexpected[:8]}")
        return model, ClassifierLoadReport(source, "finetuned", len(state))
    # The init's weights are read once: their tubelet is the default (a resumed run reads it too, to
    # build the same model; its own checkpoint is loaded by the caller).
    weights = ft.init if init is None and ft.tubelet_size is None else init
    state, source = read_weights(weights) if weights is not None else (None, None)
    model = create_classifier(
        s.name, ft.num_classes, pretrain_grid=pretrain_grid(cfg, _init_tubelet(state)), fc_drop_rate=ft.fc_drop_rate,
        head_init_scale=ft.head_init_scale, drop_path_rate=s.drop_path_rate, use_checkpoint=s.use_checkpoint,
        checkpoint_num=s.checkpoint_num, tubelet_size=classifier_tubelet(cfg, state),
    )
    if init is None:
        return model, None
    _check_pretrain_recipe(init, cfg)
    grid = (ft.num_frames // model.patch_embed.tubelet_size, ft.size // model.patch_embed.patch_size,
            ft.size // model.patch_embed.patch_size)
    return model, load_classifier_weights(model, state, head_slice=ft.head_slice, drop_head=ft.drop_head, grid=grid,
                                          source=source)


def classifier_tubelet(cfg: Recipe, init_state: dict | None) -> int:
    """Frames per token of the fine-tuned student: ``finetune.tubelet_size``, else the init's, else the student's.

    Raises:
        RecipeError: The tubelet does not divide ``finetune.num_frames``, or the init has a tubelet other
            than 1 that differs from it (only tubelet 1 is inflated).
    """
    ft = cfg.finetune
    found = checkpoint_tubelet(init_state) if init_state is not None else None
    tubelet = ft.tubelet_size or found or backbone_config(cfg.student.name)["tubelet_size"]
    if ft.num_frames % tubelet:
        raise RecipeError(f"finetune.tubelet_size={tubelet} does not divide finetune.num_frames={ft.num_frames}: "
                         "every token must span whole frames")
    if found is not None and found not in (1, tubelet):
        raise RecipeError(f"finetune.init {ft.init} has tubelet {found}; finetune.tubelet_size={tubelet} can only "
                         "inflate a tubelet-1 checkpoint (leave it null to keep the file's)")
    return tubelet


def pretrain_grid(cfg: Recipe, pretrain_tubelet: int | None = None) -> tuple[int, int, int]:
    """Token grid of pretraining, from ``finetune.pretrain_num_frames``/``pretrain_size`` and the patch size.

    ``pretrain_tubelet``: frames per token of the init checkpoint (a VideoMAE file: 2); default the student's.
    """
    bb = backbone_config(cfg.student.name)
    ft = cfg.finetune
    side = ft.pretrain_size // bb["patch_size"]
    return ft.pretrain_num_frames // (pretrain_tubelet or bb["tubelet_size"]), side, side


def _init_tubelet(state: dict | None) -> int | None:
    return checkpoint_tubelet(state) if state is not None else None


def _check_pretrain_recipe(init: str | Path, cfg: Recipe) -> None:
    """Our checkpoints carry their recipe: refuse a pretraining grid that contradicts it."""
    path = Path(init)
    ckpt = latest_checkpoint(path) if path.is_dir() else None
    recipe = ckpt / "recipe.yaml" if ckpt is not None else None
    if recipe is None or not recipe.exists():
        return
    data = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
    if data.get("train", {}).get("stage", "stage1") == "finetune":
        return  # a fine-tuned init: its grid is the fine-tuning one, the pretraining fields carry over
    views, ft = data.get("views", {}), cfg.finetune
    if (views.get("num_frames"), views.get("size")) != (ft.pretrain_num_frames, ft.pretrain_size):
        raise RecipeError(f"{recipe}: pretrained with views.num_frames={views.get('num_frames')} and views.size="
                         f"{views.get('size')}, but finetune.pretrain_num_frames={ft.pretrain_num_frames} and "
                         f"finetune.pretrain_size={ft.pretrain_size}; set them to the pretraining values")


def _image_teacher_classifier(cfg: Recipe):
    t = cfg.teacher
    if t.input_size is not None and t.input_size != cfg.finetune.size:
        raise RecipeError(f"teacher.input_size={t.input_size} differs from finetune.size={cfg.finetune.size}")
    teacher = build_teacher(cfg.model_copy(update={"teacher": t.model_copy(update={"input_size": cfg.finetune.size,
                                                                                    "layers": 1})}),
                            torch.device("cpu"))
    return ImageTeacherClassifier(
        teacher.visual, teacher.embed_dim, cfg.finetune.num_classes, teacher.mean, teacher.std,
        IMAGENET_MEAN, IMAGENET_STD, cfg.finetune.fc_drop_rate, cfg.finetune.head_init_scale,
    )


def build_mixup(cfg: Recipe) -> VideoMixup | None:
    """timm Mixup/CutMix on videos, or None when both alphas (or the probability) are 0."""
    ft = cfg.finetune
    if ft.mixup_prob == 0 or (ft.mixup == 0 and ft.cutmix == 0):
        return None
    return VideoMixup(ft.num_classes, ft.mixup, ft.cutmix, ft.mixup_prob, ft.mixup_switch_prob, ft.mixup_mode,
                      ft.label_smoothing)


def build_criterion(cfg: Recipe, soft_targets: bool) -> torch.nn.Module:
    """timm's SoftTargetCrossEntropy with Mixup (smoothing is in the targets), else label-smoothing CE."""
    if soft_targets:
        return SoftTargetCrossEntropy()
    if cfg.finetune.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.finetune.label_smoothing)
    return torch.nn.CrossEntropyLoss()


_SCREENED: dict[tuple, tuple[list[int], list[dict]]] = {}


def usable_clips(rows: list, labels: list, cfg: Recipe, source: str, record_dir: str | Path | None, stage: str,
                 env: du.DistEnv) -> tuple[list, list]:
    """The rows (and labels) that give ``finetune.num_frames`` frames; the others are skipped, recorded in
    ``record_dir/failures.jsonl`` and counted against ``corpus.max_failed_fraction`` (data/admission.py:
    the policy caching follows too)."""
    # Screened once per manifest and run (validation repeats every few epochs), on rank 0 only: every
    # rank gets the same answer instead of each opening every video itself.
    key = (str(source), cfg.corpus.root, cfg.finetune.num_frames, cfg.corpus.video_backend, len(rows))
    if key not in _SCREENED:
        _SCREENED[key] = du.broadcast_object(
            screen_clips(rows, cfg.finetune.num_frames, cfg.corpus.video_backend) if env.is_main else None)
    keep, failed = _SCREENED[key]
    if env.is_main and record_dir is not None:
        write_failures(record_dir, failed, stage)
    check_failed_fraction(len(failed), len(rows), cfg.corpus.max_failed_fraction, source)
    if failed and env.is_main:
        print(f"{source}: skipping {len(failed)} of {len(rows)} clips that cannot be used (first: {failed[0]['id']}: "
              f"{failed[0]['reason']}); all are listed in failures.jsonl", file=sys.stderr, flush=True)
    return [rows[i] for i in keep], [labels[i] for i in keep]


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, cfg: Recipe, source: str, env: du.DistEnv, device: torch.device,
                   num_clips: int, num_crops: int, out_dir: str | Path | None = None):
    """Multi-view evaluation of ``model`` on a labelled manifest; every rank takes every world_size-th video.

    Returns:
        (:class:`~umt_distill.evaluation.multiview.ClassificationReport`, files written on rank 0 or {}).
    """
    ft = cfg.finetune
    rows, labels = read_labelled_corpus(source, cfg.corpus.root, ft.num_classes, ft.label_map)
    rows, labels = usable_clips(rows, labels, cfg, source, out_dir, "evaluate", env)
    dataset = VideoClassificationTestSet(rows, labels, ft, num_clips, num_crops, cfg.corpus.video_backend)
    mine = Subset(dataset, list(range(env.rank, len(dataset), env.world_size)))
    was_training = model.training
    model.eval()
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp) if device.type == "cuda" else None
    ids, keys, logits_list, label_of = [], [], [], {}
    batches = build_loader(mine, ft.eval_batch_size, cfg.train.num_workers, cfg.seed, collate_fn=collate_test)
    for batch in track(batches, "eval", math.ceil(len(mine) / ft.eval_batch_size), enabled=env.is_main):
        B, V = batch["pixels"].shape[:2]
        pixels = batch["pixels"].to(device).flatten(0, 1)  # [B·V, T, 3, S, S] uint8
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits_list.append(model(normalize_video(pixels)).float().cpu())  # [B·V, C]
        ids += [vid for vid in batch["clip_id"] for _ in range(V)]
        keys += [tuple(k) for k in batch["views"].flatten(0, 1).tolist()]
        label_of.update(zip(batch["clip_id"], batch["label"].tolist()))
    model.train(was_training)
    # All views of a video sit on one rank: merge them here, so ranks exchange [videos, C], not [views, C].
    logits = torch.cat(logits_list) if logits_list else torch.zeros(0, ft.num_classes)
    videos, probs = merge_views(ids, keys, logits) if ids else ([], torch.zeros(0, ft.num_classes, dtype=torch.float64))
    parts = du.gather_objects((videos, probs, [label_of[v] for v in videos]))
    videos = [v for p in parts for v in p[0]]
    probs = torch.cat([p[1] for p in parts])  # [N, C]
    y = torch.tensor([label for p in parts for label in p[2]], dtype=torch.long)
    result = classification_report(probs, y, num_clips * num_crops)
    files = {}
    if out_dir is not None and env.is_main:
        names = None
        if ft.label_map:
            names = [n for n, _ in sorted(read_label_map(ft.label_map).items(), key=lambda kv: kv[1])]
        files = write_report(result, videos, probs, y, out_dir, names)
    return result, files


__all__ = ["train", "evaluate", "finetune_toy", "evaluate_model", "build_classifier", "classifier_tubelet", "build_mixup",
           "build_criterion", "pretrain_grid"]
