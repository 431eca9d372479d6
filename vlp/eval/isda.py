"""ISDa: intra-modal self-attention distance with annotation (Ren et al., ACL 2021, Section 2, Algorithm 1).

It measures, on phrase-box annotations (Flickr30k Entities), how far the relations between the annotated
objects in the text disagree with the relations between the same objects in the image, in one layer's
attention (the last one) of a matched image-text pair. The IAIS repository has no ISDa code; this follows
the paper's equations:

1. Objects (Section 2.1): object i has a linguistic item l_i (its text-block token positions) and a
   visual item v_i (its region indices). Objects without tokens or without regions are left out; a pair
   needs at least two objects (a 1 x 1 relation matrix carries no relation), otherwise it has no ISDa.
2. Intra-modal attention (Eq. 4-6): sigma(S_LL) is the text->text block of the attention with each row
   renormalized over the block's keys (every real text token, [CLS] and [SEP] included; renormalizing a
   softmax row over a key subset is the softmax over those keys' scores), sigma(S_VV) the region->region
   block likewise. Heads are averaged (the paper does not mention heads; the IAIS code averages them).
3. Cps (Eq. 7): S^(a)_LL[i, j] = (sum over x in l_i, y in l_j of sigma(S_LL)[x, y]) / |l_i|, a column sum
   and row average of the patch, with no renormalization; S^(a)_VV the same on regions.
4. m-KL (Eq. 8-9): ISDa = sum over rows i of KL(A_i || B_i) + KL(B_i || A_i), A = S^(a)_LL and B = S^(a)_VV
   with each row divided by its sum only for the KL (a Cps row is not a distribution: the attention of
   l_i that lands outside the annotated tokens is not in it). Lower means more consistent relations.

The paper's visual items are the Entities ground-truth boxes, one region per box (the authors extracted
features at those boxes: ``generate_tsv_gt.py --split flickr30k_entities``); ``detected_regions`` gives
the other choice, detected regions matched to an object's boxes by IoU.

Positions: the attention covers [text block (Lt, padding at its end, zero mass) ; regions]; token
positions index the text block, region r sits at position Lt + r.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

Object = tuple[Sequence[int], Sequence[int]]  # (text-block token positions, region indices)


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


def detected_regions(region_boxes: Tensor, boxes: Sequence[Sequence[float]], iou_threshold: float = 0.5
                     ) -> list[int]:
    """Indices of the regions whose box has IoU >= ``iou_threshold`` with one of ``boxes`` (same frame)."""
    if not len(boxes) or not len(region_boxes):
        return []
    ann = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    return (box_iou(region_boxes, ann) >= iou_threshold).any(1).nonzero().squeeze(1).tolist()


def isda(attn: Tensor, txt_len: int, n_regions: int, objects: Sequence[Object]) -> float | None:
    """ISDa of one matched pair (module docstring), or None when fewer than two objects are usable.

    ``attn``: [heads, T, T] or [T, T] attention probabilities with T >= txt_len + n_regions; ``txt_len``:
    size of the text block (Lt, padding included); ``objects[i]``: (token positions, region indices).
    """
    attn = attn.detach().cpu().double()  # one pair at a time: CPU double keeps the metric exact
    if attn.dim() == 2:
        attn = attn[None]
    if attn.dim() != 3 or attn.shape[1] != attn.shape[2]:
        raise ValueError(f"isda: attn must be [heads, T, T] or [T, T], got shape {tuple(attn.shape)}")
    if txt_len + n_regions > attn.shape[1]:
        raise ValueError(f"isda: text block {txt_len} + {n_regions} regions exceed attention size "
                         f"{attn.shape[1]}")
    usable = []
    for i, (tokens, regions) in enumerate(objects):
        bad = [t for t in tokens if not 0 <= t < txt_len]
        if bad:
            raise ValueError(f"isda: object {i} token position {bad[0]} is outside the text block "
                             f"[0, {txt_len})")
        bad = [r for r in regions if not 0 <= r < n_regions]
        if bad:
            raise ValueError(f"isda: object {i} region {bad[0]} is outside the {n_regions} regions")
        if tokens and regions:
            usable.append((sorted(set(tokens)), sorted(set(regions))))
    if len(usable) < 2:
        return None
    s_ll = _intra(attn[:, :txt_len, :txt_len])
    s_vv = _intra(attn[:, txt_len : txt_len + n_regions, txt_len : txt_len + n_regions])
    a = cps_matrix(s_ll, [tokens for tokens, _ in usable])
    b = cps_matrix(s_vv, [regions for _, regions in usable])
    return matrix_kl_sum(a, b)


def _intra(block: Tensor) -> Tensor:
    """sigma of an intra-modal block [H, S, S]: rows renormalized over the block's keys, heads averaged."""
    block = block / block.sum(-1, keepdim=True).clamp_min(1e-300)
    return block.mean(0)


def cps_matrix(attn: Tensor, groups: Sequence[Sequence[int]]) -> Tensor:
    """[m, m] with entry (i, j) = Cps(Ext(attn, g_i, g_j)): the patch's sum over rows g_i and columns g_j,
    divided by |g_i| (Eq. 7)."""
    return torch.stack([torch.stack([attn[gi][:, gj].sum() / len(gi) for gj in groups]) for gi in groups])


def matrix_kl_sum(a: Tensor, b: Tensor) -> float:
    """m-KL (Eq. 8): sum over rows of KL(a_i || b_i) + KL(b_i || a_i), each row divided by its sum first."""
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-300)
    b = b / b.sum(-1, keepdim=True).clamp_min(1e-300)
    tiny = 1e-300
    return float(((a - b) * (a.clamp_min(tiny).log() - b.clamp_min(tiny).log())).sum())


def isda_summary(values: Iterable[float | None]) -> dict[str, float]:
    """Mean ISDa over the pairs that have one (``isda``), and how many pairs were scored / skipped."""
    values = list(values)
    scored = [v for v in values if v is not None]
    return {
        "isda": sum(scored) / len(scored) if scored else float("nan"),
        "isda_pairs": float(len(scored)),
        "isda_skipped": float(len(values) - len(scored)),
    }
