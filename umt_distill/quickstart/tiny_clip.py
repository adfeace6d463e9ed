"""A tiny image CLIP trained on the spot: the quickstart's stand-in for OpenAI's CLIP, built offline.

The model is an ordinary open_clip ``CLIP`` from a small config (:data:`QUICKSTART_CLIP_CONFIG`, the
vision geometry of ``umt-test-tiny``: 64 px, patch 16, so a 4×4 token grid that matches the tiny
student). It is trained contrastively on *single frames* paired with *appearance-only* captions
(``"a red square"``) — like a web image–text CLIP, it learns what things look like, and nothing in
its training can tell it which way they move.

The weights and the config go into a folder (``clip.safetensors``, ``clip_config.json``,
``summary.json``); :class:`~umt_distill.teachers.clip.ClipTeacher` then loads them like any local
CLIP: ``teacher.name=umt-quickstart-clip teacher.model_config_path=<folder>/clip_config.json
teacher.pretrained=<folder>/clip.safetensors``. A finished folder trained with the same settings on
the same frames is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from umt_distill.teachers.clip import IMAGENET_MEAN, IMAGENET_STD
from umt_distill.teachers.configs import register_model_config

QUICKSTART_CLIP = "umt-quickstart-clip"
QUICKSTART_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 64, "layers": 4, "head_width": 16},
    # Captions are a handful of words: a short context keeps the text tower nearly free.
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
WEIGHTS_FILE = "clip.safetensors"
CONFIG_FILE = "clip_config.json"
SUMMARY_FILE = "summary.json"
CROP_SCALES = (1.0, 0.875, 0.75, 0.66)  # the umt_train view policy's crop scales: the teacher sees such crops


@dataclass(frozen=True)
class ClipTrainSettings:
    """How the tiny CLIP is trained.

    Attributes:
        steps: Optimizer steps.
        batch_size: Frames per step.
        lr: Peak AdamW learning rate (linear warmup, cosine decay to 0).
        warmup_steps: Warmup length.
        weight_decay: AdamW weight decay on matrices.
        seed: Initial weights, frame sampling and augmentation.
    """

    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 30
    weight_decay: float = 0.05
    seed: int = 0


def build_clip(seed: int = 0):
    """A randomly initialised open_clip CLIP of :data:`QUICKSTART_CLIP_CONFIG` and its tokenizer."""
    register_model_config(QUICKSTART_CLIP, QUICKSTART_CLIP_CONFIG, source="umt_distill.quickstart.tiny_clip")
    with torch.random.fork_rng(devices=[]):  # initial weights from `seed`; the caller's RNG is untouched
        torch.manual_seed(seed)
        logger = logging.getLogger()
        level = logger.level
        logger.setLevel(logging.ERROR)  # open_clip warns that no pretrained weights were loaded: by design here
        try:
            model = open_clip.create_model(QUICKSTART_CLIP, pretrained=None, precision="fp32", device="cpu")
        finally:
            logger.setLevel(level)
    return model, open_clip.get_tokenizer(QUICKSTART_CLIP)


def augment_frames(frames: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Random multi-scale square crop, resize to ``size`` and horizontal flip of each image.

    Args:
        frames: uint8 [B, H, W, 3].
        size: Output side.
        generator: Draws every crop and flip.

    Returns:
        float32 [B, 3, size, size] in 0..1.
    """
    batch, height, width, _ = frames.shape
    short = min(height, width)
    out = torch.empty(batch, 3, size, size)
    scale_idx = torch.randint(len(CROP_SCALES), (batch,), generator=generator)
    pos = torch.rand(batch, 2, generator=generator)
    flips = torch.rand(batch, generator=generator) < 0.5
    for b in range(batch):
        side = max(1, round(short * CROP_SCALES[int(scale_idx[b])]))
        x0 = int(pos[b, 0] * (width - side + 1))
        y0 = int(pos[b, 1] * (height - side + 1))
        crop = frames[b, y0 : y0 + side, x0 : x0 + side].permute(2, 0, 1).float().div(255)[None]  # [1, 3, s, s]
        if side != size:
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[b] = crop[0].flip(-1) if flips[b] else crop[0]
    return out


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_index: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss with repeated captions treated as positives of each other.

    A batch of frames holds each appearance many times. Plain CLIP would push an image away from the
    identical caption of its neighbour; instead the texts are the *unique* captions of the batch and
    the text→image direction spreads its target evenly over all images with that caption.

    Args:
        image_emb: [B, D] image embeddings (not normalised).
        text_emb: [U, D] embeddings of the U unique captions.
        caption_index: long [B], the unique caption of each image.
        logit_scale: log of the softmax temperature's inverse (open_clip's parameter).
    """
    image_emb = F.normalize(image_emb, dim=-1)
    text_emb = F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * image_emb @ text_emb.T  # [B, U]
    image_to_text = F.cross_entropy(logits, caption_index)
    positives = F.one_hot(caption_index, text_emb.shape[0]).T.float()  # [U, B]
    text_to_image = -(positives / positives.sum(1, keepdim=True) * logits.T.log_softmax(dim=-1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


def frames_digest(frames: np.ndarray, captions: Sequence[str]) -> str:
    """Identity of the training data (frames and their captions), for reuse checks."""
    digest = hashlib.sha256(np.ascontiguousarray(frames).tobytes())
    digest.update("\n".join(captions).encode())
    return digest.hexdigest()


def train_tiny_clip(
    folder: str | Path,
    frames: np.ndarray,
    captions: Sequence[str],
    settings: ClipTrainSettings = ClipTrainSettings(),
    eval_frames: np.ndarray | None = None,
    eval_captions: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train the tiny CLIP on single frames with captions, or reuse a finished run in ``folder``.

    Args:
        folder: Where ``clip.safetensors``, ``clip_config.json`` and ``summary.json`` are written.
        frames: uint8 [F, H, W, 3] training frames.
        captions: One caption per frame (appearance only).
        settings: Training settings.
        eval_frames: Optional held-out frames [E, H, W, 3] for zero-shot accuracy.
        eval_captions: Their captions (candidates: all distinct captions of training and evaluation).
        log: Progress lines go here.

    Returns:
        The summary: settings, data digest, final loss, zero-shot accuracy, seconds, file paths,
        and ``reused``.
    """
    folder = Path(folder)
    if len(frames) != len(captions):
        raise ValueError(f"{len(frames)} frames but {len(captions)} captions")
    digest = frames_digest(frames, captions)
    summary_path = folder / SUMMARY_FILE
    identity = {"settings": asdict(settings), "data_digest": digest, "config": QUICKSTART_CLIP_CONFIG}
    if summary_path.exists() and (folder / WEIGHTS_FILE).exists():
        summary = json.loads(summary_path.read_text())
        if {k: summary.get(k) for k in identity} == json.loads(json.dumps(identity)):
            return {**summary, "reused": True}
        log(f"{folder}: the saved tiny CLIP was trained differently; training it again")

    t0 = time.perf_counter()
    model, tokenizer = build_clip(settings.seed)
    # Zero-shot candidates: every caption seen in training or evaluation (a tiny run may miss some classes).
    classes = sorted(set(captions) | set(eval_captions or ()))
    class_of = torch.tensor([classes.index(c) for c in captions])  # [F]
    tokens = tokenizer(classes)  # [U_all, context]
    size = QUICKSTART_CLIP_CONFIG["vision_cfg"]["image_size"]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)  # the quickstart feeds the teacher ImageNet-normalised pixels
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.98))
    generator = torch.Generator().manual_seed(settings.seed)
    frames_t = torch.from_numpy(frames)  # [F, H, W, 3] uint8
    model.train()
    losses = []
    for step in range(settings.steps):
        lr = _lr_at(step, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr
        pick = torch.randint(len(frames_t), (settings.batch_size,), generator=generator)  # [B]
        pixels = (augment_frames(frames_t[pick], size, generator) - mean) / std  # [B, 3, S, S]
        present, caption_index = torch.unique(class_of[pick], return_inverse=True)  # [U], [B]
        image_emb = model.encode_image(pixels)  # [B, D]
        text_emb = model.encode_text(tokens[present])  # [U, D]
        loss = clip_loss(image_emb, text_emb, caption_index, model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % max(1, settings.steps // 5) == 0:
            log(f"tiny CLIP step {step + 1}/{settings.steps}: loss {np.mean(losses[-20:]):.3f}")
    model.eval()
    accuracy = None
    if eval_frames is not None and eval_captions is not None and len(eval_frames):
        accuracy = zero_shot_accuracy(model, tokenizer, eval_frames, eval_captions, classes)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / f".tmp-{WEIGHTS_FILE}"))
    (folder / f".tmp-{WEIGHTS_FILE}").replace(folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(QUICKSTART_CLIP_CONFIG, indent=1))
    summary = {
        **json.loads(json.dumps(identity)),
        "weights_sha256": hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest(),
        "final_loss": float(np.mean(losses[-20:])),
        "losses": [round(x, 5) for x in losses],
        "zero_shot_accuracy": accuracy,
        "num_frames": int(len(frames)),
        "classes": classes,
        "seconds": round(time.perf_counter() - t0, 2),
        "weights": str((folder / WEIGHTS_FILE).resolve()),
        "model_config": str((folder / CONFIG_FILE).resolve()),
        "name": QUICKSTART_CLIP,
    }
    tmp = folder / f".tmp-{SUMMARY_FILE}"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(summary_path)  # written last: the marker of a finished run
    return {**summary, "reused": False}


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, frames: np.ndarray, captions: Sequence[str], classes: Sequence[str]) -> float:
    """Fraction of frames whose nearest caption (cosine) among ``classes`` is their own (centre view)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    size = QUICKSTART_CLIP_CONFIG["vision_cfg"]["image_size"]
    pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(255)  # [E, 3, H, W]
    if pixels.shape[-1] != size or pixels.shape[-2] != size:
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    image = F.normalize(model.encode_image((pixels - mean) / std), dim=-1)  # [E, D]
    text = F.normalize(model.encode_text(tokenizer(list(classes))), dim=-1)  # [U, D]
    predicted = (image @ text.T).argmax(1)
    truth = torch.tensor([list(classes).index(c) for c in captions])
    return float((predicted == truth).float().mean())


def _lr_at(step: int, s: ClipTrainSettings) -> float:
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return 0.5 * s.lr * (1 + math.cos(math.pi * progress))
