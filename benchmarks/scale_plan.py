"""The scale plan: Kinetics-710 at K views with UMT-B/16 and UMT-L/16, computed from measured inputs.

Writes ``docs/scale.md`` (markdown on stdout, or ``--out``) from benchmark results JSONs — store size per
codec and frame format, cache time on N GPUs at a stated teacher throughput, training read bandwidth per
GPU at the student's step rate, and CPU cores per GPU at the measured per-core loader rate. Every number
in the page comes from an input listed in its first table: a measured value (the results file and key
it was read from), a recipe key (``stage1/b16_k710``, ``stage1/l16_k710``), or a named constant with its
source (``CONSTANTS``). Nothing else is typed in.

    python -m benchmarks.scale_plan benchmarks/results/cpu-2c-amd-epyc-storage-2026-12-01.json \\
        benchmarks/results/cpu-2c-amd-epyc-loader-2026-12-02.json > docs/scale.md

Each input is read from the first file (in the order given) that has it. ``tests/unit/test_scale_plan.py``
checks that ``docs/scale.md`` is this module's output for the committed files (:data:`COMMITTED`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import K710_CLIPS, REPO_DIR

COMMITTED = ("benchmarks/results/cpu-2c-amd-epyc-storage-2026-12-01.json",
             "benchmarks/results/cpu-2c-amd-epyc-loader-2026-12-02.json")
RECIPES = {"B/16": "stage1/b16_k710", "L/16": "stage1/l16_k710"}
PROJECTION_MODEL = {"B/16": "UMT-B/16", "L/16": "UMT-L/16"}  # prefix of storage.projection[].model
LOADER_SHAPE = {"B/16": "umt-b", "L/16": "umt-l"}  # loader.rows[].shape

# Named constants, each with where a reader can check it.
CONSTANTS: dict[str, tuple[Any, str]] = {
    "k710_clips": (K710_CLIPS, ("Kinetics-710 training clips, benchmarks/common.py (658,340 in the k710 list of "
                               "github.com/OpenGVLab/VideoMAEv2 docs/DATASET.md)")),
    "vit_dims": ({"ViT-B-16": (12, 768), "ViT-L-14": (24, 1024), "umt_base_patch16": (12, 768),
                  "umt_large_patch16": (24, 1024)},
                 ("(layers, width) of ViT-B and ViT-L: ViT paper (arXiv 2010.11929) Table 1; CLIP's image towers "
                 "use the same (CLIP paper, arXiv 2103.00020, its ViT hyperparameter table)")),
    "gpu_bf16_tflops": ({"A100": 312.0, "H100 SXM": 989.0},
                        "dense bf16 tensor-core peak, NVIDIA A100 and H100 datasheets"),
    "utilisation": (0.4, ("share of peak a ViT forward/backward reaches: the assumption of the loader "
                         "benchmark's student yardsticks (benchmarks/bench_loader.py)")),
    "gpu_counts": ((8, 32, 128), "one node, a small cluster, a large one"),
}


# --------------------------------------------------------------------------------------------------
# inputs


class Inputs:
    """Values read from the results files and recipes, each remembered with its source."""

    def __init__(self, files: list[Path]) -> None:
        self.docs = [(f, json.loads(f.read_text())) for f in files]
        self.sources: list[tuple[str, str, str]] = []  # (name, value shown, source)

    def get(self, name: str, path: tuple[str, ...]) -> Any:
        for file, doc in self.docs:
            node: Any = doc
            for key in path:
                node = node.get(key) if isinstance(node, dict) else None
            if node is not None:
                self.sources.append((name, _short(node), f"`{_rel(file)}`: `{'.'.join(path)}`"))
                return node
        raise SystemExit(f"scale_plan: no results file given has {'.'.join(path)} (needed for {name})")

    def note(self, name: str, value: Any, source: str) -> Any:
        self.sources.append((name, _short(value), source))
        return value


def _rel(path: Path) -> str:
    try:
        return path.resolve().relative_to(REPO_DIR).as_posix()
    except ValueError:
        return path.name


def _short(value: Any) -> str:
    if isinstance(value, list):
        return f"{len(value)} rows"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_num(v)}" for k, v in value.items())
    return _num(value) if isinstance(value, (int, float)) else str(value)


def _num(x: float, digits: int = 3) -> str:
    """``x`` to ``digits`` significant figures, thousands separated."""
    if isinstance(x, (tuple, list)):
        return "/".join(_num(v, digits) for v in x)
    if x == 0:
        return "0"
    if isinstance(x, int) or abs(x) >= 10 ** (digits - 1):
        return f"{round(x):,}"
    return f"{x:.{digits}g}"


def vit_forward_flops(layers: int, width: int, tokens: int) -> float:
    """FLOPs (2 per multiply-add) of one ViT forward over ``tokens``: per block the qkv, output and MLP
    (4x) projections, 24 N D^2, and attention's two N x N products, 4 N^2 D."""
    return layers * (24 * tokens * width**2 + 4 * tokens**2 * width)


# --------------------------------------------------------------------------------------------------
# the plan


def plan(inp: Inputs) -> dict[str, Any]:
    from umt_distill.config import load_recipe

    clips = inp.note("K710 clips", CONSTANTS["k710_clips"][0], CONSTANTS["k710_clips"][1])
    dims = CONSTANTS["vit_dims"][0]
    inp.note("ViT (layers, width)", {k: v for k, v in dims.items()}, CONSTANTS["vit_dims"][1])
    peaks = inp.note("GPU peak TFLOP/s", CONSTANTS["gpu_bf16_tflops"][0], CONSTANTS["gpu_bf16_tflops"][1])
    util = inp.note("utilisation", CONSTANTS["utilisation"][0], CONSTANTS["utilisation"][1])
    gpu_counts = inp.note("GPUs", CONSTANTS["gpu_counts"][0], CONSTANTS["gpu_counts"][1])
    projection = inp.get("target bytes per clip-view (K710 projection)", ("storage", "projection"))
    loader_rows = inp.get("loader rows (per core, per clip-view)", ("loader", "rows"))
    yardsticks = inp.get("UMT-B student clip-views/s per GPU", ("loader", "student_rates"))

    models = {}
    for model, recipe in RECIPES.items():
        cfg = load_recipe(recipe)
        views, K, T = cfg.views.size, cfg.cache.num_views, cfg.views.num_frames
        inp.note(f"{model}: K, T, view size, teacher, input, mask ratio",
                 f"{K}, {T}, {views}, {cfg.teacher.name}, {cfg.teacher.input_size}, {cfg.mask.ratio}",
                 f"recipe `{recipe}` (cache.num_views, views.num_frames, views.size, teacher.name, "
                 "teacher.input_size, mask.ratio)")
        t_patch = int(cfg.teacher.name.rsplit("-", 1)[1])
        t_layers, t_width = dims[cfg.teacher.name]
        teacher_tokens = (cfg.teacher.input_size // t_patch) ** 2 + 1
        s_patch = int(cfg.student.name.rsplit("patch", 1)[1])
        s_layers, s_width = dims[cfg.student.name]
        visible = round(T * (views // s_patch) ** 2 * (1 - cfg.mask.ratio))
        models[model] = {
            "recipe": recipe, "K": K, "T": T, "views": views,
            "teacher": cfg.teacher.name,
            "teacher_gflop_per_frame": vit_forward_flops(t_layers, t_width, teacher_tokens) / 1e9,
            # student forward + backward (3x forward) over the visible tokens of one clip-view
            "student_gflop_per_clip_view": 3 * vit_forward_flops(s_layers, s_width, visible) / 1e9,
            "visible_tokens": visible,
        }
    if len({(m["T"], m["views"]) for m in models.values()}) != 1:
        raise SystemExit("scale_plan: the recipes' views differ (views.num_frames, views.size); the frame bytes "
                         "measured at UMT-B's views apply to both only when they agree")
    base_flops = models["B/16"]["student_gflop_per_clip_view"]
    for m in models.values():
        m["teacher_fps"] = {gpu: peak * 1e12 * util / (m["teacher_gflop_per_frame"] * 1e9) for gpu, peak in peaks.items()}
        m["cache_hours"] = {gpu: {n: clips * m["K"] * m["T"] / (fps * n) / 3600 for n in gpu_counts}
                            for gpu, fps in m["teacher_fps"].items()}
        # the UMT-B yardsticks scaled by the students' FLOPs (UMT's own A100 run: UMT-B only)
        m["student_rates"] = {name: rate * base_flops / m["student_gflop_per_clip_view"]
                              for name, rate in yardsticks.items()}

    # frame bytes per clip-view: the loader's rows with frames minus the same row without (UMT-B, int8 visible)
    def row(shape: str, pixels: str) -> dict | None:
        return next((r for r in loader_rows if r["shape"] == shape and r["codec"] == "int8" and r["mode"] == "visible"
                     and r["pixels"] == pixels and r["layout"] == "wds" and r["path"] == "fast"
                     and r["compressor"] == "none"), None)

    none = row("umt-b", "none")
    frames_mb = {"none": 0.0, **{p: row("umt-b", p)["mb_read_per_clip_view"] - none["mb_read_per_clip_view"]
                                 for p in ("raw", "jpeg")}}
    store = {}
    for model in models:
        for p in projection:
            if p["model"].startswith(PROJECTION_MODEL[model] + " "):
                store[model, p["codec"], p["mode"]] = {
                    f: clips * models[model]["K"] * (p["disk_mb_per_clip_view"] + mb) / 1e6 for f, mb in frames_mb.items()}
    reads = {}
    for model in models:
        for r in loader_rows:
            if r["shape"] == LOADER_SHAPE[model] and r["layout"] == "wds" and r["path"] == "fast":
                reads[model, r["codec"], r["mode"], r["pixels"], r["compressor"]] = r
    # caching decodes the videos on the CPU: the loader's fastest measured video backend, per core
    video = max((r for r in loader_rows if r["shape"] == "umt-b" and r["pixels"].startswith("video-")),
                key=lambda r: r["cold_clip_views_per_s"])
    return {"models": models, "frames_mb": frames_mb, "store": store, "reads": reads, "gpu_counts": gpu_counts,
            "yardsticks": yardsticks, "video": video}


# --------------------------------------------------------------------------------------------------
# the page


def render(inp: Inputs, p: dict[str, Any], command: str) -> str:
    models, counts = p["models"], p["gpu_counts"]
    out = ["# Scale plan: Kinetics-710 with UMT-B/16 and UMT-L/16", "",
           "[← README](../README.md) · [Ray and Slurm](cluster.md)", "",
           (f"Generated by `{command}` (`benchmarks/scale_plan.py`); do not edit by hand. Measured inputs come "
           "from the results files below (their machine, load and command are in the files); every other "
           "input is a recipe key or a named constant with its source."), ""]

    out += ["## Sizes and rates", ""]
    out += ["| | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    out.append("| views K × frames T | " + " | ".join(f"{m['K']} × {m['T']}" for m in models.values()) + " |")
    out.append("| teacher GFLOP per frame (forward) | " + " | ".join(_num(m["teacher_gflop_per_frame"]) for m in models.values()) + " |")
    out.append("| student visible tokens per clip-view | " + " | ".join(str(m["visible_tokens"]) for m in models.values()) + " |")
    out.append("| student GFLOP per clip-view (forward + backward) | " + " | ".join(_num(m["student_gflop_per_clip_view"]) for m in models.values()) + " |")
    for gpu in next(iter(models.values()))["teacher_fps"]:
        out.append(f"| teacher frames/s per {gpu} (stated: utilisation × peak / FLOPs) | "
                   + " | ".join(_num(m["teacher_fps"][gpu]) for m in models.values()) + " |")
    out.append("")

    out += ["## Store size", "",
            "Terabytes for every clip × K views: the teacher targets (on-disk bytes per clip-view of the "
            "benchmark's K710 projection, UMT-L/16 projected from the UMT-B/16 measurement) plus the stored view "
            "frames (`cache.frames`; bytes per clip-view measured by the loader benchmark: "
            + ", ".join(f"{f} {_num(mb)} MB" for f, mb in p["frames_mb"].items()) + "; the views are the same "
            "224-px student views for both models).", ""]
    frames = list(p["frames_mb"])
    out.append("| codec | mode | " + " | ".join(f"{m} frames {f}" for m in models for f in frames) + " |")
    out.append("|---|---|" + "---|" * (len(models) * len(frames)))
    keys = sorted({(c, mode) for (_, c, mode) in p["store"]}, key=lambda k: (k[1], -p["store"]["B/16", k[0], k[1]]["none"]))
    for codec, mode in keys:
        cells = [_num(p["store"][m, codec, mode][f]) if (m, codec, mode) in p["store"] else "—" for m in models for f in frames]
        out.append(f"| {codec} | {mode} | " + " | ".join(cells) + " |")
    out.append("")

    out += ["## Cache time", "",
            ("Hours of teacher forward for every clip × K views × T frames on N GPUs at the stated teacher rate "
            "(decoding runs beside it on the CPU; the store's write overlaps)."), ""]
    video = p["video"]
    out.append("| model | GPU | " + " | ".join(f"{n} GPUs" for n in counts) + " | clip-views/s per GPU | "
               "decode cores per GPU |")
    out.append("|---|---|" + "---|" * (len(counts) + 2))
    for name, m in models.items():
        for gpu, hours in m["cache_hours"].items():
            per_gpu = m["teacher_fps"][gpu] / m["T"]
            out.append(f"| {name} | {gpu} | " + " | ".join(_num(hours[n]) for n in counts)
                       + f" | {_num(per_gpu)} | {_num(per_gpu / video['cold_clip_views_per_s'])} |")
    out += ["", (f"Decode cores per GPU: the clip-views/s the teacher takes ÷ the loader's fastest measured video "
            f"decode per core ({video['pixels'].removeprefix('video-')}, {_num(video['cold_clip_views_per_s'])} "
            "clip-views/s on the benchmark's synthetic 320×240 MP4s; one view per decode, while caching decodes "
            "a clip's K views together, so this is an upper bound). Where it exceeds a node's cores per GPU, "
            "decoding, not the teacher, sets the cache time."), ""]

    out += ["## Training input per GPU", "",
            ("Per GPU, at the student's rate in clip-views/s (the loader benchmark's UMT-B yardsticks: UMT's own "
            "A100 run and compute-bound A100 / H100 at the stated utilisation; for UMT-L/16 scaled by the "
            "students' FLOPs): the bytes read from the store (the loader's measured MB per clip-view × rate) and "
            "the CPU cores that feed it (rate ÷ the loader's measured cold clip-views/s per core). Store rows: "
            "WebDataset, the package's read path; `pixels` is the frame format read (`none`: targets only; "
            "`video-*`: decoded from the MP4 instead)."), ""]
    rates = list(p["yardsticks"])
    out.append("| model | targets | pixels | compressor | MB / clip-view | clip-views/s per core | "
               + " | ".join(f"{r}: MB/s, cores" for r in rates) + " |")
    out.append("|---|---|---|---|---|---|" + "---|" * len(rates))
    for (model, codec, mode, pixels, comp), r in sorted(p["reads"].items()):
        per_core = r["cold_clip_views_per_s"]
        cells = []
        for name in rates:
            rate = models[model]["student_rates"][name]
            cells.append(f"{_num(rate * r['mb_read_per_clip_view'])}, {_num(rate / per_core)}")
        out.append(f"| {model} | {codec} {mode} | {pixels} | {comp} | {_num(r['mb_read_per_clip_view'])} | {_num(per_core)} | "
                   + " | ".join(cells) + " |")
    out += ["", "Student rates (clip-views/s per GPU): " + "; ".join(
        f"{name} " + " / ".join(f"{m} {_num(models[m]['student_rates'][name])}" for m in models) for name in rates) + ".", ""]

    out += ["## Inputs", "", "| input | value | source |", "|---|---|---|"]
    out += [f"| {name} | {value} | {source} |" for name, value, source in inp.sources]
    out.append("")
    return "\n".join(out)


def generate(files: list[Path], command: str) -> str:
    inp = Inputs(files)
    return render(inp, plan(inp), command)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path, help="benchmark results JSONs (each input from the first that has it)")
    ap.add_argument("--out", type=Path, help="write here instead of stdout")
    args = ap.parse_args(argv)
    command = "python -m benchmarks.scale_plan " + " ".join(_rel(f) for f in args.results)
    text = generate(args.results, command)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
