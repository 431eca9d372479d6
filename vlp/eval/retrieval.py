"""Image-text retrieval evaluation as pure functions: score matrices and recall@K / Meta-Sum.

Convention: a score matrix is ``[n_img, n_txt]`` (rows images, columns texts) and ``txt2img[t]`` is
the index of the image that text ``t`` describes (one image, several texts, as in Flickr30k/COCO).

Ties are resolved pessimistically: a correct item's rank is the number of *wrong* candidates whose
score is greater than **or equal to** its score. So a tie never counts as a hit, a constant scorer
gets no lucky R@1, and the result does not depend on candidate order or on how the matrix was
chunked. A pair that was never scored (``-inf`` after :func:`shortlist_rerank`) ties with every
other unscored pair, so it only counts as a hit when K exceeds the number of wrong candidates.

Two ways to fill the matrix with a cross-encoder ``score_fn(img_idx, txt_idx) -> [len(img_idx),
len(txt_idx)]`` (both index tensors are int64 on CPU; the result may live on any device):

* :func:`score_all_pairs` scores every pair, in ``img_chunk x txt_chunk`` blocks so that memory
  is bounded by one block;
* :func:`shortlist_rerank` takes a cheap unimodal similarity, keeps the top-k images of every text
  and the top-k texts of every image, and scores only those pairs (the rest stay ``-inf``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

ScoreFn = Callable[[Tensor, Tensor], Tensor]

# Rows of the score matrix compared at once inside recall_at_k (bounds the boolean temporaries), and
# rows / columns of the similarity sorted at once by shortlist_rerank.
_RECALL_ROW_CHUNK = 1024
_SORT_SLICE = 1024


def recall_at_k(scores: Tensor, txt2img: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K of both retrieval directions, their mean and their sum (Meta-Sum).

    ``ir_r{k}`` (text -> image): the fraction of texts whose image ranks in the top k of all images.
    ``tr_r{k}`` (image -> text): the fraction of images (those with at least one text) for which
    any of their texts ranks in the top k of all texts. Values are fractions in [0, 1];
    ``r_mean`` is the mean and ``meta_sum`` the sum of all the ``ir``/``tr`` recalls (with the
    default ks that is the six numbers UNITER and IAIS report; multiply by 100 for their tables).
    """
    n_img, n_txt = _check_scores(scores, txt2img)
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"recall_at_k: ks must be positive integers, got {tuple(ks)}")
    scores = scores.detach().float().cpu()
    txt2img = txt2img.cpu()

    txt_ids = torch.arange(n_txt)
    gt_score = scores[txt2img, txt_ids]  # [n_txt]
    has_text = torch.zeros(n_img, dtype=torch.bool)
    has_text[txt2img] = True
    best_gt = torch.full((n_img,), float("-inf")).scatter_reduce(0, txt2img, gt_score, reduce="amax")

    ir_rank = torch.zeros(n_txt, dtype=torch.long)
    tr_rank = torch.zeros(n_img, dtype=torch.long)
    for start in range(0, n_img, _RECALL_ROW_CHUNK):
        rows = scores[start : start + _RECALL_ROW_CHUNK]
        img_ids = torch.arange(start, start + rows.shape[0])
        wrong = txt2img[None, :] != img_ids[:, None]  # [rows, n_txt]: pair is not a true match
        ir_rank += ((rows >= gt_score[None, :]) & wrong).sum(0)
        tr_rank[img_ids] = ((rows >= best_gt[img_ids, None]) & wrong).sum(1)

    tr_rank = tr_rank[has_text]
    out: dict[str, float] = {}
    for k in ks:
        out[f"ir_r{k}"] = (ir_rank < k).double().mean().item()
    for k in ks:
        out[f"tr_r{k}"] = (tr_rank < k).double().mean().item()
    recalls = list(out.values())
    out["r_mean"] = sum(recalls) / len(recalls)
    out["meta_sum"] = sum(recalls)
    return out


def score_all_pairs(score_fn: ScoreFn, n_img: int, n_txt: int, img_chunk: int, txt_chunk: int) -> Tensor:
    """The full ``[n_img, n_txt]`` float32 CPU score matrix, computed block by block."""
    if n_img < 1 or n_txt < 1 or img_chunk < 1 or txt_chunk < 1:
        raise ValueError(
            f"score_all_pairs: n_img={n_img}, n_txt={n_txt}, img_chunk={img_chunk}, "
            f"txt_chunk={txt_chunk} must all be positive"
        )
    out = torch.empty(n_img, n_txt, dtype=torch.float32)
    for i0 in range(0, n_img, img_chunk):
        i1 = min(i0 + img_chunk, n_img)
        for t0 in range(0, n_txt, txt_chunk):
            t1 = min(t0 + txt_chunk, n_txt)
            out[i0:i1, t0:t1] = _call(score_fn, torch.arange(i0, i1), torch.arange(t0, t1))
    return out


def shortlist_rerank(sim: Tensor, score_fn: ScoreFn, k: int, chunk: int = 256,
                     texts: Sequence[int] | None = None) -> Tensor:
    """Cross-encoder scores for the shortlisted pairs only; every other pair is ``-inf``.

    The shortlist of text ``t`` is the union of its top-``k`` images by ``sim`` and of the images
    that have ``t`` among their top-``k`` texts, so both retrieval directions see their candidates.
    Each text's shortlist is scored with one ``score_fn(images, [t])`` call per ``chunk`` images.
    Ties in ``sim`` are broken by the lower index (stable sort), so the shortlist is deterministic.
    ``texts``: score only these texts' shortlists (one worker's share); the others stay ``-inf``.
    """
    if sim.dim() != 2 or sim.shape[0] < 1 or sim.shape[1] < 1:
        raise ValueError(
            f"shortlist_rerank: sim must be a non-empty [n_img, n_txt] matrix, got {tuple(sim.shape)}"
        )
    if k < 1 or chunk < 1:
        raise ValueError(f"shortlist_rerank: k={k} and chunk={chunk} must be positive")
    sim = sim.detach().float().cpu()
    if torch.isnan(sim).any():
        raise ValueError("shortlist_rerank: sim contains NaN")
    n_img, n_txt = sim.shape
    candidate = torch.zeros(n_img, n_txt, dtype=torch.bool)
    # Sorted in slices so the int64 sort indices never cover the whole matrix at once.
    for t0 in range(0, n_txt, _SORT_SLICE):
        cols = torch.arange(t0, min(t0 + _SORT_SLICE, n_txt))
        top_img = torch.sort(sim[:, cols], dim=0, descending=True, stable=True).indices[:k]  # [k, cols]
        candidate[top_img, cols[None, :].expand_as(top_img)] = True
    for i0 in range(0, n_img, _SORT_SLICE):
        rows = torch.arange(i0, min(i0 + _SORT_SLICE, n_img))
        top_txt = torch.sort(sim[rows], dim=1, descending=True, stable=True).indices[:, :k]  # [rows, k]
        candidate[rows[:, None].expand_as(top_txt), top_txt] = True

    out = torch.full((n_img, n_txt), float("-inf"), dtype=torch.float32)
    for t in range(n_txt) if texts is None else texts:
        images = candidate[:, t].nonzero().squeeze(1)
        txt_idx = torch.tensor([t])
        for c0 in range(0, images.numel(), chunk):
            img_idx = images[c0 : c0 + chunk]
            out[img_idx, t] = _call(score_fn, img_idx, txt_idx)[:, 0]
    return out


def _call(score_fn: ScoreFn, img_idx: Tensor, txt_idx: Tensor) -> Tensor:
    block = score_fn(img_idx, txt_idx)
    expected = (img_idx.numel(), txt_idx.numel())
    if not isinstance(block, Tensor) or tuple(block.shape) != expected:
        got = tuple(block.shape) if isinstance(block, Tensor) else type(block).__name__
        raise ValueError(
            f"score_fn returned {got} for images {img_idx[0].item()}.. x texts {txt_idx[0].item()}.., "
            f"expected shape {expected}"
        )
    block = block.detach().float().cpu()
    if torch.isnan(block).any():
        raise ValueError(f"score_fn returned NaN for images {img_idx.tolist()} x texts {txt_idx.tolist()}")
    return block


def _check_scores(scores: Tensor, txt2img: Tensor) -> tuple[int, int]:
    if scores.dim() != 2:
        raise ValueError(f"recall_at_k: scores must be [n_img, n_txt], got shape {tuple(scores.shape)}")
    n_img, n_txt = scores.shape
    if txt2img.dim() != 1 or txt2img.numel() != n_txt or txt2img.dtype != torch.long:
        raise ValueError(
            f"recall_at_k: txt2img must be an int64 vector of length n_txt={n_txt}, "
            f"got {txt2img.dtype} {tuple(txt2img.shape)}"
        )
    if n_txt == 0:
        raise ValueError("recall_at_k: no texts to evaluate")
    bad = ((txt2img < 0) | (txt2img >= n_img)).nonzero()
    if bad.numel():
        t = bad[0].item()
        raise ValueError(
            f"recall_at_k: txt2img[{t}]={txt2img[t].item()} is not an image index in [0, {n_img})"
        )
    if torch.isnan(scores).any():
        r, c = torch.isnan(scores).nonzero()[0].tolist()
        raise ValueError(f"recall_at_k: scores[{r}, {c}] is NaN")
    return n_img, n_txt
