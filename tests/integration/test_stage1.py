"""Stage 1 from a real store of generated videos: parity cached vs online, smoke, resume, DDP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from umt_distill.testing.corpora import write_shapes_corpus

from umt_distill.cache.pipeline import cache_teacher
from umt_distill.config import load_recipe
from umt_distill.training.metrics import read_metrics

NUM_CLIPS = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_shapes_corpus(tmp_path_factory.mktemp("s1videos"), NUM_CLIPS, seed=100)


def _args(corpus: Path, store: Path, codec: str) -> list[str]:
    return [f"corpus.source={corpus}", f"cache.store={store}", f"cache.codec={codec}"]


# Per codec: the loss tolerance (absolute for fp32, else relative) and the least mean cosine of the cached
# targets to the online teacher's at the visible tokens. int4 and pca16 are lossy by design (on this
# random-weights tiny teacher, whose tokens have no low-rank structure, pca16 keeps half of D = 32). A
# fresh student's predictions are nearly orthogonal to any target, so the loss alone would not notice
# wrong targets; the cosine does (swapped nibbles, another basis or a misplaced layer axis).
PARITY = {"fp32": (1e-6, 1 - 1e-6), "fp16": (1e-3, 0.9999), "int4": (0.01, 0.99), "pca16": (0.01, 0.97),
          "jpca32i4": (0.01, 0.97)}


@pytest.fixture(scope="module")
def stores(corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("s1stores")
    out = {}
    for codec in PARITY:
        out[codec] = root / codec
        cache_teacher(load_recipe("stage1/tiny", _args(corpus, out[codec], codec)), progress=False)
    return out


@pytest.mark.parametrize("codec", list(PARITY))
@pytest.mark.parametrize("mask", ["semantic", "tube", "random"])
def test_online_loss_equals_cached_loss(corpus, stores, codec, mask) -> None:
    from umt_distill.teachers.build import build_teacher
    from umt_distill.data.pixels import normalize_video
    from umt_distill.cache.datasets import CachedViewDataset
    from umt_distill.data.clipviews import OnlineViewDataset
    from umt_distill.data.corpus import read_corpus
    from umt_distill.losses.uta import uta_loss
    from umt_distill.stages.parts import build_student, mask_generator, step_targets

    cfg = load_recipe("stage1/tiny", [*_args(corpus, stores[codec], codec), f"mask.type={mask}"])
    rows = read_corpus(corpus)
    cached = CachedViewDataset(stores[codec], cfg, {r.id: r for r in rows})
    online = OnlineViewDataset(rows, cfg)
    teacher = build_teacher(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    student = build_student(cfg, teacher.embed_dim)
    for epoch in (0, 1):
        cached.set_epoch(epoch)
        online.set_epoch(epoch)
        items_c = [cached[i] for i in range(3)]
        items_o = [online[i] for i in range(3)]  # the same sampler index is the same clip in both modes
        batch_c = torch.utils.data.default_collate(items_c)
        batch_o = torch.utils.data.default_collate(items_o)
        assert torch.equal(batch_c["pixels"], batch_o["pixels"]), "the same view gives the same pixels"
        assert batch_c["view_index"].tolist() == batch_o["view_index"].tolist()
        losses, targets = [], []
        for batch, t in ((batch_c, None), (batch_o, teacher)):
            target, vis = step_targets(cfg, batch, batch["pixels"], t, mask_generator(0, epoch, 0), torch.device("cpu"))
            targets.append(target)  # [K, B, L, D]
            with torch.no_grad():
                losses.append(uta_loss(student(normalize_video(batch["pixels"]), vis), target)[0].item())
        tol, min_cos = PARITY[codec]
        assert abs(losses[0] - losses[1]) <= tol * (1 if codec == "fp32" else abs(losses[1])), losses
        cos = torch.nn.functional.cosine_similarity(targets[0], targets[1], dim=-1)
        assert cos.mean().item() >= min_cos, (codec, cos.mean().item())


def _train_args(corpus: Path, store: Path, out: Path, *extra: str) -> list[str]:
    return ["stage1/tiny", *_args(corpus, store, "fp32"), f"train.output_dir={out}", *extra]


def test_thirty_steps_reduce_the_loss(corpus, stores, tmp_path) -> None:
    from umt_distill.stages.stage1 import train

    recipe, *overrides = _train_args(corpus, stores["fp32"], tmp_path / "run", "train.max_steps=30", "train.batch_size=4",
                                     "train.ckpt_every=100")
    cfg = load_recipe(recipe, overrides)
    train(cfg)
    logged = read_metrics(tmp_path / "run" / "metrics.jsonl")
    losses = [m["loss"] for m in logged]
    assert [m["step"] for m in logged] == list(range(1, 31))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    assert {"lr", "grad_norm", "loss_layer0", "loss_layer1", "step_time", "data_time", "tokens_per_s"} <= set(logged[0])
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step-00000030"


def test_spec_mismatch_is_refused(corpus, stores, tmp_path) -> None:
    from umt_distill.cache.spec import SpecMismatchError
    from umt_distill.stages.stage1 import train

    cfg = load_recipe("stage1/tiny", [*_args(corpus, stores["fp32"], "fp16"), f"train.output_dir={tmp_path}"])
    with pytest.raises(SpecMismatchError, match="cache.codec"):
        train(cfg)
    cfg = load_recipe("stage1/tiny", [*_args(corpus, stores["fp32"], "fp32"), "views.num_frames=8", f"train.output_dir={tmp_path}"])
    with pytest.raises(SpecMismatchError, match="views.num_frames"):
        train(cfg)
    # stored views are what cached training gets: a recipe without flips must not read flipped views
    cfg = load_recipe("stage1/tiny", [*_args(corpus, stores["fp32"], "fp32"), "views.flip=false", f"train.output_dir={tmp_path}"])
    with pytest.raises(SpecMismatchError, match="views.flip: store has True, recipe gives False"):
        train(cfg)


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "umt_distill", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sigkill_and_resume_continue_the_same_trajectory(corpus, stores, tmp_path) -> None:
    common = ["train.max_steps=20", "train.ckpt_every=5", "train.batch_size=2", "train.num_workers=1"]
    ref = _cli("train", *_train_args(corpus, stores["fp32"], tmp_path / "ref", *common))
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err
    # live progress off a terminal: plain lines at the first and the last step (training/progress.py)
    assert "stage1 step 1/20 (5.0%) loss " in err and "stage1 step 20/20 (100.0%) loss " in err, err[-2000:]
    expected = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "ref" / "metrics.jsonl")}

    out = tmp_path / "killed"
    proc = _cli("train", *_train_args(corpus, stores["fp32"], out, *common))
    deadline = time.time() + 240
    while time.time() < deadline:
        done = [m["step"] for m in read_metrics(out / "metrics.jsonl")] if (out / "metrics.jsonl").exists() else []
        if done and done[-1] >= 10 and (out / "checkpoints" / "latest").exists():
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = read_metrics(out / "metrics.jsonl")[-1]["step"]
    assert 10 <= killed_at < 20, killed_at
    proc = _cli("train", *_train_args(corpus, stores["fp32"], out, *common))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    got = {m["step"]: m["loss"] for m in read_metrics(out / "metrics.jsonl")}
    assert sorted(got) == list(range(1, 21))
    for step in range(11, 21):
        assert got[step] == expected[step], (step, got[step], expected[step])
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "ref" / "checkpoints" / "step-00000020" / "model.safetensors"))
    b = load_file(str(out / "checkpoints" / "step-00000020" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.distributed
def test_ddp_two_processes(corpus, stores, tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "umt_distill",
         "train", *_train_args(corpus, stores["fp32"], out, "train.max_steps=5", "train.batch_size=2", "train.ckpt_every=5")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5]
    assert (out / "checkpoints" / "step-00000005" / "model.safetensors").exists()
    assert proc.stderr.count("stage1 step 5/5") == 1  # progress from rank 0 only


def test_train_streams_a_webdataset_store_and_resumes_mid_epoch(corpus, tmp_path) -> None:
    """WebDataset layout with JPEG view frames: pixels from the store; a resume re-reads past consumed batches."""
    import shutil

    from umt_distill.stages.stage1 import train

    store = tmp_path / "wds"
    base = [f"corpus.source={corpus}", f"cache.store={store}"]
    cache_teacher(load_recipe("stage1/tiny_wds", base), progress=False)
    run = tmp_path / "run"
    cfg = load_recipe("stage1/tiny_wds", [*base, f"train.output_dir={run}", "train.pixels_from=store", "train.max_steps=6",
                                          "train.batch_size=2", "train.ckpt_every=3"])
    train(cfg)
    first = {m["step"]: m["loss"] for m in read_metrics(run / "metrics.jsonl")}
    assert sorted(first) == [1, 2, 3, 4, 5, 6] and all(v == v for v in first.values())
    # Go back to the step-3 checkpoint (mid-epoch: 4 steps per epoch) and train again.
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    (run / "checkpoints" / "latest").write_text("step-00000003\n")
    train(cfg)
    again = {m["step"]: m["loss"] for m in read_metrics(run / "metrics.jsonl")}
    assert again == first


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(corpus, stores, tmp_path) -> None:
    from umt_distill.stages.stage1 import train
    from umt_distill.training.loop import NonFiniteLossError

    run = tmp_path / "nan"
    recipe, *overrides = _train_args(corpus, stores["fp32"], run, "train.max_steps=20", "train.batch_size=2",
                                     "train.ckpt_every=1", "optim.lr=1.0e+30", "optim.warmup_epochs=0")
    with pytest.raises(NonFiniteLossError, match=r"at step \d+") as info:
        train(load_recipe(recipe, overrides))
    bad_step = int(str(info.value).split("at step ")[1].split(";")[0])
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{bad_step - 1:08d}", (latest, bad_step)


def test_training_from_a_damaged_store_names_the_shard(corpus, stores, tmp_path) -> None:
    import shutil

    from umt_distill.cache.record import StoreDamagedError
    from umt_distill.stages.stage1 import train

    store = tmp_path / "damaged"
    shutil.copytree(stores["fp32"], store)
    shard = sorted((store / "shards").glob("shard-*.zarr"))[0]
    victim = max((p for p in shard.rglob("*") if p.is_file() and p.name != "zarr.json"), key=lambda p: p.stat().st_size)
    victim.write_bytes(b"\0" * 16)
    recipe, *overrides = _train_args(corpus, store, tmp_path / "run", "train.max_steps=8", "train.batch_size=2")
    with pytest.raises(StoreDamagedError, match=shard.name):
        train(load_recipe(recipe, overrides))
