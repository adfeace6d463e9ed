"""QA evaluation: answer ranking against the plain reference, exact match per type, UMT's blended
multiple-choice score on a hand-computed example, and the annotation readers' errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from umt_distill.config import load_recipe

V = 50


@pytest.fixture(scope="module")
def decoder_and_answers():
    from umt_distill.stages.qa import build_qa_model

    cfg = load_recipe("qa/tiny", ["text.tokenizer_vocab_size=50"])
    torch.manual_seed(4)
    model = build_qa_model(cfg, V).eval()
    g = torch.Generator().manual_seed(7)
    A, La = 9, 5
    ids = torch.randint(5, V, (A, La), generator=g)
    ids[:, 0] = 2  # [CLS]
    mask = torch.ones(A, La, dtype=torch.long)
    for a, length in enumerate([3, 4, 5, 3, 4, 5, 2, 3, 5]):  # answers of different lengths, padded
        mask[a, length:] = 0
        ids[a, length:] = 0
    ids[1, 1] = ids[0, 1]  # two answers share a first token (ties in step 1 are broken by step 2)
    states = torch.randn(4, 6, 64, generator=g)
    qmask = torch.ones(4, 6, dtype=torch.long)
    qmask[2, 4:] = 0
    return model.text_decoder, states, qmask, ids, mask


def test_ranking_with_k_equal_to_the_list_is_the_full_likelihood_argmax(decoder_and_answers) -> None:
    from umt_distill.evaluation.qa import rank_answers, rank_answers_reference

    dec, states, qmask, ids, mask = decoder_and_answers
    ref = rank_answers_reference(dec, states, qmask, ids, mask)  # [Q, A], one pair at a time
    top, ll = rank_answers(dec, states, qmask, ids, mask, k=len(ids))
    assert top.shape == (4, 9)
    assert top[:, 0].tolist() == ref.argmax(1).tolist()
    torch.testing.assert_close(ll, ref.gather(1, top), atol=1e-5, rtol=1e-5)  # every answer scored, best first
    assert bool((ll[:, :-1] >= ll[:, 1:]).all())
    assert sorted(top[0].tolist()) == list(range(9))
    # Past the list size, k is the list size.
    assert torch.equal(rank_answers(dec, states, qmask, ids, mask, k=500)[0], top)


def test_small_k_rescores_the_first_token_candidates_only(decoder_and_answers) -> None:
    from umt_distill.evaluation.qa import (
        first_token_probs,
        rank_answers,
        rank_answers_reference,
    )

    dec, states, qmask, ids, mask = decoder_and_answers
    k = 3
    first = first_token_probs(dec, states, qmask, ids)  # [Q, A]
    assert first.shape == (4, 9) and bool((first > 0).all())
    ref = rank_answers_reference(dec, states, qmask, ids, mask)
    top, _ = rank_answers(dec, states, qmask, ids, mask, k=k)
    for q in range(4):
        candidates = set(first[q].topk(k).indices.tolist())
        assert set(top[q].tolist()) == candidates
        best = max(candidates, key=lambda a: float(ref[q, a]))
        assert int(top[q, 0]) == best
    # The first-token probability is the first factor of the full likelihood.
    start = ids[:, :2]
    two = torch.stack([dec.token_log_likelihood(start, torch.ones_like(start), states[q:q + 1].expand(9, -1, -1),
                                                qmask[q:q + 1].expand(9, -1)) for q in range(4)])
    torch.testing.assert_close(two, first.log(), atol=1e-5, rtol=1e-5)


def test_exact_match_and_per_type_summary() -> None:
    from umt_distill.data.qa import QARow
    from umt_distill.evaluation.qa import accuracy_summary, exact_match

    rows = [QARow("a", "v", "/v.mp4", "q", {"red": 2, "blue": 1}, "colour"),
            QARow("b", "v", "/v.mp4", "q", {"red": 1, "blue": 1}, "colour"),  # a tie: either counts
            QARow("c", "v", "/v.mp4", "q", {"left": 1}, "motion"),
            QARow("d", "v", "/v.mp4", "q", {"up": 1}, None)]
    correct = exact_match(["blue", "blue", "left", "down"], rows)
    assert correct == [False, True, True, False]
    out = accuracy_summary(correct, [r.type for r in rows])
    assert out["accuracy"] == 50.0 and out["num_questions"] == 4
    assert out["per_type"] == {"(none)": {"accuracy": 0.0, "num_questions": 1},
                               "colour": {"accuracy": 50.0, "num_questions": 2},
                               "motion": {"accuracy": 100.0, "num_questions": 1}}
    assert "per_type" not in accuracy_summary([True], [None])


def test_blended_multiple_choice_score_by_hand() -> None:
    """Matching prefers candidate 0 (P(match) 3/4 vs 2/3); the contrastive softmax strongly prefers 1:
    UMT's blend picks 1, the matching logit alone 0."""
    from umt_distill.evaluation.retrieval import (
        blended_mc_scores,
        multiple_choice_accuracy,
    )

    itm = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(2.0)]]])  # [1, 2, 2]
    itc = torch.tensor([[0.0, 0.2]])  # cosine, frame-averaged
    scores = blended_mc_scores(itm, itc, temp=0.05)
    soft1 = 1 / (1 + math.exp(-4.0))  # softmax([0, 0.2 / 0.05])[1]
    want = [0.7 * 0.75 + 0.3 * (1 - soft1), 0.7 * 2 / 3 + 0.3 * soft1]  # 0.530396, 0.761271
    assert scores[0].tolist() == pytest.approx(want, abs=1e-6)
    assert want == pytest.approx([0.530396, 0.761271], abs=1e-6)
    answer = torch.tensor([1])
    assert multiple_choice_accuracy(scores, answer) == 1.0
    assert multiple_choice_accuracy(itm[..., 1], answer) == 0.0
    assert blended_mc_scores(itm, itc, 0.05, itm_weight=1.0)[0].tolist() == pytest.approx([0.75, 2 / 3])


def test_annotation_and_answer_list_errors_name_the_line(tmp_path) -> None:
    from umt_distill.data.qa import QAFormatError, read_answer_list, read_qa

    good = {"id": "1", "video": "v.mp4", "question": "what colour?", "answers": {"Red!": 2, "blue": 1}, "type": "c"}
    f = tmp_path / "qa.jsonl"
    f.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "id": "2", "answers": ["left", "left", "up"]}) + "\n")
    rows = read_qa(f)
    assert rows[0].answers == {"red": 2, "blue": 1} and rows[1].answers == {"left": 2, "up": 1}
    assert rows[0].path == str((tmp_path / "v.mp4").resolve()) and rows[0].video_id == "v.mp4"
    cases = [({**good, "answers": {"red": 0}}, "qa.jsonl:1: answer 'red' needs a count >= 1"),
             ({**good, "question": ""}, "qa.jsonl:1: 'question' must be a non-empty string"),
             ({k: v for k, v in good.items() if k != "answers"}, "qa.jsonl:1: no 'answers'"),
             ({**good, "start": -1}, "qa.jsonl:1: 'start' must be seconds")]
    for record, message in cases:
        f.write_text(json.dumps(record) + "\n")
        with pytest.raises(QAFormatError, match=message):
            read_qa(f)
    f.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(QAFormatError, match="qa.jsonl:2: duplicate id '1' \\(first on line 1\\)"):
        read_qa(f)
    lst = tmp_path / "answers.json"
    lst.write_text(json.dumps({"b": 1, "a": 0}))
    assert read_answer_list(lst) == ["a", "b"]
    lst.write_text(json.dumps(["Red", "red."]))
    with pytest.raises(QAFormatError, match="answer 'red' appears 2 times"):
        read_answer_list(lst)
    txt = tmp_path / "answers.txt"
    txt.write_text("left\n\nright\n")
    assert read_answer_list(txt) == ["left", "right"]
