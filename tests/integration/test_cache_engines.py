"""One store, whatever ran it: the shards, their sidecars, the index, failures.jsonl, corpus.jsonl, the
captions (and a pca basis) are the same bytes whether one process, torchrun with 2 ranks or Ray with 2 local workers wrote them; only
the run-specific fields of spec.json (created, updated, the store's own path) and the run's own files
(summary.jsonl, .lock) differ (cache/FORMAT.md §1, §4).

The corpus is the session's 8-clip shapes corpus plus a row that is not a video (a failure in shard 1),
in shards of 2 clips: every engine splits the same 5 shards its own way (one process: all; torchrun:
0, 2, 4 and 1, 3; Ray: whichever worker is free). wds (tars with epoch-slot groups, JPEG frames, int8)
is compared across all three engines; zarr across one process and Ray. The Ray wds store is written by
the documented command line (`cache-teacher ... --engine ray`, run in this process, where it uses the
test's 2-CPU cluster: Ray's workers of one driver stay warm)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from umt_distill.cache.pipeline import cache_teacher
from umt_distill.config import load_recipe

# CPU kernels split some reductions by intra-op thread, so their last bits follow the thread count; torchrun
# and Ray give each worker one thread (OMP_NUM_THREADS=1), and so does this process (FORMAT.md §1).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECIPES = {"zarr": "stage1/tiny", "wds": "stage1/tiny_wds"}
RUN_SPECIFIC_FILES = {"summary.jsonl", ".lock"}


@pytest.fixture(scope="module")
def manifest(shapes_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shapes corpus with a caption per row (so the store holds caption embeddings and per-shard frame
    scores) and a text file posing as a video as its 4th row."""
    folder = shapes_corpus.parent
    with open(shapes_corpus, newline="") as f:
        rows = list(csv.reader(f))
    out = tmp_path_factory.mktemp("engines") / "m.csv"
    (out.parent / "text.mp4").write_text("this is not a video\n")
    rows = [rows[0] + ["captions"]] + [[i, str(folder / p), f"a clip, {i}"] for i, p in rows[1:]]
    rows.insert(4, ["not_a_video", str(out.parent / "text.mp4"), "no clip"])
    with open(out, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return out


def _args(layout: str, manifest: Path, store: Path) -> list[str]:
    return [RECIPES[layout], f"corpus.source={manifest}", f"cache.store={store}", "cache.clips_per_shard=2"]


def _files(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def _assert_same_store(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(set(fa) - RUN_SPECIFIC_FILES) == sorted(set(fb) - RUN_SPECIFIC_FILES)
    assert any(name.startswith("shards/shard-000004") for name in fa) and "index.json" in fa
    assert any(name.startswith("captions/") for name in fa)
    differ = [name for name in fa if name not in RUN_SPECIFIC_FILES and name != "spec.json" and fa[name] != fb[name]]
    assert not differ, f"{a.name} and {b.name} differ in {differ}"
    sa, sb = (json.loads(fa["spec.json"]), json.loads(fb["spec.json"]))
    for spec, store in ((sa, a), (sb, b)):
        assert spec["status"] == "complete" and spec["counts"]["failures"] == 1
        assert spec["recipe"]["cache"].pop("store") == str(store)
        del spec["created"], spec["updated"]
    assert sa == sb


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance with 2 CPUs (2 workers) for the module."""
    import ray  # the `ray` extra, which `make test` installs: never skipped

    address = os.environ.pop("RAY_ADDRESS", None)  # this machine's own instance, never a cluster outside
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    if address is not None:
        os.environ["RAY_ADDRESS"] = address


@pytest.mark.distributed
def test_one_process_torchrun_and_ray_write_the_same_bytes(manifest: Path, tmp_path: Path, ray_cluster: str) -> None:
    from typer.testing import CliRunner

    from umt_distill.cache.ray_engine import cache_teacher_ray
    from umt_distill.cli import app

    stores = {(engine, layout): tmp_path / f"{engine}-{layout}" for engine in ("one", "torchrun", "ray")
              for layout in RECIPES}
    # torchrun (its own processes) runs while this process caches with one process and with Ray
    torchrun = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "umt_distill",
         "cache-teacher", *_args("wds", manifest, stores["torchrun", "wds"])],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for layout, recipe in RECIPES.items():
            cache_teacher(load_recipe(recipe, _args(layout, manifest, stores["one", layout])[1:]), progress=False)
        summary = cache_teacher_ray(load_recipe(RECIPES["zarr"], _args("zarr", manifest, stores["ray", "zarr"])[1:]),
                                    progress=False)
        assert summary["engine"] == "ray" and summary["ray_tasks"] == 5 and summary["failures"] == 1
        # the documented command line, in this process: it finds Ray initialised and uses that cluster
        result = CliRunner().invoke(app, ["cache-teacher", *_args("wds", manifest, stores["ray", "wds"]), "--engine", "ray"])
        assert result.exit_code == 3, result.output  # 3: done, with failed clips
    finally:
        _, err = torchrun.communicate(timeout=240)
    # torchrun reports its ranks' exit status 3 as a failed job
    assert torchrun.returncode != 0 and (stores["torchrun", "wds"] / "index.json").exists(), err

    _assert_same_store(stores["one", "zarr"], stores["ray", "zarr"])
    _assert_same_store(stores["one", "wds"], stores["torchrun", "wds"])
    _assert_same_store(stores["one", "wds"], stores["ray", "wds"])
    summaries = [json.loads(line) for line in (stores["ray", "wds"] / "summary.jsonl").read_text().splitlines()]
    assert summaries[-1]["engine"] == "ray" and summaries[-1]["ray_tasks"] == 5


def test_a_ray_rerun_keeps_finished_shards_and_redoes_a_lost_one(manifest: Path, tmp_path: Path,
                                                                 ray_cluster: str) -> None:
    """Idempotent tasks: a re-run submits only the shard whose sidecar is gone, and the store is the same."""
    from umt_distill.cache.ray_engine import cache_teacher_ray

    store = tmp_path / "ray"
    cfg = load_recipe(RECIPES["zarr"], _args("zarr", manifest, store)[1:])
    cache_teacher_ray(cfg, progress=False)
    before = _files(store)
    (store / "shards" / "shard-000003.json").unlink()  # as if its task died between the data and the sidecar
    summary = cache_teacher_ray(cfg, progress=False)
    assert summary["ray_tasks"] == 1 and summary["skipped_shards"] == 4
    after = _files(store)
    assert {k: v for k, v in before.items() if k not in RUN_SPECIFIC_FILES | {"spec.json"}} == \
           {k: v for k, v in after.items() if k not in RUN_SPECIFIC_FILES | {"spec.json"}}


def test_a_task_that_fails_gives_its_own_error(manifest: Path, tmp_path: Path, ray_cluster: str) -> None:
    """An error raised in a worker (here: the teacher's weights file is missing) reaches the caller as itself,
    naming the file, not as Ray's traceback of the worker (the command line prints it as one line)."""
    from umt_distill.cache.ray_engine import cache_teacher_ray

    missing = tmp_path / "missing.safetensors"
    cfg = load_recipe(RECIPES["zarr"], [*_args("zarr", manifest, tmp_path / "store")[1:], f"teacher.pretrained={missing}"])
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors: teacher weights file not found"):
        cache_teacher_ray(cfg, progress=False)


def test_a_basis_codec_fits_the_same_basis_in_the_ray_setup_task(manifest: Path, tmp_path: Path,
                                                                   ray_cluster: str) -> None:
    """pca codecs: the basis (fitted once, before any shard: on rank 0, or in Ray's setup task) and every
    shard coded in it are the same bytes."""
    from umt_distill.cache.ray_engine import cache_teacher_ray

    def cfg(store: Path):
        return load_recipe(RECIPES["zarr"], [*_args("zarr", manifest, store)[1:], "cache.codec=pca16",
                                             "cache.basis_clips=2"])

    cache_teacher(cfg(tmp_path / "one"), progress=False)
    cache_teacher_ray(cfg(tmp_path / "ray"), progress=False)
    assert "basis.npy" in _files(tmp_path / "ray")
    _assert_same_store(tmp_path / "one", tmp_path / "ray")
