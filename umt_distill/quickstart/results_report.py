"""The quickstart's report: terminal tables, ``report.md`` and ``results.json`` (plots: ``plots.py``).

Kept apart from the steps so that each of them only measures; everything here only formats and reads
numbers the steps measured: the probes' table and checks, the fine-tuning table and its reading, the
retrieval rows and their reading, and the closing note.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from umt_distill.config import Recipe
from umt_distill.quickstart.baselines import baselines_markdown
from umt_distill.quickstart.finetune import AXES
from umt_distill.quickstart.names import CONTROL, DISTILLED_PREFIX, IMAGE_TEACHER, TEACHER
from umt_distill.quickstart.plots import plot_accuracy, plot_loss, plot_semantic_mask
from umt_distill.quickstart.qa import qa_markdown, qa_table
from umt_distill.quickstart.world import MOTIONS, appearance_classes
from umt_distill.quickstart.zero_shot import CHANCE, STUDENT_ITC, STUDENT_ITM
from umt_distill.quickstart.zero_shot import TEACHER as RETRIEVAL_TEACHER

# The bar for "the method works at toy scale" (UMT's claim, Table 3, in miniature).
MOTION_MARGIN = 0.20
APPEARANCE_FRACTION = 0.9


# Terminal tables fit in 80 columns: short row labels and column heads, spelt out in the table's caption.
_SHORT_ROWS = {TEACHER: "teacher", RETRIEVAL_TEACHER: "teacher", CONTROL: "control", IMAGE_TEACHER: "img teacher",
               STUDENT_ITC: "s2 contrast", STUDENT_ITM: "s2 re-rank", CHANCE: "chance"}
_PROBE_COLUMNS = (("app lin", "appearance, linear probe"), ("mot lin", "motion, linear probe"),
                  ("app kNN", "appearance, kNN"), ("mot kNN", "motion, kNN"), ("order", "order sensitivity"))
_FINETUNE_COLUMNS = (("tubelet", "tubelet"), ("top-1", "motion top-1"), ("class acc", "mean class accuracy"),
                     ("axis acc", "axis accuracy"), ("run", "run"))
_RETRIEVAL_SHORT = {"t2v R@1": "t2v@1", "t2v R@5": "t2v@5", "v2t R@1": "v2t@1", "v2t R@5": "v2t@5",
                    "mean recall": "mean R", "appearance": "app", "motion given appearance": "mot|app"}
_RETRIEVAL_LEGEND = (("t2v@k", "text→video recall at k (%)"), ("v2t@k", "video→text recall at k (%)"),
                     ("mean R", "mean recall"), ("app", "appearance"), ("mot|app", "motion given appearance"))


def short_row(name: str) -> str:
    """A row label of at most 15 characters for the terminal tables (``results.json`` keeps the full name)."""
    if name in _SHORT_ROWS:
        return _SHORT_ROWS[name]
    if name.startswith(DISTILLED_PREFIX):  # "student, distilled (cached)" [", tubelet 1 (UMT-exact)"]
        mode = name[len(DISTILLED_PREFIX):].split(")")[0].strip(" (")
        return f"dist. {mode}" + (" t1" if "tubelet 1" in name else "")
    return name if len(name) <= 15 else name[:14] + "…"


def legend(rows, columns) -> str:
    """``short = full`` for every shortened row label and column head (a table caption)."""
    items = [f"{short_row(n)} = {n}" for n in rows if short_row(n) != n] + [f"{a} = {b}" for a, b in columns if a != b]
    return escape("; ".join(items))


def checks(results: dict) -> list[dict]:
    """The pass/fail criteria for every distilled student (linear-probe test accuracy)."""
    models = results["models"]
    acc = {name: {task: m[task]["linear"]["accuracy"] for task in ("appearance", "motion")} for name, m in models.items()}
    out = []
    for name in (n for n in acc if n.startswith(DISTILLED_PREFIX)):
        s, t, r = acc[name], acc[TEACHER], acc[CONTROL]
        out += [
            {"model": name, "check": f"motion ≥ teacher + {MOTION_MARGIN:.2f}", "value": f"{s['motion']:.3f} vs {t['motion'] + MOTION_MARGIN:.3f}",
             "ok": s["motion"] >= t["motion"] + MOTION_MARGIN},
            {"model": name, "check": f"appearance ≥ {APPEARANCE_FRACTION} × teacher", "value": f"{s['appearance']:.3f} vs {APPEARANCE_FRACTION * t['appearance']:.3f}",
             "ok": s["appearance"] >= APPEARANCE_FRACTION * t["appearance"]},
            {"model": name, "check": "appearance > random-init control", "value": f"{s['appearance']:.3f} vs {r['appearance']:.3f}",
             "ok": s["appearance"] > r["appearance"]},
            {"model": name, "check": "motion > random-init control", "value": f"{s['motion']:.3f} vs {r['motion']:.3f}",
             "ok": s["motion"] > r["motion"]},
        ]
    return out


def print_table(console: Console, results: dict) -> None:
    """The accuracy table and the checks, for a human at the terminal."""
    chance = {"appearance": 1 / len(appearance_classes()), "motion": 1 / len(MOTIONS)}
    n = results["num_clips"]
    table = Table(title=f"frozen-feature probes, test accuracy ({n['test']} clips; fit on {n['train']}, ridge chosen on {n['val']})",
                  caption=legend(results["models"], _PROBE_COLUMNS), caption_justify="left")
    table.add_column("model")
    for col, _ in _PROBE_COLUMNS:
        table.add_column(col, justify="right")
    for name, m in results["models"].items():
        table.add_row(short_row(name), *(f"{m[task][probe]['accuracy']:.3f}" for probe in ("linear", "knn") for task in ("appearance", "motion")),
                      f"{m['order_sensitivity']:.3f}")
    table.add_row("[dim]chance[/]", *(f"[dim]{chance[task]:.3f}[/]" for _ in range(2) for task in ("appearance", "motion")), "")
    console.print(table)
    for c in checks(results):
        mark = "[green]✓[/]" if c["ok"] else "[red]✗[/]"
        console.print(f"{mark} {c['model']}: {c['check']} ({c['value']})", highlight=False)
    if "finetune" in results:
        finetune_table(console, results["finetune"])
    if "retrieval" in results:
        console.print(retrieval_table(results["retrieval"]))
        for line in retrieval_reading(results["retrieval"]):
            console.print(line, highlight=False)
    if "qa" in results:
        console.print(qa_table(results["qa"]))
    steps = ", ".join(f"{name} {status} {sec:.0f} s" for name, status, sec, _ in results["steps"])
    console.print(f"[dim]{steps}; total {results['total_seconds']:.0f} s[/]", highlight=False)


# --------------------------------------------------------------------------------------------------
# files


def write_report(output: Path, cfg: Recipe, results: dict) -> None:
    """``results.json``, the three plots and ``report.md`` into ``output``."""
    example = results.pop("_example", None)
    results["checks"] = checks(results)
    plot_loss(output / "loss.png", {m: Path(r) for m, r in results["runs"].items()})
    plot_accuracy(output / "accuracy.png", results)
    if example is not None:
        plot_semantic_mask(output / "semantic_mask.png", example["pixels"], example["teacher"], cfg, example["clip_id"])
    (output / "results.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    (output / "report.md").write_text(render_markdown(cfg, results), encoding="utf-8")


def render_markdown(cfg: Recipe, results: dict) -> str:
    n, w = results["num_clips"], results["settings"]["world"]
    lines = [
        "# umt-distill quickstart report",
        "",
        f"Toy world: {w['clips']} clips of {w['num_frames']} frames at {w['size']} px "
        f"({n['train']} train / {n['val']} val / {n['test']} test); {len(appearance_classes())} appearance classes "
        f"(colour × pattern), {len(MOTIONS)} motion classes ({', '.join(MOTIONS)}).",
        f"Teacher: tiny open_clip image CLIP trained on {results['settings']['clip_images']} stills with appearance-only "
        f"captions (zero-shot appearance accuracy on held-out stills: {results['teacher']['zero_shot_accuracy']:.3f}).",
        f"Student: `{cfg.student.name}` distilled for stage 1 ({cfg.train.epochs} epochs, batch {cfg.train.batch_size}, "
        f"{cfg.mask.type} mask ratio {cfg.mask.ratio}, K={cfg.teacher.layers} aligned layers, {cfg.views.num_frames} frames); "
        f"runs: {', '.join(f'{m} ({r})' for m, r in results['runs'].items())}.",
        "",
        "## Test accuracy of probes on frozen features",
        "",
        "Linear: ridge classifier on standardised features (ridge strength chosen on val). kNN: cosine, "
        f"k={results['settings']['knn_k']}. Teacher feature: its image embedding averaged over the frames; "
        "student feature: final-norm tokens of the full clip, mean-pooled; control: the same student with the "
        "random weights distillation started from.",
        "",
        "| model | appearance (linear) | motion (linear) | appearance (kNN) | motion (kNN) | order sensitivity |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in results["models"].items():
        cells = [f"{m[task][probe]['accuracy']:.3f}" for probe in ("linear", "knn") for task in ("appearance", "motion")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {m['order_sensitivity']:.3f} |")
    lines.append(f"| chance | {1 / len(appearance_classes()):.3f} | {1 / len(MOTIONS):.3f} | "
                 f"{1 / len(appearance_classes()):.3f} | {1 / len(MOTIONS):.3f} | |")
    lines += ["", "Order sensitivity: how far a clip's feature moves when the clip is played backwards, relative "
              "to how far clips' features lie from their mean (0: the feature cannot tell a clip from its reversal). "
              "Every motion class has its time reversal among the classes (left/right, up/down, growing/shrinking)."]
    lines += ["", "## Checks (linear probe)", ""]
    lines += [f"- {'PASS' if c['ok'] else 'FAIL'} — {c['model']}: {c['check']} ({c['value']})" for c in results["checks"]]
    if len(results["runs"]) > 1:
        lines += ["", "Both teacher modes were run: `cached` trained from the stored targets, `online` ran the teacher "
                  "at every step on the same views."]
    if "finetune" in results:
        lines += ["", *finetune_markdown(results["finetune"])]
    if "retrieval" in results:
        lines += ["", retrieval_markdown(results["retrieval"])]
    if "qa" in results:
        lines += ["", *qa_markdown(results["qa"])]
    if "baselines" in results:
        lines += ["", *baselines_markdown(results)]
    lines += ["", "## Closing note", "", *closing_note(results)]
    lines += ["", "## Steps", "", "| step | status | seconds | note |", "|---|---|---:|---|"]
    lines += [f"| {name} | {status} | {sec:.1f} | {note} |" for name, status, sec, note in results["steps"]]
    lines += ["", f"Total: {results['total_seconds']:.1f} s.", "", "## Plots", "",
              "- `loss.png` — stage-1 alignment loss per step.",
              "- `accuracy.png` — the probes' table as bars" + (", and the fine-tuned models' motion top-1."
                                                                if "finetune" in results else "."),
              "- `semantic_mask.png` — a test clip: frames, the teacher's CLS attention, and a semantic mask "
              f"(ratio {cfg.mask.ratio}) drawn from it (hidden tokens greyed).",
              "", "![loss](loss.png)", "", "![accuracy](accuracy.png)", "", "![semantic mask](semantic_mask.png)", ""]
    return "\n".join(lines)


def closing_note(results: dict) -> list[str]:
    """What the run reached and, where it fell short of the bar, why -- from the numbers of this run."""
    models = results["models"]
    teacher, control = models[TEACHER], models[CONTROL]
    notes, motion_short = [], []
    for name in (n for n in models if n.startswith(DISTILLED_PREFIX)):
        s = models[name]
        ok = {c["check"]: c["ok"] for c in results["checks"] if c["model"] == name}
        notes.append(f"- **{name}**: appearance {s['appearance']['linear']['accuracy']:.3f} (teacher "
                     f"{teacher['appearance']['linear']['accuracy']:.3f}, random init {control['appearance']['linear']['accuracy']:.3f}); "
                     f"motion {s['motion']['linear']['accuracy']:.3f} (teacher {teacher['motion']['linear']['accuracy']:.3f}, "
                     f"random init {control['motion']['linear']['accuracy']:.3f}, chance {1 / len(MOTIONS):.3f}); order sensitivity "
                     f"{s['order_sensitivity']:.3f} (random init {control['order_sensitivity']:.3f}, teacher {teacher['order_sensitivity']:.3f}).")
        if all(ok.values()):
            notes.append("  Every check passes: the student inherits the teacher's appearance knowledge, and its clip "
                         "feature also separates motions that the teacher's frame average cannot.")
            continue
        if ok[f"appearance ≥ {APPEARANCE_FRACTION} × teacher"] and ok["appearance > random-init control"]:
            notes.append("  Appearance transferred: the student reads it out of its own video features nearly as well "
                         "as the teacher, and better than the same network untrained.")
        if not ok[f"motion ≥ teacher + {MOTION_MARGIN:.2f}"] or not ok["motion > random-init control"]:
            motion_short.append(name)
    if motion_short:
        less = all(models[n]["order_sensitivity"] < control["order_sensitivity"] for n in motion_short)
        notes += [
            "",
            "Motion did not reach the bar. Every motion class here is the time reversal of another (left/right, "
            "up/down, growing/shrinking), so a clip feature separates them only if it changes when the clip is "
            "played backwards. The teacher's frame average cannot change at all. Stage 1 trains the student's "
            "last blocks to reproduce, token by token, the teacher's features of *that* frame; a student whose final "
            "tokens held only those would have a mean-pooled feature that, like the teacher's, is the same for a "
            "clip and its reversal. Order can enter the pooled feature only through what the student computes beyond its "
            "targets" + (", and in this run distillation left less of it than the untrained network has (order "
                         "sensitivity above)." if less else "; in this run too little of it for a linear probe."),
            "",
            "UMT reports its temporal gains over the CLIP teacher for *fine-tuned* students (action recognition), "
            "where labels train the order-aware tokens; "
            + ("the section \"Fine-tuned on the motion labels\" above tests that in miniature." if "finetune" in results
               else "this quickstart measures frozen features, which is the harder test at toy scale."),
        ]
    return notes


# --------------------------------------------------------------------------------------------------
# fine-tuning on the motion labels


def standard_error(p: float, n: int) -> float:
    """Binomial standard error of an accuracy ``p`` on ``n`` clips (one seed: the noise floor)."""
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def model_error(m: dict, n: int) -> float:
    """Standard error of a fine-tuned model's mean top-1: the spread over its fine-tuning seeds
    (sample std / √seeds) and the binomial error of the ``n`` test clips, which every seed shares,
    combined as independent. One seed: the binomial error alone."""
    seeds = m.get("seeds", 1)
    return math.sqrt(m.get("top1_std", 0.0) ** 2 / seeds + standard_error(m["top1"], n) ** 2)


def role(name: str, m: dict) -> str:
    """``distilled`` | ``control`` | ``image_teacher`` | ``umt_exact`` (results of older runs: from the name)."""
    if "role" in m:
        return m["role"]
    return {IMAGE_TEACHER: "image_teacher", CONTROL: "control"}.get(name, "distilled" if name.startswith(DISTILLED_PREFIX) else "")


def _top1(m: dict) -> str:
    return f"{m['top1']:.3f} ± {m['top1_std']:.3f}" if m.get("seeds", 1) > 1 else f"{m['top1']:.3f}"


def _tubelet(name: str, m: dict) -> str:
    return "per frame" if role(name, m) == "image_teacher" else str(m.get("tubelet") or 1)


def finetune_table(console: Console, finetune: dict) -> None:
    """The fine-tuning table, after the probes' table."""
    n, views, s = finetune["num_clips"], finetune["views_per_clip"], finetune["settings"]
    seeds = s.get("seeds", 1)
    table = Table(title=f"fine-tuned on motion labels ({s['steps']} steps × {s['batch_size']} videos on {n['train']} clips"
                        + (f", mean ± std over {seeds} seeds" if seeds > 1 else "")
                        + f"), test accuracy ({n['test']} clips × {views} views)",
                  caption=legend(finetune["models"], _FINETUNE_COLUMNS), caption_justify="left")
    table.add_column("model")
    for col, _ in _FINETUNE_COLUMNS:
        table.add_column(col, justify="right")
    for name, m in finetune["models"].items():
        table.add_row(short_row(name), _tubelet(name, m), _top1(m), f"{m['mean_class_accuracy']:.3f}", f"{m['axis_accuracy']:.3f}",
                      "reused" if m["reused"] else f"{m['seconds']:.0f} s")
    table.add_row("[dim]chance[/]", "", *(f"[dim]{c:.3f}[/]" for c in (1 / len(MOTIONS), 1 / len(MOTIONS), 1 / len(AXES))), "")
    console.print(table)
    for line in finetune_reading(finetune):
        console.print(f"[dim]{line}[/]", highlight=False)


def finetune_markdown(finetune: dict) -> list[str]:
    """The ``report.md`` section: what was run, the numbers, and what they mean."""
    n, s = finetune["num_clips"], finetune["settings"]
    seeds, tubelet = s.get("seeds", 1), s.get("tubelet_size", 1)
    lines = [
        "## Fine-tuned on the motion labels",
        "",
        f"Each model below was fine-tuned end to end on the motion labels of the {n['train']} training clips with "
        f"one recipe (`{finetune['recipe']}` at stage 1's frames and size, plus `{' '.join(finetune['recipe_overrides'])}`): "
        f"{s['steps']} steps of {s['batch_size']} videos × 2 random crops, UMT's optimisation (AdamW, cosine schedule, "
        "layer-wise LR decay, label smoothing, drop path). No horizontal flip: it would turn \"moving left\" into "
        "\"moving right\". Crops stay within stage 1's range; RandAugment, random erasing and Mixup/CutMix, regularisers "
        "for long schedules and the slowest part of a toy step, are off; frames are sampled one per segment, as UMT "
        "does for Something-Something (`MOTION_RECIPE` in `umt_distill/quickstart/finetune.py` says why each). "
        "Nothing was chosen on val; the final weights were tested "
        f"on the {n['test']} test clips with {finetune['views_per_clip']} temporal views each (softmax averaged)"
        + (f"; every model was fine-tuned with {seeds} seeds (data order, augmentation, head) and the table gives the "
           "mean ± the standard deviation over seeds." if seeds > 1 else "."),
        "",
        f"- the students' patch embedding spans {tubelet} frames per token (`finetune.tubelet_size={tubelet}`): the "
        f"distilled tubelet-1 kernel is spread over the {tubelet} frames (kernel / {tubelet} on each, so a still clip "
        "gives the stage-1 tokens) and the position table is resized to the new grid;" if tubelet != 1 else
        "- the students keep UMT's tubelet 1 (one frame per token);",
        "- distilled students start from their stage-1 checkpoint; the control from the random weights stage 1 "
        "started from (same seed, data order and head: distillation is the only difference);",
        "- the image teacher is UMT's image baseline in miniature: the tiny CLIP's image tower on every frame, frame "
        "embeddings averaged, a linear head, starting from the teacher's weights;",
        *(["- the UMT-exact row is the distilled student fine-tuned at tubelet 1, otherwise the same, reported as it "
           "comes out."] if any(role(k, m) == "umt_exact" for k, m in finetune["models"].items()) else []),
        "",
        "| model | tubelet | motion top-1 | mean class accuracy | axis accuracy |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in finetune["models"].items():
        lines.append(f"| {name} | {_tubelet(name, m)} | {_top1(m)} | {m['mean_class_accuracy']:.3f} | {m['axis_accuracy']:.3f} |")
    lines.append(f"| chance | | {1 / len(MOTIONS):.3f} | {1 / len(MOTIONS):.3f} | {1 / len(AXES):.3f} |")
    lines += [
        "",
        "Axis accuracy: the predicted motion is on the right axis (horizontal, vertical or size) whatever its "
        "direction. A frame average is the same for a clip and the clip played backwards, and every motion here "
        "is the reversal of another, so the image teacher can at best find the axis: about 0.5 top-1 with axis "
        "accuracy up to 1 (up to small differences in which frames a test view samples).",
        "",
        *finetune_reading(finetune),
    ]
    return lines


def finetune_reading(finetune: dict) -> list[str]:
    """What this run's numbers say, with their noise (:func:`model_error`: seeds and test clips)."""
    models, n = finetune["models"], finetune["num_clips"]["test"]
    teacher, control = models[IMAGE_TEACHER], models[CONTROL]
    chance = 1 / len(MOTIONS)
    floor = chance + 2 * standard_error(chance, n)  # "clearly above chance"
    learned = {name: m["top1"] > floor for name, m in models.items()}
    lines = []
    if not any(learned.values()):
        lines.append(f"- No model is clearly above chance (top-1 above {floor:.3f}): at this budget fine-tuning did not "
                     "learn motion, so the comparisons below are between noise levels (`quickstart.finetune.steps`).")

    def compare(a: dict, b: dict) -> tuple[float, float]:
        return a["top1"] - b["top1"], 2 * math.hypot(model_error(a, n), model_error(b, n))

    headline = [k for k, m in models.items() if role(k, m) == "distilled"]
    for name in headline:
        s = models[name]
        gap_t, noise_t = compare(s, teacher)
        gap_c, noise_c = compare(s, control)
        verdict_t = ("beats its image teacher on motion after fine-tuning, UMT's claim in miniature"
                     if gap_t > noise_t and learned[name]
                     else "is clearly below its image teacher" if gap_t < -noise_t
                     else "does not clearly beat its image teacher")
        verdict_c = ("distillation helped fine-tuning" if gap_c > noise_c and learned[name]
                     else "the distilled start fine-tuned clearly worse than random weights" if gap_c < -noise_c
                     else "distillation made no clear difference to fine-tuning")
        lines.append(f"- {name}: top-1 {s['top1']:.3f}; it {verdict_t} ({gap_t:+.3f} vs {teacher['top1']:.3f}, "
                     f"noise ±{noise_t:.3f}); against the control ({control['top1']:.3f}) {verdict_c} "
                     f"({gap_c:+.3f}, noise ±{noise_c:.3f}).")
    for name in (k for k, m in models.items() if role(k, m) == "umt_exact"):
        s = models[name]
        line = (f"- {name}: top-1 {s['top1']:.3f}, " + ("clearly above chance" if learned[name]
                                                         else f"not clearly above chance (top-1 above {floor:.3f})"))
        for h in headline:
            gap, noise = compare(models[h], s)
            line += f"; {h} (tubelet {models[h].get('tubelet')}) is {gap:+.3f} above it (noise ±{noise:.3f})"
            if gap > noise:
                line += (": here the patch embedding that sees frames together, not the distilled weights alone, "
                         "made motion generalise")
        lines.append(line + ".")
    lines.append(f"- image teacher: top-1 {teacher['top1']:.3f}, axis accuracy {teacher['axis_accuracy']:.3f} "
                 + ("— it finds the axis but not the direction, as a frame average must."
                    if teacher["axis_accuracy"] - teacher["top1"] > 0.25 else
                    "(the order-blind ceiling is about 0.5 top-1: the axis, not the direction)."))
    spread = {name: m["predicted_classes"] for name, m in models.items() if "predicted_classes" in m}
    if spread:
        lines.append(f"- Classes predicted on the test clips (of {len(MOTIONS)}): "
                     + ", ".join(f"{name} {k}" for name, k in spread.items())
                     + (" -- a model that predicts one class for every clip scores that class's share of the test set."
                        if 1 in spread.values() else "."))
    seeds = finetune["settings"].get("seeds", 1)
    if seeds > 1:
        lines.append(f"- Noise: ±2 standard errors of a difference of means, from the spread over {seeds} fine-tuning "
                     f"seeds (std / √{seeds}) and the binomial error on the {n} test clips every seed shares; the "
                     "stage-1 run and the control's start are the same for every seed. Differences inside it are not results.")
    else:
        lines.append(f"- Noise: ±2 binomial standard errors on {n} test clips, one seed and one run per model; "
                     "differences inside it are not results (`quickstart.finetune.seeds=3` adds the seed spread).")
    return lines


# --------------------------------------------------------------------------------------------------
# stage 2: zero-shot retrieval

_COLUMNS = (("t2v_r1", "t2v R@1"), ("t2v_r5", "t2v R@5"), ("v2t_r1", "v2t R@1"), ("v2t_r5", "v2t R@5"),
            ("r_mean", "mean recall"), ("appearance_top1", "appearance"), ("motion_given_appearance", "motion given appearance"))


def retrieval_checks(result: dict) -> list[dict]:
    """The issue's bar, in the quickstart report's check format: the headline student's R@1 above the
    teacher's in both directions on motion captions. ``noise`` is two binomial standard errors of the
    difference (queries: the distinct captions for t2v, the clips for v2t); ``clear`` says whether the
    difference exceeds it — one seed and one run per model, so a smaller difference is not a result."""
    s, t = (result["rows"][result["headline"][k]] for k in ("student", "teacher"))
    out = []
    for d, n in (("t2v", result["num_texts"]), ("v2t", result["num_videos"])):
        a, b = s[f"{d}_r1"], t[f"{d}_r1"]
        noise = 200.0 * math.sqrt((a / 100 * (1 - a / 100) + b / 100 * (1 - b / 100)) / n)
        out.append({"model": result["headline"]["student"], "check": f"zero-shot {d} R@1 > teacher's",
                    "value": f"{a:.1f} vs {b:.1f} (noise ±{noise:.1f})", "ok": a > b, "clear": a - b > noise,
                    "noise": noise})
    return out


def retrieval_reading(result: dict) -> list[str]:
    """What the headline rows say and do not say, in sentences (noise: two binomial standard errors)."""
    s, t = (result["rows"][result["headline"][k]] for k in ("student", "teacher"))
    chance, n = result["rows"][CHANCE], result["num_videos"]

    def noise(a: float, b: float) -> float:  # of the difference of two percentages over n clips each
        return 200.0 * math.sqrt((a / 100 * (1 - a / 100) + b / 100 * (1 - b / 100)) / n)

    m, c = s["motion_given_appearance"], chance["motion_given_appearance"]
    m_noise = 200.0 * math.sqrt(c / 100 * (1 - c / 100) / n)
    motion = (f"picks the right motion among the captions with the clip's appearance {m:.1f} % of the time "
              f"(chance {c:.1f} %, noise ±{m_noise:.1f})")
    motion += (": stage 2 taught it some of the motion words." if m - c > m_noise else
               ": indistinguishable from chance, so stage 2 did not teach the motion words at this budget.")
    a, b = s["appearance_top1"], t["appearance_top1"]
    appearance = (f"Appearance: {a:.1f} % vs the teacher's {b:.1f} % (noise ±{noise(a, b):.1f})"
                  + ("." if abs(a - b) > noise(a, b) else ", within the noise."))
    checks = retrieval_checks(result)
    r1 = ", ".join(f"{c['check'].split()[1]} {c['value']}" for c in checks)
    verdict = ("clearly above the teacher's" if all(c["clear"] for c in checks) else
               "above the teacher's" if all(c["ok"] for c in checks) else "not above the teacher's in both directions")
    return [f"The student {motion}", appearance,
            f"R@1 on motion captions (student vs teacher): {r1}: {verdict}"
            + ("." if all(c["clear"] for c in checks) else "; differences inside the noise are not results.")]


def retrieval_table(result: dict) -> Table:
    """A rich table of the retrieval rows (percent); the headline rows in bold."""
    table = Table(title=f"zero-shot retrieval on motion captions ({result['num_videos']} test clips, "
                        f"{result['num_texts']} distinct captions; class-level hits)",
                  caption=legend(result["rows"], _RETRIEVAL_LEGEND), caption_justify="left")
    table.add_column("model")
    for _, title in _COLUMNS:
        table.add_column(_RETRIEVAL_SHORT[title], justify="right")
    headline = set(result["headline"][k] for k in ("student", "teacher"))
    for name, m in result["rows"].items():
        style = "bold" if name in headline else ("dim" if name == CHANCE else "")
        table.add_row(short_row(name), *(f"{m[key]:.1f}" for key, _ in _COLUMNS), style=style)
    return table


def retrieval_markdown(result: dict) -> str:
    """The retrieval rows as a markdown section (headline rows in bold), with the counting rules."""
    head = set(result["headline"][k] for k in ("student", "teacher"))
    h = result["headline"]
    setting = ""
    if result.get("tubelet", 1) != 1:
        setting = (f"Stage 2 ran with a tubelet-{result['tubelet']} vision encoder (the stage-1 kernel spread over "
                   f"{result['tubelet']} frames) and the losses {result.get('losses', '?')}: UTA is off, since a token "
                   "spanning several frames has no one teacher token. ")
    lines = ["## Zero-shot retrieval on motion captions (stage 2)", "", setting +
             f"{result['num_videos']} test clips, {result['num_texts']} distinct captions. Rule: {result['rule']}. "
             f"Appearance column: {result['appearance_rule']}. Motion column: {result['motion_rule']}. "
             f"Headline: **{h['student']}** vs **{h['teacher']}** ({h['why']}). Re-ranking: top {result['k_test']}.", "",
             "| model | " + " | ".join(t for _, t in _COLUMNS) + " |", "|---|" + "---:|" * len(_COLUMNS)]
    for name, m in result["rows"].items():
        label = f"**{name}**" if name in head else name
        lines.append(f"| {label} | " + " | ".join(f"{m[k]:.1f}" for k, _ in _COLUMNS) + " |")
    lines.append("")
    for c in retrieval_checks(result):
        verdict = "PASS" if c["ok"] else "FAIL"
        lines.append(f"- {verdict}: {c['model']}: {c['check']}: {c['value']}"
                     f"{'' if c['clear'] else ' — within the noise, not a result'}")
    lines += ["", *(f"- {sentence}" for sentence in retrieval_reading(result)), "", f"Note: {result['note']}"]
    return "\n".join(lines) + "\n"
