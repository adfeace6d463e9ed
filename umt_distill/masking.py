"""Token masks: which of the T·N student tokens stay visible, the one gather of the visible tokens, and
BERT's masking of caption tokens for masked language modelling.

Every sampler has one signature (registered in ``MASKS``)::

    fn(batch, num_frames, num_patches, ratio, generator, attn=None, device=None) -> LongTensor [B, L_vis]

and returns, per sample, the *sorted* indices of the visible tokens in the flattened (t, n) order
(n = h·W' + w), i.e. exactly what :meth:`UMTStudent.forward_align` and :func:`gather_visible` take.
All randomness comes from ``generator``: noise is drawn on the generator's device, so a CPU generator
gives the same masks whatever device the result lands on. ``random``, ``tube`` and ``semantic`` also take a
list of B generators, one per sample (stage 1's per-sample masks): row i's noise comes from generator i
alone, so a sample's mask is the same whatever batch it is drawn in, at the cost of one batched draw.

Visible counts (UMT code @4fb4049: single_modality/engines/engine_for_pretraining_umt.py,
single_modality/datasets/masking_generator.py):

- ``random``: ``T·N − int(ratio·T·N)`` tokens uniformly over the whole clip.
- ``tube``: one frame pattern of ``N − int(ratio·N)`` patches, the same in every frame.
- ``semantic``: per frame ``N − int(N·ratio)`` patches drawn without replacement with probability ∝ the
  teacher's CLS→patch attention (ratio 0.8, N 196 → 40 per frame). Unlike UMT's full-permutation
  ``torch.multinomial`` this draws only the visible set (Gumbel-top-k), on the attention's device, and
  never fails on exact zeros: tokens with zero attention are kept only when a frame has fewer positive
  entries than the visible count, and then uniformly at random among the zero tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from umt_distill.registry import MASKS

# Zero-attention tokens are ranked this far (in log space) below the least likely positive token. It
# exceeds the whole range of the clamped Gumbel noise (about 21), so they can never overtake one.
_ZERO_ATTN_GAP = 64.0


def num_visible(total: int, ratio: float) -> int:
    """Visible count UMT keeps out of ``total`` tokens at mask ``ratio``: ``total − int(ratio·total)``."""
    return total - int(ratio * total)


def sample_random_mask(
    batch: int,
    num_frames: int,
    num_patches: int,
    ratio: float,
    generator: torch.Generator | Sequence[torch.Generator],
    attn: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniformly random visible tokens over the whole clip (``attn`` is ignored).

    Returns:
        long [B, T·N − int(ratio·T·N)], sorted per row.
    """
    total = num_frames * num_patches
    n_vis = _check(batch, num_frames, num_patches, ratio, total)
    noise = _uniform((batch, total), generator)  # [B, T·N]
    idx = noise.topk(n_vis, dim=1).indices.sort(dim=1).values  # [B, L_vis]
    return idx.to(device or _device(generator))


def sample_tube_mask(
    batch: int,
    num_frames: int,
    num_patches: int,
    ratio: float,
    generator: torch.Generator | Sequence[torch.Generator],
    attn: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """One random frame pattern per sample, repeated in every frame (``attn`` is ignored).

    Returns:
        long [B, T·(N − int(ratio·N))], sorted per row.
    """
    n_vis = _check(batch, num_frames, num_patches, ratio, num_patches)
    noise = _uniform((batch, num_patches), generator)  # [B, N]
    frame_idx = noise.topk(n_vis, dim=1).indices.sort(dim=1).values  # [B, N_vis]
    frame_idx = frame_idx[:, None, :].expand(batch, num_frames, n_vis)  # [B, T, N_vis]
    return flatten_frame_indices(frame_idx, num_patches).to(device or _device(generator))


def sample_semantic_mask(
    batch: int,
    num_frames: int,
    num_patches: int,
    ratio: float,
    generator: torch.Generator | Sequence[torch.Generator],
    attn: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Per-frame visible patches drawn without replacement with probability ∝ ``attn``.

    Gumbel-top-k: the top ``N_vis`` of ``log(attn) + Gumbel noise`` are a sample without replacement
    from the distribution ∝ attn (same law as sequential multinomial draws). Computed in float32 on
    ``attn``'s device.

    Args:
        attn: float [B, T, N] non-negative teacher attention (need not sum to 1).

    Returns:
        long [B, T·(N − int(N·ratio))], sorted per row, on ``device`` (default: ``attn``'s device).

    Raises:
        ValueError: ``attn`` is missing, has the wrong shape, or holds negative / non-finite values.
    """
    n_vis = _check(batch, num_frames, num_patches, ratio, num_patches)
    if attn is None:
        raise ValueError("semantic masking needs the teacher attention `attn` [B, T, N]")
    if tuple(attn.shape) != (batch, num_frames, num_patches):
        raise ValueError(
            f"attn has shape {tuple(attn.shape)}, expected [B, T, N] = [{batch}, {num_frames}, {num_patches}]"
        )
    attn = attn.float()
    if not bool((torch.isfinite(attn) & (attn >= 0)).all()):  # one host sync; bad targets must fail
        raise ValueError("attn must be finite and non-negative")
    positive = attn > 0  # [B, T, N]
    log_p = torch.where(positive, attn, torch.ones_like(attn)).log()  # [B, T, N], 0 at zeros
    # Zeros get a log-score below every positive token of their frame, so they are drawn only to fill
    # the visible count, and then in uniformly random order (the Gumbel noise alone decides).
    least = torch.where(positive, log_p, torch.full_like(log_p, float("inf"))).amin(-1, keepdim=True)
    least = torch.where(torch.isinf(least), torch.zeros_like(least), least)  # all-zero frame: uniform
    log_p = torch.where(positive, log_p, least - _ZERO_ATTN_GAP)
    gumbel = _gumbel(attn.shape, generator).to(attn.device)  # [B, T, N]
    frame_idx = (log_p + gumbel).topk(n_vis, dim=-1).indices.sort(dim=-1).values  # [B, T, N_vis]
    return flatten_frame_indices(frame_idx, num_patches).to(device or attn.device)


MASKS.register("random", sample_random_mask)
MASKS.register("tube", sample_tube_mask)
MASKS.register("semantic", sample_semantic_mask)


# --------------------------------------------------------------------------------------------------
# gathering the visible tokens


def gather_visible(targets: Tensor, visible_idx: Tensor, token_dim: int | None = None) -> Tensor:
    """Select the visible tokens of per-token values: the one gather the models and the losses' callers use.

    Args:
        targets: [K, B, T·N, D] (layer-major teacher tokens) or [B, T·N, ...] (student tokens, position
            tables, attention, pixel targets).
        visible_idx: long [B, L_vis] indices into the flattened (t, n) tokens (a mask sampler's output).
        token_dim: Which dim of ``targets`` indexes tokens; the batch dim is the one before it.
            Default: 2 for 4-D targets, else 1. Pass it for other layouts.

    Returns:
        ``targets`` with the token dim reduced to L_vis, e.g. [K, B, L_vis, D] or [B, L_vis, C].
    """
    if token_dim is None:
        token_dim = 2 if targets.ndim == 4 else 1
    if not 1 <= token_dim < targets.ndim:
        raise ValueError(f"token_dim {token_dim} is invalid for targets of shape {tuple(targets.shape)}")
    B, L = visible_idx.shape
    if targets.shape[token_dim - 1] != B:
        raise ValueError(
            f"targets {tuple(targets.shape)} have batch {targets.shape[token_dim - 1]} at dim "
            f"{token_dim - 1}, visible_idx has batch {B}"
        )
    view = [1] * (token_dim - 1) + [B, L] + [1] * (targets.ndim - token_dim - 1)
    size = list(targets.shape)
    size[token_dim] = L
    index = visible_idx.to(targets.device).reshape(view).expand(size)
    return targets.gather(token_dim, index)


def gather_visible_reference(targets: Tensor, visible_idx: Tensor, token_dim: int | None = None) -> Tensor:
    """One sample and one visible token at a time: the parity reference of :func:`gather_visible`."""
    if token_dim is None:
        token_dim = 2 if targets.ndim == 4 else 1
    per_sample = targets.movedim((token_dim - 1, token_dim), (0, 1))  # [B, T·N, ...]
    rows = [torch.stack([per_sample[b, int(i)] for i in visible_idx[b]]) for b in range(visible_idx.shape[0])]
    return torch.stack(rows).movedim((0, 1), (token_dim - 1, token_dim))


def running_cell_pattern(num_frames: int, height: int, width: int, ratio: float, phase: int) -> Tensor:
    """VideoMAE V2's running-cell decoder mask of one phase: which tokens the decoder reconstructs.

    Every 2×2 cell of the H'×W' token grid holds a queue of 4 slots, the first ``m = int(4·ratio)``
    marked "not decoded"; token (t, h, w) reads slot ``(2·(h mod 2) + (w mod 2) + t + 1 + phase) mod 4``,
    so the pattern moves by one slot per token frame ("running") and over any 4 consecutive frames every
    position is decoded ``4 − m`` times (VideoMAEv2 code @29eab1e:
    dataset/masking_generator.py, ``RunningCellMaskingGenerator``, whose 4 precomputed maps are the 4 phases). Ratio 0.5 decodes half.

    Args:
        num_frames, height, width: The token grid T' × H' × W' (H', W' even).
        ratio: Decoder mask ratio; ``int(4·ratio)`` must be 1, 2 or 3.
        phase: 0..3.

    Returns:
        bool [T'·H'·W'] in flat (t, h, w) order, True = decoded.
    """
    m = int(4 * ratio)
    if not 0 < m < 4:
        raise ValueError(f"running-cell ratio {ratio} gives {m} of 4 cell slots masked; needs 1, 2 or 3")
    if height % 2 or width % 2:
        raise ValueError(f"running-cell masking tiles 2×2 cells: the token grid {height}×{width} must be even")
    t = torch.arange(num_frames).view(-1, 1, 1)
    h = torch.arange(height).view(1, -1, 1)
    w = torch.arange(width).view(1, 1, -1)
    slot = (2 * (h % 2) + (w % 2) + t + 1 + phase) % 4  # [T', H', W']
    return (slot >= m).flatten()  # slots 0..m-1 of the queue are the masked ones


def running_cell_decode_indices(
    batch: int,
    num_frames: int,
    height: int,
    width: int,
    ratio: float,
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> Tensor:
    """Running-cell decoder masks with one uniformly drawn phase per sample (:func:`running_cell_pattern`).

    Returns:
        long [B, T'·H'·W'·(4 − m)/4], sorted flat (t, h, w) indices of the decoded tokens.
    """
    phases = torch.randint(4, (batch,), generator=generator, device=generator.device).tolist()
    rows = [running_cell_pattern(num_frames, height, width, ratio, p).nonzero()[:, 0] for p in phases]
    return torch.stack(rows).to(device or generator.device)


def decoder_plan(visible_idx: Tensor, decode: str, total: int, grid: tuple[int, int, int], ratio: float,
                 generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The tokens the decoder predicts and which of them count in the loss.

    ``none`` (VideoMAE): every token the encoder did not see, all in the loss. ``running_cell``
    (VideoMAE V2 dual masking): the running-cell tokens, whether or not the encoder saw them, so the
    decoder's cost is fixed; only the ones the encoder did not see count (as VideoMAEv2 code @29eab1e:
    engine_for_pretraining.py does).

    Args:
        visible_idx: long [B, L_vis] sorted encoder-visible indices.
        total: T'·H'·W'.
        grid: (T', H', W').

    Returns:
        decode_idx long [B, L_dec] and loss weight float [B, L_dec] (1 = invisible to the encoder).
    """
    B = visible_idx.shape[0]
    seen = visible_mask(visible_idx, total)  # [B, total]
    if decode == "none":
        decode_idx = (~seen).nonzero()[:, 1].view(B, -1)  # [B, total − L_vis], sorted
        return decode_idx, torch.ones(decode_idx.shape, device=visible_idx.device)
    if decode != "running_cell":
        raise ValueError(f"decoder mask {decode!r}: expected 'none' or 'running_cell'")
    decode_idx = running_cell_decode_indices(B, *grid, ratio, generator, device=visible_idx.device)
    weight = (~seen.gather(1, decode_idx)).float()  # [B, L_dec]
    return decode_idx, weight


def visible_mask(visible_idx: Tensor, total: int) -> Tensor:
    """Boolean visibility over all tokens: True = visible (the opposite of UMT's True = masked).

    Args:
        visible_idx: long [B, L_vis].
        total: Token count T·N.

    Returns:
        bool [B, total].
    """
    out = torch.zeros(visible_idx.shape[0], total, dtype=torch.bool, device=visible_idx.device)
    return out.scatter_(1, visible_idx, True)


def flatten_frame_indices(frame_idx: Tensor, num_patches: int) -> Tensor:
    """Per-frame patch indices [..., T, N_vis] → flattened (t, n) token indices [..., T·N_vis] (long)."""
    num_frames = frame_idx.shape[-2]
    offset = torch.arange(num_frames, device=frame_idx.device) * num_patches  # [T]
    return (frame_idx.long() + offset[:, None]).flatten(-2)


def split_frame_indices(visible_idx: Tensor, num_frames: int, num_patches: int) -> Tensor:
    """Inverse of :func:`flatten_frame_indices` for masks with the same count in every frame.

    Args:
        visible_idx: long [B, T·N_vis], sorted (tube or semantic masks).

    Returns:
        long [B, T, N_vis] patch indices within each frame.

    Raises:
        ValueError: the frames do not all hold the same number of visible tokens (e.g. a random mask).
    """
    B, L = visible_idx.shape
    frame = visible_idx // num_patches  # [B, L]
    per_frame = L // num_frames if L % num_frames == 0 else -1
    expected = torch.arange(num_frames, device=visible_idx.device).repeat_interleave(max(per_frame, 0))
    if per_frame <= 0 or not bool((frame == expected).all()):
        raise ValueError("visible_idx does not keep the same number of tokens in every frame")
    return (visible_idx % num_patches).view(B, num_frames, per_frame)


# --------------------------------------------------------------------------------------------------
# masked language modelling: which caption tokens the text encoder must restore

IGNORE_INDEX = -100  # label of the tokens MLM does not predict (PyTorch's cross-entropy default)


def draw_mlm_noise(shape: tuple[int, int], vocab_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The randomness of one MLM masking: uniforms [B, L, 3] and random token ids [B, L] (CPU)."""
    u = torch.rand((*shape, 3), generator=generator, device=generator.device).cpu()
    random_ids = torch.randint(vocab_size, shape, generator=generator, device=generator.device).cpu()
    return u, random_ids


def apply_mlm_mask(input_ids: Tensor, noise: tuple[Tensor, Tensor], prob: float, pad_id: int, cls_id: int,
                   mask_id: int) -> tuple[Tensor, Tensor]:
    """BERT masking with UMT's rate: each token but PAD/CLS is chosen with ``prob``; of those 80 % become
    [MASK], 10 % a random id, 10 % stay (SEP can be chosen, as in UMT).

    Returns:
        (masked input ids [B, L], labels [B, L]: the original id where chosen, -100 elsewhere).
    """
    u, random_ids = (t.to(input_ids.device) for t in noise)
    eligible = (input_ids != pad_id) & (input_ids != cls_id)
    chosen = eligible & (u[..., 0] < prob)
    to_mask = chosen & (u[..., 1] < 0.8)
    to_random = chosen & ~to_mask & (u[..., 2] < 0.5)
    out = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    out = torch.where(to_random, random_ids, out)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return out, labels


def apply_mlm_mask_reference(input_ids: Tensor, noise: tuple[Tensor, Tensor], prob: float, pad_id: int,
                             cls_id: int, mask_id: int) -> tuple[Tensor, Tensor]:
    u, random_ids = noise
    out, labels = input_ids.clone(), torch.full_like(input_ids, IGNORE_INDEX)
    for b in range(input_ids.shape[0]):
        for i in range(input_ids.shape[1]):
            tok = int(input_ids[b, i])
            if tok in (pad_id, cls_id) or not float(u[b, i, 0]) < prob:
                continue
            labels[b, i] = tok
            if float(u[b, i, 1]) < 0.8:
                out[b, i] = mask_id
            elif float(u[b, i, 2]) < 0.5:
                out[b, i] = int(random_ids[b, i])
    return out, labels


def mlm_mask(input_ids: Tensor, prob: float, pad_id: int, cls_id: int, mask_id: int, vocab_size: int,
             generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """:func:`apply_mlm_mask` with fresh noise from ``generator``."""
    return apply_mlm_mask(input_ids, draw_mlm_noise(tuple(input_ids.shape), vocab_size, generator), prob, pad_id,
                          cls_id, mask_id)


def _check(batch: int, num_frames: int, num_patches: int, ratio: float, pool: int) -> int:
    if batch < 1 or num_frames < 1 or num_patches < 1:
        raise ValueError(f"mask size must be positive, got B={batch} T={num_frames} N={num_patches}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    n_vis = num_visible(pool, ratio)
    if n_vis < 1:
        raise ValueError(f"mask ratio {ratio} leaves no visible token out of {pool}")
    return n_vis


def _uniform(shape: tuple[int, ...], generator: torch.Generator | Sequence[torch.Generator]) -> Tensor:
    if isinstance(generator, torch.Generator):
        return torch.rand(shape, generator=generator, device=generator.device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}: give one per sample")
    # Row i from generator i: the same numbers a batch of one would draw from it.
    return torch.stack([torch.rand(shape[1:], generator=g, device=g.device) for g in generator])


def _device(generator: torch.Generator | Sequence[torch.Generator]) -> torch.device:
    return generator.device if isinstance(generator, torch.Generator) else generator[0].device


def _gumbel(shape: torch.Size | tuple[int, ...], generator: torch.Generator | Sequence[torch.Generator]) -> Tensor:
    # Clamp away from 0 so no score is -inf; the noise then lies in about [-4.5, 16.6].
    u = _uniform(tuple(shape), generator).clamp_(min=torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(u))
