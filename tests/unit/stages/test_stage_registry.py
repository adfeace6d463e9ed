"""The stage registry (umt_distill.stages.STAGES): it matches the stage modules, the CLI reads it
(`train`, `eval`, `ls`, `train --help`), and reading it imports neither torch nor a stage module."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
import types

import pytest
from typer.testing import CliRunner

import umt_distill.stages as stages
from umt_distill.cli import app
from umt_distill.config import STAGE_NAMES, RecipeError, load_recipe
from umt_distill.stages import STAGES, Stage, StageError, get_stage, stage_names

runner = CliRunner()
ENV = {**os.environ, "COLUMNS": "300"}
HEAVY = "('torch', 'open_clip', 'zarr', 'av')"


def invoke(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "300"})


def test_registry_names_are_the_modules_that_define_train() -> None:
    defining = {}
    for info in pkgutil.iter_modules(stages.__path__):
        module = importlib.import_module(f"umt_distill.stages.{info.name}")
        if inspect.isfunction(getattr(module, "train", None)):
            defining[info.name] = module
    assert sorted(stage_names()) == sorted(defining)
    for stage in STAGES:
        module = importlib.import_module(stage.module)
        assert module is defining[stage.name], stage
        assert "resume" in inspect.signature(module.train).parameters, stage.name
        evaluate = getattr(module, "evaluate", None)
        assert stage.has_evaluate == inspect.isfunction(evaluate), f"{stage.name}: has_evaluate is wrong"
        if evaluate is not None:
            assert list(inspect.signature(evaluate).parameters)[:2] == ["cfg", "checkpoint"], stage.name
    assert {s.name for s in STAGES if s.has_evaluate} == {"finetune", "retrieval", "qa"}


def test_config_checks_train_stage_against_the_registry_names() -> None:
    assert tuple(stage_names()) == STAGE_NAMES
    assert len(set(STAGE_NAMES)) == len(STAGE_NAMES) == 6
    for name in STAGE_NAMES:
        assert load_recipe(None, [f"train.stage={name}"]).train.stage == name
    with pytest.raises(RecipeError) as err:
        load_recipe(None, ["train.stage=stag1"])
    message = str(err.value)
    assert "train.stage" in message and "did you mean 'stage1'" in message
    assert all(name in message for name in STAGE_NAMES)


def test_every_stage_has_a_one_line_description() -> None:
    for stage in STAGES:
        assert stage.description and "\n" not in stage.description and len(stage.description) < 120, stage


def test_unknown_stage_names_the_closest() -> None:
    assert get_stage("videomae").module == "umt_distill.stages.videomae"
    with pytest.raises(StageError, match="Did you mean 'finetune'.*Known: stage1, stage2, finetune, retrieval, videomae"):
        get_stage("fintune")


def test_reading_the_registry_imports_no_stage_and_no_torch() -> None:
    """`train --help` lists the stages and `eval` of a stage without an evaluation fails, both
    without importing torch or any stage module."""
    code = ("import sys\nfrom umt_distill.cli import app\n"
            "for args in (['train', '--help'], ['eval', 'stage1/tiny', 'runs/none']):\n"
            "    try:\n        app(args, standalone_mode=False)\n    except SystemExit:\n        pass\n"
            "    except Exception as e:\n        print(type(e).__name__, e)\n"
            f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY})\n"
            "loops = sorted(m for m in sys.modules if m.startswith('umt_distill.stages.'))\n"
            "assert not heavy and not loops, (heavy[:5], loops)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "videomae" in done.stdout


def test_ls_lists_every_stage() -> None:
    result = invoke("ls")
    assert result.exit_code == 0, result.output
    assert "stages (train.stage)" in result.stdout
    for stage in STAGES:
        assert stage.name in result.stdout and stage.description in result.stdout, stage.name


def test_train_help_lists_every_stage() -> None:
    proc = subprocess.run([sys.executable, "-m", "umt_distill", "train", "--help"], capture_output=True, text=True,
                          timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr
    for stage in STAGES:
        assert f"{stage.name}: {stage.description}" in proc.stdout, stage.name


def test_eval_of_a_stage1_recipe_fails_in_one_line(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "umt_distill", "eval", "stage1/tiny", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: train.stage=stage1 has no evaluation")
    assert "finetune, retrieval" in lines[0]


@pytest.fixture
def fake_stages(monkeypatch):
    """Registry entries whose module is a stand-in that records its calls."""
    calls = []
    fake = types.ModuleType("fake_stage_module")
    fake.train = lambda cfg, resume=None: calls.append(("train", cfg.train.stage, resume))
    fake.evaluate = lambda cfg, checkpoint: calls.append(("evaluate", cfg.train.stage, str(checkpoint))) or {"top1": 1.0}
    monkeypatch.setitem(sys.modules, "fake_stage_module", fake)
    monkeypatch.setattr(stages, "STAGES", [Stage("stage1", "fake", "fake_stage_module"),
                                           Stage("finetune", "fake", "fake_stage_module", has_evaluate=True)])
    return calls


def test_train_and_eval_dispatch_through_the_registry(fake_stages, tmp_path) -> None:
    result = invoke("train", "stage1/tiny", "--resume", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert fake_stages == [("train", "stage1", tmp_path)]
    result = invoke("eval", "finetune/tiny", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert fake_stages[-1] == ("evaluate", "finetune", str(tmp_path)) and '"top1": 1.0' in result.stdout
