"""Action-recognition classifiers: the UMT video ViT with a mean-pooling head, and an image-teacher baseline.

:class:`VideoClassifier` is UMT's fine-tuning model (UMT code @4fb4049:
single_modality/models/modeling_finetune.py): the stage-1 backbone without its final norm, the mean of all
tokens, ``fc_norm`` (LayerNorm), dropout and a linear ``head`` initialised small (trunc-normal std 0.02, times
0.001). Its parameter names equal the official fine-tuned checkpoints' (``patch_embed.*``, ``blocks.{i}.*``,
``fc_norm.*``, ``head.*``).

The position table is never trained. It starts from the 1-D sine-cosine table of the *pretraining*
token grid and, when the fine-tuning grid differs, is resized per frame bicubically in space and then
linearly in time, as UMT does for 16 frames or 384 px (``get_sinusoid_encoding_table`` in
modeling_finetune.py).

:func:`load_classifier_weights` initialises a classifier from our stage-1/2 checkpoints or official UMT
files (stage 1 ``encoder.*``, stage 2 ``vision_encoder.encoder.*``, fine-tuned unprefixed keys),
strictly: every backbone key must be present with the right shape, and anything left over is an error
listing the keys — except the documented leftovers of pretraining files (``encoder.norm``, the
alignment heads ``clip_decoder``), which fine-tuning does not use.

Tubelet inflation: a tubelet-1 checkpoint (UMT pretraining) loads into a classifier whose patch
embedding spans ``T'`` frames per token (:func:`inflate_tubelet`): the 2-D kernel is spread evenly over
the ``T'`` frames, ``W'[:, :, τ] = W / T'`` -- the ``center=False`` rule of the official code's kernel
inflation (UMT code @4fb4049: single_modality/models/clip.py, ``load_state_dict``; its default,
``center=True``, puts the kernel on the middle frame only, so each token would start from one frame). A
token is then the mean of the ``T'`` per-frame tokens it replaces (the convolution is linear and the
bias is kept), so a static clip gives exactly the tubelet-1 tokens. The position table is the
pretraining table resized to the new grid (linearly in time, as above); for ``T' = 2`` that is the mean
of the two frames' positions, so the embedding of any clip is the mean of the tubelet-1 embeddings of
each frame pair. Only tubelet 1 is inflated; any other change of tubelet is refused.

:class:`ImageTeacherClassifier` is the baseline the paper compares against: the CLIP image tower run on
every frame, its image embeddings averaged over time, then the same ``fc_norm`` + ``head``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from umt_distill.masking import gather_visible
from umt_distill.models.checkpoints import (
    CheckpointError,
    CheckpointMismatchError,
    read_state_dict,
    select_student_keys,
    unwrap_state_dict,
    weights_file,
)
from umt_distill.models.vit import LN_EPS, VisionTransformer, sincos_1d
from umt_distill.registry import (
    STUDENTS,  # the sizes are registered by models.vit, imported above
)

# Tolerance when a fine-tuned file's stored ``pos_embed`` is compared with the regenerated table: both
# are the same float32 interpolation of the same sine-cosine table, up to summation order.
POS_EMBED_ATOL = 1e-4
# Pretraining-file keys the classifier does not use: the final norm (Identity under mean pooling) and
# the alignment heads.
_PRETRAIN_LEFTOVERS = ("norm.", "clip_decoder.")
# Top-level keys of pixel-reconstruction files (ours and VideoMAE / VideoMAE V2's official pretraining
# files, ``models/videomae.py``): the decoder side, which fine-tuning drops as VideoMAE does.
_PIXEL_DECODER_KEYS = ("decoder.", "encoder_to_decoder.", "mask_token")


def pretrained_pos_embed(dim: int, pretrain_grid: tuple[int, int, int], grid: tuple[int, int, int]) -> Tensor:
    """UMT's fine-tuning position table for token grid ``grid``, derived from the pretraining grid.

    The 1-D sine-cosine table of the pretraining token count (e.g. 8×14×14 = 1568 for B/16) is viewed
    as ``[T0, H0, W0, C]``; each frame is resized bicubically to ``(H, W)`` (``align_corners=False``),
    then every spatial position is resized linearly along time to ``T``. With ``grid == pretrain_grid``
    this is exactly the plain table the pretraining student used.

    Args:
        dim: Embedding width C.
        pretrain_grid: ``(T0, H0, W0)`` tokens of pretraining (frames / tubelet, size / patch).
        grid: ``(T, H, W)`` tokens of the input now.

    Returns:
        float32 ``[T·H·W, C]`` in (t, h, w) order.
    """
    t0, h0, w0 = pretrain_grid
    t, h, w = grid
    table = sincos_1d(t0 * h0 * w0, dim)  # [T0·H0·W0, C] float32
    if tuple(grid) == tuple(pretrain_grid):
        return table
    x = table.view(t0, h0, w0, dim)
    if (h, w) != (h0, w0):
        x = F.interpolate(x.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False)  # [T0, C, H, W]
        x = x.permute(0, 2, 3, 1)  # [T0, H, W, C]
    if t != t0:
        x = x.permute(1, 2, 3, 0).reshape(h * w, dim, t0)  # [H·W, C, T0]
        x = F.interpolate(x, size=t, mode="linear", align_corners=False)  # [H·W, C, T]
        x = x.reshape(h, w, dim, t).permute(3, 0, 1, 2)  # [T, H, W, C]
    return x.reshape(t * h * w, dim).contiguous()


def _init_head(fc_norm: nn.LayerNorm, head: nn.Linear, init_scale: float) -> None:
    # UMT: trunc-normal(0.02) weights and zero bias, then both scaled by init_scale (0.001), so the
    # fresh head starts near-uniform and does not disturb the pretrained backbone early on.
    nn.init.ones_(fc_norm.weight)
    nn.init.zeros_(fc_norm.bias)
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    with torch.no_grad():
        head.weight.mul_(init_scale)
        head.bias.mul_(init_scale)


class VideoClassifier(VisionTransformer):
    """UMT fine-tuning model: video ViT → mean over tokens → ``fc_norm`` → dropout → ``head``.

    Args:
        num_classes: Rows of ``head``.
        pretrain_grid: ``(T0, H0, W0)`` token grid of pretraining; the position table is adapted from it
            to every input's grid. None: the plain 1-D table of the input's own token count.
        fc_drop_rate: Dropout before the head (UMT default 0).
        head_init_scale: Factor on the head's initial weights and bias (UMT: 0.001).
        **vit_kwargs: :class:`~umt_distill.models.vit.VisionTransformer` arguments (embed_dim, depth,
            num_heads, patch_size, tubelet_size, mlp_ratio, drop_path_rate, use_checkpoint ...).
    """

    def __init__(
        self,
        num_classes: int,
        pretrain_grid: tuple[int, int, int] | None = None,
        fc_drop_rate: float = 0.0,
        head_init_scale: float = 0.001,
        **vit_kwargs: Any,
    ) -> None:
        super().__init__(**vit_kwargs)
        self.num_classes = num_classes
        self.pretrain_grid = None if pretrain_grid is None else tuple(int(g) for g in pretrain_grid)
        # Mean pooling: the stage-1 final norm is replaced by fc_norm after pooling (no `norm.*` keys).
        self.norm = nn.Identity()
        self.fc_norm = nn.LayerNorm(self.embed_dim, eps=LN_EPS)
        self.fc_dropout = nn.Dropout(fc_drop_rate)
        self.head = nn.Linear(self.embed_dim, num_classes)
        _init_head(self.fc_norm, self.head, head_init_scale)
        self._grid_cache: dict[tuple[tuple[int, int, int], str], Tensor] = {}

    def pos_table(self, grid: tuple[int, int, int], device: torch.device) -> Tensor:
        """float32 ``[T·H·W, C]`` position table for a token grid (cached per grid and device)."""
        key = (tuple(grid), str(device))
        table = self._grid_cache.get(key)
        if table is None:
            if self.pretrain_grid is None:
                table = sincos_1d(math.prod(grid), self.embed_dim)
            else:
                table = pretrained_pos_embed(self.embed_dim, self.pretrain_grid, tuple(grid))
            table = table.to(device)
            self._grid_cache[key] = table
        return table

    def embed(self, x: Tensor, visible_idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Patch-embed and add the grid-adapted position table (see :meth:`VisionTransformer.embed`)."""
        if x.ndim != 5:
            raise ValueError(f"classifier input must be [B, 3, T, H, W], got shape {tuple(x.shape)}")
        B, _, T, H, W = x.shape
        grid = self.patch_embed.grid(T, H, W)
        tokens = self.patch_embed(x)  # [B, T'·H'·W', C]
        pos = self.pos_table(grid, tokens.device)[None]  # [1, T'·H'·W', C]
        tokens = tokens + pos.to(tokens.dtype)
        if visible_idx is not None:
            tokens = gather_visible(tokens, visible_idx)  # [B, L_vis, C]
            pos = gather_visible(pos.expand(B, -1, -1), visible_idx)
        return tokens, pos

    def forward_pooled(self, x: Tensor) -> Tensor:
        """``fc_norm`` of the token mean: [B, 3, T, H, W] → [B, C] (the features the head sees)."""
        tokens = self.forward_features(x)  # [B, L, C]; self.norm is Identity
        return self.fc_norm(tokens.mean(dim=1))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits [B, num_classes] for normalised pixels [B, 3, T, H, W]."""
        return self.head(self.fc_dropout(self.forward_pooled(x)))


class ImageTeacherClassifier(nn.Module):
    """Image-model baseline: a CLIP image tower on every frame, embeddings averaged over time, then a head.

    The tower is trained (not frozen); its input is re-normalised from the ImageNet statistics the
    data pipeline uses to the tower's own (``mean``/``std``), so both classifiers share one pipeline.

    Args:
        visual: An open_clip ``VisionTransformer`` (e.g. ``ClipTeacher(...).visual``); its forward maps
            ``[F, 3, S, S]`` to ``[F, D]``.
        embed_dim: D, the width of the tower's output.
        num_classes: Rows of ``head``.
        mean: The tower's input mean (per channel, 0..1 pixels).
        std: The tower's input std.
        input_mean: Mean the incoming pixels were normalised with.
        input_std: Std the incoming pixels were normalised with.
        head_init_scale: As in :class:`VideoClassifier`.
    """

    def __init__(
        self,
        visual: nn.Module,
        embed_dim: int,
        num_classes: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        input_mean: tuple[float, float, float],
        input_std: tuple[float, float, float],
        fc_drop_rate: float = 0.0,
        head_init_scale: float = 0.001,
    ) -> None:
        super().__init__()
        self.visual = visual
        self.visual.requires_grad_(True)
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.depth = len(visual.transformer.resblocks)
        # x_tower = (x_in · s_in + m_in − m) / s: one affine per channel, [1, 3, 1, 1]
        scale = torch.tensor(input_std) / torch.tensor(std)
        shift = (torch.tensor(input_mean) - torch.tensor(mean)) / torch.tensor(std)
        self.register_buffer("_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_shift", shift.view(1, 3, 1, 1), persistent=False)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.fc_dropout = nn.Dropout(fc_drop_rate)
        self.head = nn.Linear(embed_dim, num_classes)
        _init_head(self.fc_norm, self.head, head_init_scale)

    def forward_pooled(self, x: Tensor) -> Tensor:
        """[B, 3, T, H, W] (ImageNet-normalised) → ``fc_norm`` of the time-averaged image embeddings [B, D]."""
        B, C, T, H, W = x.shape
        frames = x.transpose(1, 2).reshape(B * T, C, H, W) * self._scale + self._shift  # [B·T, 3, H, W]
        emb = self.visual(frames)  # [B·T, D]
        return self.fc_norm(emb.view(B, T, -1).mean(dim=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.fc_dropout(self.forward_pooled(x)))

    def no_weight_decay(self) -> set[str]:
        """1-D parameters and the position table (never decayed in ViT fine-tuning)."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1 or n.endswith("positional_embedding")}


# --------------------------------------------------------------------------------------------------
# construction


def backbone_config(student_name: str) -> dict[str, Any]:
    """The backbone arguments of a registered student size (``umt_base_patch16`` ...).

    The student is built on the meta device (no memory, no init cost) and its encoder read back, so the
    registered sizes stay the single source of truth for both pretraining and fine-tuning.
    """
    with torch.device("meta"):
        encoder = STUDENTS.get(student_name)().encoder
    block = encoder.blocks[0]
    return {
        "embed_dim": encoder.embed_dim,
        "depth": encoder.depth,
        "num_heads": block.attn.num_heads,
        "patch_size": encoder.patch_embed.patch_size,
        "tubelet_size": encoder.patch_embed.tubelet_size,
        "mlp_ratio": block.mlp.fc1.out_features / encoder.embed_dim,
    }


def create_classifier(student_name: str, num_classes: int, **overrides: Any) -> VideoClassifier:
    """A :class:`VideoClassifier` with the backbone of a registered student size.

    Example: ``create_classifier("umt_base_patch16", 400, pretrain_grid=(8, 14, 14), drop_path_rate=0.1)``.
    """
    return VideoClassifier(num_classes=num_classes, **{**backbone_config(student_name), **overrides})


# --------------------------------------------------------------------------------------------------
# loading


@dataclass
class ClassifierLoadReport:
    """What :func:`load_classifier_weights` did.

    Attributes:
        source: The file (or ``<state dict>``).
        layout: ``stage1``, ``stage2`` (pretraining files: backbone only) or ``finetuned``.
        loaded: Number of tensors copied into the model.
        fresh: Model keys left at their initialisation (the head of a pretraining file, or a dropped head).
        ignored: File keys not used, by documented rule (pretraining leftovers, a regenerated ``pos_embed``).
        head_rows: Rows of the file's head, if it had one (before any slicing).
    """

    source: str
    layout: str
    loaded: int
    fresh: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    head_rows: int | None = None
    inflated: str | None = None  # e.g. "patch_embed tubelet 1 → 2 (kernel / 2)"


def read_weights(path_or_state: str | Path | Mapping[str, object]) -> tuple[dict[str, Tensor], str]:
    """Tensors of a checkpoint, whatever its container: (state dict, source name).

    Accepts an in-memory dict, a weights file (``.pth``/``.pt``/``.safetensors``), one of our checkpoint
    directories (``.../checkpoints/step-N`` with ``model.safetensors``) or a run directory (its latest
    checkpoint). ``model``/``module`` wrappers and DDP's ``module.`` prefix are peeled.
    """
    if isinstance(path_or_state, Mapping):
        return unwrap_state_dict(path_or_state), "<state dict>"
    path = weights_file(path_or_state)
    return unwrap_state_dict(read_state_dict(path), str(path)), str(path)


PATCH_KERNEL_KEYS = ("patch_embed.proj.weight", "encoder.patch_embed.proj.weight",
                     "vision_encoder.encoder.patch_embed.proj.weight")  # fine-tuned, stage-1, stage-2 layouts


def checkpoint_tubelet(state: Mapping[str, Tensor]) -> int | None:
    """Frames per token of a checkpoint's patch embedding (kernel ``[C, 3, T, p, p]``), or None if it has none."""
    for key in PATCH_KERNEL_KEYS:
        weight = state.get(key)
        if weight is not None and weight.ndim == 5:
            return int(weight.shape[2])
    return None


def inflate_tubelet(weight: Tensor, tubelet: int) -> Tensor:
    """A tubelet-1 patch kernel ``[C, 3, 1, p, p]`` spread evenly over ``tubelet`` frames → ``[C, 3, T', p, p]``.

    Every frame gets ``W / T'``, so the token of ``T'`` identical frames equals the tubelet-1 token of
    one of them (see the module docstring).

    Raises:
        ValueError: The kernel is not a tubelet-1 Conv3d kernel, or ``tubelet < 1``.
    """
    if weight.ndim != 5 or weight.shape[2] != 1:
        raise ValueError(f"only a tubelet-1 kernel [C, 3, 1, p, p] can be inflated, got shape {tuple(weight.shape)}")
    if tubelet < 1:
        raise ValueError(f"tubelet must be >= 1, got {tubelet}")
    return (weight / tubelet).repeat(1, 1, tubelet, 1, 1).contiguous()


def inflate_patch_kernel(state: Mapping[str, Tensor], key: str, tubelet: int, source: str) -> dict[str, Tensor]:
    """``state`` with its patch kernel ``key`` at ``tubelet`` frames per token: inflated from tubelet 1
    (:func:`inflate_tubelet`), kept if it already has that tubelet, refused otherwise.

    Raises:
        CheckpointError: No such key, or a kernel of another tubelet than 1 or ``tubelet``.
    """
    weight = state.get(key)
    if weight is None or weight.ndim != 5:
        raise CheckpointError(source, f"no patch-embedding kernel {key!r} [C, 3, T, p, p] to inflate")
    have = int(weight.shape[2])
    if have == tubelet:
        return dict(state)
    if have != 1:
        raise CheckpointError(source, f"the patch embedding has tubelet {have}: only a tubelet-1 checkpoint can be "
                                      f"inflated to {tubelet}")
    return {**state, key: inflate_tubelet(weight, tubelet)}


def detect_layout(state: Mapping[str, Tensor], source: str) -> str:
    """``stage1`` / ``stage2`` (pretraining: ``encoder.*`` / ``vision_encoder.encoder.*``) or ``finetuned``."""
    if any(k.startswith("encoder.") for k in state):
        return "stage1"
    if any(k.startswith("vision_encoder.encoder.") for k in state):
        return "stage2"
    if "patch_embed.proj.weight" in state or any(k.startswith("blocks.") for k in state):
        return "finetuned"
    hint = ""
    if "conv1.weight" in state or any(k.startswith(("visual.", "transformer.resblocks.")) for k in state):
        hint = " It looks like a CLIP image tower; the image-model baseline uses finetune.backbone=image_teacher."
    raise CheckpointError(
        source,
        "no UMT video backbone keys (expected 'encoder.*', 'vision_encoder.encoder.*' or fine-tuned "
        f"'patch_embed.*'/'blocks.*'); found e.g. {', '.join(sorted(state)[:8])}.{hint}",
    )


def load_classifier_weights(
    model: VideoClassifier,
    path_or_state: str | Path | Mapping[str, object],
    head_slice: int | None = None,
    drop_head: bool = False,
    grid: tuple[int, int, int] | None = None,
    source: str | None = None,
) -> ClassifierLoadReport:
    """Initialise a :class:`VideoClassifier` from a pretraining or fine-tuned checkpoint, strictly.

    Pretraining files (our stage-1/2 safetensors, UMT ``encoder.*`` / ``vision_encoder.encoder.*``):
    the backbone must match exactly; ``fc_norm`` and ``head`` stay fresh; ``encoder.norm`` and the
    ``clip_decoder`` heads are ignored (UMT drops them too), and so is the pixel decoder of VideoMAE files
    (``decoder.*``, ``encoder_to_decoder.*``, ``mask_token``).

    Fine-tuned files (UMT's DeepSpeed ``module`` dicts, our fine-tuning checkpoints): every key must
    match, head included, unless ``drop_head``. A stored ``pos_embed`` (only files fine-tuned at ≠ 8
    frames or ≠ 224 px) is derived from the sine-cosine table and never trained; when it has the
    model's token count it must equal the regenerated table, otherwise it is ignored and regenerated
    for the model's grid (reported in ``ignored``).

    Args:
        model: The classifier; its ``state_dict`` defines what must be present.
        path_or_state: A file, one of our checkpoint/run directories, or a (wrapped) state dict.
        head_slice: Keep only the first rows of the file's head (K710 → K400: 400, since the K710 label
            order lists the 400 Kinetics-400 classes first). Must equal ``model.num_classes``.
        drop_head: Leave ``head`` freshly initialised (``fc_norm`` is still loaded).
        grid: The ``(T, H, W)`` token grid the model will see; a stored ``pos_embed`` of that size is
            checked against the regenerated table.
        source: Name of the file ``path_or_state`` was read from, for messages (default: its own).

    A tubelet-1 file loads into a model of tubelet ``T' > 1`` by :func:`inflate_tubelet` (reported in
    ``inflated``); a file of another tubelet must match the model's.

    Raises:
        CheckpointError: Unreadable file, no backbone keys, a head request that cannot be met, or a
            tubelet that cannot be inflated to the model's.
        CheckpointMismatchError: Missing, unexpected or mis-shaped keys (all listed).
    """
    raw, found_source = read_weights(path_or_state)
    source = source or found_source
    layout = detect_layout(raw, source)
    expected = model.state_dict()
    ignored: list[str] = []
    head_rows = None
    if layout in ("stage1", "stage2"):
        if head_slice is not None:
            raise CheckpointError(source, f"finetune.head_slice={head_slice}: a {layout} pretraining file has no classification head")
        student, _ = select_student_keys(raw, source)  # stage-1 key layout
        state = {}
        for key, value in student.items():
            inner = key[len("encoder."):] if key.startswith("encoder.") else key
            if inner.startswith(_PRETRAIN_LEFTOVERS) or key.startswith(("clip_decoder.", *_PIXEL_DECODER_KEYS)):
                ignored.append(key)
            elif key.startswith("encoder."):
                state[inner] = value
            else:
                state[key] = value  # not an encoder key: reported as unexpected below
        fresh = sorted(k for k in expected if k.startswith(("fc_norm.", "head.")))
    else:
        state = dict(raw)
        if "pos_embed" in state:
            ignored.append("pos_embed")
            _check_stored_pos_embed(model, state.pop("pos_embed"), grid, source)
        if "norm.weight" in state and "norm.weight" not in expected:
            raise CheckpointError(source, "a fine-tuned file with 'norm.*' was trained without mean pooling (use_cls); not supported")
        fresh = []
        if "head.weight" in state:
            head_rows = int(state["head.weight"].shape[0])
        if drop_head:
            ignored += [k for k in ("head.weight", "head.bias") if k in state]
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            fresh = ["head.bias", "head.weight"]
        elif head_slice is not None:
            state = _slice_head(state, head_slice, model.num_classes, source)
    inflated = _inflate_patch_embed(state, expected, source)
    wanted = {k for k in expected if k not in fresh}
    missing = sorted(wanted - set(state))
    unexpected = sorted(set(state) - wanted)
    mismatched = [(k, tuple(state[k].shape), tuple(expected[k].shape))
                  for k in sorted(set(state) & wanted) if state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        if layout == "finetuned" and head_rows is not None and head_rows != model.num_classes and not drop_head \
                and head_slice is None:
            raise CheckpointError(
                source, f"the file's head has {head_rows} classes, the model {model.num_classes}; set "
                f"finetune.head_slice={model.num_classes} to keep its first rows (K710 → K400) or finetune.drop_head=true"
            )
        raise CheckpointMismatchError(source, missing, unexpected, mismatched)
    model.load_state_dict(state, strict=False)  # exactly `wanted` (checked above); `fresh` keeps its init
    return ClassifierLoadReport(source, layout, len(state), fresh, sorted(ignored), head_rows, inflated)


def _inflate_patch_embed(state: dict[str, Tensor], expected: Mapping[str, Tensor], source: str) -> str | None:
    """Inflate ``state``'s tubelet-1 patch kernel in place to the model's tubelet; refuse any other change."""
    key = "patch_embed.proj.weight"
    have, want = state.get(key), expected.get(key)
    if have is None or want is None or have.ndim != 5 or have.shape[2] == want.shape[2]:
        return None  # nothing to inflate (a missing key or other shape error is reported by the caller)
    t_file, t_model = int(have.shape[2]), int(want.shape[2])
    if t_file != 1:
        raise CheckpointError(source, f"the file's patch embedding has tubelet {t_file}, the model {t_model}: only a "
                                      "tubelet-1 checkpoint can be inflated; set finetune.tubelet_size to the file's "
                                      f"{t_file} (or leave it null)")
    state.update(inflate_patch_kernel(state, key, t_model, source))
    return f"patch_embed tubelet 1 → {t_model} (kernel / {t_model} on each frame)"


def _slice_head(state: dict[str, Tensor], rows: int, num_classes: int, source: str) -> dict[str, Tensor]:
    if rows != num_classes:
        raise CheckpointError(source, f"finetune.head_slice={rows} must equal finetune.num_classes={num_classes}")
    if "head.weight" not in state or "head.bias" not in state:
        raise CheckpointError(source, f"finetune.head_slice={rows}: the file has no head to slice")
    have = state["head.weight"].shape[0]
    if have < rows:
        raise CheckpointError(source, f"finetune.head_slice={rows}: the file's head has only {have} rows")
    return {**state, "head.weight": state["head.weight"][:rows].clone(), "head.bias": state["head.bias"][:rows].clone()}


def _check_stored_pos_embed(model: VideoClassifier, stored: Tensor, grid: tuple[int, int, int] | None,
                            source: str) -> None:
    """A file's ``pos_embed`` with the model's token count must be the table the model regenerates."""
    stored = stored.reshape(-1, stored.shape[-1]).float()  # [N, C]
    if grid is None or stored.shape[0] != math.prod(grid):
        return  # another grid: regenerated for the model's grid instead (reported as ignored)
    table = model.pos_table(grid, torch.device("cpu"))
    err = (stored - table).abs().max().item()
    if err > POS_EMBED_ATOL:
        raise CheckpointError(
            source, f"pos_embed differs from the sine-cosine table regenerated for grid {grid} (max abs diff "
            f"{err:.3g}); check finetune.pretrain_num_frames/pretrain_size against the pretraining run"
        )
