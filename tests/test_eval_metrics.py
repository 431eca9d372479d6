"""Evaluation library: retrieval recall@K / Meta-Sum, chunked and shortlisted scoring, VQA, ISDa."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vlp.eval import retrieval
from vlp.eval.isda import box_iou, detected_regions, isda, isda_summary
from vlp.eval.retrieval import recall_at_k, score_all_pairs, shortlist_rerank
from vlp.eval.vqa import (
    answer_score,
    build_answer_vocab,
    mean_vqa_accuracy,
    normalize_answer,
    soft_targets,
    vqa_accuracy,
)

# ../shared/fixtures beside the checkout (a git worktree sits one level deeper: the nearest one up).
FIXTURES = next(p / "shared" / "fixtures" / "formats" for p in Path(__file__).resolve().parents
                if (p / "shared" / "fixtures").is_dir())

# ---------------------------------------------------------------- retrieval

# 3 images x 5 texts; texts 0,1 describe image 0, texts 2,3 image 1, text 4 image 2.
SCORES = torch.tensor(
    [
        [0.9, 0.1, 0.5, 0.2, 0.3],
        [0.8, 0.7, 0.6, 0.1, 0.4],
        [0.2, 0.3, 0.6, 0.9, 0.5],
    ]
)
TXT2IMG = torch.tensor([0, 0, 1, 1, 2])


def test_recall_at_k_hand_case():
    # text -> image, wrong images scoring >= the true one:
    #   t0: none -> rank 0;  t1: 0.7, 0.3 -> 2;  t2: img2 ties at 0.6 -> 1 (a tie is a miss);
    #   t3: 0.2, 0.9 -> 2;  t4: none -> 0.      R@1 = 2/5, R@2 = 3/5, R@3 = 5/5
    # image -> text, wrong texts scoring >= the image's best true text:
    #   img0 (best 0.9): none -> 0;  img1 (best 0.6): 0.8, 0.7 -> 2;  img2 (0.5): 0.6, 0.9 -> 2
    #   R@1 = 1/3, R@2 = 1/3, R@3 = 3/3
    out = recall_at_k(SCORES, TXT2IMG, ks=(1, 2, 3))
    assert out["ir_r1"] == pytest.approx(0.4)
    assert out["ir_r2"] == pytest.approx(0.6)
    assert out["ir_r3"] == pytest.approx(1.0)
    assert out["tr_r1"] == pytest.approx(1 / 3)
    assert out["tr_r2"] == pytest.approx(1 / 3)
    assert out["tr_r3"] == pytest.approx(1.0)
    assert out["meta_sum"] == pytest.approx(0.4 + 0.6 + 1.0 + 1 / 3 + 1 / 3 + 1.0)
    assert out["r_mean"] == pytest.approx(out["meta_sum"] / 6)


def test_recall_default_ks_and_tie_handling():
    out = recall_at_k(SCORES, TXT2IMG)
    assert set(out) == {"ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10", "r_mean", "meta_sum"}
    assert out["ir_r5"] == out["tr_r10"] == 1.0  # only 3 images / 2-4 wrong texts: every rank < 5
    # A constant scorer hits nothing at 1: every true item ties with the wrong ones.
    flat = recall_at_k(torch.zeros(3, 5), TXT2IMG, ks=(1,))
    assert flat["ir_r1"] == 0.0 and flat["tr_r1"] == 0.0
    # The order of the candidates does not change the result.
    perm = torch.tensor([2, 0, 1])
    inverse = torch.argsort(perm)
    permuted = recall_at_k(SCORES[perm], inverse[TXT2IMG], ks=(1, 2, 3))
    assert permuted == pytest.approx(recall_at_k(SCORES, TXT2IMG, ks=(1, 2, 3)))


def test_recall_bad_input():
    with pytest.raises(ValueError, match=r"txt2img\[4\]=3 is not an image index in \[0, 3\)"):
        recall_at_k(SCORES, torch.tensor([0, 0, 1, 1, 3]))
    with pytest.raises(ValueError, match="int64 vector of length n_txt=5"):
        recall_at_k(SCORES, TXT2IMG[:4])
    nan = SCORES.clone()
    nan[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"scores\[1, 2\] is NaN"):
        recall_at_k(nan, TXT2IMG)


class _Lookup:
    """A cross-encoder stand-in: scores are read from a fixed matrix; every call is recorded."""

    def __init__(self, matrix: torch.Tensor):
        self.matrix = matrix
        self.calls: list[tuple[list[int], list[int]]] = []

    def __call__(self, img_idx: torch.Tensor, txt_idx: torch.Tensor) -> torch.Tensor:
        self.calls.append((img_idx.tolist(), txt_idx.tolist()))
        return self.matrix[img_idx][:, txt_idx]


def test_chunked_scoring_equals_full_matrix():
    full = torch.randn(7, 23, generator=torch.Generator().manual_seed(0))
    txt2img = torch.arange(23) % 7
    fn = _Lookup(full)
    chunked = score_all_pairs(fn, 7, 23, img_chunk=3, txt_chunk=5)
    assert torch.equal(chunked, full)
    assert len(fn.calls) == 3 * 5  # ceil(7/3) x ceil(23/5) blocks
    assert max(len(i) for i, _ in fn.calls) == 3 and max(len(t) for _, t in fn.calls) == 5
    assert recall_at_k(chunked, txt2img) == recall_at_k(full, txt2img)


def test_shortlist_rerank_equals_full_scoring_when_k_covers_everything():
    full = torch.randn(6, 13, generator=torch.Generator().manual_seed(1))
    sim = torch.randn(6, 13, generator=torch.Generator().manual_seed(2))
    reranked = shortlist_rerank(sim, _Lookup(full), k=13, chunk=4)
    assert torch.equal(reranked, full)
    txt2img = torch.arange(13) % 6
    assert recall_at_k(reranked, txt2img) == recall_at_k(full, txt2img)


def test_shortlist_keeps_top_k_of_both_directions():
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.3],
            [0.1, 0.8, 0.2, 0.0],
            [0.5, 0.4, 0.3, 0.2],
        ]
    )
    cross = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    fn = _Lookup(cross)
    out = shortlist_rerank(sim, fn, k=1, chunk=8)
    # top-1 image per text: t0->i0, t1->i1, t2->i2, t3->i0; top-1 text per image: i0->t0, i1->t1, i2->t0
    expected = torch.tensor(
        [
            [True, False, False, True],
            [False, True, False, False],
            [True, False, True, False],
        ]
    )
    assert torch.equal(torch.isfinite(out), expected)
    assert torch.equal(out[expected], cross[expected])
    assert sum(len(i) for i, _ in fn.calls) == int(expected.sum())  # every shortlisted pair scored once


def test_internal_slicing_does_not_change_results(monkeypatch):
    sim = torch.randn(9, 14, generator=torch.Generator().manual_seed(3))
    full = torch.randn(9, 14, generator=torch.Generator().manual_seed(4))
    txt2img = torch.arange(14) % 9
    whole = shortlist_rerank(sim, _Lookup(full), k=3), recall_at_k(full, txt2img)
    monkeypatch.setattr(retrieval, "_SORT_SLICE", 4)
    monkeypatch.setattr(retrieval, "_RECALL_ROW_CHUNK", 2)
    sliced = shortlist_rerank(sim, _Lookup(full), k=3), recall_at_k(full, txt2img)
    assert torch.equal(whole[0], sliced[0])
    assert whole[1] == sliced[1]


def test_score_fn_with_wrong_shape_is_reported():
    with pytest.raises(
        ValueError, match=r"score_fn returned \(3,\) for images 0.. x texts 0.., expected shape \(3, 2\)"
    ):
        score_all_pairs(lambda i, t: torch.zeros(len(i)), 3, 2, img_chunk=4, txt_chunk=4)


# ---------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two", "2"),  # number words -> digits
        ("none", "0"),
        ("  An Apple  ", "apple"),  # articles dropped, lowercased
        ("the dog.", "dog"),  # period not before a digit is deleted
        ("3.5", "3.5"),  # ... but a decimal point stays
        ("1,000", "1000"),  # digit-comma-digit: punctuation deleted, not spaced
        ("hello, world", "hello world"),  # punctuation touching a space is deleted
        ("red,blue", "red blue"),  # otherwise it becomes a space
        ("t-shirt", "t shirt"),
        ("yes!", "yes"),
        ("dont", "don't"),  # contractions restored
        ("isnt it?", "isn't it"),
        ("a man's hat", "man's hat"),  # the apostrophe is not punctuation
        ("black & white", "black & white"),  # '&' is not in the official list
    ],
)
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_vqa_accuracy_leave_one_out():
    # VQA v2 question 458752001: pitcher x 9, catcher x 1 (see the formats fixture)
    answers = ["pitcher", "catcher"] + ["pitcher"] * 8
    assert vqa_accuracy("pitcher", answers) == 1.0
    # catcher: leaving it out leaves 0 matches (0), the 9 other subsets have 1 match (1/3) -> 9/3/10
    assert vqa_accuracy("Catcher.", answers) == pytest.approx(0.3)
    assert vqa_accuracy("umpire", answers) == 0.0
    two = ["dog", "dog"] + ["cat"] * 8  # (2 * 1/3 + 8 * 2/3) / 10
    assert vqa_accuracy("a dog", two) == pytest.approx(0.6)
    three = ["dog"] * 3 + ["cat"] * 7  # (3 * 2/3 + 7 * 1) / 10
    assert vqa_accuracy("dog", three) == pytest.approx(0.9)
    # Human answers are only punctuation-processed, and only when they disagree.
    assert vqa_accuracy("2", ["two"] * 10) == 0.0
    assert vqa_accuracy("dog", ["dog."] * 10) == 0.0
    assert vqa_accuracy("dog", ["dog."] * 9 + ["cat"]) == pytest.approx(1.0)


def test_vqa_on_the_format_fixture():
    data = json.loads((FIXTURES / "vqa_v2" / "v2_mscoco_train2014_annotations.json").read_text())
    questions = [
        (a["question_id"], [x["answer"] for x in a["answers"]], a["answer_type"]) for a in data["annotations"]
    ]
    preds = {458752000: "mesh", 458752001: "pitcher", 458752002: "orange", 458752003: "no"}
    out = mean_vqa_accuracy(preds, questions)
    # mesh 0.3 (1 of 10), pitcher 1, orange 1 (9 of 10), no 0.3 (1 of 10)
    assert out["overall"] == pytest.approx((0.3 + 1 + 1 + 0.3) / 4)
    assert out["answer_type/other"] == pytest.approx((0.3 + 1 + 1) / 3)
    assert out["answer_type/yes/no"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="no prediction for question_id 458752003"):
        mean_vqa_accuracy({k: v for k, v in preds.items() if k != 458752003}, questions)


def test_answer_vocab_and_soft_targets():
    train = ["Two"] * 3 + ["2"] * 2 + ["yes"] * 5 + ["no"] * 4 + ["red"] * 2 + ["blue", "a dog", "dog"]
    vocab = build_answer_vocab(train, min_count=2)
    # normalized counts: 2 -> 5, yes -> 5, no -> 4, dog -> 2, red -> 2, blue -> 1 (dropped)
    assert vocab == {"2": 0, "yes": 1, "no": 2, "dog": 3, "red": 4}

    humans = ["two", "2", "2", "Dog", "dog", "the dog", "dog", "cat", "yes", "maybe"]
    labels, scores = soft_targets(humans, vocab)
    # 2 x 3 -> 0.9, dog x 4 -> 1, yes x 1 -> 0.3 (UNITER / MCAN); cat and maybe are not in the vocabulary
    assert labels == [0, 1, 3]
    assert scores == pytest.approx([0.9, 0.3, 1.0])
    # min(n / 3, 1): 2 x 3 -> 1, yes x 1 -> 1/3
    assert soft_targets(humans, vocab, "linear") == (labels, pytest.approx([1.0, 1 / 3, 1.0]))
    assert [answer_score(n) for n in range(6)] == pytest.approx([0, 0.3, 0.6, 0.9, 1, 1])  # UNITER / MCAN
    assert [answer_score(n, "linear") for n in range(5)] == pytest.approx([0, 1 / 3, 2 / 3, 1, 1])


# ---------------------------------------------------------------- ISDa


def _isda_example(lt: int = 5, n: int = 3) -> torch.Tensor:
    """One head over [CLS, a, b, c, SEP (, text padding)] + regions [r0, r1, r2 (, padded regions)].

    Every real row puts half its mass on each modality, so a renormalized intra-modal block row is twice
    the row's entries in that block. sigma(S_LL) rows over [CLS, a, b, c, SEP]:
      a [0.1, 0.3, 0.2, 0.2, 0.2], b [0.2, 0.2, 0.4, 0.1, 0.1], c [0.1, 0.1, 0.2, 0.4, 0.2];
    sigma(S_VV) rows over [r0, r1, r2]: r0 [0.5, 0.25, 0.25], r1 [0.2, 0.4, 0.4], r2 [0.1, 0.3, 0.6].
    Padded keys get no mass (as the model gives them)."""
    attn = torch.zeros(lt + n, lt + n, dtype=torch.float64)
    text = {0: [0.2] * 5, 1: [0.1, 0.3, 0.2, 0.2, 0.2], 2: [0.2, 0.2, 0.4, 0.1, 0.1],
            3: [0.1, 0.1, 0.2, 0.4, 0.2], 4: [0.2] * 5}
    image = {0: [0.5, 0.25, 0.25], 1: [0.2, 0.4, 0.4], 2: [0.1, 0.3, 0.6]}
    for q, row in text.items():
        attn[q, :5] = 0.5 * torch.tensor(row, dtype=torch.float64)
        attn[q, lt : lt + 3] = 0.5 / 3
    for r, row in image.items():
        attn[lt + r, :5] = 0.1
        attn[lt + r, lt : lt + 3] = 0.5 * torch.tensor(row, dtype=torch.float64)
    return attn


# Objects: "a" with r0, "b c" with r1 + r2 (an object of two tokens and two regions), "SEP" with no region.
OBJECTS = [([1], [0]), ([2, 3], [1, 2]), ([4], [])]
# Cps (Eq. 7), column sum and row average of each patch:
#   S^(a)_LL = [[0.3, 0.2 + 0.2], [(0.2 + 0.1) / 2, (0.4 + 0.1 + 0.2 + 0.4) / 2]] = [[0.3, 0.4], [0.15, 0.55]]
#   S^(a)_VV = [[0.5, 0.25 + 0.25], [(0.2 + 0.1) / 2, (0.8 + 0.9) / 2]] = [[0.5, 0.5], [0.15, 0.85]]
# rows normalized for the KL: L [3/7, 4/7], [3/14, 11/14]; V [1/2, 1/2], [3/20, 17/20]
#   row 0: (3/7 - 1/2) ln(6/7) + (4/7 - 1/2) ln(8/7) = (1/14) ln(4/3)
#   row 1: (9/140) ln((3/14) / (3/20)) - (9/140) ln((11/14) / (17/20)) = (9/140) ln(17/11)
# m-KL (Eq. 8) sums the rows.
ISDA_BY_HAND = math.log(4 / 3) / 14 + (9 / 140) * math.log(17 / 11)


def test_isda_hand_case_from_the_papers_equations():
    attn = _isda_example()
    assert isda(attn, 5, 3, OBJECTS) == pytest.approx(ISDA_BY_HAND, abs=1e-12)
    # Heads are averaged: two identical heads give the same value.
    assert isda(torch.stack([attn, attn]), 5, 3, OBJECTS) == pytest.approx(ISDA_BY_HAND, abs=1e-12)
    # Padding at the end of either block carries no mass and changes nothing.
    padded = _isda_example(lt=7, n=4)
    assert isda(padded, 7, 4, OBJECTS) == pytest.approx(ISDA_BY_HAND, abs=1e-12)
    # One usable object carries no relation: no ISDa.
    assert isda(attn, 5, 3, [([1], [0]), ([2], [])]) is None


def test_isda_summary_and_detected_region_matching():
    assert isda_summary([0.5, None, 1.5]) == {"isda": 1.0, "isda_pairs": 2.0, "isda_skipped": 1.0}
    assert math.isnan(isda_summary([None])["isda"])
    iou = box_iou(
        torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[5.0, 0.0, 15.0, 10.0], [20, 20, 30, 30]])
    )
    assert iou[0].tolist() == pytest.approx([50 / 150, 0.0])
    regions = torch.tensor([[0, 0, 10, 8], [20, 20, 40, 30], [0, 0, 10, 4]], dtype=torch.float64)
    # IoU with r0 = 80/100, with r2 = 40/100; with r1 = 200/400 = 0.5 exactly: matched (>=)
    assert detected_regions(regions, [[0, 0, 10, 10], [20, 20, 40, 40]]) == [0, 1]
    assert detected_regions(regions, [[20, 20, 40, 40]], iou_threshold=0.6) == []
    assert detected_regions(regions, []) == []


def test_isda_bad_input():
    attn = _isda_example()
    with pytest.raises(ValueError, match=r"object 1 token position 5 is outside the text block \[0, 5\)"):
        isda(attn, 5, 3, [([1], [0]), ([5], [1])])
    with pytest.raises(ValueError, match="object 0 region 3 is outside the 3 regions"):
        isda(attn, 5, 3, [([1], [3]), ([2], [1])])
    with pytest.raises(ValueError, match="text block 5 \\+ 4 regions exceed attention size 8"):
        isda(attn, 5, 4, OBJECTS)
