"""IAIS regularizer on a hand-built attention example: 2 words x 2 regions, numbers worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from vlp.objectives.iais import IAISConfig, IAISLoss, schedule_weight, symmetric_matrix_kl

# Last-layer attention of one matched pair, one head, sequence [w0, w1, v0, v1]; rows sum to 1.
# Renormalized blocks (row / row sum over the block's keys):
#   S_LL = [[2/3, 1/3], [1/4, 3/4]]      S_LV = [[1/4, 3/4], [2/3, 1/3]]
#   S_VL = [[7/12, 5/12], [1/4, 3/4]]    S_VV = [[1/2, 1/2], [1/5, 4/5]]
ATTN = [
    [0.40, 0.20, 0.10, 0.30],
    [0.10, 0.30, 0.40, 0.20],
    [0.35, 0.25, 0.20, 0.20],
    [0.10, 0.30, 0.12, 0.48],
]

# singular, text anchor: argmax S_LV maps w0 -> v1, w1 -> v0, so the mirror is S_VV read at
# [m(i), m(j)] = [[S_VV11, S_VV10], [S_VV01, S_VV00]] = [[4/5, 1/5], [1/2, 1/2]].
#   row 0: (2/3 - 4/5) ln((2/3)/(4/5)) + (1/3 - 1/5) ln((1/3)/(1/5)) = (2/15) ln 2
#   row 1: (1/4 - 1/2) ln((1/4)/(1/2)) + (3/4 - 1/2) ln((3/4)/(1/2)) = (1/4) ln 3
SINGULAR_TEXT = ((2 / 15) * math.log(2) + 0.25 * math.log(3)) / 2
# singular, image anchor: argmax S_VL maps v0 -> w0, v1 -> w1, so the mirror is S_LL itself.
#   row 0: [1/2, 1/2] vs [2/3, 1/3] -> (1/6) ln 2;  row 1: [1/5, 4/5] vs [1/4, 3/4] -> (1/20) ln(4/3)
SINGULAR_IMAGE = (math.log(2) / 6 + 0.05 * math.log(4 / 3)) / 2
# distributed, text anchor: S_LV @ S_VL = [[1/3, 2/3], [17/36, 19/36]]
#   row 0: [2/3, 1/3] vs [1/3, 2/3] -> (2/3) ln 2;  row 1: [9/36, 27/36] vs [17/36, 19/36] -> (2/9) ln(51/19)
DISTRIBUTED_TEXT = ((2 / 3) * math.log(2) + (2 / 9) * math.log(51 / 19)) / 2
# distributed, image anchor: S_VL @ S_LV = [[61/144, 83/144], [9/16, 7/16]]
#   row 0: [72/144, 72/144] vs [61/144, 83/144] -> (11/144) ln(83/61)
#   row 1: [1/5, 4/5] vs [9/16, 7/16] -> (29/80) ln(36/7)
DISTRIBUTED_IMAGE = ((11 / 144) * math.log(83 / 61) + (29 / 80) * math.log(36 / 7)) / 2


def _all_real():
    """txt_mask, img_mask, positives of one positive pair with 2 words and 2 regions, no padding."""
    return (
        torch.ones(1, 2, dtype=torch.bool),
        torch.ones(1, 2, dtype=torch.bool),
        torch.ones(1, dtype=torch.bool),
    )


def _single(attn=ATTN):
    return torch.tensor(attn, dtype=torch.float64)[None, None], *_all_real()  # attn [B=1, H=1, 4, 4]


def _loss(variant, anchors=("text", "image")):
    return IAISLoss(IAISConfig(variant=variant, anchors=anchors, drop_cls_sep=False))


@pytest.mark.parametrize(
    ("variant", "text", "image"),
    [("singular", SINGULAR_TEXT, SINGULAR_IMAGE), ("distributed", DISTRIBUTED_TEXT, DISTRIBUTED_IMAGE)],
)
def test_hand_computed_values(variant, text, image):
    out = _loss(variant)(*_single())
    assert out["iais_kl_text"].item() == pytest.approx(text, abs=1e-9)
    assert out["iais_kl_image"].item() == pytest.approx(image, abs=1e-9)
    assert out["iais_loss"].item() == pytest.approx(text + image, abs=1e-9)

    only_text = _loss(variant, anchors=("text",))(*_single())
    assert only_text["iais_loss"].item() == pytest.approx(text, abs=1e-9)
    assert "iais_kl_image" not in only_text
    only_image = _loss(variant, anchors=("image",))(*_single())
    assert only_image["iais_loss"].item() == pytest.approx(image, abs=1e-9)


def test_singular_mirror_renormalizes_when_words_share_a_region():
    # Both words look most at v0 (S_LV rows [3/4, 1/4] and [2/3, 1/3]): the mirror is S_VV00 everywhere,
    # renormalized to [[1/2, 1/2], [1/2, 1/2]].
    attn = [row[:] for row in ATTN]
    attn[0] = [0.40, 0.20, 0.30, 0.10]
    out = _loss("singular", anchors=("text",))(*_single(attn))
    # row 0: [2/3, 1/3] vs [1/2, 1/2] -> (1/6) ln 2;  row 1: [1/4, 3/4] vs [1/2, 1/2] -> (1/4) ln 3
    assert out["iais_loss"].item() == pytest.approx((math.log(2) / 6 + 0.25 * math.log(3)) / 2, abs=1e-9)


def test_heads_are_averaged_after_renormalizing_each_block():
    # Head 2 gives the same blocks as head 1 once renormalized (its text rows are scaled down and the
    # freed mass moved to the other block's keys), so the loss is unchanged.
    head1 = torch.tensor(ATTN, dtype=torch.float64)
    head2 = head1.clone()
    head2[0] = torch.tensor([0.20, 0.10, 0.175, 0.525])  # S_LL row [2/3, 1/3], S_LV row [1/4, 3/4]
    attn = torch.stack([head1, head2])[None]
    out = _loss("singular")(attn, *_all_real())
    assert out["iais_loss"].item() == pytest.approx(SINGULAR_TEXT + SINGULAR_IMAGE, abs=1e-9)


# Two heads, sequence [w0, w1, v0, v1]: every row puts half its mass on each modality, so a renormalized
# block is twice the row's entries there. Both heads: S_LL = [[2/3, 1/3], [1/4, 3/4]] and
# S_LV = [[1/4, 3/4], [2/3, 1/3]] (w0 -> v1, w1 -> v0). S_VV differs: head A [[3/4, 1/4], [1/4, 3/4]],
# head B [[1/4, 3/4], [1/4, 3/4]]; heads averaged [[1/2, 1/2], [1/4, 3/4]].
TWO_HEADS = [
    [[1 / 3, 1 / 6, 1 / 8, 3 / 8], [1 / 8, 3 / 8, 1 / 3, 1 / 6], [1 / 4, 1 / 4, 3 / 8, 1 / 8],
     [1 / 4, 1 / 4, 1 / 8, 3 / 8]],
    [[1 / 3, 1 / 6, 1 / 8, 3 / 8], [1 / 8, 3 / 8, 1 / 3, 1 / 6], [1 / 4, 1 / 4, 1 / 8, 3 / 8],
     [1 / 4, 1 / 4, 1 / 8, 3 / 8]],
]


def _kl2(p: list[float], q: list[float]) -> float:
    """KL(p || q) + KL(q || p) of two distributions."""
    return sum((a - b) * math.log(a / b) for a, b in zip(p, q, strict=True))


def test_singular_mirror_on_two_heads_paper_scores_and_official_probabilities():
    attn = torch.tensor(TWO_HEADS, dtype=torch.float64)[None]
    # Paper (sigma over gathered scores): per head, row i is softmax_j s[m(i), m(j)] = the gathered row of
    # that head renormalized; m = (v1, v0) reads whole rows of S_VV, so the mirror is the heads' mean of
    # [[S_VV11, S_VV10], [S_VV01, S_VV00]] = [[3/4, 1/4], [1/2, 1/2]].
    paper = (_kl2([2 / 3, 1 / 3], [3 / 4, 1 / 4]) + _kl2([1 / 4, 3 / 4], [1 / 2, 1 / 2])) / 2
    assert paper == pytest.approx((math.log(3 / 2) / 12 + math.log(3) / 4) / 2)
    # Official code (softmax over the gathered head-averaged probabilities): row 0 softmax([3/4, 1/4]) =
    # [sigmoid(1/2), sigmoid(-1/2)], row 1 softmax([1/2, 1/2]) = [1/2, 1/2].
    sig = 1 / (1 + math.exp(-0.5))
    official = (_kl2([2 / 3, 1 / 3], [sig, 1 - sig]) + _kl2([1 / 4, 3 / 4], [1 / 2, 1 / 2])) / 2
    for mirror, expected in (("scores", paper), ("probabilities", official)):
        loss = IAISLoss(IAISConfig(anchors=("text",), drop_cls_sep=False, singular_mirror=mirror))
        assert loss(attn, *_all_real())["iais_loss"].item() == pytest.approx(expected, abs=1e-12)
    assert IAISConfig().singular_mirror == "scores"


def test_singular_scores_mirror_renormalizes_each_head_before_averaging():
    # 2 words, 3 regions: w0 -> v2, w1 -> v0 reads only two of each S_VV row's three entries, so renormalizing
    # per head (paper) differs from renormalizing the heads' average. Rows: half the mass per modality.
    vv = {"A": [[0.2, 0.2, 0.6], [0.3, 0.3, 0.4], [0.1, 0.3, 0.6]],
          "B": [[0.6, 0.2, 0.2], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]]}
    heads = []
    for h in ("A", "B"):
        rows = [[1 / 3, 1 / 6, 0.05, 0.05, 0.4], [1 / 8, 3 / 8, 0.3, 0.1, 0.1]]  # S_LV: w0 -> v2, w1 -> v0
        rows += [[0.25, 0.25, *(0.5 * x for x in vv[h][r])] for r in range(3)]
        heads.append(rows)
    attn = torch.tensor(heads, dtype=torch.float64)[None]
    masks = (torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool),
             torch.ones(1, dtype=torch.bool))
    # Gathered rows [S_VV[m(i), v2], S_VV[m(i), v0]]: i=0 (v2): A [0.6, 0.1] -> [6/7, 1/7], B [0.1, 0.5] ->
    # [1/6, 5/6], mean [43/84, 41/84]; i=1 (v0): A [0.6, 0.2] -> [3/4, 1/4], B [0.2, 0.6] -> [1/4, 3/4],
    # mean [1/2, 1/2]. (Renormalizing the heads' average [0.35, 0.3] instead would give [7/13, 6/13].)
    expected = (_kl2([2 / 3, 1 / 3], [43 / 84, 41 / 84]) + _kl2([1 / 4, 3 / 4], [1 / 2, 1 / 2])) / 2
    averaged_first = (_kl2([2 / 3, 1 / 3], [7 / 13, 6 / 13]) + _kl2([1 / 4, 3 / 4], [1 / 2, 1 / 2])) / 2
    assert expected != pytest.approx(averaged_first)
    loss = IAISLoss(IAISConfig(anchors=("text",), drop_cls_sep=False))
    assert loss(attn, *masks)["iais_loss"].item() == pytest.approx(expected, abs=1e-12)


def test_positives_mean_or_sum():
    # Two positive pairs with the hand example: the mean is one pair's distance, the sum (official code) two.
    attn = torch.tensor(ATTN, dtype=torch.float64)[None, None].expand(2, 1, 4, 4)
    masks = (torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool),
             torch.ones(2, dtype=torch.bool))
    for positives, factor in (("mean", 1), ("sum", 2)):
        out = IAISLoss(IAISConfig(drop_cls_sep=False, positives=positives))(attn, *masks)
        assert out["iais_loss"].item() == pytest.approx(factor * (SINGULAR_TEXT + SINGULAR_IMAGE), abs=1e-9)
        assert out["iais_kl_text"].item() == pytest.approx(SINGULAR_TEXT, abs=1e-9)  # logged as a mean


def _embed_padded(garbage: torch.Generator):
    """The hand example inside a padded batch: text [CLS, w0, w1, SEP, pad], regions [v0, v1, pad],
    plus a second, negative pair. The extra keys get arbitrary mass; rows are renormalized to 1."""
    lt, n = 5, 3
    text_pos, img_pos = [1, 2], [lt + 0, lt + 1]
    attn = torch.rand(2, 2, lt + n, lt + n, generator=garbage, dtype=torch.float64) + 0.05
    core = torch.tensor(ATTN, dtype=torch.float64)
    real = text_pos + img_pos
    for h in range(2):
        for qi, q in enumerate(real):
            # keep the hand values' ratios inside each block; the scale of each block does not matter
            attn[0, h, q, real] = core[qi] * (1.0 + h)
    attn = attn / attn.sum(-1, keepdim=True)
    txt_mask = torch.tensor([[True, True, True, True, False], [True, True, True, False, False]])
    img_mask = torch.tensor([[True, True, False], [True, False, False]])
    positives = torch.tensor([True, False])
    return attn, txt_mask, img_mask, positives


@pytest.mark.parametrize(
    ("variant", "expected"),
    [("singular", SINGULAR_TEXT + SINGULAR_IMAGE), ("distributed", DISTRIBUTED_TEXT + DISTRIBUTED_IMAGE)],
)
def test_padding_cls_sep_and_negatives_are_masked(variant, expected):
    attn, txt_mask, img_mask, positives = _embed_padded(torch.Generator().manual_seed(0))
    loss = IAISLoss(IAISConfig(variant=variant))  # drop_cls_sep=True by default
    out = loss(attn, txt_mask, img_mask, positives)
    assert out["iais_loss"].item() == pytest.approx(expected, abs=1e-9)

    # Different garbage in the masked places gives the same loss.
    attn2, *_ = _embed_padded(torch.Generator().manual_seed(1))
    assert loss(attn2, txt_mask, img_mask, positives)["iais_loss"].item() == pytest.approx(expected, abs=1e-9)


def test_gradient_reaches_attention_and_no_positive_gives_zero():
    attn, txt_mask, img_mask, positives = _embed_padded(torch.Generator().manual_seed(0))
    attn = attn.float().requires_grad_(True)
    loss = IAISLoss()
    loss(attn, txt_mask, img_mask, positives)["iais_loss"].backward()
    assert torch.isfinite(attn.grad).all()
    assert attn.grad[0].abs().sum() > 0
    assert attn.grad[1].abs().sum() == 0  # the negative pair is not regularized

    attn.grad = None
    out = loss(attn, txt_mask, img_mask, torch.tensor([False, False]))
    assert out["iais_loss"].item() == 0.0
    out["iais_loss"].backward()  # still part of the graph
    assert attn.grad.abs().sum() == 0


def test_bad_inputs_raise_one_line_errors():
    attn, txt_mask, img_mask, positives = _embed_padded(torch.Generator().manual_seed(0))
    loss = IAISLoss()
    with pytest.raises(ValueError, match="txt_mask \\+ img_mask give 4\\+3"):
        loss(attn, txt_mask[:, :4], img_mask, positives)
    with pytest.raises(ValueError, match="txt_mask must be bool"):
        loss(attn, txt_mask.long(), img_mask, positives)
    holes = txt_mask.clone()
    holes[1, 1] = False
    with pytest.raises(ValueError, match="txt_mask row 1 has a real position after padding"):
        loss(attn, holes, img_mask, positives)
    with pytest.raises(ValueError, match="anchors"):
        IAISConfig(anchors=("text", "text"))


def test_schedules():
    assert schedule_weight("exp", 0, 100) == pytest.approx(math.exp(-5))
    assert schedule_weight("exp", 50, 100) == pytest.approx(math.exp(-2.5))
    assert schedule_weight("exp", 50, 100, gamma=10) == pytest.approx(math.exp(-5))
    assert schedule_weight("exp", 100, 100) == 1.0
    assert schedule_weight("exp", 250, 100) == 1.0  # past the end: clamped
    assert schedule_weight("linear", 25, 100) == 0.25
    assert schedule_weight("log", 0, 100) == 0.0
    assert schedule_weight("log", 20, 100) == pytest.approx(1 - math.exp(-1))
    assert schedule_weight("constant", 3, 100) == 1.0
    loss = IAISLoss(IAISConfig(schedule="exp", gamma=10))
    assert loss.weight(90, 100) == pytest.approx(math.exp(-1))
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        schedule_weight("cosine", 1, 10)
    with pytest.raises(ValueError, match="total steps must be positive"):
        schedule_weight("exp", 1, 0)


def test_symmetric_matrix_kl_masks_rows_and_columns():
    p = torch.tensor([[[0.5, 0.5, 9.0], [0.2, 0.8, 9.0], [7.0, 7.0, 7.0]]])
    q = torch.tensor([[[0.25, 0.75, 1.0], [0.2, 0.8, 3.0], [1.0, 2.0, 3.0]]])
    rows = torch.tensor([[True, True, False]])
    cols = torch.tensor([[True, True, False]])
    # row 0: (1/2 - 1/4) ln((1/2)/(1/4)) + (1/2 - 3/4) ln((1/2)/(3/4)); row 1: 0; the masked row is ignored
    expected = (0.25 * math.log(2) - 0.25 * math.log(2 / 3)) / 2
    assert symmetric_matrix_kl(p, q, rows, cols).item() == pytest.approx(expected, abs=1e-6)
