"""Frozen open_clip image teacher producing UMT's targets for each frame of a view.

Per frame the teacher returns (UMT code @4fb4049: single_modality/models/clip.py):

- ``tokens``: the residual stream after each of the last K selected blocks, CLS dropped, passed
  through the tower's own ``ln_post`` and ``@ proj`` (UMT's projected tokens; not L2-normalised);
- ``attn``: the last block's CLS→patch softmax attention averaged over heads (semantic masking);
- ``pooled``: the image embedding, identical to open_clip's ``encode_image`` (unnormalised).

The tower is open_clip's own ``VisionTransformer``; :class:`ClipTeacher` walks its modules block by
block instead of copying weights into another class, so any checkpoint open_clip loads is used as is.

Precision: ``bf16``/``fp16`` mean CUDA autocast over fp32 weights. On other devices the teacher falls
back to fp32 with a warning, and ``describe()`` records the precision actually used: CPU autocast
exists but is slow on most CPUs and would silently change the targets written to a cache.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import math
import os
import socket
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import open_clip.factory
import open_clip.model
import torch
import torch.nn.functional as F
from open_clip.transformer import Attention as OpenClipAttention
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from umt_distill.registry import TEACHERS
from umt_distill.teachers.configs import TINY_CONFIGS, register_model_config_file, register_tiny_configs

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("clip", "imagenet")
# precision name -> CUDA autocast dtype (None = plain fp32)
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")
# Random-init teachers (pretrained=None) draw from this seed so every process (torchrun ranks, a later
# resume) builds the same weights, and the caller's global RNG is left untouched.
RANDOM_INIT_SEED = 0


class TeacherError(ValueError):
    """A teacher cannot be built as requested (unknown model/tag, unsupported tower, bad weights)."""


@dataclass
class TeacherOutput:
    """Teacher targets for a batch of views (all float32, on the teacher's device)."""

    tokens: Tensor  # [B, K, T, N, D]  last K blocks ascending, CLS dropped, ln_post then proj
    attn: Tensor  # [B, T, N]  last block, head-averaged CLS->patch attention (rows sum to < 1)
    pooled: Tensor  # [B, T, D]  == open_clip encode_image per frame, not normalised


def select_layer_indices(num_blocks: int, layers: int, interval: float = 1) -> list[int]:
    """UMT's choice of returned blocks: ``[L-1-int(i*interval) for i in range(K)]``, ascending.

    Raises:
        TeacherError: ``layers`` < 1, or an index falls below 0 or repeats (e.g. interval < 1).
    """
    if layers < 1:
        raise TeacherError(f"teacher layers must be >= 1, got {layers}")
    indices = [num_blocks - 1 - int(i * interval) for i in range(layers)]
    if min(indices) < 0 or len(set(indices)) != len(indices):
        raise TeacherError(
            f"layers={layers} with layer_interval={interval} selects blocks {indices}, "
            f"which are not {layers} distinct blocks of the {num_blocks} in the model"
        )
    return sorted(indices)


def interpolate_positional_embedding(table: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """Resize a ``[1 + G0*G1, C]`` ViT position table to another patch grid, keeping the CLS row.

    Bicubic, ``align_corners=False`` and no antialiasing, as UMT does for CLIP-L/14 at 196 px
    (open_clip's own ``resize_pos_embed`` antialiases, which changes the result when shrinking).
    """
    cls_row, patch_rows = table[:1], table[1:]  # [1, C], [G0*G1, C]
    width = table.shape[1]
    grid = patch_rows.reshape(1, old_grid[0], old_grid[1], width).permute(0, 3, 1, 2)  # [1, C, G0, G1]
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False)
    patch_rows = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], width).to(table.dtype)
    return torch.cat([cls_row, patch_rows], dim=0)


def _open_clip_model_name(name: str) -> str:
    return name.replace("/", "-")  # open_clip spells "ViT-B/16" as "ViT-B-16"; create_model does the same


def _unknown_model_error(name: str) -> TeacherError:
    known = open_clip.list_models()
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return TeacherError(
        f"unknown open_clip model {name!r}.{hint} ({len(known)} models in open_clip.list_models(); "
        "custom architectures: pass model_config=<open_clip config JSON>)"
    )


def _build_vision_tower(name: str, config: dict[str, Any], quick_gelu: bool) -> nn.Module:
    """The vision tower alone (no text tower), randomly initialised from a fixed seed, fp32 on CPU."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        build = getattr(open_clip.model, "_build_vision_tower", None)
        if build is None:  # private helper gone in some future open_clip: build CLIP, keep its tower
            return open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu).visual
        return build(config["embed_dim"], config["vision_cfg"], quick_gelu, None)


def _read_visual_state_dict(path: Path) -> tuple[dict[str, Tensor], bool]:
    """Vision-tower weights from a full open_clip CLIP checkpoint or a visual-only state dict.

    open_clip's reader handles safetensors, ``{"state_dict": ...}`` wrappers and ``module.`` prefixes.
    Visual-only files are OpenAI CLIP's visual tower extracted as UMT ships it (``vit_b16.pth``, keys
    ``conv1.weight``, ``transformer.resblocks.*``; single_modality/models/extract_clip/extract.ipynb).

    Returns:
        ``(state, openai_visual)``: the tower's state dict, and whether the file is such a visual-only
        OpenAI extraction (which was trained with QuickGELU).
    """
    try:
        state = open_clip.factory.load_state_dict(str(path))  # safetensors, or torch.load(weights_only=True)
    except Exception as e:  # noqa: BLE001 - safetensors, pickle and zip readers raise many types
        first = (str(e).splitlines() or [""])[0][:200]
        raise TeacherError(f"{path}: cannot read the teacher weights ({type(e).__name__}: {first}); is the file "
                           "complete (an interrupted download?) and a weights file? Give another teacher.pretrained") from None
    if not isinstance(state, dict) or not state:
        raise TeacherError(f"{path}: holds no state dict of weights")
    openai_visual = not any(key.startswith("visual.") for key in state)
    if not openai_visual:
        state = {key[len("visual.") :]: value for key, value in state.items() if key.startswith("visual.")}
    openai_visual = openai_visual and "conv1.weight" in state and "class_embedding" in state
    conv = state.get("conv1.weight")
    if conv is not None and conv.ndim == 5 and conv.shape[2] == 1:
        # UMT's teacher patch embed is a Conv3d with temporal kernel 1: [C, 3, 1, p, p] -> [C, 3, p, p]
        state["conv1.weight"] = conv.squeeze(2)
    return state, openai_visual


# Hub weight files open_clip looks for in a tag's repository (newest first).
_HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _check_tag_reachable(name: str, tag: str, tag_cfg: dict[str, Any], timeout: float = 3.0) -> None:
    """Fail within seconds, naming the offline alternative, when a tag's weights are neither in the local
    Hugging Face cache nor downloadable (offline machine, HF_HUB_OFFLINE=1): open_clip would otherwise
    retry for about a minute and end in a traceback."""
    from huggingface_hub import constants, try_to_load_from_cache

    repo = str(tag_cfg.get("hf_hub") or "").rstrip("/")
    if repo and any(isinstance(try_to_load_from_cache(repo, f), str) for f in _HUB_FILES):
        return  # downloaded before: open_clip loads it from the cache
    where = f"hf-hub:{repo}" if repo else str(tag_cfg.get("url") or "its download address")
    fix = (f"download the weights where there is network (e.g. {_HUB_FILES[1]} of {where}) and pass the file: "
           f"teacher.pretrained=/path/to/{_HUB_FILES[1]}")
    if constants.HF_HUB_OFFLINE:
        raise TeacherError(f"pretrained={tag!r} of {name!r} must be downloaded ({where}), but HF_HUB_OFFLINE is set "
                           f"and it is not in the local cache; {fix}")
    host = urllib.parse.urlparse(constants.ENDPOINT if repo else str(tag_cfg.get("url", ""))).hostname
    try:
        socket.create_connection((host or "huggingface.co", 443), timeout=timeout).close()
    except OSError as e:
        raise TeacherError(f"pretrained={tag!r} of {name!r} must be downloaded ({where}), but {host} cannot be "
                           f"reached ({e}); {fix}") from None


def _set_grid(visual: VisionTransformer, grid: tuple[int, int]) -> None:
    """Make the tower's geometry attributes describe ``grid`` so open_clip's own forward agrees."""
    patch = tuple(visual.conv1.kernel_size)
    visual.grid_size = grid
    visual.image_size = (grid[0] * patch[0], grid[1] * patch[1])
    if isinstance(getattr(visual, "preprocess_cfg", None), dict):
        visual.preprocess_cfg["size"] = visual.image_size


def _load_visual_weights(visual: VisionTransformer, state: dict[str, Tensor], path: Path, name: str) -> None:
    table = state.get("positional_embedding")
    current = visual.positional_embedding
    other_grid = table is not None and table.ndim == 2 and table.shape[0] != current.shape[0]
    if other_grid and table.shape[1] == current.shape[1]:
        # A checkpoint at another resolution (e.g. UMT's vit_l14_336.pth for "ViT-L-14"): adopt its grid
        # now and interpolate once, from the checkpoint's grid straight to the requested input size.
        side = math.isqrt(table.shape[0] - 1)
        if side * side != table.shape[0] - 1:
            raise TeacherError(f"{path}: positional_embedding {tuple(table.shape)} is not a square patch grid + CLS")
        visual.positional_embedding = nn.Parameter(torch.empty_like(table, dtype=current.dtype))
        _set_grid(visual, (side, side))
    try:
        visual.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise TeacherError(f"{path}: weights do not fit open_clip model {name!r}: {err}") from None


@TEACHERS.register("open_clip")
class ClipTeacher(nn.Module):
    """Frozen open_clip ViT image teacher returning UMT targets for every frame of a view.

    Args:
        name: open_clip model name (``"ViT-B-16"``, ``"ViT-L-14"``, a name registered at runtime, or
            ``hf-hub:org/repo``). OpenAI weights need QuickGELU: with a tag it is set from the tag; a
            local visual-only OpenAI file (UMT's ``vit_b16.pth``) switches to QuickGELU with a warning;
            a full local checkpoint of OpenAI weights needs the ``*-quickgelu`` name (``"ViT-B-16-quickgelu"``).
        pretrained: ``None`` (random init from a fixed seed, for tests), an open_clip tag such as
            ``"openai"`` (downloaded by open_clip), or a local weights file: a full open_clip CLIP
            state dict or a visual-only one (UMT's ``vit_b16.pth`` layout), .pt/.pth/.bin/.safetensors.
        model_config: Path to an open_clip model-config JSON; registered with open_clip as ``name``.
        layers: K, the number of blocks whose tokens are returned.
        layer_interval: Spacing of those blocks (UMT's ``clip_return_interval``, may be fractional).
        input_size: Side of the square teacher input; the position table is interpolated when it
            differs from the weights' (UMT-L: CLIP-L/14 at 196). Default: the weights' resolution.
        normalize: ``"imagenet"`` (what UMT feeds its teacher; the recipes' default too) or ``"clip"``
            (the model's own preprocessing mean/std).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (CUDA autocast; fp32 elsewhere, see module doc).
        device: Torch device, or ``"auto"`` for CUDA when available.
    """

    interpolation = "bicubic"

    def __init__(
        self,
        name: str,
        pretrained: str | None = None,
        model_config: str | None = None,
        layers: int = 6,
        layer_interval: float = 1,
        input_size: int | None = None,
        normalize: str = "imagenet",
        precision: str = "fp32",
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        if normalize not in NORMALIZATIONS:
            raise TeacherError(f"teacher normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if precision not in AUTOCAST_DTYPES:
            raise TeacherError(f"teacher precision must be one of {tuple(AUTOCAST_DTYPES)}, got {precision!r}")
        self.name = name
        self.pretrained = None if pretrained is None else str(pretrained)
        self.model_config = None if model_config is None else str(model_config)
        self.layer_interval = layer_interval
        self.normalize = normalize

        visual, clip_mean, clip_std = self._build(name, self.pretrained, self.model_config)
        self._check_supported(visual)
        self.visual = visual

        self.layer_indices = select_layer_indices(len(visual.transformer.resblocks), layers, layer_interval)
        self.input_size = self._set_input_size(visual, input_size)
        self.grid: tuple[int, int] = tuple(visual.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.embed_dim = int(visual.proj.shape[1])
        self.mean, self.std = (clip_mean, clip_std) if normalize == "clip" else (IMAGENET_MEAN, IMAGENET_STD)

        self.requires_grad_(False)
        super().train(False)
        self._weights_digest: str | None = None

        self.device = self._resolve_device(device)
        self.precision = precision
        self._autocast_dtype = AUTOCAST_DTYPES[precision]
        if self._autocast_dtype is not None and self.device.type != "cuda":
            warnings.warn(
                f"teacher precision {precision!r} uses CUDA autocast; on {self.device} the teacher runs in fp32",
                stacklevel=2,
            )
            self.precision, self._autocast_dtype = "fp32", None
        # [1, 3, 1, 1]; non-persistent so the state dict (and its digest) holds only model weights
        self.register_buffer("_pixel_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_pixel_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        self.to(self.device)

    # ----------------------------------------------------------------------------------- construction

    @staticmethod
    def _resolve_device(device: str | torch.device) -> torch.device:
        if device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(device)

    @staticmethod
    def _build(name: str, pretrained: str | None, model_config: str | None) -> tuple[nn.Module, tuple, tuple]:
        """Return (vision tower, clip mean, clip std), fp32 on CPU."""
        file_preprocess: dict[str, Any] = {}
        if name in TINY_CONFIGS:  # recipes may name the test teachers without registering them first
            register_tiny_configs()
        if model_config is not None:
            try:
                _, file_preprocess = register_model_config_file(name, model_config)
            except ValueError as e:
                if "already registered" not in str(e):
                    raise
                raise TeacherError(
                    f"{model_config} is registered under the teacher's name {name!r}, which open_clip already "
                    f"defines with another architecture: give it its own name, e.g. "
                    f"teacher.name={Path(model_config).stem}"
                ) from None
        schema = name.startswith(("hf-hub:", "local-dir:"))
        model_name = name if schema else _open_clip_model_name(name)
        weights_file = None
        if pretrained is not None and not schema:
            if os.path.isfile(pretrained):
                weights_file = Path(pretrained)
            elif not open_clip.get_pretrained_cfg(model_name, pretrained):  # not a known tag
                if pretrained.endswith(WEIGHT_SUFFIXES) or os.sep in pretrained:
                    raise FileNotFoundError(f"{pretrained}: teacher weights file not found")
                if open_clip.get_model_config(model_name) is None:
                    raise _unknown_model_error(name)
                tags = open_clip.list_pretrained_tags_by_model(model_name)
                raise TeacherError(
                    f"pretrained={pretrained!r} is neither a file nor an open_clip tag of {name!r} "
                    f"(tags: {', '.join(tags) or 'none'})"
                )

        if schema or (pretrained is not None and weights_file is None):
            # Tag or hub model: open_clip's factory downloads, converts and loads the full CLIP; keep the
            # vision tower only. open_clip 3.x merely *warns* when a tag trained with QuickGELU (OpenAI's)
            # meets a GELU config such as "ViT-B-16", so force the activation the weights were trained with.
            tag_cfg = {} if schema else open_clip.get_pretrained_cfg(model_name, pretrained)
            if not schema:
                _check_tag_reachable(name, pretrained, tag_cfg)
            with torch.random.fork_rng(devices=[]):
                model = open_clip.create_model(
                    model_name,
                    pretrained=None if schema else pretrained,
                    force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
                    precision="fp32",
                    device="cpu",
                )
            preprocess = open_clip.get_model_preprocess_cfg(model)
            visual = model.visual
            del model  # drops the text tower
            return visual, tuple(preprocess["mean"]), tuple(preprocess["std"])

        config = open_clip.get_model_config(model_name)
        if config is None:
            raise _unknown_model_error(name)
        quick_gelu = bool(config.get("quick_gelu", False))
        state = None
        if weights_file is not None:
            state, openai_visual = _read_visual_state_dict(weights_file)
            if openai_visual and not quick_gelu:
                # OpenAI trained CLIP with QuickGELU; open_clip's plain "ViT-B-16" config has GELU and would
                # run these weights silently wrong (UMT's tokens off by ~3e-3). Use the variant they need.
                warnings.warn(
                    f"{weights_file} holds an OpenAI CLIP visual tower (UMT's vit_b16.pth layout), trained with "
                    f"QuickGELU; building {name!r} with QuickGELU (name the model {model_name}-quickgelu, or "
                    "give a full open_clip checkpoint with a 'visual.' prefix, to say so explicitly)",
                    stacklevel=3,
                )
                quick_gelu = True
        visual = _build_vision_tower(model_name, config, quick_gelu)
        if state is not None:
            _load_visual_weights(visual, state, weights_file, name)
        preprocess = {**config.get("preprocess_cfg", {}), **file_preprocess}
        mean = tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
        std = tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD))
        return visual, mean, std

    @staticmethod
    def _check_supported(visual: nn.Module) -> None:
        """UMT's targets need a ViT with a CLS token, a token-level ln_post and a CLS attention row."""
        if not isinstance(visual, VisionTransformer):
            raise TeacherError(
                f"open_clip vision tower {type(visual).__name__} is not supported: the teacher needs an "
                "open_clip VisionTransformer (timm and ResNet towers have no per-block CLS attention)"
            )
        if getattr(visual, "attn_pool", None) is not None:
            raise TeacherError("open_clip towers with an attentional pooler (CoCa) are not supported")
        pool_type = getattr(visual, "pool_type", "tok")
        if pool_type not in ("tok", "avg"):
            raise TeacherError(f"open_clip pool_type {pool_type!r} is not supported (need 'tok' or 'avg')")
        attn = visual.transformer.resblocks[-1].attn
        if isinstance(attn, nn.MultiheadAttention):
            if not attn._qkv_same_embed_dim or attn.bias_k is not None:
                raise TeacherError("last block attention must be plain self-attention (packed qkv, no bias_kv)")
        elif isinstance(attn, OpenClipAttention):
            if attn.logit_scale is not None:
                # open_clip 3.3's own scaled-cosine path fails on 4-D q/k (torch.bmm), so it cannot be
                # run or checked; reject it instead of guessing its attention
                raise TeacherError("open_clip towers with scaled_cosine_attn are not supported")
        else:
            raise TeacherError(f"unsupported attention module {type(attn).__name__} in the last block")

    @staticmethod
    def _set_input_size(visual: VisionTransformer, input_size: int | None) -> int:
        grid = tuple(visual.grid_size)
        patch = tuple(visual.conv1.kernel_size)
        if input_size is None:
            if grid[0] * patch[0] != grid[1] * patch[1]:
                raise TeacherError(f"weights have a non-square input {visual.image_size}; pass input_size")
            return grid[0] * patch[0]
        if input_size % patch[0] or input_size % patch[1]:
            raise TeacherError(f"teacher input_size {input_size} is not a multiple of the patch size {patch}")
        new_grid = (input_size // patch[0], input_size // patch[1])
        if new_grid != grid:
            table = interpolate_positional_embedding(visual.positional_embedding.data, grid, new_grid)
            visual.positional_embedding = nn.Parameter(table, requires_grad=False)
            _set_grid(visual, new_grid)
        return input_size

    # -------------------------------------------------------------------------------------- frozen

    def train(self, mode: bool = True) -> ClipTeacher:
        """The teacher is frozen: stays in eval mode whatever a parent module asks."""
        return super().train(False)

    @property
    def weights_digest(self) -> str:
        """sha256 over the tower's state dict (names, shapes, dtypes, bytes in sorted key order)."""
        if self._weights_digest is None:
            digest = hashlib.sha256()
            state = self.visual.state_dict()
            for key in sorted(state):
                tensor = state[key].detach().to("cpu").contiguous()
                digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
                # a uint8 view hashes the raw bytes of any dtype (numpy has no bfloat16)
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
            self._weights_digest = digest.hexdigest()
        return self._weights_digest

    def describe(self) -> dict[str, Any]:
        """JSON-able provenance of the targets this teacher produces (for the cache spec)."""
        return {
            "kind": "open_clip",
            "name": self.name,
            "pretrained": self.pretrained,
            "model_config": self.model_config,
            "layers": len(self.layer_indices),
            "layer_interval": self.layer_interval,
            "layer_indices": list(self.layer_indices),
            "input_size": self.input_size,
            "normalize": self.normalize,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "precision": self.precision,
            "weights_digest": self.weights_digest,
            "D": self.embed_dim,
            "N": self.num_patches,
            "grid": list(self.grid),
        }

    # ---------------------------------------------------------------------------------- text tower

    def encode_text(self, captions: list[str], batch_size: int = 256) -> Tensor:
        """L2-normalised CLIP text embeddings ``[C, D]`` (float32, CPU) of ``captions``, in the joint space
        of ``pooled``: ``cos(pooled[t], text[c])`` scores frame ``t`` against caption ``c`` (text-guided
        frame selection, ``cache/captions.py``).

        The text tower is built on first use (the vision-only teacher never holds it) from the same
        weights as the tower: the tag or hub model, a full open_clip checkpoint, or the fixed seed of a
        random init. Raises :class:`TeacherError` for a visual-only weights file (it has no text tower).
        """
        text, tokenizer = self.text_tower()
        out = []
        autocast = (torch.autocast("cuda", dtype=self._autocast_dtype) if self._autocast_dtype is not None
                    else contextlib.nullcontext())
        with torch.no_grad(), autocast:
            for i in range(0, len(captions), batch_size):
                tokens = tokenizer(list(captions[i : i + batch_size])).to(self.device)  # [b, context]
                out.append(F.normalize(text.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    def text_tower(self) -> tuple[nn.Module, Any]:
        """(open_clip CLIP without its ``visual``, tokenizer), built once and kept outside the module
        tree (not in ``state_dict``, so the weights digest stays the vision tower's)."""
        kept = self.__dict__.get("_text")
        if kept is None:
            kept = self.__dict__["_text"] = _build_text_tower(self.name, self.pretrained, self.device)
        return kept

    @property
    def text_digest(self) -> str:
        """sha256 over the text tower's state dict (as :attr:`weights_digest` is over the vision tower's)."""
        digest = hashlib.sha256()
        state = self.text_tower()[0].state_dict()
        for key in sorted(state):
            tensor = state[key].detach().to("cpu").contiguous()
            digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        return digest.hexdigest()

    # ------------------------------------------------------------------------------------- forward

    def preprocess(self, frames: Tensor) -> Tensor:
        """uint8 view pixels ``[B, T, 3, H, W]`` -> normalised teacher input ``[B*T, 3, S, S]`` (float32)."""
        if not isinstance(frames, Tensor) or frames.dtype != torch.uint8 or frames.ndim != 5 or frames.shape[2] != 3:
            got = f"{frames.dtype} {tuple(frames.shape)}" if isinstance(frames, Tensor) else type(frames).__name__
            raise ValueError(f"teacher expects uint8 frames [B, T, 3, H, W], got {got}")
        batch, time, _, height, width = frames.shape
        pixels = frames.to(self.device).reshape(batch * time, 3, height, width).float() / 255
        if (height, width) != (self.input_size, self.input_size):
            size = (self.input_size, self.input_size)
            pixels = F.interpolate(pixels, size=size, mode="bicubic", align_corners=False)
        return (pixels - self._pixel_mean) / self._pixel_std

    def forward(self, frames: Tensor) -> TeacherOutput:
        """Teacher targets for uint8 view pixels ``[B, T, 3, H, W]``."""
        batch, time = frames.shape[:2]
        # no_grad rather than inference_mode: online training feeds these outputs to ops next to
        # autograd tensors, which inference tensors may not join.
        with torch.no_grad():
            pixels = self.preprocess(frames)  # [B*T, 3, S, S]
            autocast = (
                torch.autocast("cuda", dtype=self._autocast_dtype)
                if self._autocast_dtype is not None
                else contextlib.nullcontext()
            )
            with autocast:
                tokens, attn, pooled = self.encode_pixels(pixels)
        k, n, d = len(self.layer_indices), self.num_patches, self.embed_dim
        return TeacherOutput(
            tokens=tokens.float().reshape(batch, time, k, n, d).transpose(1, 2).contiguous(),  # [B, K, T, N, D]
            attn=attn.float().reshape(batch, time, n),
            pooled=pooled.float().reshape(batch, time, d),
        )

    def encode_pixels(self, pixels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Run the tower on normalised images ``[F, 3, S, S]``.

        Returns:
            tokens ``[F, K, N, D]``, attn ``[F, N]``, pooled ``[F, D]`` (in the autocast dtype, if any).
        """
        visual = self.visual
        # patch stem, the same module calls as open_clip's VisionTransformer
        x = visual.conv1(pixels)  # [F, C, G0, G1]
        x = x.flatten(2).transpose(1, 2)  # [F, N, C]
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [F, 1, C]
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)  # [F, 1+N, C]
        x = visual.patch_dropout(x)  # identity in eval mode; kept to mirror the tower exactly
        x = visual.ln_pre(x)

        # open_clip < 2.26 ran vision blocks sequence-first ([L, F, C]) and has no batch_first attribute
        batch_first = getattr(visual.transformer, "batch_first", False)
        blocks = visual.transformer.resblocks
        collected = []  # K x [F, 1+N, C], ascending block order
        attn = None
        h = x if batch_first else x.transpose(0, 1)
        for index, block in enumerate(blocks):
            if index == len(blocks) - 1:
                attn = cls_attention(block, h if batch_first else h.transpose(0, 1))  # [F, N]
            h = block(h, attn_mask=None)
            if index in self.layer_indices:
                collected.append(h if batch_first else h.transpose(0, 1))
        x = h if batch_first else h.transpose(0, 1)  # [F, 1+N, C]

        hidden = torch.stack(collected, dim=1)[:, :, 1:]  # [F, K, N, C]
        tokens = visual.ln_post(hidden) @ visual.proj  # [F, K, N, D]
        return tokens, attn, pool_like_open_clip(visual, x)


def _build_text_tower(name: str, pretrained: str | None, device: torch.device) -> tuple[nn.Module, Any]:
    """The text half of the teacher's CLIP (see :meth:`ClipTeacher.encode_text`), frozen, on ``device``.

    The model name is already registered by the teacher's construction (tiny configs, model_config).
    """
    schema = name.startswith(("hf-hub:", "local-dir:"))
    model_name = name if schema else _open_clip_model_name(name)
    weights_file = pretrained if pretrained is not None and not schema and os.path.isfile(pretrained) else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        if schema or (pretrained is not None and weights_file is None):  # tag or hub: open_clip loads it
            tag_cfg = {} if schema else open_clip.get_pretrained_cfg(model_name, pretrained)
            model = open_clip.create_model(model_name, pretrained=None if schema else pretrained,
                                           force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
                                           precision="fp32", device="cpu")
        else:
            model = open_clip.create_model(model_name, pretrained=None, precision="fp32", device="cpu")
    if weights_file is not None:
        state = open_clip.factory.load_state_dict(str(weights_file))
        text = {k: v for k, v in state.items() if not k.startswith("visual.")} if isinstance(state, dict) else {}
        if not text or not any(k.startswith(("token_embedding", "transformer.")) for k in text) or \
                "conv1.weight" in text:
            raise TeacherError(f"{weights_file}: holds only a vision tower, so captions cannot be embedded (text-guided "
                               "frame selection); give a full open_clip CLIP checkpoint as teacher.pretrained, or set "
                               "frame_select.cache_captions=false")
        expected = {k for k in model.state_dict() if not k.startswith("visual.")}
        missing = sorted(expected - set(text))
        if missing:
            raise TeacherError(f"{weights_file}: the text tower lacks {len(missing)} key(s) of {name!r} "
                               f"(first: {missing[0]})")
        model.load_state_dict({**{k: v for k, v in model.state_dict().items() if k.startswith("visual.")}, **text},
                              strict=True)
    del model.visual  # encode_text does not touch it
    model.requires_grad_(False)
    return model.eval().to(device), open_clip.get_tokenizer(model_name)


def cls_attention(block: nn.Module, x: Tensor) -> Tensor:
    """Head-averaged softmax attention of the CLS query over the patches in ``block``.

    Only the CLS query row is computed (one query instead of 1+N), so the block itself keeps its fused
    attention kernel. The softmax runs over all 1+N keys and the CLS key is then dropped, so each row sums
    to slightly less than 1, as in UMT.

    Args:
        block: An open_clip residual block (``nn.MultiheadAttention`` or open_clip ``Attention`` inside).
        x: The block's input ``[F, 1+N, C]`` (batch first).

    Returns:
        ``[F, N]`` float32.
    """
    h = block.ln_1(x)  # [F, L, C]
    attn = block.attn
    frames, length, width = h.shape
    heads = attn.num_heads
    head_dim = width // heads
    weight, bias = attn.in_proj_weight, attn.in_proj_bias  # rows: q; k; v
    q_bias, k_bias = (None, None) if bias is None else (bias[:width], bias[width : 2 * width])
    q = F.linear(h[:, :1], weight[:width], q_bias)  # [F, 1, C]
    k = F.linear(h, weight[width : 2 * width], k_bias)  # [F, L, C]
    q = q.reshape(frames, 1, heads, head_dim).transpose(1, 2)  # [F, H, 1, hd]
    k = k.reshape(frames, length, heads, head_dim).transpose(1, 2)  # [F, H, L, hd]
    if isinstance(attn, OpenClipAttention):
        q, k = attn.ln_q(q), attn.ln_k(k)  # identities unless qk_norm
    logits = (q * head_dim**-0.5) @ k.transpose(-1, -2)  # [F, H, 1, L]
    probs = logits.float().softmax(dim=-1).mean(dim=1)[:, 0]  # [F, L] averaged over heads
    return probs[:, 1:]


def pool_like_open_clip(visual: VisionTransformer, x: Tensor) -> Tensor:
    """open_clip's image embedding from the final residual stream ``[F, 1+N, C]`` -> ``[F, D]``."""
    if hasattr(visual, "_pool"):  # open_clip >= 3.0: the tower's own pooling path
        pooled, _ = visual._pool(x)
    else:
        pooled = legacy_pool(visual, x)
    return pooled @ visual.proj if visual.proj is not None else pooled


def legacy_pool(visual: VisionTransformer, x: Tensor) -> Tensor:
    """The pooling open_clip < 3.0 wrote inline in ``forward`` (towers without attentional pooler)."""
    if visual.final_ln_after_pool:
        pooled, _ = visual._global_pool(x)
        return visual.ln_post(pooled)
    pooled, _ = visual._global_pool(visual.ln_post(x))
    return pooled
