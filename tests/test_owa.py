"""Object-word alignment (vlp.objectives.owa): the soft target A* on a hand-built case, the top-k softmax, the
KL's two supports, word similarity (exact names, GloVe text files) and the objective on a small UNITER."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlp.model import UniterConfig, UniterModel
from vlp.objectives.owa import (
    ExactMatch,
    ObjectWordAlignment,
    WordVectors,
    alignment_kl,
    alignment_targets,
    iou,
    normalize_rows,
    semantic_similarities,
    topk_softmax,
    words_of,
)


def test_target_a_star_on_a_hand_built_case():
    # The annotated box of "red circle" and three detections: the same box (a square, blue), a box overlapping
    # half of it (a circle, red) and a disjoint one (a circle, green).
    annotated = np.array([[0, 0, 4, 4]])
    detected = np.array([[0, 0, 4, 4], [2, 0, 6, 4], [10, 10, 12, 12]])
    # IoU: 1; 8 / (16 + 16 - 8) = 1/3; 0
    assert iou(annotated, detected).tolist() == [[1.0, pytest.approx(1 / 3), 0.0]]
    classes, attributes = ["square", "circle", "circle"], ["blue", "red", "green"]
    class_sim, attr_sim = semantic_similarities([words_of("the red circle")], classes, attributes,
                                                ExactMatch())
    assert class_sim.tolist() == [[0.0, 1.0, 1.0]] and attr_sim.tolist() == [[0.0, 1.0, 0.0]]
    a_star = alignment_targets(annotated, detected, class_sim, attr_sim)
    # norm(PA) = [1, 1/3, 0] / (4/3) = [3/4, 1/4, 0]; SA = [0, 3/4 + 1/4, 3/4] -> / 7/4 = [0, 4/7, 3/7]
    expected = np.array([(3 / 4 + 0) / 2, (1 / 4 + 4 / 7) / 2, (0 + 3 / 7) / 2])
    np.testing.assert_allclose(a_star[0], expected, rtol=1e-12)
    assert a_star.sum() == pytest.approx(1.0)
    # norm = max: PA / 1 = [1, 1/3, 0]; SA / 1 = [0, 1, 3/4]; averaged, then normalised over the regions
    by_max = alignment_targets(annotated, detected, class_sim, attr_sim, norm="max")
    raw = np.array([1 / 2, (1 / 3 + 1) / 2, 3 / 8])
    np.testing.assert_allclose(by_max[0], raw / raw.sum(), rtol=1e-12)


def test_norm_clips_negative_cosines_and_falls_back_to_uniform():
    rows = np.array([[-0.5, 0.5, 1.5], [0.0, 0.0, 0.0], [-1.0, -2.0, -0.1]])
    out = normalize_rows(rows)
    np.testing.assert_allclose(out[0], [0, 0.25, 0.75])
    np.testing.assert_allclose(out[1], [1 / 3] * 3)  # no overlap anywhere: no preference
    np.testing.assert_allclose(out[2], [1 / 3] * 3)
    np.testing.assert_allclose(normalize_rows(rows, "max")[0], [0, 1 / 3, 1])
    with pytest.raises(ValueError, match="norm"):
        normalize_rows(rows, "softmax")
    # an annotated box nothing overlaps leaves the semantic criterion to decide, at half weight
    a_star = alignment_targets(np.array([[0, 0, 1, 1]]), np.array([[5, 5, 6, 6], [7, 7, 8, 8]]),
                               np.array([[1.0, 0.0]]), np.array([[0.0, 0.0]]))
    np.testing.assert_allclose(a_star[0], [(0.5 + 1) / 2, (0.5 + 0) / 2])


def test_topk_softmax_keeps_k_regions_and_never_a_padding_one():
    scores = torch.tensor([[1.0, 3.0, 2.0, 0.0, 5.0], [0.5, 0.1, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True, True, False], [True, True, False, False, False]])
    probs = topk_softmax(scores, 3, mask)
    top = torch.softmax(torch.tensor([3.0, 2.0, 1.0]), dim=0)
    assert torch.allclose(probs[0], torch.tensor([top[2], top[0], top[1], 0.0, 0.0]))  # padding 5.0 left out
    # fewer real regions than k: all of them
    assert torch.allclose(probs[1], torch.cat([torch.softmax(torch.tensor([0.5, 0.1]), 0), torch.zeros(3)]))
    assert torch.allclose(probs.sum(-1), torch.ones(2))
    assert (topk_softmax(scores, 1) == torch.tensor([[0, 0, 0, 0, 1.0], [0, 0, 1.0, 0, 0]])).all()


def test_kl_support_full_and_topk():
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    target = torch.tensor([[0.5, 0.0, 0.0, 0.5]])  # half its mass on the region ranked last
    # The paper's literal KL(A* || top-k softmax) is infinite here: A is 0 on the target's fourth region.
    literal = topk_softmax(scores, 3, mask)
    assert literal[0, 3] == 0
    assert (target * (target / literal).log()).nan_to_num(posinf=math.inf).sum() == math.inf
    # full (default): KL against the softmax over every region, finite, and it pulls the last region in
    kl, kept = alignment_kl(scores, target, mask, k=3, support="full")
    log_p = torch.log_softmax(scores, dim=-1)[0]
    expected = 0.5 * (math.log(0.5) - log_p[0]) + 0.5 * (math.log(0.5) - log_p[3])
    assert kept.tolist() == [True] and kl.item() == pytest.approx(expected.item(), rel=1e-6)
    leaf = scores.clone().requires_grad_(True)
    alignment_kl(leaf, target, mask, 3, "full")[0].sum().backward()
    assert leaf.grad[0, 3] < 0  # gradient descent raises the target region ranked outside the top-k
    # topk: the target restricted to A's top-3 and renormalised -> all of it on region 0
    kl, kept = alignment_kl(scores, target, mask, k=3, support="topk")
    top3 = torch.log_softmax(scores[0, :3], dim=-1)
    assert kept.tolist() == [True] and kl.item() == pytest.approx(-top3[0].item(), rel=1e-6)
    # a target with no mass on the top-k has no defined loss: left out (and no NaN anywhere)
    far = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    leaf = scores.clone().requires_grad_(True)
    kl, kept = alignment_kl(leaf, far, mask, k=3, support="topk")
    assert kept.tolist() == [False] and torch.isfinite(kl).all()
    (kl * kept).sum().backward()
    assert torch.isfinite(leaf.grad).all()
    # padding regions carry neither target nor probability
    padded = torch.tensor([[True, True, False, False]])
    kl, _ = alignment_kl(scores, torch.tensor([[1.0, 0.0, 0.0, 0.0]]), padded, 3, "full")
    assert kl.item() == pytest.approx(-torch.log_softmax(scores[0, :2], 0)[0].item(), rel=1e-6)


def test_exact_match_and_glove_vectors(tmp_path):
    exact = ExactMatch()
    words = words_of("Are there two red circles?")
    assert words == ["are", "there", "two", "red", "circles"]
    assert exact(words, "circle") == 1.0 and exact(words, "red") == 1.0 and exact(words, "square") == 0.0
    assert exact(words_of("a polka-dot star"), "polka-dot") == 1.0 and exact(words, "red circle") == 1.0
    glove = tmp_path / "glove.test.3d.txt"
    glove.write_text("circle 1 0 0\nring 0.9 0.1 0\nred 0 1 0\nsquare 0 0 1\nthe 0.1 0.1 0.1\n")
    vectors = WordVectors.from_glove(glove)
    assert vectors(["circle"], "circle") == pytest.approx(1.0)
    assert vectors(["ring"], "circle") == pytest.approx(0.9 / math.sqrt(0.82))
    assert vectors(["circle"], "square") == pytest.approx(0.0)
    assert vectors(["red", "circle"], "circle") == pytest.approx(1 / math.sqrt(2))  # the group's mean vector
    assert vectors(["hexagon"], "circle") == 0.0  # out of vocabulary
    only = WordVectors.from_glove(glove, vocabulary={"circle", "red"})
    assert sorted(only.vectors) == ["circle", "red"]
    bad = tmp_path / "bad.txt"
    bad.write_text("circle 1 0 0\nred 0 1\n")
    with pytest.raises(ValueError, match="line 2: 2 numbers, the file's first vector has 3"):
        WordVectors.from_glove(bad)


def _model() -> UniterModel:
    torch.manual_seed(0)
    return UniterModel(UniterConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, img_dim=8))


def _batch(txt_lens, img_lens):
    b, lt, n = len(txt_lens), max(txt_lens), max(img_lens)
    torch.manual_seed(1)
    txt_mask = torch.arange(lt) < torch.tensor(txt_lens)[:, None]
    img_mask = torch.arange(n) < torch.tensor(img_lens)[:, None]
    targets = torch.zeros(b, lt, n)
    for i in range(b):  # tokens 1 and 2 point at region i % n_i (a pointer's tokens share its row)
        row = torch.full((img_lens[i],), 0.1 / max(img_lens[i] - 1, 1))
        row[i % img_lens[i]] = 0.9
        targets[i, 1:3, : img_lens[i]] = row / row.sum()
    return {"input_ids": torch.randint(5, 30, (b, lt)) * txt_mask,
            "position_ids": torch.arange(lt).repeat(b, 1),
            "txt_mask": txt_mask, "img_feat": torch.randn(b, n, 8), "img_pos_feat": torch.rand(b, n, 7),
            "img_mask": img_mask, "img_keys": [f"vg:{i}" for i in range(b)], "align_targets": targets}


@pytest.mark.parametrize("support", ["full", "topk"])
def test_objective_counts_annotated_tokens_and_learns(support):
    model = _model()
    objective = ObjectWordAlignment(model, k=3, support=support)
    batch = _batch([5, 4, 6], [4, 2, 5])
    out = objective(model, batch)
    assert out["owa_count"].item() == 6 and torch.isfinite(out["owa_loss"])
    optimizer = torch.optim.Adam([*model.parameters(), *objective.parameters()], lr=5e-3)
    first = None
    for _ in range(25):
        out = objective(model, batch)
        first = first if first is not None else out["owa_loss"].item()
        optimizer.zero_grad()
        out["owa_loss"].backward()
        optimizer.step()
    assert out["owa_loss"].item() < 0.5 * first
    assert out["owa_correct"].item() == 6 and out["owa_topk_correct"].item() == 6
    with pytest.raises(ValueError, match="support"):
        ObjectWordAlignment(model, support="epsilon")
