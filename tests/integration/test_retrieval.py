"""Retrieval protocol (metrics, top-k re-ranking, multiple choice) and retrieval fine-tuning on generated clips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from umt_distill.config import load_recipe
from umt_distill.evaluation.retrieval import (
    finish_rerank,
    ground_truth_ranks,
    multiple_choice_accuracy,
    multiple_choice_texts,
    rerank_top_k,
    rerank_top_k_reference,
    retrieval_metrics,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------------------
# metrics on a hand-computed example


def test_metrics_on_a_hand_computed_matrix() -> None:
    # 3 videos, 4 texts: texts 0 and 1 describe video 0, text 2 video 1, text 3 video 2.
    text_to_video = torch.tensor([0, 0, 1, 2])
    v2t = torch.tensor([[0.9, 0.1, 0.5, 0.2],   # best true text t0 first → rank 1
                        [0.3, 0.8, 0.4, 0.1],   # t2 behind t1 → rank 2
                        [0.7, 0.6, 0.5, 0.2]])  # t3 behind three → rank 4
    t2v = v2t.t().clone()
    # t0: v0 first → 1; t1: v0 (0.1) behind v1, v2 → 3; t2: v1 (0.4) behind v0, v2 (0.5) → 3;
    # t3: v2 (0.2) ties with v0 (0.2): ties count against the true item → 2.
    m = retrieval_metrics(v2t, t2v, text_to_video)
    assert m["v2t_r1"] == pytest.approx(100 / 3) and m["v2t_r5"] == 100 and m["v2t_r10"] == 100
    assert m["v2t_medr"] == 2 and m["v2t_meanr"] == pytest.approx(7 / 3)
    assert m["t2v_r1"] == 25 and m["t2v_r5"] == 100
    assert m["t2v_medr"] == 2.5 and m["t2v_meanr"] == pytest.approx(9 / 4)
    assert m["r_mean"] == pytest.approx((100 / 3 + 100 + 100 + 25 + 100 + 100) / 6)


def test_ranks_need_a_true_item_and_left_out_items_rank_last() -> None:
    with pytest.raises(ValueError, match="query 1 has no true item"):
        ground_truth_ranks(torch.zeros(2, 3), torch.tensor([[True, False, False], [False, False, False]]))
    inf = float("-inf")
    ranks = ground_truth_ranks(torch.tensor([[2.0, inf, inf, 1.0]]), torch.tensor([[False, True, False, False]]))
    assert ranks.tolist() == [4]  # outside the top-k, behind everything


def test_multiple_choice_on_a_hand_example() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.3], [0.5, 0.2, 0.1], [0.2, 0.3, 0.4]])
    assert multiple_choice_accuracy(scores, torch.tensor([1, 2, 2])) == pytest.approx(2 / 3)
    assert multiple_choice_texts("what moves?", ["a disc", "a cube"]) == ["what moves? a disc", "what moves? a cube"]
    assert multiple_choice_texts("", ["a disc"]) == ["a disc"]


# --------------------------------------------------------------------------------------------------
# top-k re-ranking against the plain reference


@pytest.mark.parametrize("k", [1, 3, 7, 50])
def test_rerank_top_k_matches_reference_and_ranks_split(k) -> None:
    g = torch.Generator().manual_seed(k)
    coarse, fine = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    calls = []

    def score_pairs(rows, cols):
        calls.append(len(rows))
        return fine[rows, cols]

    scores, in_top = rerank_top_k(coarse, k, score_pairs)
    got = finish_rerank(scores, in_top)
    want = rerank_top_k_reference(coarse, k, lambda r, c: float(fine[r, c]))
    torch.testing.assert_close(got, want)
    assert sum(calls) == 5 * min(k, 7)  # only the candidates are scored
    # Two "ranks" each scoring every other row, summed: the same matrix.
    parts = [rerank_top_k(coarse, k, score_pairs, rank=r, world_size=2) for r in range(2)]
    torch.testing.assert_close(finish_rerank(parts[0][0] + parts[1][0], parts[0][1]), want)


# --------------------------------------------------------------------------------------------------
# end to end: retrieval fine-tuning on generated clips whose captions name colour and direction

COLOURS = {"red": (230, 40, 40), "green": (40, 210, 60), "blue": (50, 70, 235), "yellow": (235, 225, 40)}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def _disc_clip(colour: tuple[int, int, int], direction: tuple[int, int], seed: int, frames: int = 8,
               side: int = 48) -> np.ndarray:
    """A disc of one colour crossing the frame in one direction over moving_shapes_video's textured
    background (its own disc hidden under ours): uint8 [T, H, W, 3]."""
    from umt_distill.testing.media import moving_shapes_video

    video = moving_shapes_video(frames, side, side, seed=seed, radius=1.0)
    ys, xs = np.mgrid[0:side, 0:side]
    for t in range(frames):
        progress = (t + 0.5) / frames  # 0 → 1 across the clip
        cx = side / 2 + direction[0] * (progress - 0.5) * side * 0.7
        cy = side / 2 + direction[1] * (progress - 0.5) * side * 0.7
        video[t][(xs - cx) ** 2 + (ys - cy) ** 2 <= 8**2] = colour
    return video


@pytest.fixture(scope="module")
def captioned_clips(tmp_path_factory) -> Path:
    from umt_distill.testing.media import write_video

    root = tmp_path_factory.mktemp("ret")
    rows = []
    for i, (colour, direction) in enumerate(zip(list(COLOURS) * 2, ["left", "right", "up", "down", "right", "left", "down", "up"])):
        write_video(root / f"c{i}.mp4", _disc_clip(COLOURS[colour], DIRECTIONS[direction], seed=i), fps=8)
        rows.append({"id": f"c{i}", "path": f"c{i}.mp4",
                     "captions": [f"a {colour} disc moves {direction}", f"{colour} ball going {direction}"]})
    (root / "clips.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Multiple choice: the true caption among three of other clips (label = its index).
    mc = []
    for i, r in enumerate(rows):
        others = [rows[(i + d) % len(rows)]["captions"][0] for d in (1, 3)]
        answer = i % 3
        cands = others[:answer] + [r["captions"][0]] + others[answer:]
        mc.append({"id": r["id"], "path": r["path"], "captions": cands, "label": answer})
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    return root


@pytest.mark.slow
def test_retrieval_finetune_learns_and_is_evaluated(captioned_clips, tmp_path, capsys) -> None:
    """120 steps from a random tiny model: the loss falls and contrastive retrieval beats the untrained model."""
    from umt_distill.data.text import load_tokenizer
    from umt_distill.evaluation.retrieval import evaluate_multiple_choice_model, evaluate_retrieval_model
    from umt_distill.stages.retrieval import build_retrieval_model, load_vl_model, train
    from umt_distill.stages.retrieval import evaluate as evaluate_retrieval
    from umt_distill.training.metrics import read_metrics

    run, cpu = tmp_path / "run", torch.device("cpu")
    clips = captioned_clips / "clips.jsonl"
    cfg = load_recipe("finetune/tiny_ret", [f"corpus.source={clips}", f"finetune.test_source={clips}",
                                            f"train.output_dir={run}", "train.log_every=10", "train.ckpt_every=120"])
    last = train(cfg)
    logged = [m for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in logged] == list(range(10, 121, 10))
    err = capsys.readouterr().err  # live progress (not a terminal: plain lines), training then the test videos
    assert "retrieval step 120/120 (100.0%) loss " in err and "eval videos step 1/" in err, err[-2000:]
    tokenizer = load_tokenizer(run / "tokenizer")
    torch.manual_seed(cfg.seed)
    before = evaluate_retrieval_model(build_retrieval_model(cfg, len(tokenizer)), tokenizer, cfg, clips, cpu)
    print(f"retrieval fine-tune loss {logged[0]['loss']:.3f} -> {logged[-1]['loss']:.3f} (vtc {logged[-1]['loss_vtc']:.3f}, "
          f"vtm {logged[-1]['loss_vtm']:.3f}); ITC t2v/v2t R@1 {before['emb_t2v_r1']:.1f}/{before['emb_v2t_r1']:.1f} -> "
          f"{last['test_emb_t2v_r1']:.1f}/{last['test_emb_v2t_r1']:.1f}, r_mean {before['emb_r_mean']:.1f} -> "
          f"{last['test_emb_r_mean']:.1f}; ITM re-ranked r_mean {last['test_r_mean']:.1f}")
    assert logged[-1]["loss_vtc"] < logged[0]["loss_vtc"] - 0.4
    assert last["test_emb_r_mean"] > before["emb_r_mean"] + 15
    assert last["test_emb_t2v_r1"] + last["test_emb_v2t_r1"] > before["emb_t2v_r1"] + before["emb_v2t_r1"]
    assert last["test_num_videos"] == 8 and last["test_num_texts"] == 16 and last["test_k_test"] == 128
    # The checkpoint evaluates the same from its folder (tokenizer found beside it).
    result = evaluate_retrieval(cfg, run)
    assert result["t2v_r1"] == pytest.approx(last["test_t2v_r1"]) and result["r_mean"] == pytest.approx(last["test_r_mean"])
    assert json.loads((Path(result["output"]) / "retrieval.json").read_text())["k_test"] == 128
    model, tokenizer = load_vl_model(cfg, run)
    mc = evaluate_multiple_choice_model(model, tokenizer, cfg, captioned_clips / "mc.jsonl", cpu)
    assert mc["num_questions"] == 8 and 0.0 <= mc["mc_accuracy"] <= 1.0
    print(f"multiple choice accuracy {mc['mc_accuracy']:.3f} (ITC {mc['mc_emb_accuracy']:.3f}, chance 0.333)")


def test_multiple_choice_scores_each_candidate_with_the_matching_head(captioned_clips) -> None:
    """MC accuracy of a random model equals the argmax of its pairs scored one by one."""
    from umt_distill.data.corpus import read_corpus
    from umt_distill.data.text import train_wordpiece_tokenizer
    from umt_distill.evaluation.retrieval import encode_texts, encode_videos, evaluate_multiple_choice_model
    from umt_distill.evaluation.retrieval import _video_batches
    from umt_distill.stages.retrieval import build_retrieval_model

    cfg = load_recipe("finetune/tiny_ret")
    rows = read_corpus(captioned_clips / "mc.jsonl")
    tokenizer = train_wordpiece_tokenizer([c for r in rows for c in r.captions], 200)
    torch.manual_seed(1)
    model = build_retrieval_model(cfg, len(tokenizer)).eval()
    cpu = torch.device("cpu")
    mc = evaluate_multiple_choice_model(model, tokenizer, cfg, captioned_clips / "mc.jsonl", cpu)
    with torch.no_grad():
        video = encode_videos(model, _video_batches(rows, cfg, 3), cpu)
        correct = 0
        for i, r in enumerate(rows):
            text = encode_texts(model, tokenizer, list(r.captions), cfg.text.max_length, cpu)
            logits = [float(model.match_logits(text.hidden[j : j + 1], text.mask[j : j + 1], video.tokens[i : i + 1])[0, 1])
                      for j in range(len(r.captions))]
            correct += int(np.argmax(logits) == r.label)
    assert mc["mc_accuracy"] == pytest.approx(correct / len(rows))
    bad = captioned_clips / "mc_bad.jsonl"
    bad.write_text(json.dumps({"id": "q", "path": "c0.mp4", "captions": ["one", "two"], "label": 2}) + "\n")
    with pytest.raises(ValueError, match="row 'q'"):
        evaluate_multiple_choice_model(model, tokenizer, cfg, bad, cpu)


def test_one_step_resume_and_bad_manifest(captioned_clips, tmp_path) -> None:
    """Two steps, resumed from the step-1 checkpoint: the same second step; a caption-less clip is named."""
    from umt_distill.data.vl import CaptionError
    from umt_distill.stages.retrieval import train
    from umt_distill.training.metrics import read_metrics

    run = tmp_path / "run"
    clips = captioned_clips / "clips.jsonl"
    cfg = load_recipe("finetune/tiny_ret", [f"corpus.source={clips}", f"train.output_dir={run}",
                                            "train.max_steps=2", "train.ckpt_every=1"])
    train(cfg)
    first = read_metrics(run / "metrics.jsonl")
    (run / "checkpoints" / "latest").write_text("step-00000001\n")
    train(cfg)
    again = read_metrics(run / "metrics.jsonl")
    assert [(m["step"], m["loss"], m["loss_vtm"]) for m in again] == [(m["step"], m["loss"], m["loss_vtm"]) for m in first]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "path": str(captioned_clips / "c0.mp4")}) + "\n")
    with pytest.raises(CaptionError, match="'x'"):
        train(load_recipe("finetune/tiny_ret", [f"corpus.source={bad}", f"train.output_dir={tmp_path / 'bad'}"]))


def test_retrieval_section_is_a_strict_recipe_section() -> None:
    from umt_distill.config import RecipeError
    from umt_distill.evaluation.retrieval import k_test_of

    cfg = load_recipe("finetune/tiny_ret", ["retrieval.k_test=4", "retrieval.mc_source=mc.jsonl"])
    assert k_test_of(cfg) == 4 and cfg.retrieval.mc_source == "mc.jsonl"
    assert k_test_of(load_recipe("finetune/b16_msrvtt_ret")) == 128
    with pytest.raises(RecipeError, match="k_test"):
        load_recipe("finetune/tiny_ret", ["retrieval.ktest=4"])
    with pytest.raises(RecipeError, match="retrieval.k_test"):
        load_recipe("finetune/tiny_ret", ["retrieval.k_test=0"])
