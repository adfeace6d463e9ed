"""The Ray engine's edges that need no cluster: which tasks ask for a GPU, what a missing Ray says, and that
the commands that do not cache never import Ray."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from umt_distill.cache.ray_engine import INSTALL_HINT, wants_gpu
from umt_distill.cache.store_folder import CacheError
from umt_distill.cli import app


@pytest.mark.parametrize(("device", "gpus", "expected"), [
    ("auto", 0, False), ("auto", 8, True), ("cpu", 8, False), ("cuda", 1, True), ("cuda:3", 4, True),
])
def test_a_task_asks_for_a_gpu_when_the_recipe_runs_on_cuda(device: str, gpus: float, expected: bool) -> None:
    assert wants_gpu(device, gpus) is expected


def test_cuda_on_a_cluster_without_gpus_is_refused_naming_the_key() -> None:
    with pytest.raises(CacheError, match=r"cache.device=cuda but the Ray cluster has no GPU"):
        wants_gpu("cuda", 0)


def test_without_ray_the_command_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path\n")
    result = CliRunner().invoke(app, ["cache-teacher", "stage1/tiny", f"corpus.source={manifest}",
                                      f"cache.store={tmp_path / 'store'}", "--engine", "ray"])
    assert result.exit_code == 1
    assert INSTALL_HINT in result.output and "Traceback" not in result.output
    assert not (tmp_path / "store").exists()  # stopped before touching the store


def test_an_unknown_engine_is_a_usage_error() -> None:
    result = CliRunner().invoke(app, ["cache-teacher", "stage1/tiny", "--engine", "spark"])
    assert result.exit_code == 2 and "choose torchrun or ray" in result.output


def test_help_and_validate_do_not_import_ray() -> None:
    code = ("import sys; from typer.testing import CliRunner; from umt_distill.cli import app; "
            "r = CliRunner(); assert r.invoke(app, ['cache-teacher', '--help']).exit_code == 0; "
            "assert r.invoke(app, ['validate', 'stage1/tiny']).exit_code == 0; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
