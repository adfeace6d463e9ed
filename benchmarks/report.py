"""Turn one suite run's results into ``<stem>.json``, ``<stem>.md`` and ``<stem>-*.png``.

Numbers are printed as measured (fixed decimals, no rounding toward a goal); the markdown says which
machine, load and command produced them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.common import K710_CLIPS
from benchmarks.derived import smallest_faithful, student_rates

MODE_NAMES = {"student": "student only", "cached": "cached", "online": "online"}
GOALS = {"online_over_cached": 2.5, "cached_over_student": 1.05, "min_cos": 0.99, "bytes": 1e6,
         # the input path (issue: feed a GPU): per CPU core, and bytes read per byte trained on
         "loader_per_core": 150.0, "loader_targets_per_core": 500.0, "read_amplification": 1.0}


def _f(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def paired_ratio(r: dict, a: str, b: str) -> float | None:
    """Median over turns of (step time of mode a / step time of mode b) in the same turn.

    In an interleaved run the i-th measured steps of all modes ran within seconds of each other, so
    each pair sees the same machine; the median of the pairs resists speed swings that last minutes.
    """
    import statistics

    ta, tb = r["modes"].get(a, {}).get("times"), r["modes"].get(b, {}).get("times")
    if not ta or not tb or len(ta) != len(tb) or not r.get("settings", {}).get("interleave", False):
        return None
    return statistics.median(x / y for x, y in zip(ta, tb))


def _row_key(r: dict) -> str:
    return f"{r['size']} T={r['frames']} {int(round(r['mask_ratio'] * 100))}%"


# --------------------------------------------------------------------------------------------------
# headline


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The three numbers the issue asks for, with their goals, from whatever sections ran."""
    h = results["meta"]["headline_config"]
    out: dict[str, Any] = {"config": h}
    rows = [r for r in results.get("step", []) if (r["size"], r["frames"], r["mask_ratio"]) == (h["size"], h["frames"], h["mask_ratio"])]
    if rows:
        r = rows[0]
        spread = {m: (v["max"] - v["min"]) / v["median"] for m, v in r["modes"].items()}
        out["step"] = {"label": r["label"], "batch_size": r["batch_size"], "spread": spread,
                       # a cached step does strictly more work than a student-only one: below 1 is noise
                       "noisy": (r["ratios"]["cached_over_student"] or 1) < 1 or max(spread.values()) > 0.25,
                       "median_s": {m: v["median"] for m, v in r["modes"].items()}, **r["ratios"],
                       "online_over_cached_paired": paired_ratio(r, "online", "cached"),
                       "cached_over_student_paired": paired_ratio(r, "cached", "student"),
                       "online_over_cached_goal_met": (r["ratios"]["online_over_cached"] or 0) >= GOALS["online_over_cached"],
                       "cached_over_student_goal_met": (r["ratios"]["cached_over_student"] or 9) <= GOALS["cached_over_student"]}
    storage = results.get("storage")
    if storage:
        for key, mode in (("smallest_faithful", None), ("smallest_faithful_full", "full")):
            best = smallest_faithful(storage["rows"], GOALS["min_cos"], mode)
            if best:
                out[key] = {"codec": best["codec"], "mode": best["mode"], "bytes_per_clip_view": best["bytes_per_clip_view"],
                            "mean_cos": best["mean_cos"], "p1_cos": best["p1_cos"],
                            "bytes_goal_met": best["bytes_per_clip_view"] <= GOALS["bytes"]}
        out["targets"] = storage["reference"]["shape_KTND"]
        trained = (storage.get("smallest_faithful") or {}).get("trained")
        if storage.get("trained"):
            out["trained_smallest_faithful"] = trained  # None: no codec was faithful by cos and probe
    loader = results.get("loader", {}).get("headline")
    if loader:
        out["loader"] = {**loader,
                         "per_core_goal_met": loader["clip_views_per_s_per_core"] >= GOALS["loader_per_core"],
                         "targets_only_goal_met": (loader["targets_only_clip_views_per_s_per_core"] or 0)
                         >= GOALS["loader_targets_per_core"],
                         "amplification_goal_met": loader["read_amplification"] <= GOALS["read_amplification"]}
    return out


# --------------------------------------------------------------------------------------------------
# markdown


def _headline_md(res: dict) -> list[str]:
    h, m = res["headline"], res["meta"]
    lines = ["## Headline", ""]
    cfg = h["config"]
    lines.append(f"Configuration: size `{cfg['size']}`, T = {cfg['frames']}, mask ratio {cfg['mask_ratio']}, "
                 f"targets K×T×N×D = {h.get('targets')}, teacher weights random (same cost and shapes as pretrained).")
    lines += ["", "| quantity | measured | goal | met |", "|---|---|---|---|"]
    if "step" in h:
        s = h["step"]
        def met(ok: bool) -> str:
            return "unresolved (noise, see below)" if s["noisy"] else ("yes" if ok else "no")

        lines.append(f"| online / cached step time | {_f(s['online_over_cached'])}× | ≥ 2.5× | {met(s['online_over_cached_goal_met'])} |")
        lines.append(f"| cached / student-only step time | {_f(s['cached_over_student'])} | ≤ 1.05 | {met(s['cached_over_student_goal_met'])} |")
        lines.append(f"| ceiling: online / student-only | {_f(s['online_over_student'])}× | — | — |")
        if s.get("online_over_cached_paired") is not None:
            lines.append(f"| online / cached, median of same-turn pairs | {_f(s['online_over_cached_paired'])}× | (check) | — |")
            lines.append(f"| cached / student-only, median of same-turn pairs | {_f(s['cached_over_student_paired'])} | (check) | — |")
    for key, what in (("smallest_faithful", "smallest codec/mode with mean cos ≥ 0.99"),
                      ("smallest_faithful_full", "smallest *full-mode* codec with mean cos ≥ 0.99")):
        if key in h:
            b = h[key]
            lines.append(f"| {what} | {b['codec']}/{b['mode']}: {b['bytes_per_clip_view'] / 1e6:.4f} MB "
                         f"({b['bytes_per_clip_view']:,.0f} bytes) per clip-view "
                         f"(mean cos {b['mean_cos']:.6f}) | ≤ 1 MB | {'yes' if b['bytes_goal_met'] else 'no'} |")
    if "loader" in h:
        ld = h["loader"]
        yn = {True: "yes", False: "no"}
        lines.append(f"| input path, {ld['config']}, clip-views/s per core (cold) | {ld['clip_views_per_s_per_core']:.1f} "
                     f"| ≥ {GOALS['loader_per_core']:.0f} | {yn[ld['per_core_goal_met']]} |")
        lines.append(f"| targets only (int8 visible, no frames), clip-views/s per core | "
                     f"{_f(ld['targets_only_clip_views_per_s_per_core'], 1)} | ≥ {GOALS['loader_targets_per_core']:.0f} "
                     f"| {yn[ld['targets_only_goal_met']]} |")
        lines.append(f"| read amplification (bytes read / bytes of the epoch's views) | {ld['read_amplification']:.3f} "
                     f"| {GOALS['read_amplification']:.1f} | {yn[ld['amplification_goal_met']]} |")
    if "trained_smallest_faithful" in h:
        b = h["trained_smallest_faithful"]
        got = (f"{b['codec']}/{b['mode']} (UMT-B {b['umt_b_codec']}): {b['umt_b_mb_per_clip_view']:.4f} MB per UMT-B clip-view "
               f"(mean cos {b['mean_cos']:.6f}, Δ probe {_f(b.get('probe_diff'))})") if b else "none"
        met = "yes" if b and b["goal_met"] else "no"
        lines.append(f"| trained tiny CLIP: smallest codec/mode with mean cos ≥ 0.99 and Δ probe ≤ 0.01 | {got} | ≤ 0.25 MB | {met} |")
    if "step" in h:
        lines += ["", "Spread of the headline steps, (max − min) / median: "
                  + ", ".join(f"{MODE_NAMES[m]} {x:.0%}" for m, x in h["step"]["spread"].items()) + "."]
        if h["step"]["noisy"]:
            lines += ["", "**Noise warning:** the step times of this run vary more than the effects measured (a cached step "
                      "does strictly more work than a student-only step, so a ratio below 1 is noise). Treat the step ratios "
                      "above as unresolved on this machine; re-run on an idle machine or a GPU."]
        lines += ["", "online / cached can at best reach the ceiling online / student-only (a free loader); the gap between "
                  "them is the loader's cost (cached / student-only). When the ceiling itself is below 2.5×, the teacher's "
                  "forward is cheap relative to the student's step on this hardware, whatever the cache does."]
        med = h["step"]["median_s"]
        lines += ["", "Median step seconds (batch " + str(h["step"]["batch_size"]) + "): "
                  + ", ".join(f"{MODE_NAMES[k]} {v:.3f}" for k, v in med.items()) + f" — {m['machine']['cpu']}"
                  + (f", {m['machine']['gpu']}" if m["machine"].get("gpu") else "") + "."]
    return lines + [""]


def _step_md(res: dict) -> list[str]:
    rows = res.get("step")
    if not rows:
        return []
    sequential = any(not r.get("settings", {}).get("interleave", True) for r in rows)
    lines = ["## 1. Step cost: student only vs cached vs online" + (" (sequential)" if sequential else ""), "",
             "Seconds per training step: median / min / max over the measured steps after warm-up. The three modes "
             "run side by side on the same clips and store and take turns one step at a time (mirrored order; the "
             "waiting ones paused, DataLoader workers stopped), unless the run says 'sequential'. Peak memory of the measuring process (CPU: resident set, "
             "'base' = the Python/torch runtime before the model; CUDA: allocated bytes). Student only = targets in "
             "memory; cached = the real stage-1 loop over a Zarr store (pixels decoded by its DataLoader); online = "
             "the same loop running the teacher.", "",
             "| config | batch / threads | mode | median s | min s | max s | steps | peak MB (base) | load at start |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for mode, v in r["modes"].items():
            threads = r.get("settings", {}).get("threads", "?")
            lines.append(f"| {_row_key(r)} | {r['batch_size']} / {threads} | {MODE_NAMES[mode]} | {v['median']:.4f} | "
                         f"{v['min']:.4f} | {v['max']:.4f} | {v['n']} | "
                         f"{v['peak_mb']:.0f} ({v['baseline_mb']:.0f}) | {v['load_start'][0]:.2f} |")
    lines += ["", "Ratios of the medians; in brackets the median of same-turn pairs (steps of the modes taken within "
              "seconds of each other — the steadier figure when the machine's speed swings).", "",
              "| config | student / teacher | cached / student | online / cached | ceiling online / student | student clip-views/s |",
              "|---|---|---|---|---|---|"]

    def both(r: dict, key: str, a: str, b: str) -> str:
        p = paired_ratio(r, a, b)
        return _f(r["ratios"][key]) + ("" if p is None else f" ({_f(p)})")

    for r in rows:
        lines.append(f"| {_row_key(r)} | {r['label']} | {both(r, 'cached_over_student', 'cached', 'student')} | "
                     f"{both(r, 'online_over_cached', 'online', 'cached')} | {both(r, 'online_over_student', 'online', 'student')} | "
                     f"{_f(r['student_clips_per_s'], 3)} |")
    if res.get("omitted"):
        omitted = ", ".join(f"{s} T={t} {int(round(x * 100))}%" for s, t, x in res["omitted"])
        lines += ["", f"Not measured in this run (preset `{res['meta']['preset']}`; `--grid full` runs them): {omitted}."]
    return lines + [""]


def _layers(r: dict) -> str:
    return " / ".join(f"{c:.4f}" for c in r.get("layer_mean_cos", []))


def storage_md(res: dict, stem: str) -> list[str]:
    st = res.get("storage")
    if not st:
        return []
    ref = st["reference"]
    lines = ["## 2. Storage vs fidelity", "",
             "### Random-weights headline teacher (shapes and bytes)", "",
             f"The same {ref['records']} clip-views (targets K×T×N×D = {ref['shape_KTND']}, {ref['tokens_compared']} tokens) "
             f"re-encoded with each codec (zstd on top). Visible mode keeps {ref['visible_tokens_per_frame']} tokens per frame "
             f"(mask ratio {ref['mask_ratio']}, one mask per view). Cosine is per token against fp32 (per layer: mean, "
             f"last layer last). Loss = UTA loss of a "
             f"freshly initialised `{ref['loss_student']}` on a fixed batch of {ref['loss_batch']} clip-views, fp32 targets vs codec targets "
             "(same predictions and mask). Write = encode + compress + write + fsync; read = cold (page cache evicted) "
             "read + decode to float32. MB/s are of on-disk bytes. Random weights have no low-rank structure: "
             "the pca rows here show cost, not the fidelity a trained CLIP would keep.", "",
             "| codec | mode | MB per clip-view | write MB/s | read MB/s | read clip-views/s | mean cos | p1 cos | mean cos per layer | loss fp32 | |Δ loss| |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in st["rows"]:
        lines.append(f"| {r['codec']} | {r['mode']} | {r['bytes_per_clip_view'] / 1e6:.4f} | {r['write_mb_per_s']:.1f} | "
                     f"{r['read_mb_per_s']:.1f} | {r['read_records_per_s']:.2f} | {r['mean_cos']:.6f} | {r['p1_cos']:.6f} | "
                     f"{_layers(r)} | {r['loss_fp32']:.5f} | {r['loss_abs_diff']:.2e} |")
    lines += ["", f"![bytes vs cosine]({stem}-storage.png)", ""]
    lines += _trained_md(st.get("trained"))
    lines += _faithful_md(st.get("smallest_faithful"))
    lines += [f"UMT target shapes and a Kinetics-710 projection ({K710_CLIPS / 1e6:.2f} M training clips, 658,340 in the "
              "k710 list of VideoMAEv2's `docs/DATASET.md`; one view per clip — multiply by K views). Raw = exact array bytes from the "
              "shapes (visible mode at UMT's 80 % mask ratio; pca ranks at the same share of D, or of K×D for jpca); on disk = raw × "
              "the on-disk/raw ratio measured above for that codec and mode. A pca store also holds its basis once "
              "(float32, K×(1+r)×D or (1+r)×K×D values), not counted per clip-view.", "",
              "| teacher measured | model | codec (projected as) | mode | raw MB / clip-view | on-disk MB / clip-view | K710 TB per view (raw) | K710 TB per view (on disk) |",
              "|---|---|---|---|---|---|---|---|"]
    for label, section in (("random weights", st), ("trained tiny CLIP", st.get("trained"))):
        for p in (section or {}).get("projection", []):
            lines.append(f"| {label} | {p['model']} | {p['codec']} ({p.get('target_codec', p['codec'])}) | {p['mode']} | "
                         f"{p['raw_mb_per_clip_view']:.4f} | {p['disk_mb_per_clip_view']:.4f} | "
                         f"{p['k710_tb_per_view_raw']:.3f} | {p['k710_tb_per_view_disk']:.3f} |")
    return lines + [""]


def _trained_md(tr: dict | None) -> list[str]:
    if not tr:
        return []
    ref, teacher, down = tr["reference"], tr.get("teacher", {}), tr.get("downstream")
    lines = ["### Trained teacher: the quickstart's tiny CLIP on its toy world", "",
             f"Teacher `{teacher.get('name')}` ({teacher.get('source')}; zero-shot appearance accuracy "
             f"{_f(teacher.get('zero_shot_accuracy'))}), targets K×T×N×D = {ref['shape_KTND']} of {ref['records']} clip-views "
             f"(training split × 4 views), visible mode at the quickstart's mask ratio {ref['mask_ratio']}. "
             "UMT-B MB = the raw bytes of UMT-B/16 targets with the same codec at the same share of D (visible: 80 % masked; "
             "zstd ratios at this tiny shape are dominated by per-chunk overhead, so they are not carried over). "
             "Loss (trained) = UTA loss of the fp32-trained student on a fixed batch with the codec's targets vs fp32's."]
    if down:
        seeds = [r for r in down["runs"] if r["seed"] != 0]
        noise = ", ".join(f"{r['mode']} {_f(abs(r['appearance_linear'] - next(x['appearance_linear'] for x in down['runs'] if x['codec'] == 'fp32' and x['mode'] == r['mode'] and x['seed'] == 0)))}"
                          for r in seeds if r["codec"] == "fp32")
        lines[-1] += (f" Probe = linear-probe appearance accuracy (test split, {down['test_clips']} clips: one clip = "
                      f"{1 / down['test_clips']:.4f}) of the stage-1 student trained {down['epochs']} epochs from the codec's targets, "
                      f"same seed; Δ probe against fp32 of the same mode (faithful: ≤ 0.01). Two fp32 runs that differ only "
                      f"in the seed differ by: {noise or '—'}. Rows with mean cos < 0.99 were not trained (—).")
    lines += ["", "| codec | mode | UMT-B codec | UMT-B MB / clip-view | mean cos | p1 cos | mean cos per layer | |Δ loss| fresh | |Δ loss| trained | probe | Δ probe |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in tr["rows"]:
        lines.append(f"| {r['codec']} | {r['mode']} | {r.get('umt_b_codec', '')} | {r['umt_b_mb_per_clip_view']:.4f} | "
                     f"{r['mean_cos']:.6f} | {r['p1_cos']:.6f} | {_layers(r)} | {r['loss_abs_diff']:.2e} | "
                     f"{_e(r.get('loss_trained_abs_diff'))} | {_f(r.get('appearance_linear'))} | {_f(r.get('probe_diff'))} |")
    return lines + [""]


def _e(x: float | None) -> str:
    return "—" if x is None else f"{x:.2e}"


def _faithful_md(sf: dict | None) -> list[str]:
    if not sf:
        return []
    lines = ["Smallest faithful codec/mode per teacher (`storage.smallest_faithful`; goal ≤ 0.25 MB per UMT-B clip-view):", "",
             "| teacher | judged by | codec / mode | UMT-B codec | UMT-B MB / clip-view | mean cos | Δ probe | goal met |", "|---|---|---|---|---|---|---|---|"]
    for key, b in sf.items():
        if b:
            lines.append(f"| {key} | {b['judged_by']} | {b['codec']} / {b['mode']} | {b['umt_b_codec']} | {b['umt_b_mb_per_clip_view']:.4f} | "
                         f"{b['mean_cos']:.6f} | {_f(b.get('probe_diff'))} | {'yes' if b['goal_met'] else 'no'} |")
        else:
            lines.append(f"| {key} | — | none faithful | — | — | — | — | no |")
    return lines + [""]


def _input_md(res: dict, stem: str) -> list[str]:
    inp = res.get("input")
    if not inp:
        return []
    c = res.get("corpus") or {}
    lines = ["## 3. Input pipeline", "",
             f"Decode: {inp['decode'][0]['clips']} clips of {c.get('frames')} frames, {c.get('width')}×{c.get('height')}, "
             f"{c.get('fps')} fps, {c.get('kbit_per_s')} kbit/s ({c.get('encoder')}); UMT sparse sampling of 8 frames "
             "(one per segment), one decoder thread per DataLoader worker, decode only.", "",
             "| backend | decoder that ran | workers | frames/s | clips/s |", "|---|---|---|---|---|"]
    for d in inp["decode"]:
        lines.append(f"| {d['backend']} | {', '.join(d['decoders_used'])} | {d['workers']} | {d['frames_per_s']:.1f} | {d['clips_per_s']:.2f} |")
    rates = student_rates(res)
    lines += ["", "Target reads, cold: Zarr in random order vs WebDataset streamed, through a DataLoader.", "",
              "| targets (teacher) | layout | access | workers | clip-views/s | MB/s on disk | MB/s decoded | MB per clip-view |",
              "|---|---|---|---|---|---|---|---|"]
    for r in inp["reads"]:
        lines.append(f"| {r['targets']} ({r['codec']}) | {r['layout']} | {r['access']} | {r['workers']} | {r['records_per_s']:.2f} | "
                     f"{r['disk_mb_per_s']:.1f} | {r['decoded_mb_per_s']:.1f} | {r['bytes_per_record'] / 1e6:.3f} |")
    if rates:
        lines += ["", "The student consumes (student-only step, this machine): "
                  + "; ".join(f"{x['size']} {x['clips_per_s']:.3f} clip-views/s" for x in rates)
                  + ". A source keeps up when its clip-views/s is above the student's rate for the same teacher."]
    return lines + ["", f"![input pipeline]({stem}-input.png)", ""]


def cache_md(res: dict, stem: str) -> list[str]:
    points = res.get("cache_write")
    if not points:
        return []
    lines = ["## 4. Cache write", "",
             "cache-teacher end to end (decode workers → teacher → codec → shard writer) vs the teacher's forward "
             "alone on the same, already decoded views in the same batch size. Ratio = share of the teacher's speed "
             "the pipeline keeps.", "",
             "| teacher | batch | codec | decode workers | clip-views | forward-only frames/s | cache-teacher frames/s | ratio "
             "| time in teacher | s to first clip | s draining writer |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p['teacher']} ({p['input_size']} px, T={p['frames']}) | {p['batch_size']} | {p['codec']} | {p['decode_workers']} | "
                     f"{p['clip_views']} | {_f(p.get('teacher_forward_fps'), 2)} | {p['cache_teacher_fps']:.2f} | "
                     f"{_f(p.get('ratio'))} | {p['share_of_time_in_teacher']:.3f} | {_f(p.get('first_clip_seconds'), 2)} "
                     f"| {_f(p.get('drain_seconds'), 2)} |")
    return lines + ["", f"![cache write]({stem}-cache.png)", ""]


def loader_md(res: dict) -> list[str]:
    section = res.get("loader")
    if not section:
        return []
    from benchmarks.bench_loader import table

    st = section["settings"]
    lines = ["## 5. Input path per CPU core", "",
             f"The stage-1 dataset + DataLoader (1 worker, 1 torch thread) + host-to-device + on-device dequantisation, "
             f"T={st['T']}, N={st['N']}, {st['size']} px, batch {st['batch_size']}, {st['clips']} clips x {st['views']} views, "
             f"median of {st['passes']} epochs; cold = page cache evicted before each epoch. 'reference' is the path "
             "before store format 2 (every view read, float32 decoded on the CPU). cores/GPU and GB/s/GPU: what one "
             "A100 consuming ~700 clip-views/s needs.", "", table(section), ""]
    if section.get("object_storage"):
        from benchmarks.bench_loader import object_storage_table

        lines += [f"Read from object storage ({section['object_storage']['server']}) beside local disk, same run:", "",
                  object_storage_table(section["object_storage"]), ""]
    for label, prof in section.get("profiles", {}).items():
        lines += [f"Profile, one epoch in-process ({label}), top functions by own time:", "", "```", *prof, "```", ""]
    return lines


def markdown(res: dict, stem: str) -> str:
    m = res["meta"]
    mi = m["machine"]
    lines = [f"# umt-distill benchmarks — {stem}", "",
             f"Command: `{m['command']}`  ", f"Wall time: {m['wall_seconds']:.0f} s ({m['started']} → {m['finished']})  ",
             f"Machine: {mi['cpu']}, {mi['cores']} cores, {mi['memory_gb']} GB"
             + (f", GPU {mi['gpu']}" if mi.get("gpu") else ", no GPU") + f"; torch {mi['torch']} ({mi['torch_threads']} threads), "
             f"Python {mi['python']}, commit {mi['git_commit']}  ",
             f"Load average (1/5/15 min) at start {m['load_start']}, at end {m['load_end']} — above {mi['cores']} means other "
             "work shared the cores and absolute times are slower than on an idle machine; ratios within one section are "
             "measured back to back on the same inputs.", ""]
    lines += _headline_md(res)
    lines += _step_md(res) + ([f"![step time]({stem}-step.png)", ""] if res.get("step") else [])
    lines += storage_md(res, stem) + _input_md(res, stem) + cache_md(res, stem) + loader_md(res)
    if res.get("table1"):
        from benchmarks.bench_table1 import table1_markdown

        lines += [table1_markdown(res["table1"])]
    secs = res["sections"]
    lines += ["## Section times", "", "| section | seconds | load start | load end |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['seconds']} | {v['load_start'][0]:.2f} | {v['load_end'][0]:.2f} |" for k, v in secs.items()]
    return "\n".join(lines) + "\n"


def write_report(results: dict[str, Any], out: Path, stem: str) -> dict[str, Path]:
    """JSON, markdown and the charts that have data; returns the paths written."""
    from benchmarks.charts import write_charts

    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md"}
    paths["json"].write_text(json.dumps(results, indent=1, default=str))
    paths.update(write_charts(results, out, stem))
    paths["markdown"].write_text(markdown(results, stem))
    return paths


def main(argv: list[str] | None = None) -> None:
    """Re-render the markdown and charts of a results JSON (same measurements, current report code)."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("json", type=Path, help="a benchmarks/results/<machine>-<date>.json")
    args = p.parse_args(argv)
    results = json.loads(args.json.read_text())
    results["headline"] = headline(results)
    for kind, path in write_report(results, args.json.parent, args.json.stem).items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    from benchmarks.report import main as package_main  # see bench_step.py

    package_main()
