"""The real CLI in subprocesses: --help, ls, validate on every shipped recipe, misspelled keys."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from umt_distill.config import list_recipe_files, recipes_dir


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "umt_distill", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})


def test_help_lists_commands() -> None:
    proc = run("--help")
    assert proc.returncode == 0
    for command in ("validate", "ls", "cache-teacher", "cache", "train", "eval", "quickstart"):
        assert command in proc.stdout
    assert "Exit status" in proc.stdout


def test_command_help_has_examples() -> None:
    proc = run("cache-teacher", "--help")
    assert proc.returncode == 0 and "Example" in proc.stdout and "torchrun" in proc.stdout


def test_ls_lists_recipes_and_parts() -> None:
    proc = run("ls")
    assert proc.returncode == 0, proc.stderr
    for name in ("stage1/b16_k710", "open_clip", "umt_base_patch16", "semantic", "int8", "zarr", "wds", "umt_train", "pyav"):
        assert name in proc.stdout, name


def test_validate_every_shipped_recipe_in_one_process() -> None:
    # One subprocess per recipe would cost seconds each; the CLI function is the same.
    from typer.testing import CliRunner

    from umt_distill.cli import app

    runner = CliRunner()
    for path in list_recipe_files():
        name = path.relative_to(recipes_dir()).with_suffix("").as_posix()
        result = runner.invoke(app, ["validate", name])
        assert result.exit_code == 0, (name, result.output)
        assert "teacher:" in result.output


def test_validate_misspelled_key_exits_2_naming_it() -> None:
    proc = run("validate", "stage1/tiny", "teacher.layer=3")
    assert proc.returncode == 2
    assert "teacher.layer" in proc.stderr and "teacher.layers" in proc.stderr


def test_validate_unknown_recipe() -> None:
    proc = run("validate", "stage1/tinny")
    assert proc.returncode == 2 and "stage1/tiny" in proc.stderr


@pytest.mark.parametrize("override", ["cache.codec=fp17", "mask.type=semantc"])
def test_validate_unknown_part_name(override: str) -> None:
    proc = run("validate", "stage1/tiny", override)
    assert proc.returncode == 2 and override.split("=")[0] in proc.stderr
