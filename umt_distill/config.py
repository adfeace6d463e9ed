"""Typed, strict recipes: YAML files plus ``key=value`` overrides.

A recipe is one :class:`Recipe`. Every section is a pydantic model that forbids unknown keys and does
not coerce types, so a typo (``cache.codek``) or a wrong type (``cache.num_views=four``) fails with a
message naming the key and, for typos, the closest valid key.

    recipe = load_recipe("recipes/stage1/tiny.yaml", ["cache.codec=int8", "train.epochs=2"])
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError


class RecipeError(ValueError):
    """A recipe file or override is invalid; the message names the key and the reason."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, validate_default=True)


class CorpusConfig(_Section):
    """Where the clips come from."""

    source: str = ""
    """A .csv/.jsonl manifest or a folder of videos/images."""
    root: str | None = None
    """Folder that relative paths in the manifest are resolved against (default: the manifest's folder)."""
    video_backend: Literal["decord", "pyav", "torchcodec"] = "decord"
    """decord is fast; pyav is the frame-exact reference; torchcodec needs FFmpeg's shared libraries."""
    max_failed_fraction: float = Field(0.5, ge=0.0, le=1.0)
    """Clips that cannot be used (unreadable, or fewer frames than a view or clip needs) are skipped and
    recorded (the store's or the run's ``failures.jsonl``); past this fraction of the corpus, fine-tuning
    and evaluation stop before they start, and ``cache-teacher`` stops when it finishes (exit status 1)."""


class ViewConfig(_Section):
    """How views (frame indices, crop, flip, size) are drawn. A view is a function of (seed, clip, index)."""

    policy: str = "umt_train"
    num_frames: int = Field(8, ge=1)
    size: int = Field(224, ge=8)
    scales: tuple[float, ...] = (1.0, 0.875, 0.75, 0.66)
    max_distort: int = Field(1, ge=0)
    flip: bool = True
    sampling_rate: int = Field(4, ge=1)
    """Frame stride of the dense ``videomae_train`` policy (VideoMAE: 16 frames every 4th)."""


class TeacherConfig(_Section):
    """The frozen image CLIP teacher."""

    type: str = "open_clip"
    name: str = "ViT-B-16"
    pretrained: str | None = "openai"
    """An open_clip tag (``openai``), a local weights file, or null for random weights."""
    model_config_path: str | None = None
    """An open_clip model-config JSON for custom/tiny models, registered with open_clip under
    ``teacher.name`` (so give it a name of its own, not a built-in one such as ``ViT-B-16``)."""
    layers: int = Field(6, ge=1)
    layer_interval: float = Field(1.0, gt=0)
    input_size: int | None = None
    """Teacher input resolution; null = the model's own (UMT-L: CLIP-L/14 at 196)."""
    normalize: Literal["clip", "imagenet"] = "imagenet"
    """UMT feeds the teacher ImageNet-normalised pixels; ``clip`` uses the model's own statistics."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype on CUDA; CPU always runs fp32."""
    mode: Literal["cached", "online"] = "cached"
    """Where training targets come from: the cache store or the teacher run at every step."""


class CacheConfig(_Section):
    """The teacher cache store."""

    store: str = "cache/default"
    layout: Literal["zarr", "wds"] = "zarr"
    num_views: int = Field(4, ge=1)
    """K augmented views cached per clip."""
    mode: Literal["full", "visible"] = "full"
    """``full`` keeps all tokens (masks drawn at train time); ``visible`` stores M masks' visible tokens."""
    mask_ratio: float = Field(0.8, ge=0.0, lt=1.0)
    masks_per_view: int = Field(1, ge=1)
    codec: str = "fp16"
    basis_clips: int = Field(32, ge=1)
    """Codecs with a basis (``pca<r>``): clips (all K views) the per-layer basis is fitted on."""
    compressor: Literal["zstd", "blosc", "none"] = "zstd"
    frames: Literal["none", "jpeg", "raw"] = "none"
    """Also store the student's view pixels so training skips video decoding: ``raw`` or ``jpeg`` (the
    teacher runs on the decoded JPEGs, so teacher and student see the same pixels); both layouts."""
    clips_per_shard: int = Field(16, ge=1)
    batch_size: int = Field(8, ge=1)
    """Clip-views per teacher forward."""
    num_workers: int = Field(2, ge=0)
    """DataLoader workers that decode video."""
    device: str = "auto"
    limit: int | None = None
    """Cache only the first N clips of the corpus (smoke runs)."""


class StudentConfig(_Section):
    """The video ViT student."""

    name: str = "umt_base_patch16"
    drop_path_rate: float = Field(0.1, ge=0.0, lt=1.0)
    use_checkpoint: bool = False
    checkpoint_num: int = Field(0, ge=0)
    align_interval: float = Field(1.0, gt=0)


class MaskConfig(_Section):
    """Which tokens the student sees."""

    type: str = "semantic"
    ratio: float = Field(0.8, ge=0.0, lt=1.0)


class OptimConfig(_Section):
    """AdamW with a per-iteration cosine schedule; learning rates are per 256 samples."""

    lr: float = Field(1.5e-4, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    warmup_lr: float = Field(0.0, ge=0)
    warmup_epochs: float = Field(40.0, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = None
    scale_lr: bool = True
    """Scale lr, min_lr and warmup_lr by total batch / 256 (UMT's rule)."""


# The names of umt_distill.stages.STAGES, the stage registry (`umt-distill ls` lists it with descriptions).
# Recipes are checked here, a layer below the stages, so the names are repeated rather than imported;
# tests/unit/stages/test_stage_registry.py keeps the two equal.
STAGE_NAMES: tuple[str, ...] = ("stage1", "stage2", "finetune", "retrieval", "videomae", "qa")


class TrainConfig(_Section):
    """The training loop."""

    stage: str = "stage1"
    """Which loop `umt-distill train` runs: one of :data:`STAGE_NAMES` (see `umt-distill ls`)."""
    output_dir: str = "runs/default"
    epochs: int = Field(201, ge=1)
    batch_size: int = Field(64, ge=1)
    """Per process."""
    accum_steps: int = Field(1, ge=1)
    max_steps: int | None = None
    num_workers: int = Field(4, ge=0)
    device: str = "auto"
    amp: Literal["none", "bf16", "fp16"] = "bf16"
    """Autocast on CUDA only."""
    log_every: int = Field(10, ge=1)
    ckpt_every: int = Field(1000, ge=1)
    tensorboard: bool = False
    pixels_from: Literal["video", "store"] = "video"
    """Re-decode the view from the video, or read the frames stored in the shards."""
    shuffle_buffer: int = Field(64, ge=0)
    """WebDataset streaming: samples in each worker's shuffle buffer (0: store order, shards unshuffled).
    Stage 1 reads its elastic global order instead (seeded shard order, then a seeded order within each
    shard's epoch group; docs/cli.md): there any value above 0 shuffles and 0 keeps store order."""

    @field_validator("stage")
    @classmethod
    def _known_stage(cls, stage: str) -> str:
        if stage not in STAGE_NAMES:  # reads "train.stage: not a known stage (...), got 'stag1'"
            close = difflib.get_close_matches(stage, STAGE_NAMES, n=2, cutoff=0.5)
            hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
            raise PydanticCustomError("unknown_stage", f"not a known stage ({hint}known: {', '.join(STAGE_NAMES)})")
        return stage


class TextConfig(_Section):
    """Stage 2 / retrieval: the BERT text side. (Fields owned by the stage-2 work.)"""

    encoder: str = "bert-base-uncased"
    """HF hub id or local folder of a BERT checkpoint; ``tiny`` builds a small random BERT for tests."""
    tokenizer: str = "bert-base-uncased"
    """HF hub id or local folder; ``train-on-corpus`` trains a WordPiece tokenizer on the captions."""
    tokenizer_vocab_size: int = Field(1000, ge=16)
    """Vocabulary size of a ``train-on-corpus`` tokenizer."""
    fusion_layer: int = Field(9, ge=1)
    """First BERT layer with cross-attention to the vision tokens (BERT-base 9, BERT-large 19)."""
    max_length: int = Field(32, ge=4)
    """Tokens per caption (padded / truncated)."""
    gradient_checkpointing: bool = False
    """Recompute BERT layers in backward (UMT turns it on)."""


class Stage2Config(_Section):
    """Stage 2 losses and data mixing. (Fields owned by the stage-2 work.)

    The video source is the recipe's ``corpus`` + ``cache`` sections (as in stage 1); the image source
    is ``image_corpus`` + ``image_store``, a store cached with ``views.num_frames=1``.
    """

    sources: tuple[Literal["video", "image"], ...] = ("video", "image")
    """Which sources train; with both, each step's source is drawn in proportion to their sizes.
    ``image`` needs ``image_corpus`` and ``image_store`` (checked when stage 2 starts)."""
    loss_weights: dict[str, float] = {"uta": 1.0, "vtc": 1.0, "vtm": 1.0, "mlm": 1.0}
    """Weights of uta, vtc, vtm, mlm (a key left out keeps weight 1; 0 skips that loss)."""
    embed_dim: int = Field(512, ge=1)
    """Width of the contrastive space (B/16: 512, L/16: 768)."""
    temp_init: float = Field(0.07, ge=0.001, le=0.5)
    image_mask_ratio: float = Field(0.5, ge=0.0, lt=1.0)
    """Mask ratio of images (videos use ``mask.ratio``)."""
    mlm_prob: float = Field(0.5, gt=0.0, lt=1.0)
    vtm_hard_negatives: bool = True
    """Draw VTM negatives ∝ softmax similarity (UMT); false: uniformly among non-positives."""
    image_corpus: str = ""
    """Manifest (or folder) of images with captions."""
    image_corpus_root: str | None = None
    image_store: str = ""
    """Cache store of the image corpus (cache-teacher with views.num_frames=1)."""
    image_layout: Literal["zarr", "wds"] = "zarr"
    init_vision: str | None = None
    """Stage-1 weights for the vision encoder: our run/checkpoint folder or .safetensors, or an official UMT file."""
    init: str | None = None
    """A whole stage-2 model to start from: an official UMT stage-2 file or our stage-2 checkpoint."""
    tubelet_size: int | None = Field(None, ge=1)
    """Frames per token of the vision encoder; null = the student's (UMT: 1). A tubelet-1 ``init_vision`` is
    inflated (kernel / T' on each frame, as ``finetune.tubelet_size``). UTA pairs each student token with
    one teacher token of one frame, so T' > 1 needs ``loss_weights.uta=0``."""

    @property
    def weights(self) -> dict[str, float]:
        """All four loss weights: ``loss_weights`` with the keys it leaves out at 1 (an override such as
        ``stage2.loss_weights.vtm=0`` gives a one-key dict)."""
        return {"uta": 1.0, "vtc": 1.0, "vtm": 1.0, "mlm": 1.0, **self.loss_weights}

    @model_validator(mode="after")
    def _check(self) -> Stage2Config:
        unknown = sorted(set(self.loss_weights) - {"uta", "vtc", "vtm", "mlm"})
        if unknown:
            raise ValueError(f"loss_weights: unknown loss {unknown[0]!r} (valid: uta, vtc, vtm, mlm)")
        if any(v < 0 for v in self.weights.values()) or not any(v > 0 for v in self.weights.values()):
            raise ValueError("loss_weights: weights must be >= 0 and at least one > 0")
        if not self.sources or len(set(self.sources)) != len(self.sources):
            raise ValueError(f"sources: give video and/or image once each, got {list(self.sources)}")
        if self.init and self.init_vision:
            raise ValueError("init and init_vision: give one (init loads the whole stage-2 model)")
        if (self.tubelet_size or 1) > 1 and self.weights["uta"] > 0:
            raise ValueError(f"tubelet_size={self.tubelet_size}: a token then spans {self.tubelet_size} frames and has no "
                             "single teacher token to align with; set loss_weights.uta=0 (or tubelet_size=1)")
        return self


class FinetuneConfig(_Section):
    """Action-recognition fine-tuning and evaluation (UMT code @4fb4049:
    single_modality/run_class_finetuning.py). The backbone size is ``student.name`` and its drop path
    ``student.drop_path_rate``; LRs are per 256 clips (``optim``)."""

    # data: labelled manifests (corpus.root and corpus.video_backend apply to all three)
    train_source: str = ""
    """Training manifest (.csv/.jsonl with a label per row)."""
    val_source: str | None = None
    """Validated on one centre view every ``eval_every`` epochs; null = no validation."""
    test_source: str | None = None
    """Multi-view tested after training and by `umt-distill eval` (falls back to ``val_source``)."""
    label_map: str | None = None
    """Class names, one per line (line i = class i) or JSON; needed when manifests give names."""
    num_classes: int = Field(400, ge=1)
    num_frames: int = Field(8, ge=1)
    size: int = Field(224, ge=8)
    sampling: Literal["sparse", "segment"] = "sparse"
    """``sparse``: UMT's Kinetics sampling; ``segment``: TSN segments (SSv2)."""

    # model and initialisation
    backbone: Literal["student", "image_teacher"] = "student"
    """``image_teacher``: the baseline — the ``teacher`` CLIP tower per frame, averaged over time."""
    init: str | None = None
    """Our stage-1/2/fine-tune checkpoint (file or run dir) or an official UMT file; null = random init."""
    pretrain_num_frames: int = Field(8, ge=1)
    """Frames of pretraining: the position table is adapted from that grid (UMT: 8)."""
    pretrain_size: int = Field(224, ge=8)
    """Resolution of pretraining (UMT: 224)."""
    tubelet_size: int | None = Field(None, ge=1)
    """Frames per token of the fine-tuned student; null = the init checkpoint's (else ``student.name``'s).
    A tubelet-1 checkpoint is inflated to it (kernel / T' on each frame; ``models/classifier.py``)."""
    drop_head: bool = False
    """Re-initialise the head of a fine-tuned init checkpoint."""
    head_slice: int | None = Field(None, ge=1)
    """Keep the first N rows of the init checkpoint's head (K710 → K400: 400)."""
    head_init_scale: float = Field(0.001, gt=0)
    fc_drop_rate: float = Field(0.0, ge=0.0, lt=1.0)

    # optimisation (AdamW, cosine and warmup come from `optim`)
    layer_decay: float = Field(0.75, gt=0.0, le=1.0)
    """Layer-wise LR decay (UMT: 0.75 for B, 0.85 for L); 1 = off."""
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    mixup: float = Field(0.8, ge=0.0)
    """Mixup beta alpha; 0 = off."""
    cutmix: float = Field(1.0, ge=0.0)
    """CutMix beta alpha; 0 = off (one box per clip, shared by all frames)."""
    mixup_prob: float = Field(1.0, ge=0.0, le=1.0)
    mixup_switch_prob: float = Field(0.5, ge=0.0, le=1.0)
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"

    # training augmentation
    randaug: str | None = "rand-m7-n4-mstd0.5-inc1"
    """timm RandAugment string, the same ops on every frame of a clip; null = off."""
    train_scale: tuple[float, float] = (0.08, 1.0)
    """Random-resized-crop area range."""
    train_ratio: tuple[float, float] = (0.75, 1.3333)
    """Random-resized-crop aspect-ratio range."""
    flip: bool = True
    """Random horizontal flip (false for SSv2, whose labels say left/right)."""
    reprob: float = Field(0.25, ge=0.0, le=1.0)
    """Random-erasing probability per frame."""
    remode: Literal["pixel", "rand", "const"] = "pixel"
    recount: int = Field(1, ge=1)
    num_sample: int = Field(2, ge=1)
    """Repeated augmentation: augmented clips per decoded video (the batch holds batch_size × num_sample)."""
    preload: bool = False
    """Decode the training videos once into memory instead of every epoch (small corpora only)."""

    # evaluation
    test_num_clips: int = Field(4, ge=1)
    test_num_crops: int = Field(3, ge=1)
    eval_every: int = Field(1, ge=0)
    """Validate every N epochs (0 = only at the end)."""
    eval_batch_size: int = Field(4, ge=1)
    """Videos per evaluation batch (each with clips × crops views)."""


class RetrievalConfig(_Section):
    """Video-text retrieval evaluation (stage 2 zero-shot and retrieval fine-tuning; UMT code
    @4fb4049: multi_modality/tasks/retrieval_utils.py)."""

    k_test: int = Field(128, ge=1)
    """Candidates per query that the matching head re-ranks after the contrastive scores (UMT: 128)."""
    mc_source: str | None = None
    """Multiple-choice manifest (``captions`` = candidate answers, ``label`` = the right one's index),
    scored as retrieval after the retrieval test (MSRVTT-MC); null = none."""


class QAConfig(_Section):
    """Open-ended video QA (``train.stage=qa``; UMT code @4fb4049: multi_modality/tasks/vqa.py,
    multi_modality/configs/qa*.py). Annotations and the answer list: docs/qa.md."""

    train_source: str = ""
    """Training questions (JSONL: video, question, answers with counts, type)."""
    val_source: str | None = None
    """Validation questions: the best epoch by exact match is kept in ``<output_dir>/best`` (null = the last)."""
    test_source: str | None = None
    """Test questions: evaluated after training and by ``umt-distill eval``."""
    answer_list: str = ""
    """The answers inference ranks (JSON list, UMT's ``{answer: index}``, or one per line)."""
    k_test: int = Field(128, ge=1)
    """Answers per question kept by first-token probability and re-scored by full likelihood (UMT: 128)."""
    question_max_length: int = Field(25, ge=4)
    """Question tokens, [CLS] and [SEP] included (UMT: 25)."""
    answer_max_length: int = Field(5, ge=3)
    """Answer tokens, [CLS] and [SEP] included (UMT: 5)."""


class VideoMAEConfig(_Section):
    """Pixel reconstruction (``train.stage=videomae``): VideoMAE, VideoMAE V2 dual masking, UTA + pixel.

    The encoder is ``student.name``'s backbone with ``tubelet_size``; the encoder mask is ``mask``."""

    tubelet_size: int = Field(2, ge=1)
    """Frames per token (VideoMAE: 2; UTA + pixel needs 1, one teacher token per student token)."""
    decoder_dim: int = Field(384, ge=8)
    """Decoder width (VideoMAE B/16: 384)."""
    decoder_depth: int = Field(4, ge=1)
    """Decoder blocks (VideoMAE scripts: 4)."""
    decoder_heads: int = Field(6, ge=1)
    decoder_mask: Literal["none", "running_cell"] = "none"
    """``none``: reconstruct every invisible token (VideoMAE); ``running_cell``: VideoMAE V2's decoder mask."""
    decoder_mask_ratio: float = Field(0.5, gt=0.0, lt=1.0)
    """Running-cell ratio: int(4·ratio) of every 2×2 cell are not decoded (V2: 0.5)."""
    norm_target: bool = True
    """Normalise each patch's pixels per channel (VideoMAE's ``normlize_target``)."""
    target: Literal["pixel", "uta+pixel"] = "pixel"
    """``uta+pixel``: UMT Table 1's combination, UTA on the visible tokens plus pixels of the masked ones."""
    uta_weight: float = Field(1.0, ge=0.0)
    pixel_weight: float = Field(1.0, ge=0.0)


class SparsifyConfig(_Section):
    """Token sparsification (SMAUG, arXiv 2211.11446): among each frame's visible tokens, the blocks from
    ``after_block`` on see only the top ``keep`` fraction by attention. Training only (stage 1, stage 2);
    ``keep: 1.0`` (the default) is off. Needs a mask with the same visible count in every frame (tube,
    semantic). See docs/smaug.md."""

    keep: float = Field(1.0, gt=0.0, le=1.0)
    """ρ: fraction of each frame's visible tokens kept (``max(1, int(ρ·n))`` of n); 1.0 = off."""
    after_block: int = Field(0, ge=0)
    """ℓ: blocks 0..ℓ-1 see every visible token, blocks ℓ.. only the kept ones (0: drop before block 0)."""
    source: Literal["teacher", "student"] = "teacher"
    """Ranking: ``teacher`` = the teacher's CLS attention (cached ``attn``, or the online teacher's);
    ``student`` = the attention of each frame's mean token in the student's block ℓ."""
    fuse: bool = False
    """EViT: each frame's dropped tokens become one token, their attention-weighted mean."""


class FrameSelectConfig(_Section):
    """Text-guided frame selection (SMAUG, arXiv 2211.11446) in stage 2: each video step keeps ``keep_frames``
    of the T frames of every view, ranked for the step's caption; the kept frames keep their temporal
    positions and the cached targets are sliced to them. Training only: evaluation sees every frame.
    ``method: none`` (the default) is off. See docs/smaug.md."""

    method: Literal["none", "text_guided", "learned", "uniform", "random"] = "none"
    """``text_guided``: top k by the cached CLIP frame-caption cosine; ``learned``: a small selector over
    per-frame features and the caption's CLIP text embedding, trained through a perturbed top-k;
    ``uniform``: evenly spaced; ``random``: k drawn at random each step."""
    keep_frames: int | None = Field(None, ge=1)
    """k of T frames kept (needed unless ``method`` is none)."""
    per_segment: bool = False
    """At most one kept frame per temporal segment (T split into k equal segments)."""
    cache_captions: bool = True
    """cache-teacher embeds every caption with the teacher's text tower and scores each view's frames
    (``cache/captions.py``); needs a teacher with a text tower (a tag, hub model or full checkpoint)."""
    selector_hidden: int = Field(64, ge=1)
    """Width of the learned selector."""
    selector_sigma: float = Field(0.05, gt=0.0)
    """Noise scale of the perturbed top-k (its gradient's smoothing)."""
    selector_samples: int = Field(32, ge=1)
    """Noise samples of the perturbed top-k per step."""

    @model_validator(mode="after")
    def _check(self) -> FrameSelectConfig:
        if self.method != "none" and self.keep_frames is None:
            raise ValueError(f"method={self.method}: give keep_frames (k of the T frames to keep)")
        return self


class StorageConfig(_Section):
    """Reading a store on object storage (``cache.store=s3://...`` or ``http(s)://...``; docs/object-storage.md).
    Endpoint and credentials come from the standard places (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``...)"""

    block_mb: int = Field(16, ge=1)
    """Largest request: the byte ranges a batch needs are merged into requests of at most this size."""
    read_ahead: int = Field(2, ge=0)
    """Shard ranges a streaming reader fetches ahead of the one it reads, in the background."""
    read_ahead_mb: int = Field(512, ge=1)
    """At most this many MB fetched ahead and not yet read."""
    retries: int = Field(5, ge=1)
    """Tries of a request (connection refused or reset, 5xx, 503 SlowDown, a body cut short) before the run
    stops with a network error."""
    backoff_s: float = Field(0.5, ge=0.0)
    """Wait before the second try, doubled before each further one (at most 8 s)."""
    cache_dir: str | None = None
    """A local folder keeping fetched shard ranges (read from it next epoch); None: no cache."""
    cache_gb: float = Field(0.0, ge=0.0)
    """The most the cache folder holds; the least recently used ranges are deleted beyond it."""


class Recipe(_Section):
    """A complete recipe. Sections a command does not use are ignored by it."""

    seed: int = 0
    corpus: CorpusConfig = CorpusConfig()
    views: ViewConfig = ViewConfig()
    teacher: TeacherConfig = TeacherConfig()
    cache: CacheConfig = CacheConfig()
    student: StudentConfig = StudentConfig()
    mask: MaskConfig = MaskConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    text: TextConfig = TextConfig()
    stage2: Stage2Config = Stage2Config()
    finetune: FinetuneConfig = FinetuneConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    videomae: VideoMAEConfig = VideoMAEConfig()
    qa: QAConfig = QAConfig()
    sparsify: SparsifyConfig = SparsifyConfig()
    frame_select: FrameSelectConfig = FrameSelectConfig()
    storage: StorageConfig = StorageConfig()


# --------------------------------------------------------------------------------------------------
# loading


def recipes_dir() -> Path:
    """The recipes folder: ``$UMT_DISTILL_RECIPES``, else the recipes shipped inside the package.

    They are package data (``umt_distill/recipes``, found with importlib.resources), so an installed
    wheel has them; in the repository the top-level ``recipes/`` is a link to that folder.
    """
    env = os.environ.get("UMT_DISTILL_RECIPES")
    if env:
        return Path(env)
    from importlib.resources import files

    # A package installed as files (wheel, editable) gives a real path; a zipped one is not supported.
    return Path(str(files("umt_distill").joinpath("recipes")))


def resolve_recipe_path(recipe: str | Path) -> Path:
    """A file path, or a name under the recipes folder (``stage1/tiny`` → ``recipes/stage1/tiny.yaml``)."""
    path = Path(recipe)
    if path.is_file():
        return path
    for cand in (recipes_dir() / recipe, recipes_dir() / f"{recipe}.yaml"):
        if cand.is_file():
            return cand
    names = [p.relative_to(recipes_dir()).with_suffix("").as_posix() for p in list_recipe_files()]
    close = difflib.get_close_matches(str(recipe), names, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise RecipeError(f"recipe {str(recipe)!r} not found (not a file, not under {recipes_dir()}).{hint}")


def list_recipe_files() -> list[Path]:
    root = recipes_dir()
    return sorted(root.rglob("*.yaml")) if root.is_dir() else []


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        full = f"{prefix}{name}"
        keys.append(full)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_valid_keys(ann, f"{full}."))
    return keys


def _closest_key(key: str) -> str:
    valid = _valid_keys(Recipe)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # a typo in the section name: compare the leaf only
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in valid if k.rsplit(".", 1)[-1] in difflib.get_close_matches(leaf, [v.rsplit(".", 1)[-1] for v in valid], n=1)]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(recipe)"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key {key!r}{_closest_key(key)}")
        else:
            got = e.get("input")
            got_txt = f", got {got!r}" if not isinstance(got, dict) else ""
            lines.append(f"{key}: {e['msg']}{got_txt}")
    return f"invalid recipe ({origin}):\n  " + "\n  ".join(lines)


class YamlAliasError(yaml.YAMLError):
    """A recipe used a YAML alias (``*name``)."""


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 floats: ``1e-3`` is a number (PyYAML's YAML 1.1 reads it as a string), and
    without aliases: ``*name`` is refused where it is read, before anything is expanded, so a recipe
    from someone else cannot blow up to gigabytes (nested aliases) or recurse (an alias inside its own
    anchor). Recipes are small; writing a value twice costs nothing."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise YamlAliasError(f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not "
                                 "allowed in recipes; write the value out instead")
        return super().compose_node(parent, index)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 -- a SafeLoader subclass


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` → (["a", "b"], value parsed as YAML)."""
    if "=" not in text:
        raise RecipeError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {text!r} has an empty key")
    try:
        value = _yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise RecipeError(f"override {key}: cannot parse value {raw!r}: {e}") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` overrides to a nested dict (a copy is returned)."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise RecipeError(f"override {text!r}: {'.'.join(path[: i + 1])} is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def recipe_from_dict(data: dict, origin: str = "recipe") -> Recipe:
    # JSON mode: YAML lists become tuples and ints are accepted for floats, while strings are never
    # coerced to numbers or booleans (strict=True).
    try:
        return Recipe.model_validate_json(json.dumps(data, default=str))
    except ValidationError as err:
        raise RecipeError(_format_errors(err, origin)) from None


def load_recipe(recipe: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe file (or the defaults if ``recipe`` is None) and apply overrides."""
    data: dict = {}
    origin = "defaults"
    if recipe is not None:
        path = resolve_recipe_path(recipe)
        origin = str(path)
        try:
            loaded = _yaml_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise RecipeError(f"cannot read recipe {path}: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise RecipeError(f"recipe {path}: the top level must be a mapping of sections")
        data = loaded
    if overrides:
        data = apply_overrides(data, overrides)
        origin += " + overrides"
    return recipe_from_dict(data, origin)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def recipe_header(path: Path) -> str:
    """The first comment line of a recipe file (its one-line description)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


# Recipe keys that name a registered part, and the registry each must be found in.
_PART_KEYS = {
    "views.policy": "view policies",
    "teacher.type": "teachers",
    "cache.codec": "codecs",
    "student.name": "students",
    "mask.type": "masks",
}


def check_parts(recipe: Recipe) -> None:
    """Fail, naming the key, if the recipe names a part that no registry holds.

    Names are checked against the registries' catalog, so no part (and no torch) is imported; a family's
    parameters (``pca<r>``) are checked when the part is built.
    """
    from umt_distill.registry import RegistryError, catalog_registry

    problems = []
    for key, kind in _PART_KEYS.items():
        section, field = key.split(".")
        name = getattr(getattr(recipe, section), field)
        try:
            catalog_registry(kind).get(name)
        except RegistryError as e:
            problems.append(f"{key}: {e}")
    if problems:
        raise RecipeError("invalid recipe:\n  " + "\n  ".join(problems))
