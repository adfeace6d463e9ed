"""The built wheel carries the recipes: installed into a fresh venv, its `umt-distill validate stage1/tiny`
works from outside the repository, and `umt-distill ls` lists the recipes from the installed package.

The wheel is built from a copy of the project (pyproject.toml, README.md, umt_distill/) so the build
writes nothing into the working tree. The fresh venv gets the wheel only (``--no-deps``); the
dependencies come from this interpreter's site-packages through PYTHONPATH, which adds no ``.pth``
file, so this checkout's editable install is not seen.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(cmd: list, cwd: Path, env: dict | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A fresh venv (no pip) holding only the wheel built from this checkout; returns its folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for extra in REPO.glob("LICEN[CS]E*"):
        shutil.copy2(extra, src / extra.name)
    shutil.copytree(REPO / "umt_distill", src / "umt_distill", ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src],
         cwd=tmp)
    wheels = sorted((tmp / "dist").glob("umt_distill-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-deps",
          "--no-index", wheels[0]], cwd=tmp)
    return venv


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "UMT_DISTILL_RECIPES")}
    env["PYTHONPATH"] = sysconfig.get_paths()["purelib"]  # the dependencies (pydantic, yaml, typer, rich)
    env["COLUMNS"] = "300"
    return env


def test_installed_wheel_validates_a_shipped_recipe_outside_the_repository(wheel_venv: Path, tmp_path: Path) -> None:
    done = _run([wheel_venv / "bin" / "umt-distill", "validate", "stage1/tiny"], cwd=tmp_path, env=_env())
    assert "name: umt-test-tiny" in done.stdout and "stage: stage1" in done.stdout and "store: cache/tiny" in done.stdout
    code = ("import json, umt_distill, umt_distill.config as c\n"
            "files = sorted(p.relative_to(c.recipes_dir()).as_posix() for p in c.list_recipe_files())\n"
            "print(json.dumps([umt_distill.__file__, str(c.recipes_dir()), files]))\n")
    where, recipes, files = json.loads(_run([wheel_venv / "bin" / "python", "-c", code], cwd=tmp_path, env=_env()).stdout)
    assert Path(where).is_relative_to(wheel_venv) and not Path(where).resolve().is_relative_to(REPO), where
    assert Path(recipes) == Path(where).parent / "recipes"  # package data of the wheel's copy, not this checkout
    assert files == sorted(p.relative_to(REPO / "recipes").as_posix() for p in (REPO / "recipes").rglob("*.yaml"))

def test_installed_wheel_lists_its_recipes(wheel_venv: Path, tmp_path: Path) -> None:
    done = _run([wheel_venv / "bin" / "umt-distill", "ls"], cwd=tmp_path, env=_env())
    for name in ("stage1/tiny", "stage2/b16_25m", "finetune/b16_msrvtt_ret", "videomae/b16_v2_dual", "quickstart/stage1"):
        assert name in done.stdout, name
    assert "videomae" in done.stdout.split("stages (train.stage)")[1]
