"""The teacher's targets for one (clip, view), and how a record maps to named stored arrays.

Both store layouts (``zarr_store``, ``wds_store``) keep a record as the same set of named arrays
(``tokens`` or ``tokens.q`` + ``tokens.scale``, ``attn``, ``pooled``, ``visible_idx``, ``frames``) plus
a small JSON description; this module owns that mapping so the two layouts cannot drift apart.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from umt_distill.cache.codecs import Codec, get_codec
from umt_distill.data.jpeg import encode_jpegs
from umt_distill.data.views import ViewSpec
from umt_distill.masking import num_visible

DIGEST_PREFIX = "sha256:"
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")

# Fields stored with the record's codec. attn and pooled are tiny next to tokens (T*N and T*D values
# against K*T*N*D) and attn drives the semantic mask, so they stay float32: with any codec, cached
# training draws exactly the masks the online teacher would.
CODED_FIELDS = ("tokens",)
FLOAT32_FIELDS = ("attn", "pooled")


class RecordError(ValueError):
    """A target record is inconsistent (shapes, dtypes, values); the message names clip and view."""


class StoreDamagedError(RuntimeError):
    """A cache store file is missing, truncated, corrupt or disagrees with the index.

    Attributes:
        path: The damaged file or directory (a shard file, ``index.json`` ...).
        reason: What is wrong with it.
    """

    def __init__(self, path: str, reason: str | None = None) -> None:
        # One argument: an already formatted message (how DataLoader re-raises a worker's error).
        super().__init__(str(path) if reason is None else f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason if reason is not None else str(path)


def frames_digest(frames: np.ndarray) -> str:
    """Digest of a view's pixels: ``"sha256:"`` + hex sha256 of the C-contiguous uint8 bytes.

    Args:
        frames: uint8 [T, 3, H, W], the pixels the teacher saw (after ``apply_view``).
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames_digest expects uint8 [T, 3, H, W], got {frames.dtype} {list(frames.shape)}")
    return DIGEST_PREFIX + hashlib.sha256(np.ascontiguousarray(frames).tobytes()).hexdigest()


@dataclass
class TargetRecord:
    """The cached teacher outputs for one view of one clip.

    Attributes:
        clip_id: Corpus id of the clip.
        view_index: Which of the clip's K views (0-based).
        view: The exact view (frame indices, crop, flip, size) the teacher saw.
        frames_digest: :func:`frames_digest` of the view's pixels.
        tokens: float32 [K, T, N, D] (mode full) or [M, K, T, N_vis, D] (mode visible).
        attn: float32 [T, N], last block's CLS->patch attention.
        pooled: float32 [T, D], the image embedding of each frame.
        visible_idx: int16 [M, T, N_vis] patch indices per frame, sorted (mode visible), else None.
        frames: uint8 [T, 3, H, W] view pixels, if the store keeps them, else None.
        frames_jpeg: With JPEG frames: the T stored JPEGs, whose decoding is ``frames`` (the pixels
            the teacher saw and the digest covers), else None.
    """

    clip_id: str
    view_index: int
    view: ViewSpec
    frames_digest: str
    tokens: np.ndarray
    attn: np.ndarray
    pooled: np.ndarray
    visible_idx: np.ndarray | None = None
    frames: np.ndarray | None = None
    frames_jpeg: tuple[bytes, ...] | None = None

    @property
    def mode(self) -> str:
        """``"visible"`` when only visible tokens are stored, else ``"full"``."""
        return "full" if self.visible_idx is None else "visible"

    def _fail(self, reason: str) -> RecordError:
        return RecordError(f"record {self.clip_id!r} view {self.view_index}: {reason}")

    def validate(self) -> TargetRecord:
        """Check shapes, dtypes and values agree; raise :class:`RecordError` naming the problem.

        Returns:
            The record itself, so ``store.add(record.validate())`` reads naturally.
        """
        if not isinstance(self.clip_id, str) or not self.clip_id:
            raise self._fail("clip_id must be a non-empty string")
        index = self.view_index
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise self._fail(f"view_index must be an int >= 0, got {self.view_index!r}")
        if not isinstance(self.view, ViewSpec):
            raise self._fail(f"view must be a ViewSpec, got {type(self.view).__name__}")
        if not isinstance(self.frames_digest, str) or not _DIGEST_RE.match(self.frames_digest):
            raise self._fail(f"frames_digest must look like 'sha256:<64 hex>', got {self.frames_digest!r}")
        for name in ("tokens", "attn", "pooled"):
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or arr.dtype != np.float32:
                raise self._fail(f"{name} must be a float32 numpy array, got {_describe(arr)}")
        if self.attn.ndim != 2:
            raise self._fail(f"attn must be [T, N], got {list(self.attn.shape)}")
        T, N = self.attn.shape
        if T != len(self.view.frame_indices):
            raise self._fail(f"attn has T={T} frames but the view has {len(self.view.frame_indices)}")
        if self.pooled.ndim != 2 or self.pooled.shape[0] != T:
            raise self._fail(f"pooled must be [T={T}, D], got {list(self.pooled.shape)}")
        D = self.pooled.shape[1]
        self._validate_tokens(T, N, D)
        if self.frames is not None:
            if not isinstance(self.frames, np.ndarray) or self.frames.dtype != np.uint8:
                raise self._fail(f"frames must be a uint8 numpy array, got {_describe(self.frames)}")
            if self.frames.shape != (T, 3, *self.view.size):
                want = [T, 3, *self.view.size]
                raise self._fail(f"frames must be [T, 3, H, W] = {want}, got {list(self.frames.shape)}")
        if self.frames_jpeg is not None and (self.frames is None or len(self.frames_jpeg) != T):
            raise self._fail(f"frames_jpeg must hold T={T} JPEGs beside the decoded frames")
        for name in ("tokens", "attn", "pooled"):
            if not np.isfinite(getattr(self, name)).all():
                raise self._fail(f"{name} contains NaN or inf")
        return self

    def _validate_tokens(self, T: int, N: int, D: int) -> None:
        tokens = self.tokens
        if self.visible_idx is None:
            if tokens.ndim != 4 or tokens.shape[1:] != (T, N, D):
                raise self._fail(f"tokens must be [K, T={T}, N={N}, D={D}] (mode full), got {list(tokens.shape)}")
            return
        idx = self.visible_idx
        if not isinstance(idx, np.ndarray) or idx.dtype != np.int16 or idx.ndim != 3 or idx.shape[1] != T:
            raise self._fail(f"visible_idx must be int16 [M, T={T}, N_vis], got {_describe(idx)}")
        M, _, n_vis = idx.shape
        if tokens.ndim != 5 or tokens.shape[0] != M or tokens.shape[2:] != (T, n_vis, D):
            raise self._fail(
                f"tokens must be [M={M}, K, T={T}, N_vis={n_vis}, D={D}] (mode visible), got {list(tokens.shape)}"
            )
        if idx.size and (idx.min() < 0 or idx.max() >= N):
            raise self._fail(f"visible_idx must lie in [0, N={N}), got [{idx.min()}, {idx.max()}]")
        if n_vis > 1 and not (np.diff(idx, axis=-1) > 0).all():
            raise self._fail("visible_idx must be strictly increasing within each frame")

    def describe(self, codec: str, compressor: str) -> dict[str, Any]:
        """The JSON-able description stored beside the arrays (wds ``view.json``)."""
        return {
            "clip_id": self.clip_id,
            "view_index": int(self.view_index),
            "view": self.view.to_dict(),
            "frames_digest": self.frames_digest,
            "codec": codec,
            "compressor": compressor,
            "mode": self.mode,
        }


def _describe(x: object) -> str:
    if isinstance(x, np.ndarray):
        return f"{x.dtype} {list(x.shape)}"
    return type(x).__name__


def part_name(field: str, part: str) -> str:
    """Stored name of one codec part: the field itself for single-part codecs (``tokens``),
    ``field.part`` otherwise (``tokens.q``, ``tokens.scale``)."""
    return field if part == Codec.SINGLE_PART else f"{field}.{part}"


def stored_names(codec: Codec, mode: str, frames: bool) -> list[str]:
    """Names of the arrays a record is stored as, in storage order."""
    names = [part_name(f, p) for f in CODED_FIELDS for p in codec.parts]
    names += list(FLOAT32_FIELDS)
    if mode == "visible":
        names.append("visible_idx")
    if frames:
        names.append("frames")
    return names


def record_arrays(record: TargetRecord, codec: Codec, frames: bool) -> dict[str, np.ndarray]:
    """Encode a record into its named stored arrays (see :func:`stored_names`)."""
    out: dict[str, np.ndarray] = {}
    for field in CODED_FIELDS:
        for part, arr in codec.encode(getattr(record, field)).items():
            out[part_name(field, part)] = arr
    for field in FLOAT32_FIELDS:
        out[field] = np.ascontiguousarray(getattr(record, field), dtype=np.float32)
    if record.visible_idx is not None:
        out["visible_idx"] = np.ascontiguousarray(record.visible_idx)
    if frames:
        out["frames"] = np.ascontiguousarray(require_frames(record))
    return out


def vector_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each vector (the last axis) of ``a`` against ``b``, in float64; two zero vectors count as 1."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, np.shape(a)[-1])
    b = np.asarray(b, dtype=np.float64).reshape(-1, np.shape(b)[-1])
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(denom > 0, (a * b).sum(1) / np.maximum(denom, 1e-30), 1.0)


class CodecErrorTally:
    """The codec's reconstruction error over the records a shard writer encodes, measured at write time
    on the exact float32 tokens the teacher produced: the worst per-token cosine (over D) between a
    token and its decoding, and the largest absolute error. Shard writers return it in their close
    info (``codec_error``), which the pipeline keeps in the shard's sidecar; ``cache verify`` holds the
    store's records to it."""

    def __init__(self) -> None:
        self.min_cos, self.max_abs, self.records = 1.0, 0.0, 0

    def add(self, codec: Codec, tokens: np.ndarray, arrays: Mapping[str, np.ndarray]) -> None:
        self.records += 1
        if codec.lossless:
            return
        decoded = codec.decode({p: arrays[part_name("tokens", p)] for p in codec.parts})
        self.min_cos = min(self.min_cos, float(vector_cosines(tokens, decoded).min()))
        self.max_abs = max(self.max_abs, float(np.abs(decoded.astype(np.float64) - tokens).max(initial=0.0)))

    def as_dict(self) -> dict[str, Any]:
        return {"min_cos": self.min_cos, "max_abs": self.max_abs, "records": self.records}


def check_new_key(record: TargetRecord, seen: set[tuple[str, int]]) -> None:
    """Validate a record about to be added to a shard holding ``seen`` keys; a repeated key is an error."""
    record.validate()
    if (record.clip_id, int(record.view_index)) in seen:
        raise RecordError(f"record {record.clip_id!r} view {record.view_index}: already in this shard")


def require_frames(record: TargetRecord) -> np.ndarray:
    """The record's pixels, for a store that keeps them; :class:`RecordError` if it has none."""
    if record.frames is None:
        raise RecordError(f"record {record.clip_id!r} view {record.view_index}: the store keeps frames, it has none")
    return record.frames


def record_jpegs(record: TargetRecord, quality: int = 95) -> list[bytes]:
    """The JPEG bytes to store for a record: the ones the pipeline decoded for the teacher
    (``frames_jpeg``), or, for a record without them (tools that re-encode a store), an encoding of its
    frames (whose decoding then differs slightly from ``frames``)."""
    if record.frames_jpeg is not None:
        return list(record.frames_jpeg)
    return encode_jpegs(require_frames(record), quality)


#: A dimension the spec does not fix (``frames_jpeg``'s byte axis; any axis of a spec without the field).
ANY = -1


def _size_hw(size: Any) -> tuple[int, int]:
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    return ANY, ANY


def record_layout(spec: Mapping[str, Any], layout: str | None = None) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Every stored array of one record as the store's spec fixes it: name -> (dtype, shape without the
    record axis), :data:`ANY` for a dimension the spec does not fix (a partial spec, or JPEG lengths).

    Readers check each array's metadata (zarr ``zarr.json``, a wds entry's ``.npy`` header) against this
    *before* reading it, so an edited dtype or shape is damage instead of garbage, and the size a file
    declares is bounded by what the spec allows (:func:`layout_nbytes`).

    Args:
        spec: The store's ``spec.json`` (``codec``, ``mode``, ``frames``, ``teacher``, ``views``).
        layout: ``zarr`` (JPEG frames as ``frames_jpeg`` + ``frames_jpeg_len``) or ``wds`` (one
            ``frameNNN.jpg`` entry per frame, not an array); default ``spec["layout"]``.
    """
    codec = get_codec(spec["codec"]["name"])
    mode = (spec.get("mode") or {}).get("mode", "full")
    frames = spec.get("frames", "none")
    layout = layout or spec.get("layout", "zarr")
    teacher, views, masks = spec.get("teacher") or {}, spec.get("views") or {}, spec.get("mode") or {}

    def dim(value: Any) -> int:
        return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else ANY

    K, N, D, T = dim(teacher.get("layers")), dim(teacher.get("N")), dim(teacher.get("D")), dim(views.get("num_frames"))
    H, W = _size_hw(views.get("size"))
    out: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
    if mode == "visible":
        M = dim(masks.get("masks_per_view"))
        ratio = masks.get("mask_ratio")
        n_vis = num_visible(N, float(ratio)) if N != ANY and isinstance(ratio, (int, float)) else ANY
        values: tuple[int, ...] = (M, K, T, n_vis, D)
        out_idx = {"visible_idx": (np.dtype(np.int16), (M, T, n_vis))}
    else:
        values, out_idx = (K, T, N, D), {}
    for field in CODED_FIELDS:
        # part_layout keeps an unknown (-1) axis unknown: int4 halves it (-1 // 2 == -1), pca keeps it.
        for part, (dtype, shape) in codec.part_layout(values).items():
            out[part_name(field, part)] = (np.dtype(dtype), tuple(int(x) for x in shape))
    out["attn"] = (np.dtype(np.float32), (T, N))
    out["pooled"] = (np.dtype(np.float32), (T, D))
    out.update(out_idx)
    if frames == "raw":
        out["frames"] = (np.dtype(np.uint8), (T, 3, H, W))
    elif frames == "jpeg" and layout == "zarr":
        out["frames_jpeg"] = (np.dtype(np.uint8), (T, ANY))
        out["frames_jpeg_len"] = (np.dtype(np.int32), (T,))
    return out


def shape_matches(want: tuple[int, ...], got: tuple[int, ...]) -> bool:
    """Whether a stored shape is the one :func:`record_layout` expects (:data:`ANY` matches anything)."""
    return len(want) == len(got) and all(w == ANY or w == int(g) for w, g in zip(want, got))


def layout_nbytes(dtype: np.dtype, shape: tuple[int, ...]) -> int | None:
    """Bytes of an array of ``shape`` (None when a dimension is :data:`ANY`)."""
    if ANY in shape:
        return None
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def record_from_arrays(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], codec: Codec) -> TargetRecord:
    """Rebuild a record (float32 decoded) from its description and named stored arrays, and validate it.

    Raises:
        KeyError: a stored array is missing; RecordError: the arrays disagree (the layouts turn both
            into :class:`StoreDamagedError` naming the shard).
    """
    decoded = {}
    for field in CODED_FIELDS:
        decoded[field] = codec.decode({p: arrays[part_name(field, p)] for p in codec.parts})
    return TargetRecord(
        clip_id=str(meta["clip_id"]),
        view_index=int(meta["view_index"]),
        view=ViewSpec.from_dict(meta["view"]),
        frames_digest=str(meta["frames_digest"]),
        tokens=decoded["tokens"],
        attn=np.asarray(arrays["attn"], dtype=np.float32),
        pooled=np.asarray(arrays["pooled"], dtype=np.float32),
        visible_idx=arrays["visible_idx"] if meta.get("mode") == "visible" else None,
        frames=arrays.get("frames"),
    ).validate()
