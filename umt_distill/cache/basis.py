"""The per-layer basis of the low-rank codecs (``pca<r>``): fitted once per store, bound to the codec.

``cache-teacher`` with a ``pca<r>`` codec runs the teacher over a sample of the corpus
(``cache.basis_clips`` clips, evenly spaced in corpus order, all K views) before any shard, fits a
basis per teacher layer (mean + the top-r principal directions scaled by their standard deviation),
writes it to ``<root>/basis.npy`` (float32 ``[K, 1 + r, D]``, a plain ``.npy``) and records the file's
sha256 in ``spec.json["basis"]``. Every reader builds the store's codec with :func:`codec_for_store`,
which refuses a store whose basis file is missing or differs from the digest: records coded in one
basis decode to wrong numbers in any other.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from umt_distill.cache.codecs import Codec, CodecError, PcaCodec, get_codec
from umt_distill.cache.record import StoreDamagedError
from umt_distill.cache.spec import read_spec
from umt_distill.cache.wds_stream import npy_array
from umt_distill.data.clipviews import ClipFailure, decode_clip_views
from umt_distill.io import atomic_write_bytes, atomic_write_json
from umt_distill.training import distributed as du

if TYPE_CHECKING:
    from umt_distill.config import Recipe

BASIS_FILE = "basis.npy"
SPEC_FILE = "spec.json"
#: Token positions the fit uses at most (a seeded subsample beyond): the D x D covariance of 200k
#: tokens is exact enough for the top directions and costs ~1 s per layer at D = 512 on one core; a
#: joint basis (K*D = 3072 for CLIP-B/16) costs K^2 times that per token, so it takes 50k.
MAX_FIT_TOKENS = 200_000
MAX_FIT_TOKENS_JOINT = 50_000


def _principal(x: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean [F] and the top ``rank`` principal directions times their standard deviation [rank, F] of
    samples x [S, F]. Each direction's largest-magnitude entry is positive, so the result does not
    depend on the eigen-solver's signs."""
    x = x.astype(np.float64)
    mean = x.mean(0)
    xc = x - mean
    w, v = np.linalg.eigh(xc.T @ xc / (len(x) - 1))  # ascending eigenvalues
    w, v = w[::-1][:rank], v[:, ::-1][:, :rank]  # [r], [F, r]
    # A direction with (numerically) no variance would make the whitened coefficient blow up.
    std = np.sqrt(np.maximum(w, max(float(w[0]), 1e-30) * 1e-12))
    sign = np.sign(v[np.abs(v).argmax(0), np.arange(rank)])
    return mean, (v * sign * std).T


def fit_basis(tokens: np.ndarray, rank: int, joint: bool = False) -> np.ndarray:
    """Fit the basis of a ``pca<rank>`` (``joint``: ``jpca<rank>``) codec on sampled teacher tokens.

    Args:
        tokens: float32 [K, S, D]: S sampled (frame, patch) positions of each of the K teacher layers
            (the same positions in every layer, which the joint basis needs).
        rank: Principal directions kept (< D per layer; < K*D joint).
        joint: One basis over the K layers' concatenated tokens instead of one per layer.

    Returns:
        float32 [K, 1 + rank, D] (per layer: row 0 the mean, rows 1.. the directions, descending
        variance, times their standard deviation), or [1 + rank, K, D] (joint: the same over K*D values).
    """
    tokens = np.asarray(tokens, dtype=np.float32)
    if tokens.ndim != 3:
        raise CodecError(f"fit_basis expects tokens [K, S, D], got {list(tokens.shape)}")
    K, S, D = tokens.shape
    width, name = (K * D, f"jpca{rank}") if joint else (D, f"pca{rank}")
    if not 0 < rank < width:
        raise CodecError(f"codec {name} needs a rank below the teacher's {'K*D' if joint else 'D'} = {width}")
    if S <= rank:
        raise CodecError(f"codec {name}: {S} sampled tokens per layer cannot fit {rank} directions")
    if joint:
        mean, dirs = _principal(np.moveaxis(tokens, 0, 1).reshape(S, K * D), rank)  # [K*D], [r, K*D]
        return np.concatenate([mean[None], dirs]).reshape(1 + rank, K, D).astype(np.float32)
    out = np.empty((K, 1 + rank, D), dtype=np.float32)
    for k in range(K):
        mean, dirs = _principal(tokens[k], rank)
        out[k, 0], out[k, 1:] = mean, dirs
    return out


def basis_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def write_basis(root: str | Path, basis: np.ndarray, fit: dict[str, Any]) -> dict[str, Any]:
    """Write ``<root>/basis.npy`` atomically (temporary file, fsync, rename); return its spec entry."""
    root = Path(root)
    data = _npy_bytes(np.asarray(basis, dtype=np.float32))
    atomic_write_bytes(root / BASIS_FILE, data)
    return {"file": BASIS_FILE, "sha256": basis_digest(data), "dtype": "float32", "shape": list(basis.shape), "fit": fit}


def _read_bytes(root: str, name: str) -> bytes:
    path = f"{root}/{name}"
    if "://" in root:
        from umt_distill import storage

        return storage.read_bytes(path)  # retried; a network fault is storage.NetworkError
    with open(path, "rb") as f:
        return f.read()


def read_basis(root: str | Path, spec: dict[str, Any]) -> np.ndarray:
    """The store's basis, checked against ``spec["basis"]`` (digest, dtype, shape, rank).

    Raises:
        StoreDamagedError: no basis entry in the spec, no basis file, or a file that differs from the
            entry (the records were coded in another basis and cannot be decoded with this one).
    """
    root = str(root).rstrip("/")
    codec = get_codec(spec["codec"]["name"])
    entry = spec.get("basis")
    if not isinstance(entry, dict) or "sha256" not in entry:
        raise StoreDamagedError(f"{root}/{SPEC_FILE}", f"codec {codec.name} needs a basis, but spec.json records none "
                                "(cache-teacher stopped before fitting it, or the store was not made by cache-teacher)")
    path = f"{root}/{entry.get('file', BASIS_FILE)}"
    try:
        data = _read_bytes(root, entry.get("file", BASIS_FILE))
    except FileNotFoundError:
        raise StoreDamagedError(path, f"missing: codec {codec.name} cannot decode this store's records without it") from None
    digest = basis_digest(data)
    if digest != entry["sha256"]:
        raise StoreDamagedError(path, f"{digest} differs from spec.json's basis {entry['sha256']}: the basis was "
                                "replaced or damaged, and records coded in another basis decode to wrong numbers")
    try:
        basis = npy_array(data).copy()  # bounded by the file's bytes: a header's claim is never allocated
    except ValueError as e:
        raise StoreDamagedError(path, f"not a valid .npy file: {e}") from None
    if list(basis.shape) != list(entry["shape"]):
        raise StoreDamagedError(path, f"shape {list(basis.shape)}, spec.json says {entry['shape']}")
    try:
        codec.bind(basis)
    except CodecError as e:
        raise StoreDamagedError(path, str(e)) from None
    return basis


def _read_spec(root: str) -> dict[str, Any]:
    try:
        return json.loads(_read_bytes(root, SPEC_FILE))
    except FileNotFoundError:
        raise StoreDamagedError(f"{root}/{SPEC_FILE}", "missing: not a umt-distill cache store") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreDamagedError(f"{root}/{SPEC_FILE}", f"not valid JSON: {e}") from None


def codec_for_store(root: str | Path, spec: dict[str, Any] | None = None) -> Codec:
    """The codec a store's records were written with, bound to the store's basis where it has one.

    The one function to call wherever a store's codec is needed (writers, readers, training). For
    ``pca<r>`` stores it reads and checks ``basis.npy`` (see :func:`read_basis`); other codecs need no
    state and come from the registry.

    Args:
        root: Store directory or fsspec URL.
        spec: The store's parsed ``spec.json`` if already read.
    """
    root = str(root).rstrip("/")
    spec = _read_spec(root) if spec is None else spec
    codec = get_codec(spec["codec"]["name"])
    if isinstance(codec, PcaCodec):
        return codec.bind(read_basis(root, spec))
    return codec


# --------------------------------------------------------------------------------------------------
# fitting during cache-teacher


def codec_spec_fields(cfg: Recipe) -> dict[str, Any]:
    """Extra ``spec["codec"]`` fields of codecs with a basis (how it is fitted), compared on resume."""
    return {"basis_clips": cfg.cache.basis_clips} if get_codec(cfg.cache.codec).needs_basis else {}


def sample_clip_indices(num_clips: int, wanted: int) -> list[int]:
    """``wanted`` clip indices spread evenly over the corpus order (a corpus sorted by class or source
    then still contributes every part of itself)."""
    n = min(wanted, num_clips)
    return sorted({int(i) for i in np.linspace(0, num_clips - 1, n).round()}) if n else []


def subsample(x: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """At most ``limit`` positions of tokens [K, S, D] (seeded, the same positions in every layer)."""
    if x.shape[1] <= limit:
        return x
    return x[:, np.sort(np.random.default_rng([seed, 14]).choice(x.shape[1], limit, replace=False))]


def sample_tokens(cfg: Recipe, rows, teacher, device) -> tuple[np.ndarray, dict[str, Any]]:
    """Teacher tokens [K, S, D] of all K views of the sample clips (at most :data:`MAX_FIT_TOKENS`, or
    :data:`MAX_FIT_TOKENS_JOINT` for a joint basis, positions).

    A clip that fails to decode is left out of the sample (the shard that owns it records the failure).
    """
    chunks, used = [], 0
    for i in sample_clip_indices(len(rows), cfg.cache.basis_clips):
        try:
            _, pixels = decode_clip_views(rows[i], cfg)  # [V, T, 3, H, W]
        except ClipFailure:
            continue
        used += 1
        for batch in pixels.split(cfg.cache.batch_size):
            tokens = teacher(batch.to(device)).tokens.float().cpu().numpy()  # [B, K, T, N, D]
            chunks.append(np.moveaxis(tokens, 1, 0).reshape(tokens.shape[1], -1, tokens.shape[-1]))  # [K, B*T*N, D]
    if not chunks:
        raise CodecError(f"codec {cfg.cache.codec}: none of the {cfg.cache.basis_clips} sample clips decoded; "
                         "cannot fit the basis")
    joint = get_codec(cfg.cache.codec).joint  # type: ignore[attr-defined]
    x = subsample(np.concatenate(chunks, axis=1), MAX_FIT_TOKENS_JOINT if joint else MAX_FIT_TOKENS, cfg.seed)  # [K, S, D]
    return x, {"clips": used, "tokens_per_layer": int(x.shape[1])}


def ensure_basis(root: Path, cfg: Recipe, rows, teacher, device, env) -> None:
    """``cache-teacher``'s basis step, after the store's spec exists and before any shard.

    Rank 0 fits and writes the basis (or, resuming, checks the one already recorded: the finished
    shards were coded in it); the other ranks wait for it.
    """
    codec = get_codec(cfg.cache.codec)
    if not isinstance(codec, PcaCodec):
        return
    if env.is_main:
        spec = read_spec(root)
        if "basis" in spec:
            read_basis(root, spec)  # refuses a missing or replaced basis
        else:
            tokens, fit = sample_tokens(cfg, rows, teacher, device)
            spec["basis"] = write_basis(root, fit_basis(tokens, codec.rank, codec.joint), fit)
            atomic_write_json(Path(root) / SPEC_FILE, spec)
    du.barrier()
