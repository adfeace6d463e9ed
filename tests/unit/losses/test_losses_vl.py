"""Stage-2 losses against their plain references, and the VTC gradient across 2 gloo processes."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F

from umt_distill.data.vl import sample_id
from umt_distill.losses.vl import mlm_loss, vtc_loss, vtc_loss_reference, vtm_loss, vtm_loss_reference
from umt_distill.masking import IGNORE_INDEX, apply_mlm_mask, apply_mlm_mask_reference, draw_mlm_noise, mlm_mask
from umt_distill.stages.stage2_parts import VTMError, negative_weights, sample_rows, sample_rows_reference, vtm_pairs
from umt_distill.training.distributed import gather_with_grad


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("frames", [1, 3])
def test_vtc_equals_reference_with_repeated_ids(frames) -> None:
    vision, text = _unit(6, frames, 8, seed=0), _unit(6, 8, seed=1)
    ids = [11, 12, 13, 11, 14, 15]  # rows 0 and 3 are the same sample: both count as positives
    got = vtc_loss(vision, text, torch.tensor(ids), torch.tensor(0.07))  # default: no gather
    want = vtc_loss_reference(vision, text, ids, 0.07)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6), (got, want)


def test_sample_ids_are_stable_and_separate_sources() -> None:
    assert sample_id("video", "a") == sample_id("video", "a")
    assert sample_id("video", "a") != sample_id("image", "a")
    assert 0 <= sample_id("image", "zzz") < 2**63


# --------------------------------------------------------------------------------------------------
# VTC under DDP: 2 gloo processes against one process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vtc_problem():
    """A tiny encoder (one Linear per modality) and a global batch of 8 with one repeated id."""
    g = torch.Generator().manual_seed(0)
    x_v, x_t = torch.randn(8, 2, 6, generator=g), torch.randn(8, 5, generator=g)
    ids = torch.tensor([1, 2, 3, 4, 5, 6, 7, 1])  # rows 0 and 7 fall on different ranks
    lin_v, lin_t = torch.nn.Linear(6, 4), torch.nn.Linear(5, 4)
    with torch.no_grad():
        for p in (*lin_v.parameters(), *lin_t.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    temp = torch.nn.Parameter(torch.tensor(0.1))
    return x_v, x_t, ids, lin_v, lin_t, temp


def _vtc_loss_and_grads(rows: slice):
    x_v, x_t, ids, lin_v, lin_t, temp = _vtc_problem()
    loss = vtc_loss(F.normalize(lin_v(x_v[rows]), dim=-1), F.normalize(lin_t(x_t[rows]), dim=-1), ids[rows], temp,
                    gather_with_grad)
    loss.backward()
    params = [*lin_v.parameters(), *lin_t.parameters(), temp]
    return loss.detach(), [p.grad.clone() for p in params]


def _vtc_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        per = 8 // world
        loss, grads = _vtc_loss_and_grads(slice(rank * per, (rank + 1) * per))
        for g in grads:  # what DDP does with parameter gradients: average over ranks
            dist.all_reduce(g)
            g /= world
        # numpy, not tensors: a tensor would travel as a shared-memory handle that dies with this process
        queue.put((rank, loss.numpy(), [g.numpy() for g in grads]))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_vtc_gather_gives_the_one_process_loss_and_gradient() -> None:
    import torch.multiprocessing as mp

    want_loss, want_grads = _vtc_loss_and_grads(slice(0, 8))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_vtc_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (loss, grads)) for r, loss, grads in (queue.get(timeout=60) for _ in procs))
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for rank, (loss, grads) in results.items():
        assert torch.allclose(torch.from_numpy(loss), want_loss, atol=1e-6), (rank, loss, want_loss)
        for got, want in zip(grads, want_grads):
            assert torch.allclose(torch.from_numpy(got), want, rtol=1e-4, atol=1e-6), (rank, got, want)


# --------------------------------------------------------------------------------------------------
# VTM


def test_negative_sampling_matches_the_reference_and_the_distribution() -> None:
    sim = torch.randn(5, 5, generator=torch.Generator().manual_seed(3)) * 3
    ids = torch.tensor([0, 1, 2, 3, 0])  # rows 0 and 4 are positives of each other
    weights = negative_weights(sim, ids, ids)
    assert (weights[ids[:, None] == ids[None, :]] == 0).all()
    # Same uniforms → same choices as the plain inverse-CDF loop.
    u = torch.rand(5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    got = sample_rows(weights, torch.Generator().manual_seed(9))
    assert got.tolist() == sample_rows_reference(weights, u.tolist())
    # Frequencies follow softmax(sim) renormalised over the negatives; positives never drawn.
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_rows(weights, gen) for _ in range(4000)])  # [4000, 5]
    expected = weights / weights.sum(1, keepdim=True)
    for row in range(5):
        freq = torch.bincount(draws[:, row], minlength=5).double() / len(draws)
        assert (freq[expected[row] == 0] == 0).all()
        assert torch.allclose(freq, expected[row], atol=0.03), (row, freq, expected[row])


def test_vtm_pairs_and_loss() -> None:
    sim = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([5, 6, 7, 8])
    vi, ti, labels = vtm_pairs(sim, ids, torch.Generator().manual_seed(0))
    assert labels.tolist() == [1] * 4 + [0] * 8
    assert vi[:4].tolist() == ti[:4].tolist() == [0, 1, 2, 3]
    assert (ids[vi[4:]] != ids[ti[4:]]).all(), "negatives are never the positive sample"
    again = vtm_pairs(sim, ids, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip((vi, ti, labels), again)), "the generator decides the draw"
    logits = torch.randn(12, 2, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(vtm_loss(logits, labels).double(), vtm_loss_reference(logits, labels.tolist()), atol=1e-6)
    _, _, _ = vtm_pairs(sim, ids, torch.Generator().manual_seed(0), hard=False)


def test_vtm_refuses_a_batch_without_negatives() -> None:
    with pytest.raises(VTMError, match="no negative"):
        vtm_pairs(torch.zeros(2, 2), torch.tensor([3, 3]), torch.Generator())
    with pytest.raises(VTMError, match="no negative"):
        vtm_pairs(torch.zeros(1, 1), torch.tensor([3]), torch.Generator())


# --------------------------------------------------------------------------------------------------
# MLM

PAD, CLS, SEP, MASK, VOCAB = 0, 2, 3, 4, 50


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, length), generator=g)
    ids[:, 0] = CLS
    lengths = torch.randint(3, length + 1, (batch,), generator=g)
    for b, n in enumerate(lengths.tolist()):
        ids[b, n - 1] = SEP
        ids[b, n:] = PAD
    return ids


def test_mlm_masking_equals_reference() -> None:
    ids = _ids(6, 12, seed=0)
    noise = draw_mlm_noise(tuple(ids.shape), VOCAB, torch.Generator().manual_seed(1))
    got = apply_mlm_mask(ids, noise, 0.5, PAD, CLS, MASK)
    want = apply_mlm_mask_reference(ids, noise, 0.5, PAD, CLS, MASK)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_mlm_masking_rates_and_protected_tokens() -> None:
    ids = _ids(400, 32, seed=1)
    masked, labels = mlm_mask(ids, 0.5, PAD, CLS, MASK, VOCAB, torch.Generator().manual_seed(2))
    eligible = (ids != PAD) & (ids != CLS)
    chosen = labels != IGNORE_INDEX
    assert not chosen[~eligible].any(), "PAD and CLS are never chosen"
    assert torch.equal(masked[~chosen], ids[~chosen])
    assert torch.equal(labels[chosen], ids[chosen])
    assert abs(chosen.sum().item() / eligible.sum().item() - 0.5) < 0.02
    n = chosen.sum().item()
    as_mask = (masked[chosen] == MASK).sum().item() / n
    kept = (masked[chosen] == ids[chosen]).sum().item() / n
    assert abs(as_mask - 0.8) < 0.02 and abs(kept - 0.1) < 0.02, (as_mask, kept)
    assert ((ids[:, 1:] == SEP) & chosen[:, 1:]).any(), "SEP can be chosen (as in UMT)"


def test_mlm_loss_without_chosen_tokens_is_zero_and_differentiable() -> None:
    logits = torch.randn(0, VOCAB, requires_grad=True)
    loss = mlm_loss(logits, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0
