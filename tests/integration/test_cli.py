"""The CLI: one real subprocess (`python -m umt_distill`), the rest in-process through typer's runner."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from umt_distill.cli import app
from umt_distill.config import list_recipe_files, recipes_dir

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "300"})


def test_python_dash_m_help_lists_commands() -> None:
    proc = subprocess.run([sys.executable, "-m", "umt_distill", "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0
    for command in ("validate", "ls", "cache-teacher", "cache", "train", "eval", "quickstart"):
        assert command in proc.stdout
    assert "Exit status" in proc.stdout


def test_command_help_has_examples() -> None:
    result = invoke("cache-teacher", "--help")
    assert result.exit_code == 0 and "Example" in result.stdout and "torchrun" in result.stdout


def test_ls_lists_recipes_and_parts() -> None:
    result = invoke("ls")
    assert result.exit_code == 0, result.output
    for name in ("stage1/b16_k710", "open_clip", "umt_base_patch16", "semantic", "int8", "zarr", "wds", "umt_train", "pyav"):
        assert name in result.stdout, name


@pytest.mark.parametrize("path", list_recipe_files(), ids=lambda p: p.relative_to(recipes_dir()).as_posix())
def test_validate_every_shipped_recipe(path) -> None:
    result = invoke("validate", path.relative_to(recipes_dir()).with_suffix("").as_posix())
    assert result.exit_code == 0, result.output
    assert "teacher:" in result.stdout


def test_validate_misspelled_key_exits_2_naming_it() -> None:
    result = invoke("validate", "stage1/tiny", "teacher.layer=3")
    assert result.exit_code == 2
    assert "teacher.layer" in result.stderr and "teacher.layers" in result.stderr


def test_validate_unknown_recipe() -> None:
    result = invoke("validate", "stage1/tinny")
    assert result.exit_code == 2 and "stage1/tiny" in result.stderr


@pytest.mark.parametrize("override", ["cache.codec=fp17", "mask.type=semantc"])
def test_validate_unknown_part_name(override: str) -> None:
    result = invoke("validate", "stage1/tiny", override)
    assert result.exit_code == 2 and override.split("=")[0] in result.stderr


def test_quickstart_takes_overrides_and_names_a_bad_key(tmp_path) -> None:
    result = invoke("quickstart", "--help")
    assert result.exit_code == 0 and "teacher.mode=online" in result.stdout
    result = invoke("quickstart", "--output", str(tmp_path / "qs"), "quickstart.wrld.clips=3")
    assert result.exit_code == 2 and "quickstart.wrld.clips" in result.output and "quickstart.world" in result.output
    assert not (tmp_path / "qs" / "world").exists()  # nothing generated before the settings are valid


def test_install_metadata_raises_no_setuptools_warnings() -> None:
    """`pip install -e .` reads pyproject.toml with setuptools; a deprecated field there prints a wall of
    warnings on every fresh install (a `license` table instead of an SPDX string did)."""
    import tomllib
    import warnings
    from pathlib import Path

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_configuration(Distribution(), str(pyproject))
    assert [str(w.message)[:300] for w in caught] == []
    config = tomllib.loads(pyproject.read_text())
    assert isinstance(config["project"]["license"], str)  # an SPDX expression needs setuptools >= 77
    assert any(req.replace(" ", "").startswith("setuptools>=77") for req in config["build-system"]["requires"])
