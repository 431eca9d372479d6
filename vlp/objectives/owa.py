"""Object-word alignment (Kervadec et al., "Weak supervision helps emergence of word-object alignment"): an
alignment decoder predicts which detected region each annotated word points at, supervised by soft targets.

Decoder (paper Eq. 11-13, on the single-stream encoder's last layer): the text and region outputs S', O' are
projected per modality with a feed-forward block, a residual and LayerNorm, Ŝ = LN(S' + FF(S')),
Ô = LN(O' + FF(O')) (FF: Linear(H, I) - GELU - Linear(I, H), I the encoder's intermediate size: the paper
gives no depth); A = Ŝ·Ôᵀ / √d over the image's real regions; a word's distribution over regions is the
softmax over its top-k (k = 3) scores, ``topk_softmax``.

Soft targets A* (Eq. 15-18, ``alignment_targets``), for an annotated word group s with box b* and every
detected region o_j: position PA*_j = IoU(b*, b_j); semantics SA*_j = ¾·S(s, class_j) + ¼·S(s, attribute_j)
with the detector's predicted class and attribute; A*_j = (norm_j(PA*) + norm_j(SA*)) / 2, normalised to sum 1
over the regions. The paper leaves ``norm`` undefined; ours (``norm="sum"``, METHODS.md's recommendation):
clip at 0 and divide by the sum over the regions, a uniform row when every value is 0 (``"max"``: divide by
the largest value instead). S is the cosine of word vectors in GloVe's text format (``WordVectors``,
multi-word names and groups averaged) or, where the class and attribute names are literal words (the demo
world's shapes, colours, sizes, textures), exact matching: 1 when the name is one of the group's words (a
plural "s"/"es" allowed), else 0 (``ExactMatch``).

Loss: KL(A* ‖ A) on the annotated words, averaged over them. With A the top-k softmax the KL is infinite
wherever A* has mass outside A's top-k; ``support`` chooses how that is resolved:

* ``"full"`` (default): the KL against the softmax over *all* regions; the top-k softmax is the prediction
  (accuracy, figures). Every region gets a gradient, so a correct region outside the current top-k is pulled
  in; with (a) it never would be.
* ``"topk"``: A* restricted to A's top-k regions and renormalised there, the KL against the top-k softmax. A
  word whose target has no mass on its top-k has no defined loss: it is left out.

Batches carry ``align_targets`` [B, Lt, N] (each annotated token's A* row over the image's regions, zero rows
elsewhere; the tokens of a pointer share its row). Metrics: ``owa_acc``, the annotated tokens whose top region
is the target's most likely one, and ``owa_topk_acc``, those whose target's most likely region is in A's
top-k.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from vlp.model.uniter import UniterModel
from vlp.objectives.common import encode, init_head_weights

Support = Literal["full", "topk"]
Norm = Literal["sum", "max"]
CLASS_WEIGHT, ATTRIBUTE_WEIGHT = 0.75, 0.25
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


# -------------------------------------------------------------------------------------------- targets


def iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """[P, R] intersection over union of x1, y1, x2, y2 boxes [P, 4] and [R, 4] (any common unit)."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)
    area_b = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def normalize_rows(values: np.ndarray, norm: Norm = "sum") -> np.ndarray:
    """``norm_j``: each row clipped at 0, divided by its sum (``sum``) or its largest value (``max``); a row
    that is 0 everywhere becomes uniform (``sum``) / all ones (``max``), so it carries no preference."""
    clipped = np.clip(np.asarray(values, dtype=np.float64), 0.0, None)
    scale = clipped.sum(axis=-1, keepdims=True) if norm == "sum" else clipped.max(axis=-1, keepdims=True)
    if norm not in ("sum", "max"):
        raise ValueError(f"norm must be 'sum' or 'max', got {norm!r}")
    empty = scale <= 0
    fallback = (1.0 / clipped.shape[-1]) if norm == "sum" else 1.0
    return np.where(empty, fallback, clipped / np.where(empty, 1.0, scale))


def alignment_targets(annotated: np.ndarray, detected: np.ndarray, class_sim: np.ndarray,
                      attribute_sim: np.ndarray, norm: Norm = "sum") -> np.ndarray:
    """A* [P, R] of P annotated boxes over R detected regions (each row sums to 1).

    ``annotated`` [P, 4] and ``detected`` [R, 4] boxes x1, y1, x2, y2 in one unit; ``class_sim`` /
    ``attribute_sim`` [P, R]: S(word group p, predicted class / attribute name of region r)."""
    position = iou(annotated, detected)
    semantic = CLASS_WEIGHT * np.asarray(class_sim, np.float64) + ATTRIBUTE_WEIGHT * np.asarray(attribute_sim,
                                                                                                np.float64)
    combined = (normalize_rows(position, norm) + normalize_rows(semantic, norm)) / 2
    return combined / combined.sum(axis=-1, keepdims=True)


class Similarity(Protocol):
    def __call__(self, words: Sequence[str], name: str) -> float: ...


def words_of(text: str) -> list[str]:
    """Lowercased words of a text, punctuation dropped ("Yes," -> "yes", "pond?" -> "pond")."""
    return _WORD.findall(text.lower())


class ExactMatch:
    """S = 1 when every word of ``name`` is one of ``words`` (a plural "s" / "es" on a word allowed), else 0:
    for vocabularies of literal words (the demo world's shapes, colours, sizes and textures)."""

    def __call__(self, words: Sequence[str], name: str) -> float:
        present = {w for word in words for w in (word, word.removesuffix("es"), word.removesuffix("s"))}
        parts = words_of(name)
        return float(bool(parts) and all(p in present for p in parts))


class WordVectors:
    """Word vectors in GloVe's text format (``word v1 ... vd`` a line); S is the cosine of the mean vectors of
    the in-vocabulary words of the group and of the name (0 when either has none)."""

    def __init__(self, vectors: Mapping[str, np.ndarray]):
        self.vectors = {w: np.asarray(v, dtype=np.float32) for w, v in vectors.items()}
        dims = {v.shape for v in self.vectors.values()}
        if len(dims) > 1:
            raise ValueError(f"word vectors of several sizes: {sorted(dims)}")

    @classmethod
    def from_glove(cls, path: str | Path, vocabulary: Iterable[str] | None = None) -> WordVectors:
        """Read a GloVe text file (``glove.6B.300d.txt``); ``vocabulary`` keeps only those words (the real
        files hold 400K-2.2M words). A line that is not ``word`` + numbers is an error naming it."""
        wanted = None if vocabulary is None else set(vocabulary)
        vectors, size = {}, None
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                word, _, rest = line.rstrip("\n").partition(" ")
                if not word or (wanted is not None and word not in wanted):
                    continue
                try:
                    vector = np.asarray(rest.split(" "), dtype=np.float32)
                except ValueError:
                    raise ValueError(f"{path}: line {line_no}: expected a word and numbers") from None
                if size is not None and vector.shape != size:
                    raise ValueError(f"{path}: line {line_no}: {vector.size} numbers, the file's first "
                                     f"vector has {size[0]}")
                size = vector.shape
                vectors[word] = vector
        return cls(vectors)

    def mean(self, words: Iterable[str]) -> np.ndarray | None:
        found = [self.vectors[w] for w in words if w in self.vectors]
        return np.mean(found, axis=0) if found else None

    def __call__(self, words: Sequence[str], name: str) -> float:
        a, b = self.mean(words), self.mean(words_of(name))
        if a is None or b is None:
            return 0.0
        denom = float(np.linalg.norm(a) * np.linalg.norm(b))
        return float(a @ b) / denom if denom > 0 else 0.0


def semantic_similarities(groups: Sequence[Sequence[str]], classes: Sequence[str | None],
                          attributes: Sequence[str | None], sim: Similarity) -> tuple[np.ndarray, np.ndarray]:
    """([P, R] S(group, class_r), [P, R] S(group, attribute_r)); a region without a name scores 0."""
    cls = np.array([[sim(g, c) if c else 0.0 for c in classes] for g in groups], dtype=np.float64)
    att = np.array([[sim(g, a) if a else 0.0 for a in attributes] for g in groups], dtype=np.float64)
    return cls.reshape(len(groups), len(classes)), att.reshape(len(groups), len(attributes))


# ----------------------------------------------------------------------------------------- prediction


def topk_softmax(scores: Tensor, k: int, mask: Tensor | None = None) -> Tensor:
    """Softmax over each row's top-k scores (paper Eq. 13), zero elsewhere; ``mask`` [.., R] marks the real
    regions (padding never enters the top-k). Rows with fewer than k real regions use all of them."""
    scores = scores.float()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    k = min(k, scores.size(-1))
    top, index = scores.topk(k, dim=-1)
    probs = torch.softmax(top, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)
    out = torch.zeros_like(scores).scatter(-1, index, probs)
    return out.masked_fill(~torch.isfinite(scores), 0.0) if mask is not None else out


def alignment_kl(scores: Tensor, targets: Tensor, mask: Tensor, k: int, support: Support = "full"
                 ) -> tuple[Tensor, Tensor]:
    """(KL(A* ‖ A) per word [W], kept [W] bool) for W annotated words' scores [W, R], targets [W, R] (rows sum
    to 1 over the real regions) and region masks [W, R]; see the module docstring for ``support``."""
    scores = scores.float().masked_fill(~mask, float("-inf"))
    targets = targets.float() * mask
    if support == "full":
        log_probs = torch.log_softmax(scores, dim=-1)
        kept = torch.ones(scores.size(0), dtype=torch.bool, device=scores.device)
    elif support == "topk":
        k = min(k, scores.size(-1))
        index = scores.topk(k, dim=-1).indices
        in_top = torch.zeros_like(mask).scatter(-1, index, True) & mask
        targets = targets * in_top
        mass = targets.sum(dim=-1, keepdim=True)
        kept = mass.squeeze(-1) > 0
        targets = targets / mass.clamp_min(1e-12)
        log_probs = torch.log_softmax(scores.masked_fill(~in_top, float("-inf")), dim=-1)
    else:
        raise ValueError(f"support must be 'full' or 'topk', got {support!r}")
    # 0 * log 0 = 0; the clamp keeps -inf (regions outside the support, where the target is 0) out of the
    # product and out of the gradient.
    terms = targets * (torch.log(targets.clamp_min(1e-12)) - log_probs.clamp_min(-1e4))
    return terms.sum(dim=-1), kept


# --------------------------------------------------------------------------------------------- module


class AlignmentDecoder(nn.Module):
    """Ŝ = LN(S' + FF(S')), Ô = LN(O' + FF(O')) and A = Ŝ·Ôᵀ/√d."""

    def __init__(self, hidden: int, intermediate: int, eps: float):
        super().__init__()
        self.text_ff = nn.Sequential(nn.Linear(hidden, intermediate), nn.GELU(),
                                     nn.Linear(intermediate, hidden))
        self.region_ff = nn.Sequential(nn.Linear(hidden, intermediate), nn.GELU(),
                                       nn.Linear(intermediate, hidden))
        self.text_norm = nn.LayerNorm(hidden, eps=eps)
        self.region_norm = nn.LayerNorm(hidden, eps=eps)
        self.scale = 1.0 / math.sqrt(hidden)

    def forward(self, text: Tensor, regions: Tensor) -> Tensor:
        s = self.text_norm(text + self.text_ff(text))
        o = self.region_norm(regions + self.region_ff(regions))
        return torch.einsum("bth,brh->btr", s, o) * self.scale


class ObjectWordAlignment(nn.Module):
    """The alignment objective (registry name ``owa``); see the module docstring."""

    requires: tuple[str, ...] = ()

    def __init__(self, model: UniterModel, *, k: int = 3, support: Support = "full") -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"object-word alignment k must be >= 1, got {k}")
        if support not in ("full", "topk"):
            raise ValueError(f"object-word alignment support must be 'full' or 'topk', got {support!r}")
        config = model.config
        self.k, self.support = k, support
        self.decoder = AlignmentDecoder(config.hidden_size, config.intermediate_size, config.layer_norm_eps)
        init_head_weights(self.decoder, config.initializer_range)

    def prepare(self, batch: dict, generator: torch.Generator) -> dict:
        return batch

    def scores(self, model: UniterModel, batch: dict) -> Tensor:
        """A [B, Lt, N] of the batch (padding regions included; mask them with ``img_mask``)."""
        sequence = encode(model, batch)
        text_len = batch["input_ids"].size(1)
        return self.decoder(sequence[:, :text_len], sequence[:, text_len:])

    def forward(self, model: UniterModel, batch: dict) -> dict[str, Tensor]:
        scores = self.scores(model, batch)
        targets = batch["align_targets"].to(scores.device)
        words = targets.sum(dim=-1) > 0  # [B, Lt] annotated tokens
        region_mask = batch["img_mask"].unsqueeze(1).expand_as(scores)[words]
        word_scores, word_targets = scores[words], targets[words]
        with torch.autocast(device_type=scores.device.type, enabled=False):
            kl, kept = alignment_kl(word_scores.float(), word_targets.float(), region_mask, self.k,
                                    self.support)
            loss = kl[kept].sum() / max(int(kept.sum()), 1)
            probs = topk_softmax(word_scores.float(), self.k, region_mask)
        best = word_targets.argmax(dim=-1)
        correct = probs.argmax(dim=-1) == best
        in_top = probs.gather(-1, best.unsqueeze(-1)).squeeze(-1) > 0  # the target's best region in A's top-k
        count = torch.tensor(correct.numel(), device=scores.device)
        return {
            "owa_loss": loss if kept.any() else scores.sum() * 0.0,
            "owa_correct": correct.sum().detach(),
            "owa_count": count,
            "owa_topk_correct": in_top.sum().detach(),
            "owa_topk_count": count,
        }


@torch.no_grad()
def alignment_maps(model: UniterModel, objective: ObjectWordAlignment, batch: dict
                   ) -> list[dict[str, Tensor]]:
    """Per example of a collated alignment batch (the paper's Fig. 4 data): over its annotated tokens
    ``rows`` (positions) x its real regions, the target A*, the predicted top-k distribution A and the last
    layer's text-to-region attention (heads averaged)."""
    was = model.training, objective.training
    model.eval()
    objective.eval()
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], txt_mask=batch["txt_mask"],
                img_feat=batch["img_feat"], img_pos_feat=batch["img_pos_feat"], img_mask=batch["img_mask"],
                attn_layer=-1)
    text_len = batch["input_ids"].size(1)
    scores = objective.decoder(out.sequence_output[:, :text_len], out.sequence_output[:, text_len:])
    maps = []
    for b in range(scores.size(0)):
        rows = (batch["align_targets"][b].sum(-1) > 0).nonzero().squeeze(-1)
        n = int(batch["img_mask"][b].sum())
        mask = batch["img_mask"][b, :n].expand(len(rows), n)
        attention = out.attention[b].mean(0)[:text_len, text_len:text_len + n]
        maps.append({"rows": rows.cpu(), "target": batch["align_targets"][b, rows, :n].float().cpu(),
                     "predicted": topk_softmax(scores[b, rows, :n], objective.k, mask).cpu(),
                     "attention": attention[rows].float().cpu()})
    model.train(was[0])
    objective.train(was[1])
    return maps
