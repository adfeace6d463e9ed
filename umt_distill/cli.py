"""The ``umt-distill`` command line: a thin shell over library functions.

Each command parses its arguments, loads the recipe and calls one function that the tests call
directly. Heavy imports (torch, open_clip, zarr) happen inside the commands so ``--help`` is fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from umt_distill.config import (
    RecipeError,
    check_parts,
    load_recipe,
    parse_override,
    recipe_to_yaml,
)

# Exit statuses shared by every command (documented in --help).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3  # finished, but some clips failed (see failures.jsonl)

app = typer.Typer(
    name="umt-distill",
    help=(
        "Train video foundation models with Unmasked Teacher, caching the frozen CLIP teacher.\n\n"
        "Recipes are YAML files (see `umt-distill ls`); any key can be overridden as key=value.\n\n"
        "Exit status: 0 done; 1 error; 2 bad usage or recipe; 3 done with failed clips."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
cache_app = typer.Typer(help="Inspect and verify teacher cache stores.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")

console = Console(stderr=True, soft_wrap=True)  # an error line is never broken mid-word
out = Console()

RecipeArg = Annotated[str, typer.Argument(help="Recipe file, or a name under recipes/ (e.g. stage1/tiny).")]
OverridesArg = Annotated[
    Optional[list[str]], typer.Argument(help="Overrides key=value, e.g. cache.codec=int8 train.epochs=2.")
]


# --debug (or UMT_DISTILL_DEBUG=1): errors come with their traceback. Without it a user error is one line.
_DEBUG = {"on": os.environ.get("UMT_DISTILL_DEBUG", "") not in ("", "0")}


@app.callback()
def _global_options(
    debug: Annotated[bool, typer.Option("--debug", help="Print the full traceback with an error.")] = False,
) -> None:
    _DEBUG["on"] = _DEBUG["on"] or debug


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    if _DEBUG["on"] and sys.exc_info()[0] is not None:
        console.print_exception()
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)  # "[i4]" is text, not markup
    raise typer.Exit(code)


def _override_keys(overrides: list[str] | None) -> set[str]:
    """The dotted keys the command line sets (``cache.codec`` of ``cache.codec=int8``)."""
    return {".".join(parse_override(text)[0]) for text in overrides or []}


def _load(recipe: str | None, overrides: list[str] | None):
    try:
        cfg = load_recipe(recipe, overrides or [])
        check_parts(cfg)
        return cfg
    except RecipeError as e:
        _fail(str(e))


@app.command()
def validate(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Print the fully resolved recipe (defaults + file + overrides), or name the bad key.

    Example: `umt-distill validate stage1/tiny cache.codec=int8`
    """
    cfg = _load(recipe, overrides)
    out.print(recipe_to_yaml(cfg), end="", highlight=False)


@app.command("ls")
def list_parts() -> None:
    """List shipped recipes, training stages (`train.stage`) and registered parts (teachers, students,
    masks, codecs, stores ...).

    Example: `umt-distill ls`
    """
    from umt_distill.config import list_recipe_files, recipe_header, recipes_dir
    from umt_distill.registry import ALL_REGISTRIES, load_all_parts
    from umt_distill.stages import STAGES

    load_all_parts()
    table = Table(title="recipes", show_lines=False)
    table.add_column("name")
    table.add_column("description")
    for path in list_recipe_files():
        table.add_row(path.relative_to(recipes_dir()).with_suffix("").as_posix(), recipe_header(path))
    out.print(table)
    table = Table(title="stages (train.stage)")
    table.add_column("name")
    table.add_column("description")
    table.add_column("eval")
    for stage in STAGES:
        table.add_row(stage.name, stage.description, "yes" if stage.has_evaluate else "")
    out.print(table)
    for kind, registry in ALL_REGISTRIES.items():
        table = Table(title=kind)
        table.add_column("name")
        table.add_column("description")
        for name, doc in registry.describe().items():
            table.add_row(name, doc)
        out.print(table)


@app.command("cache-teacher")
def cache_teacher_cmd(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    deep: Annotated[bool, typer.Option("--deep", help="On a re-run, read every record of every finished "
                                       "shard (checksums) instead of checking presence and sizes.")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Re-attempt the clips listed in "
                                               "STORE/failures.jsonl (default: failed clips stay failed).")] = False,
    engine: Annotated[str, typer.Option("--engine", help="torchrun: this process (or every rank under torchrun) "
                                        "writes shards; ray: one Ray task per shard on the cluster at RAY_ADDRESS "
                                        "(else a local one). Both write the same store.")] = "torchrun",
) -> None:
    """Run the frozen teacher once over K views of every clip and write a sharded store.

    Re-running the same command resumes and repairs: partial shards are redone, and so is every
    finished shard whose data is missing or has another size than recorded (with --deep: any record
    unreadable); each redone shard is named with its reason. Failed clips stay failed unless
    --retry-failed is given: then the shards holding failed clips that decode now are redone, and
    the clips that still fail keep a line in failures.jsonl with their new reason.
    Under torchrun every rank writes its own shards; with --engine ray, Ray tasks do (one per shard,
    one GPU each when cache.device is CUDA, retried when a worker is lost) and this process writes the
    index. The store is the same bytes whichever engine and however many workers wrote it.
    cache.store may be s3://bucket/prefix (not with --engine ray): each shard is uploaded whole as it
    closes, under a lease object (docs/object-storage.md).

    Exit status: 0 all clips cached; 3 done, but some clips failed (listed in STORE/failures.jsonl);
    1 error; 2 bad recipe.

    Examples:

        umt-distill cache-teacher stage1/tiny corpus.source=data/train.csv cache.store=cache/tiny

        torchrun --nproc-per-node 8 -m umt_distill cache-teacher stage1/b16_k710

        umt-distill cache-teacher stage1/tiny corpus.source=data/train.csv cache.store=s3://bucket/stores/tiny

        RAY_ADDRESS=auto umt-distill cache-teacher stage1/b16_k710 --engine ray
    """
    if engine not in ("torchrun", "ray"):
        _fail(f"--engine {engine!r}: choose torchrun or ray")
    cfg = _load(recipe, overrides)
    if engine == "ray":
        from umt_distill.cache.ray_engine import cache_teacher_ray as cache_teacher
    else:
        from umt_distill.cache.pipeline import cache_teacher

    try:
        summary = cache_teacher(cfg, deep=deep, retry_failed=retry_failed)
    except _user_errors() as e:
        _fail(str(e), EXIT_ERROR)
    raise typer.Exit(EXIT_PARTIAL if summary.get("failures", 0) else EXIT_OK)


@cache_app.command("info")
def cache_info_cmd(
    store: Annotated[str, typer.Argument(help="Store directory, or a URL (s3://bucket/prefix, https://host/path).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the spec and sizes as JSON.")] = False,
) -> None:
    """Print a store's spec (provenance) and sizes: bytes per clip-view and total.

    Example: `umt-distill cache info cache/tiny`
    """
    from umt_distill.cache.pipeline import store_info
    from umt_distill.cache.store_folder import CacheError

    try:
        info = store_info(store)
    except (CacheError, *_user_errors()) as e:
        _fail(str(e), EXIT_ERROR)
    if json_out:
        import json

        out.print_json(json.dumps(info))
        return
    table = Table(title=str(store), show_header=False)
    for key, value in _flatten(info).items():
        table.add_row(key, str(value))
    out.print(table)


@cache_app.command("verify")
def cache_verify_cmd(
    store: Annotated[str, typer.Argument(help="Store directory, or a URL (s3://bucket/prefix, https://host/path).")],
    sample: Annotated[int, typer.Option("--sample", "-n", help="Records to re-compute.")] = 8,
    seed: Annotated[int, typer.Option(help="Which records are sampled.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    deep: Annotated[bool, typer.Option("--deep", help="Also read every record of every shard (checksums).")] = False,
    repair: Annotated[bool, typer.Option("--repair", help="First redo damaged shards (as a cache-teacher "
                                         "re-run does, with the store's own recipe), then verify.")] = False,
) -> None:
    """Re-decode and re-run the teacher on N random records and compare with the store.

    First checks the files: every shard present with the size index.json records, counts that
    agree with spec.json (and with --deep, every record readable). Then reports max/mean absolute
    error and cosine per field, checks frame digests and that the teacher's weights match the spec.
    Exit status 1 on any mismatch or damage, naming the shard or field.

    Example: `umt-distill cache verify cache/tiny --sample 16`
    """
    from umt_distill.cache.verify import repair_store, verify_store

    try:
        if repair:
            repair_store(store, deep=deep, device=device)
        report = verify_store(store, sample=sample, seed=seed, device=device, deep=deep)
    except _user_errors() as e:
        _fail(str(e), EXIT_ERROR)
    table = Table(title=f"verify {store}: {report['checked']} of {report['records']} records re-computed")
    for col in ("field", "max abs err", "mean abs err", "min cosine", "mean cosine", "tolerance", "ok"):
        table.add_column(col)
    for row in report["fields"]:
        table.add_row(row["field"], f"{row['max_abs']:.3g}", f"{row['mean_abs']:.3g}", f"{row['min_cos']:.6f}",
                      f"{row['mean_cos']:.6f}", f"{row['tol']:.6g}", str(row["ok"]))
    out.print(table)
    for problem in report["problems"]:
        console.print(f"[red]mismatch:[/] {escape(str(problem))}", highlight=False)
    raise typer.Exit(EXIT_OK if report["ok"] else EXIT_ERROR)


def _train_help() -> str:
    """`train --help`, its list of stages generated from the stage registry."""
    from umt_distill.stages import STAGES

    stages = "\n".join(f"* `{s.name}`: {s.description}" for s in STAGES)
    return f"""Train the stage named by `train.stage` as the recipe says. The stages:

{stages}

Stage 1 streams cached teacher targets (`teacher.mode=cached`) or runs the teacher online
(`teacher.mode=online`). From a store (`cache.store=PATH`), the store's layout, codec, mode, views and
teacher come from its spec.json (a `note:` per value changed; a key=value that contradicts the store is
refused). A re-run with the same `train.output_dir` resumes mid-epoch.

Examples:

    umt-distill train stage1/tiny corpus.source=data/m.csv cache.store=cache/tiny train.output_dir=runs/tiny

    torchrun --nproc-per-node 8 -m umt_distill train stage1/b16_k710
"""


@app.command(help=_train_help())
def train(recipe: RecipeArg, overrides: OverridesArg = None,
          resume: Annotated[Optional[Path], typer.Option(help="Checkpoint dir to resume from.")] = None) -> None:
    """Train the stage named by `train.stage` (its help text is `_train_help()`, listing the stage registry)."""
    from umt_distill.stages import get_stage

    cfg = _load(recipe, overrides)
    stage = get_stage(cfg.train.stage)  # the recipe's stage was checked against the same names
    if stage.reads_store and cfg.teacher.mode == "cached":
        from umt_distill.stages.store_recipe import adopt_store_spec

        try:
            cfg, notes = adopt_store_spec(cfg, _override_keys(overrides))
        except RecipeError as e:
            _fail(str(e))
        except _user_errors() as e:
            _fail(str(e), EXIT_ERROR)
        if os.environ.get("RANK", "0") == "0":
            for note in notes:
                console.print(f"note: {note}", highlight=False, markup=False)
    try:
        stage.train(cfg, resume=resume)
    except _user_errors() as e:
        _fail(str(e), EXIT_ERROR)


@app.command("eval")
def eval_cmd(
    target: Annotated[str, typer.Argument(help="A finished run folder (evaluated with the recipe it was trained "
                                                "with), or a recipe followed by CHECKPOINT.")],
    rest: Annotated[Optional[list[str]], typer.Argument(help="After a recipe: CHECKPOINT (run/checkpoint dir or an "
                                                              "official .pth file); then overrides key=value.")] = None,
) -> None:
    """Evaluate a fine-tuned model: action recognition, retrieval, or video QA (by the recipe's train.stage).

    Given a run folder, its own recipe (saved with its checkpoints) is used and the results go into the
    run folder (`RUN/eval/<name>/`); overrides may follow, e.g. another `finetune.test_source`. Given a
    recipe and a checkpoint, results go to `<train.output_dir>/eval/<checkpoint name>/`.

    Action recognition: multi-view test (clips x crops, softmax averaged per video), top-1/5, per-class
    accuracy, confusion PNG. Retrieval: UMT's protocol (contrastive scores, top-k re-ranked by the
    matching head), R@1/5/10 both ways, and contrastive-only scores. QA: the answer list ranked (top
    `qa.k_test` by first-token probability, re-scored by full likelihood), exact match overall and per
    question type, predictions JSONL; a run folder is evaluated on its best validation epoch (`best/`).

    Examples:

        umt-distill eval runs/ft_b16_k400

        umt-distill eval runs/ft_b16_k400 finetune.test_source=data/k400_val.csv

        umt-distill eval finetune/b16_k400 official/b16_ptk710_ftk400_f8_res224.pth finetune.test_source=data/k400_val.csv

        umt-distill eval runs/qa_b16_msrvtt qa.test_source=data/msrvtt_qa/test.jsonl
    """
    import json

    from umt_distill.stages import StageError, get_stage

    args = [target, *(rest or [])]
    run_recipe = None
    if Path(target).is_dir():  # (a recipe name reads no checkpoint code: a refused eval stays fast)
        from umt_distill.models.checkpoints import CheckpointError, run_recipe_file

        try:
            run_recipe = run_recipe_file(target)
        except CheckpointError as e:
            _fail(str(e), EXIT_ERROR)
    if run_recipe is not None:
        # Our own fine-tuned head is evaluated: the init's drop_head (a training-time choice) does not apply.
        recipe, checkpoint = str(run_recipe), Path(target)
        overrides = [f"train.output_dir={target}", "finetune.drop_head=false", *args[1:]]
    elif len(args) >= 2 and "=" not in args[1]:
        recipe, checkpoint, overrides = target, Path(args[1]), args[2:]
    else:
        _fail(f"{target}: not a run folder with a checkpoint; give a run folder, or a recipe and a checkpoint "
              "(umt-distill eval RECIPE CHECKPOINT [key=value ...])")
    cfg = _load(recipe, overrides)
    try:
        summary = get_stage(cfg.train.stage).evaluate(cfg, checkpoint)
    except StageError as e:  # a stage without an evaluation: the message names those with one
        _fail(str(e))
    except _user_errors() as e:
        _fail(str(e), EXIT_ERROR)
    out.print_json(json.dumps(summary))


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's data, files or recipe: reported in one line, exit status 1."""
    from umt_distill.cache.store_folder import CacheError
    from umt_distill.cache.record import StoreDamagedError
    from umt_distill.cache.datasets import CorpusMismatchError
    from umt_distill.cache.spec import SpecMismatchError, SpecReadError
    from umt_distill.data.admission import TooManyFailuresError
    from umt_distill.data.classification import LabelError
    from umt_distill.data.corpus import CorpusError
    from umt_distill.data.qa import QAFormatError
    from umt_distill.data.text import TokenizerError
    from umt_distill.data.video_base import VideoDecodeError
    from umt_distill.data.vl import CaptionError
    from umt_distill.models.checkpoints import CheckpointError
    from umt_distill.teachers.clip import TeacherError
    from umt_distill.training.loop import NonFiniteLossError
    from umt_distill.storage import NetworkError

    # OSError: a file or folder that cannot be read or written (missing, permissions, disk full); its
    # message names the path. NetworkError: a store on object storage the network failed to read.
    return (NetworkError, CacheError, RecipeError, SpecMismatchError, OSError, NonFiniteLossError, CorpusError,
            StoreDamagedError, CheckpointError, LabelError, VideoDecodeError, CaptionError, TokenizerError,
            TeacherError, TooManyFailuresError, SpecReadError, CorpusMismatchError, QAFormatError)


@app.command("convert-qa")
def convert_qa_cmd(
    annotations: Annotated[Path, typer.Argument(help="UMT's QA JSON: a list of {video, question, answer, answer_type?}.")],
    output: Annotated[Path, typer.Argument(help="The JSONL to write (format: docs/qa.md).")],
    answer_list: Annotated[Optional[Path], typer.Option(help="UMT's *_ans2label.json (or a JSON list, or one answer "
                                                              "a line); written as answers.json beside OUTPUT.")] = None,
    video_prefix: Annotated[str, typer.Option(help="Prepended to every video path, relative to OUTPUT's folder.")] = "",
) -> None:
    """Convert UMT's official QA annotations (and answer list) to this toolkit's QA format (docs/qa.md).

    Examples:

        umt-distill convert-qa anno/msrvtt_qa/train.json data/msrvtt_qa/train.jsonl --answer-list anno/msrvtt_qa/train_ans2label.json --video-prefix videos/

        umt-distill convert-qa anno/msrvtt_qa/test.json data/msrvtt_qa/test.jsonl --video-prefix videos/
    """
    import json

    from umt_distill.data.qa import convert_official

    try:
        summary = convert_official(annotations, output, video_prefix, answer_list)
    except _user_errors() as e:
        _fail(str(e), EXIT_ERROR)
    out.print_json(json.dumps(summary))


@app.command()
def quickstart(
    overrides: Annotated[
        Optional[list[str]],
        typer.Argument(help="Overrides key=value of recipes/quickstart/stage1.yaml (e.g. teacher.mode=online) "
                            "and of the quickstart's own settings (quickstart.world.clips=240, quickstart.clip.steps=300)."),
    ] = None,
    output: Annotated[Path, typer.Option(help="Output folder (world, teacher, cache, runs, report).")] = Path("outputs/quickstart"),
    clips: Annotated[Optional[int], typer.Option(help="Number of toy clips (default: the quickstart's 480).")] = None,
) -> None:
    """The whole UMT loop at toy scale, offline, on the CPU, in minutes.

    Generates a toy world of MP4 clips, trains a tiny image CLIP teacher on stills, caches it, distils
    the tiny video student (stage 1), probes frozen features of teacher, student and a random-init
    control, fine-tunes them on the motion labels, runs stage 2 with zero-shot retrieval, and writes
    report.md, results.json and plots into --output. About 5 minutes on 2 idle CPU cores (the
    fine-tuning runs and stage 2 go 2 at a time: quickstart.finetune.parallel=2). A re-run reuses every
    finished step and says so.

    Examples:

        umt-distill quickstart --output outputs/quickstart

        umt-distill quickstart --output outputs/quickstart teacher.mode=online

        umt-distill quickstart --output /tmp/qs --clips 120 quickstart.clip.steps=200
    """
    from umt_distill.quickstart import run_quickstart

    try:
        summary = run_quickstart(output, clips=clips, overrides=overrides or [])
    except _user_errors() as e:
        _fail(str(e), EXIT_ERROR if not isinstance(e, RecipeError) else EXIT_USAGE)
    raise typer.Exit(EXIT_PARTIAL if summary.get("failures", 0) else EXIT_OK)


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except Exception as e:  # an error no check foresaw: one line unless --debug, never a silent exit
        if _DEBUG["on"]:
            raise
        console.print(f"[bold red]error:[/] {escape(f'{type(e).__name__}: {e}'.splitlines()[0][:500])}\n"
                      "  (unexpected: run again with --debug for the traceback, and please report it)", highlight=False)
        sys.exit(EXIT_ERROR)
