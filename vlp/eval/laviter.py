"""LAViTeR's evaluation metrics as pure functions: R-precision, AIMCoS and a Fréchet distance between feature
sets (the region-space stand-in for FID).

* ``r_precision`` (AttnGAN's protocol, which LAViTeR reports): for every (image, caption) pair, the caption is
  ranked by score among itself and ``negatives`` (99) captions drawn at random from those of other images;
  R-precision is the fraction ranked first. ``ks`` also reports the fraction in the top k (LAViTeR quotes a
  "top-3 R-precision" it does not define: ``r_precision_top3`` is that reading). AttnGAN repeats the draw
  (10 times) and reports the mean and the standard deviation; so does ``repeats``. Ties count against the
  caption (as ``vlp.eval.retrieval.recall_at_k``). With fewer than ``negatives`` captions of other images,
  all of them are the candidates (``candidates`` says how many).
* ``aimcos`` (LAViTeR Eq. 17): the mean over images of the mean cosine between the image's global feature and
  the text features of its attributes; ``average="class"`` is the paper's COCO protocol (per attribute the
  mean over the images that have it, then the mean over attributes).
* ``frechet_distance``: ||μ1 - μ2||² + Tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½) between two sets of vectors (FID's formula on
  whatever features are given: here pooled region features, ``pooled``). The matrix square root's trace is
  computed from the eigenvalues of Σ1^½ Σ2 Σ1^½ (symmetric PSD), in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

_CHUNK = 1024


def cosine_matrix(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """[len(a), len(b)] cosine similarities."""
    a, b = a.double(), b.double()
    return (a @ b.T) / (a.norm(dim=-1)[:, None] * b.norm(dim=-1)[None, :]).clamp_min(eps)


def r_precision(scores: Tensor, txt2img: Tensor, negatives: int = 99, ks: Sequence[int] = (1, 3),
                repeats: int = 1, seed: int = 0, rows: Tensor | None = None) -> dict[str, float]:
    """R-precision of a score matrix ``[n_img, n_txt]`` (``txt2img[t]``: the image caption t describes).
    ``rows[t]``: the row of caption t's query when it is not its image's (a region set generated from each
    caption: ``scores`` [n_txt, n_txt] and ``rows`` = arange); the negatives are still captions of other
    images.

    ``r_precision`` (top 1) and ``r_precision_top{k}`` for the other ``ks``: means over ``repeats`` draws of
    the negatives (``*_std``: their standard deviation, 0 for one draw); ``candidates``: captions ranked per
    query. The draws come from a generator seeded with ``seed``."""
    scores = scores.detach().double().cpu()
    txt2img = torch.as_tensor(txt2img).long().cpu()
    n_img, n_txt = scores.shape
    if txt2img.shape != (n_txt,) or n_txt == 0:
        raise ValueError(f"r_precision: txt2img has shape {tuple(txt2img.shape)} for {n_txt} captions")
    if negatives < 0 or repeats < 1 or not ks or min(ks) < 1:
        raise ValueError(f"r_precision: needs negatives >= 0, repeats >= 1 and ks >= 1, got {negatives}, "
                         f"{repeats}, {tuple(ks)}")
    others = (txt2img[None, :] != txt2img[:, None])  # [query caption, candidate caption]
    available = int(others.sum(1).min())
    draw = min(negatives, available)
    generator = torch.Generator().manual_seed(seed)
    rows_of = txt2img if rows is None else torch.as_tensor(rows).long().cpu()
    gt = scores[rows_of, torch.arange(n_txt)]  # each pair's own score
    runs = {k: [] for k in ks}
    for _ in range(repeats):
        hits = {k: 0 for k in ks}
        for start in range(0, n_txt, _CHUNK):  # queries in chunks: the draw keys are [chunk, n_txt]
            chunk = torch.arange(start, min(start + _CHUNK, n_txt))
            keys = torch.rand(len(chunk), n_txt, generator=generator).masked_fill(~others[chunk], 2.0)
            chosen = keys.argsort(dim=1)[:, :draw]  # `draw` random captions of other images per query
            negative = scores[rows_of[chunk][:, None], chosen]  # the query with each negative
            rank = (negative >= gt[chunk][:, None]).sum(1)
            for k in ks:
                hits[k] += int((rank < k).sum())
        for k in ks:
            runs[k].append(hits[k] / n_txt)
    out: dict[str, float] = {}
    for k in ks:
        name = "r_precision" if k == 1 else f"r_precision_top{k}"
        values = np.asarray(runs[k])
        out[name] = float(values.mean())
        out[f"{name}_std"] = float(values.std(ddof=1)) if repeats > 1 else 0.0
    out["candidates"] = float(draw + 1)
    return out


def aimcos(images: Tensor, attributes: Tensor, has: Tensor, average: str = "image") -> float:
    """AIMCoS of image features [N, d] and attribute text features [A, d]; ``has`` Bool[N, A] says which
    attributes each image has. ``image``: Eq. 17, (1/N) sum_n (1/A_n) sum_{a of n} cos(v̄_n, ē_a) over the
    images with at least one attribute; ``class``: the COCO protocol, the mean over attributes (that some
    image has) of the mean over their images."""
    has = torch.as_tensor(has).bool().cpu()
    cos = cosine_matrix(images.detach().cpu(), attributes.detach().cpu())
    if has.shape != cos.shape:
        raise ValueError(f"aimcos: has is {tuple(has.shape)}, expected {tuple(cos.shape)}")
    if average not in ("image", "class"):
        raise ValueError(f"aimcos: average must be 'image' or 'class', got {average!r}")
    dim = 1 if average == "image" else 0
    counts = has.sum(dim)
    if not bool((counts > 0).any()):
        raise ValueError("aimcos: no image has an attribute")
    means = (cos * has).sum(dim) / counts.clamp_min(1)
    return float(means[counts > 0].mean())


def pooled(features: Tensor, mask: Tensor) -> Tensor:
    """[B, d] mean of each set's real vectors (features [B, N, d], mask Bool[B, N])."""
    mask = mask.to(features.dtype)
    return (features * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(values.clip(min=0))) @ vectors.T


def frechet_from_moments(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||μ1 - μ2||² + Tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½) of two Gaussians."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    root = _sqrt_psd(sigma1)
    middle = np.linalg.eigvalsh((root @ sigma2 @ root + (root @ sigma2 @ root).T) / 2)
    trace_sqrt = float(np.sqrt(middle.clip(min=0)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)
    return max(value, 0.0)


def frechet_distance(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two sets of vectors [n, d] and [m, d] (sample means
    and unbiased covariances, as FID's reference code)."""
    x = np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, np.float64)
    y = np.asarray(y.detach().cpu() if isinstance(y, Tensor) else y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"frechet_distance: needs two sets of at least 2 vectors of one size, got "
                         f"{x.shape} and {y.shape}")
    return frechet_from_moments(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
