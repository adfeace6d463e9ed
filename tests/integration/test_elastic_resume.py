"""Stage 1 stopped at one world size resumes at another (real torchrun, gloo) and trains the same global
sequence, every sample of an epoch exactly once, for both store layouts; ``ledger.jsonl`` shows it.

Per layout, three runs go 2 → 1, 1 → 2 and 2 → 3 processes (the first leg stopped by ``train.max_steps``,
which counts steps of the global batch the run started with; the second trains to the end of the epoch);
an uninterrupted one-process run is the reference. A torchrun launch trains every leg of its world size
(this file is also the script torchrun runs), so the test starts two launches in all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from umt_distill.config import load_recipe
from umt_distill.training.ledger import epoch_samples, read_ledger
from umt_distill.training.metrics import read_metrics
from umt_distill.training.state_file import read_plain_entry

LAYOUTS = ("zarr", "wds")
EPOCHS, CLIPS = 2, 8  # the reference trains 2 epochs; the resumed runs 1 (and what straddles into the next)


def _recipe(layout: str, corpus: Path, store: Path, out: Path, *extra: str):
    name = "stage1/tiny_wds" if layout == "wds" else "stage1/tiny"
    pixels = ["train.pixels_from=store"] if layout == "wds" else []  # zarr: decoded from the videos
    return load_recipe(name, [f"corpus.source={corpus}", f"cache.store={store}", f"train.output_dir={out}",
                              "cache.codec=fp16", "train.batch_size=1", "train.ckpt_every=100", "train.log_every=1", "train.num_workers=0",
                              "train.epochs=1", *pixels, *extra])


def _train_legs(legs: list[dict]) -> None:
    """Train each leg ({layout, corpus, store, out, extra}) in this process (one rank of a torchrun, or alone)."""
    from umt_distill.stages import stage1

    for leg in legs:
        stage1.train(_recipe(leg["layout"], Path(leg["corpus"]), Path(leg["store"]), Path(leg["out"]), *leg["extra"]))


def _torchrun(world: int, legs: list[dict]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
                           __file__, json.dumps(legs)], check=False, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]


# Per run: its legs ((world size, overrides) in launch order) and the worlds and first positions of its steps.
RUNS = {
    "2to1": ([(2, ["train.max_steps=2", "train.num_workers=2"]), (1, [])], [2, 2, 1, 1, 1, 1], [0, 2, 4, 5, 6, 7], 8),
    "1to2": ([(1, ["train.max_steps=3"]), (2, [])], [1, 1, 1, 2, 2, 2], [0, 1, 2, 3, 5, 7], 9),
    "2to3": ([(2, ["train.max_steps=1"]), (3, [])], [2, 3, 3], [0, 2, 5], 8),
}


@pytest.mark.distributed
def test_runs_resumed_at_other_world_sizes_train_the_same_sequence_each_sample_once_per_epoch(
        shapes_corpus, tiny_store, tmp_path) -> None:
    stores = {layout: tiny_store(layout, "fp16") for layout in LAYOUTS}

    def legs(run: str, extra: list[str]) -> list[dict]:
        return [{"layout": layout, "corpus": str(shapes_corpus), "store": str(stores[layout]),
                 "out": str(tmp_path / f"{run}-{layout}"), "extra": extra} for layout in LAYOUTS]

    # Legs in an order that needs two torchrun launches: 1 -> 2 -> 1 -> 3 processes.
    _train_legs(legs("1to2", RUNS["1to2"][0][0][1]))  # stops after 3 samples
    _torchrun(2, legs("2to1", RUNS["2to1"][0][0][1]) + legs("1to2", RUNS["1to2"][0][1][1])
              + legs("2to3", RUNS["2to3"][0][0][1]))
    _train_legs(legs("2to1", RUNS["2to1"][0][1][1]) + legs("reference", ["train.batch_size=4", f"train.epochs={EPOCHS}"]))
    _torchrun(3, legs("2to3", RUNS["2to3"][0][1][1]))

    for layout in LAYOUTS:
        reference = read_ledger(tmp_path / f"reference-{layout}" / "ledger.jsonl")  # one process, uninterrupted
        want = {(e, p): (clip, view) for r in reference for samples in r["ranks"] for e, p, clip, view in samples}
        assert sorted(p for _, p in want) == list(range(EPOCHS * CLIPS))
        for run, (_, worlds, positions, end) in RUNS.items():
            folder = tmp_path / f"{run}-{layout}"
            steps = read_ledger(folder / "ledger.jsonl")
            assert [r["world"] for r in steps] == worlds and [r["position"] for r in steps] == positions, run
            assert [m["step"] for m in read_metrics(folder / "metrics.jsonl")] == list(range(1, len(worlds) + 1))
            got = {(e, p): (clip, view) for r in steps for samples in r["ranks"] for e, p, clip, view in samples}
            # every position once, each the sample (and view) the uninterrupted run trained there
            assert sorted(p for _, p in got) == list(range(end)), run
            assert all(got[k] == want[k] for k in got), (run, got, want)
            by_epoch = epoch_samples(steps)
            assert sorted(clip for _, clip in by_epoch[0]) == sorted(f"v{i}" for i in range(CLIPS))  # each clip once
            data = read_plain_entry(folder / "checkpoints" / f"step-{len(worlds):08d}", "data")
            assert (data["position"], data["world"]) == (end, worlds[-1]), run


if __name__ == "__main__":  # one rank of the torchrun launches above
    _train_legs(json.loads(sys.argv[1]))
