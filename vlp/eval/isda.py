"""ISDa: intra-modal self-attention distance with annotation (Ren et al., ACL 2021).

It measures on phrase-box annotations (Flickr30k Entities) how far the relations between phrases in
the text disagree with the relations between the matching objects in the image, in one layer's
attention (the last one in the paper) of a matched image-text pair:

1. Entities: each annotated phrase i has its text tokens P_i and the detected regions R_i whose
   box has IoU >= 0.5 with one of the phrase's annotated boxes. Phrases without tokens or without
   any matching region are left out; a pair needs at least two entities (a 1x1 relation matrix
   carries no relation), otherwise it has no ISDa.
2. Phrase relations: for each head, each token x of P_i spreads its attention over the annotated
   tokens (the union of all P_j, renormalized); A_L[i, j] is the share that lands on P_j, averaged
   over x in P_i, then over heads. The region relations A_V[i, j] are built the same way from the
   image->image attention and the R_i. Both are row distributions over the m entities.
3. ISDa = m-KL(A_L, A_V): the mean over rows of KL(A_L_i || A_V_i) + KL(A_V_i || A_L_i), the same
   symmetric matrix KL as the IAIS regularizer. Lower means more consistent relations.

Positions: the attention covers [text block (Lt, padding at its end) ; regions]; phrase tokens are
positions in the text block, region r sits at position Lt + r. Boxes are [x1, y1, x2, y2] in one
coordinate frame for regions and annotations (Entities boxes are 0-based pixels: scale normalized
region boxes by the image size first).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from vlp.objectives.iais import symmetric_matrix_kl


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of every box in ``a`` [N, 4] with every box in ``b`` [M, 4] (x1, y1, x2, y2) -> [N, M]."""
    a, b = a.double(), b.double()
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp_min(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp_min(0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def phrase_token_positions(word_ids: Sequence[int | None], first_word: int, n_words: int) -> list[int]:
    """Text-block positions of the tokens of words ``first_word .. first_word + n_words - 1``.

    ``word_ids`` is the tokenizer's token -> word index list over the text block (``None`` for
    [CLS]/[SEP]), from tokenizing the Entities sentence split on spaces (``is_split_into_words``), so
    word indices agree with the annotation's ``first_word_index``.
    """
    end = first_word + n_words
    return [pos for pos, w in enumerate(word_ids) if w is not None and first_word <= w < end]


def isda(
    attn: Tensor,
    txt_len: int,
    phrase_tokens: Sequence[Sequence[int]],
    phrase_boxes: Sequence[Sequence[Sequence[float]]],
    region_boxes: Tensor,
    iou_threshold: float = 0.5,
) -> float | None:
    """ISDa of one matched pair, or None when fewer than two entities are usable.

    ``attn``: [heads, T, T] or [T, T] attention probabilities with T >= txt_len + len(region_boxes);
    ``txt_len``: size of the text block (Lt, padding included); ``phrase_tokens[i]``: text-block
    positions of phrase i; ``phrase_boxes[i]``: its annotated boxes; ``region_boxes`` [N, 4]: the
    detected regions, in the image block's order.
    """
    attn = attn.detach().cpu().double()  # one pair at a time: CPU double keeps the metric exact
    region_boxes = region_boxes.detach().cpu().double()
    if attn.dim() == 2:
        attn = attn[None]
    if attn.dim() != 3 or attn.shape[1] != attn.shape[2]:
        raise ValueError(f"isda: attn must be [heads, T, T] or [T, T], got shape {tuple(attn.shape)}")
    n_regions = region_boxes.shape[0]
    if region_boxes.dim() != 2 or region_boxes.shape[1] != 4:
        raise ValueError(f"isda: region_boxes must be [N, 4], got shape {tuple(region_boxes.shape)}")
    if txt_len + n_regions > attn.shape[1]:
        raise ValueError(
            f"isda: text block {txt_len} + {n_regions} regions exceed attention size {attn.shape[1]}"
        )
    if len(phrase_tokens) != len(phrase_boxes):
        raise ValueError(f"isda: {len(phrase_tokens)} phrase token lists but {len(phrase_boxes)} box lists")

    token_sets: list[list[int]] = []
    region_sets: list[list[int]] = []
    for i, (tokens, boxes) in enumerate(zip(phrase_tokens, phrase_boxes, strict=True)):
        bad = [t for t in tokens if not 0 <= t < txt_len]
        if bad:
            raise ValueError(
                f"isda: phrase {i} token position {bad[0]} is outside the text block [0, {txt_len})"
            )
        if not tokens or not boxes or n_regions == 0:
            continue
        ann = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
        matched = (box_iou(region_boxes, ann) >= iou_threshold).any(1).nonzero().squeeze(1)
        if matched.numel():
            token_sets.append(sorted(set(tokens)))
            region_sets.append(matched.tolist())
    if len(token_sets) < 2:
        return None

    a_l = _relations(attn[:, :txt_len, :txt_len], token_sets)
    a_v = _relations(attn[:, txt_len : txt_len + n_regions, txt_len : txt_len + n_regions], region_sets)
    m = len(token_sets)
    full = torch.ones(1, m, dtype=torch.bool)
    return symmetric_matrix_kl(a_l[None], a_v[None], full, full, eps=1e-12).item()


def isda_summary(values: Iterable[float | None]) -> dict[str, float]:
    """Mean ISDa over the pairs that have one (``isda``), and how many pairs were scored / skipped."""
    values = list(values)
    scored = [v for v in values if v is not None]
    return {
        "isda": sum(scored) / len(scored) if scored else float("nan"),
        "isda_pairs": float(len(scored)),
        "isda_skipped": float(len(values) - len(scored)),
    }


def _relations(attn: Tensor, groups: list[list[int]]) -> Tensor:
    """[H, S, S] attention within one modality -> [m, m] group-to-group relation distribution."""
    union = sorted({p for g in groups for p in g})
    index = {p: k for k, p in enumerate(union)}
    sub = attn[:, union][:, :, union]  # [H, U, U]
    sub = sub / sub.sum(-1, keepdim=True).clamp_min(1e-300)
    member = torch.zeros(len(union), len(groups), dtype=sub.dtype)  # [U, m] one-hot membership
    for j, g in enumerate(groups):
        member[[index[p] for p in g], j] = 1.0
    to_group = sub @ member  # [H, U, m]: each position's share of attention per group
    rows = torch.stack([to_group[:, [index[p] for p in g]].mean(1) for g in groups], dim=1)  # [H, m, m]
    rows = rows.mean(0)
    return rows / rows.sum(-1, keepdim=True).clamp_min(1e-300)
