"""Image-text retrieval with the UNITER cross-encoder: hard-negative ranking finetuning and evaluation.

Training follows UNITER's ``itm_hard_neg`` recipe. The rank head is ``Linear(H, 1)`` over the pooled
[CLS] output, initialised from the pretrained ITM head's *matched* row, so at step 0 it scores a pair
with the ITM positive logit. For every positive pair of a batch the data holds ``neg_samples`` random
candidate images (other images than the pair's) and as many candidate texts (texts of other images);
the current model scores them without gradients (eval mode: no dropout), the ``hard_negatives``
highest-scoring ones of each side are kept, and the loss is the hinge

    mean_j max(0, margin + sigmoid(s(t, i_j^-)) - sigmoid(s(t, i)))      (text anchor, image negatives)
  + mean_j max(0, margin + sigmoid(s(t'_j^-, i')) - sigmoid(s(t', i')))  (image anchor, text negatives)

``sides``: ``shared`` (the IAIS paper, Section 4.2: "for each positive instance, 31 hard negative instances
are sampled on the text and image side") anchors both sides on one positive, (t', i') = (t, i); ``separate``
(the official code, ``train_itm_hard_negatives.py``: one loader of texts with candidate images and an
independent one of images with candidate texts) draws the image side's positive (t', i') independently,
uniformly over the split. The official recipe is 399 candidates, the 31 hardest per side, 8 positives per
step (``train-itm-flickr-base-8gpu-hn.json``): ``neg_samples``, ``hard_negatives`` and the finetuning config's
``positives_per_step``. With IAIS, the text anchor regularizes the text side's positives and the image
anchor the image side's (the same pairs when shared).

(UNITER applies the hinge to sigmoid scores, so the margin is on a [0, 1] scale). Hardest negatives need a
model that already ranks: from a random start the cheapest way down is one score for every pair (loss
2 x margin, then no gradient out of it, as VSE++ observed), which is why UNITER starts from the ITM head
and why a from-scratch baseline tends to stay at chance. With IAIS enabled the
training forward also returns the last layer's attention and ``iais_loss`` is the IAIS regularizer on
the positive pairs; the loop weights it by ``loss_weights(step, total)`` (the annealing schedule).

Evaluation scores image x text pairs with the same head (:class:`PairScorer`) either for every pair or
for a shortlist from unimodal similarity (:func:`unimodal_similarity`: the encoder run on the text alone
and on the regions alone, mean of its outputs, cosine), both chunked (``vlp.eval.retrieval``).
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from vlp.data.collate import collate
from vlp.data.img_db import ImgDb
from vlp.data.pretrain_dataset import ImageTextIndex, PretrainDataset, TxtDbLike
from vlp.eval.isda import detected_regions, isda
from vlp.model import UniterConfig, UniterModel
from vlp.objectives.common import init_head_weights
from vlp.objectives.iais import IAISConfig, IAISLoss

ITM_HEAD = "itm.head"  # prefix of the ITM head's parameters in the pretrain stage's heads.pt
Sides = Literal["shared", "separate"]
Autocast = Callable[[], AbstractContextManager]
TEXT_FIELDS = ("input_ids", "position_ids", "txt_mask")
IMAGE_FIELDS = ("img_feat", "img_pos_feat", "img_mask")


class RetrievalDataError(ValueError):
    """Retrieval data that cannot be trained or evaluated on; the message names the db and the setting."""


def hardest(scores: Tensor, k: int) -> Tensor:
    """Indices [B, k] of the k highest candidate scores of each row of ``scores`` [B, N]."""
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"hardest: k={k} must be in [1, {scores.shape[1]}] (candidates per positive)")
    return scores.topk(k, dim=1).indices


def hinge(positive: Tensor, negative: Tensor, margin: float) -> Tensor:
    """Mean of max(0, margin + negative - positive) over [B, k] negatives of [B] positives."""
    return (margin + negative - positive[:, None]).clamp_min(0).mean()


def _pad_cat(parts: Sequence[Tensor]) -> Tensor:
    """Concatenate [n_i, L_i, ...] tensors along dim 0, zero-padding dim 1 to the longest."""
    length = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, (0, 0) * (p.dim() - 2) + (0, length - p.shape[1])) for p in parts])


def pair_batch(texts: Mapping[str, Tensor], images: Mapping[str, Tensor], txt_rows: Tensor,
               img_rows: Tensor) -> dict[str, Tensor]:
    """The model input pairing text ``txt_rows[j]`` with image ``img_rows[j]``, blocks trimmed to the
    longest real text / most regions among the chosen rows (padding at each block's end is kept)."""
    txt_mask, img_mask = texts["txt_mask"][txt_rows], images["img_mask"][img_rows]
    lt, n = int(txt_mask.sum(1).max()), int(img_mask.sum(1).max())
    batch = {key: texts[key][txt_rows][:, :lt] for key in TEXT_FIELDS}
    batch |= {key: images[key][img_rows][:, :n] for key in IMAGE_FIELDS}
    return batch


class Retrieval(nn.Module):
    """Rank head + hard-negative hinge loss (+ IAIS); ``forward(model, batch)`` is one training step."""

    name = "retrieval"
    metric = "r_mean"  # of vlp.eval.retrieval.recall_at_k, on the validation split

    def __init__(self, encoder_config: UniterConfig, *, margin: float = 0.2, hard_negatives: int = 1,
                 iais: IAISConfig | Mapping[str, Any] | None = None, iais_weight: float = 1.0,
                 sides: Sides = "shared"):
        super().__init__()
        if margin < 0 or hard_negatives < 1 or iais_weight < 0:
            raise ValueError(f"Retrieval: margin {margin} and iais_weight {iais_weight} must be >= 0 and "
                             f"hard_negatives {hard_negatives} >= 1")
        if sides not in ("shared", "separate"):
            raise ValueError(f"Retrieval: sides must be 'shared' or 'separate', got {sides!r}")
        self.margin, self.hard_negatives, self.iais_weight = float(margin), int(hard_negatives), iais_weight
        self.sides = sides
        self.rank = nn.Linear(encoder_config.hidden_size, 1)
        init_head_weights(self.rank, encoder_config.initializer_range)
        if iais is not None and not isinstance(iais, IAISConfig):
            iais = IAISConfig.model_validate(dict(iais))
        self.iais = IAISLoss(iais) if iais is not None else None

    def init_from_itm(self, heads: Mapping[str, Tensor], source: str = "heads.pt") -> None:
        """Copy the ITM head's matched row (class 1) into the rank head, as UNITER does."""
        weight, bias = heads.get(f"{ITM_HEAD}.weight"), heads.get(f"{ITM_HEAD}.bias")
        if weight is None or bias is None:
            raise ValueError(f"{source}: no ITM head ({ITM_HEAD}.weight / .bias); pretrain with the itm task "
                             "or finetune from scratch")
        if tuple(weight.shape) != (2, self.rank.in_features) or tuple(bias.shape) != (2,):
            raise ValueError(f"{source}: ITM head has shape {tuple(weight.shape)}, the rank head needs "
                             f"(2, {self.rank.in_features})")
        with torch.no_grad():
            self.rank.weight.copy_(weight[1:])
            self.rank.bias.copy_(bias[1:])

    def score(self, model: UniterModel, batch: Mapping[str, Tensor],
              attn_layer: int | None = None) -> tuple[Tensor, Tensor | None]:
        """Rank scores [B] (fp32: bf16 would create ties between close pairs) and the requested attention."""
        out = model(**{key: batch[key] for key in (*TEXT_FIELDS, *IMAGE_FIELDS)}, attn_layer=attn_layer)
        pooled = model.pool(out.sequence_output)
        with torch.autocast(pooled.device.type, enabled=False):
            return self.rank(pooled.float()).squeeze(-1), out.attention

    def loss_weights(self, step: int, total: int) -> dict[str, float]:
        """Weights of the returned losses at optimizer step ``step`` of ``total`` (IAIS is annealed)."""
        weights = {"retrieval_loss": 1.0}
        if self.iais is not None:
            weights["iais_loss"] = self.iais_weight * self.iais.weight(step, total)
        return weights

    @torch.no_grad()
    def _mine(self, model: UniterModel, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """Indices [B * k] into the candidate images and into the candidate texts: the k hardest negatives
        of each positive, positive by positive (the image side's positives: ``image_side``)."""
        n = int(batch["neg_samples"])
        b, device = batch["input_ids"].shape[0], batch["input_ids"].device
        anchors = torch.arange(b, device=device).repeat_interleave(n)
        candidates = torch.arange(b * n, device=device)
        with_images = pair_batch(batch, _negatives(batch, "img"), anchors, candidates)
        with_texts = pair_batch(_negatives(batch, "txt"), image_side(batch), candidates, anchors)
        with evaluating(model):
            img_scores, _ = self.score(model, with_images)
            txt_scores, _ = self.score(model, with_texts)
        offset = (torch.arange(b, device=device) * n)[:, None]
        k = min(self.hard_negatives, n)
        return (hardest(img_scores.view(b, n), k) + offset).flatten(), (
            hardest(txt_scores.view(b, n), k) + offset).flatten()

    def forward(self, model: UniterModel, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        if not batch.get("neg_samples"):
            raise ValueError("Retrieval.forward needs a training batch with negative candidates "
                             "(RetrievalDataset with neg_samples > 0)")
        separate = "side_input_ids" in batch
        if separate != (self.sides == "separate"):
            raise ValueError(f"Retrieval head with sides={self.sides!r} got a batch "
                             f"{'with' if separate else 'without'} separate image-side positives")
        hard_img, hard_txt = self._mine(model, batch)
        b = batch["input_ids"].shape[0]
        k = hard_img.numel() // b
        # One pass over [positives ; text with hard images ; (image-side positives ;) hard texts with the
        # image-side image]: text rows index the positives' texts, the candidate texts, then the image side's
        # texts; image rows the positives' images, the candidates, then the image side's images.
        parts = [batch, _prefixed(batch, "neg_"), *([image_side(batch)] if separate else [])]
        texts = {key: _pad_cat([part[key] for part in parts]) for key in TEXT_FIELDS}
        images = {key: _pad_cat([part[key] for part in parts]) for key in IMAGE_FIELDS}
        own = torch.arange(b, device=hard_img.device)
        side_rows = b + batch["neg_input_ids"].shape[0] + own if separate else own
        side_pairs = [side_rows] if separate else []
        txt_rows = torch.cat([own, own.repeat_interleave(k), *side_pairs, b + hard_txt])
        img_rows = torch.cat([own, b + hard_img, *side_pairs, side_rows.repeat_interleave(k)])
        pairs = pair_batch(texts, images, txt_rows, img_rows)
        scores, attention = self.score(model, pairs, attn_layer=-1 if self.iais is not None else None)
        probs = scores.sigmoid()
        positive = probs[:b]
        neg_img = probs[b : b + b * k].view(b, k)
        side_start = b + b * k + (b if separate else 0)
        side_positive = probs[b + b * k : side_start] if separate else positive
        neg_txt = probs[side_start:].view(b, k)
        loss_txt_anchor = hinge(positive, neg_img, self.margin)
        loss_img_anchor = hinge(side_positive, neg_txt, self.margin)
        correct = (positive > neg_img.max(1).values) & (side_positive > neg_txt.max(1).values)
        out = {
            "retrieval_loss": loss_txt_anchor + loss_img_anchor,
            "retrieval_hinge_text_anchor": loss_txt_anchor.detach(),
            "retrieval_hinge_image_anchor": loss_img_anchor.detach(),
            "retrieval_correct": correct.sum().detach(),
            "retrieval_count": torch.tensor(b, device=correct.device),
        }
        if self.iais is not None:
            masks = (pairs["txt_mask"].bool(), pairs["img_mask"].bool())
            if not separate:
                positives = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
                positives[:b] = True
                out |= self.iais(attention, *masks, positives)
            else:  # the text anchor on the text side's positives, the image anchor on the image side's
                total = attention.sum() * 0.0
                for anchor, start in (("text", 0), ("image", b + b * k)):
                    if anchor in self.iais.config.anchors:
                        positives = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
                        positives[start : start + b] = True
                        part = self.iais(attention, *masks, positives, anchors=(anchor,))
                        total = total + part["iais_loss"]
                        out[f"iais_kl_{anchor}"] = part[f"iais_kl_{anchor}"]
                out["iais_loss"] = total
        return out

    def state_extra(self) -> dict[str, Any]:
        return {"margin": self.margin, "hard_negatives": self.hard_negatives, "iais_weight": self.iais_weight,
                "iais": None if self.iais is None else self.iais.config.model_dump(mode="json"),
                "sides": self.sides}


def _negatives(batch: Mapping[str, Any], side: str) -> dict[str, Tensor]:
    fields = IMAGE_FIELDS if side == "img" else TEXT_FIELDS
    return {key: batch[f"neg_{key}"] for key in fields}


def _prefixed(batch: Mapping[str, Any], prefix: str) -> dict[str, Tensor]:
    return {key: batch[f"{prefix}{key}"] for key in (*TEXT_FIELDS, *IMAGE_FIELDS)}


def image_side(batch: Mapping[str, Any]) -> dict[str, Tensor]:
    """The image side's positive pairs: the batch's own (shared sides) or its ``side_*`` pairs (separate)."""
    return _prefixed(batch, "side_" if "side_input_ids" in batch else "")


class RetrievalDataset(Dataset):
    """Caption ``i`` of the text dbs with its image; with ``neg_samples`` > 0 each example also carries
    that many random other images and texts of other images (the hard-negative candidates). With
    ``sides="separate"`` the image side has its own positive: a caption drawn uniformly from the split
    (``image_side``), whose candidate texts are texts of other images than its own.

    Texts whose image is not in the store are listed in ``missing`` (image keys) and left out.
    """

    def __init__(self, txt_dbs: TxtDbLike | Sequence[TxtDbLike], img_db: ImgDb, *,
                 max_txt_len: int | None = 60, neg_samples: int = 0, seed: int = 0, sides: Sides = "shared"):
        self.pairs = PretrainDataset(txt_dbs, img_db, max_txt_len)
        self.img_db = img_db
        self.missing: list[str] = list(self.pairs.missing_images)
        self.pad_id = int(self.pairs.meta.get("PAD", 0))
        self.index = ImageTextIndex.from_dataset(self.pairs) if len(self.pairs) else None
        self.neg_samples = int(neg_samples)
        if self.neg_samples and self.index is not None:
            n_img = len(self.index.img_keys)
            fewest = n_img - 1
            if self.neg_samples > fewest:
                raise RetrievalDataError(f"neg_samples={self.neg_samples}: the split has only {n_img} "
                                         f"images, so a pair has at most {fewest} other images to sample")
            own = np.bincount(self.index.txt2img.numpy(), minlength=n_img)
            if len(self.pairs) - int(own.max()) < self.neg_samples:
                raise RetrievalDataError(f"neg_samples={self.neg_samples}: some image has fewer texts of "
                                         "other images than that")
        if sides not in ("shared", "separate"):
            raise RetrievalDataError(f"sides must be 'shared' or 'separate', got {sides!r}")
        self.sides = sides
        self._rng = np.random.default_rng(seed)
        self._texts: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def txt_lens(self) -> np.ndarray:
        return self.pairs.txt_lens

    @property
    def img_lens(self) -> np.ndarray:
        return self.pairs.img_lens

    @property
    def lengths(self) -> np.ndarray:
        return self.pairs.lengths

    def text(self, j: int) -> Tensor:
        """Input ids ([CLS] ... [SEP]) of text ``j`` (cached: texts are small and read again as negatives)."""
        if j not in self._texts:
            self._texts[j] = self.pairs.pair(j, self.pairs.img_keys[j])["input_ids"]
        return self._texts[j]

    def __getitem__(self, i: int) -> dict[str, Any]:
        example = self.pairs[i]
        self._texts.setdefault(i, example["input_ids"])
        if self.neg_samples:
            own = int(self.index.txt2img[i])
            # Other images: uniform over the n_img - 1 indices, skipping the own one.
            draw = self._rng.choice(len(self.index.img_keys) - 1, self.neg_samples, replace=False)
            example["neg_images"] = [self.index.img_keys[m + (m >= own)] for m in draw.tolist()]
            if self.sides == "separate":
                example["image_side"] = int(self._rng.integers(len(self.pairs)))
                own = int(self.index.txt2img[example["image_side"]])
            texts: list[int] = []
            while len(texts) < self.neg_samples:  # rejection: an image has only a few texts
                extra = self.neg_samples - len(texts) + 4
                drawn = self._rng.choice(len(self.pairs), min(extra, len(self.pairs)), replace=False)
                texts += [j for j in drawn.tolist() if self.index.txt2img[j] != own and j not in texts]
            example["neg_texts"] = texts[: self.neg_samples]
        return example

    def collate(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(examples, pad_id=self.pad_id)
        batch.pop("soft_labels", None)
        if self.neg_samples:
            # Row r of the candidates pairs image neg_images[r] with text neg_texts[r] only to share one
            # collate; the model never sees those pairs together (see Retrieval._mine).
            keys = [key for ex in examples for key in ex["neg_images"]]
            texts = [j for ex in examples for j in ex["neg_texts"]]
            regions = [self.img_db.get(key) for key in keys]
            neg = collate([{"input_ids": self.text(j), "img_feat": r.features, "img_pos_feat": r.boxes,
                            "img_key": key, "txt_id": self.pairs.txt_ids[j]}
                           for r, key, j in zip(regions, keys, texts, strict=True)], pad_id=self.pad_id)
            batch |= {f"neg_{key}": neg[key] for key in (*TEXT_FIELDS, *IMAGE_FIELDS)}
            batch["neg_samples"] = self.neg_samples
            if self.sides == "separate":
                rows = []
                for j in (ex["image_side"] for ex in examples):
                    region = self.img_db.get(self.pairs.img_keys[j])
                    rows.append({"input_ids": self.text(j), "img_feat": region.features,
                                 "img_pos_feat": region.boxes, "img_key": self.pairs.img_keys[j],
                                 "txt_id": self.pairs.txt_ids[j]})
                side = collate(rows, pad_id=self.pad_id)
                batch |= {f"side_{key}": side[key] for key in (*TEXT_FIELDS, *IMAGE_FIELDS)}
        return batch


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


class PairScorer:
    """Cross-encoder scores of image x text blocks: ``scorer(img_idx, txt_idx) -> [I, T]``.

    Texts are held in memory (token ids are small); image regions are read from the store and kept in
    an LRU cache of ``cache_images`` images, so memory does not grow with the number of images.

    Every block allocates tensors of a slightly different size (its longest text, its most regions, its
    real positions). glibc serves those from a heap that fragments once its mmap threshold has adapted
    upwards, and RSS then climbs with the number of blocks although live memory does not (measured: 8 GB
    after the 5,000 blocks of a 1K x 5K evaluation, 1 GB with a static threshold). Every
    ``release_every`` blocks the free heap pages are handed back (glibc ``malloc_trim``; 0 never).
    """

    def __init__(self, model: UniterModel, task: Retrieval, img_db: ImgDb, img_keys: Sequence[str],
                 texts: Sequence[Tensor], *, pad_id: int = 0, device: torch.device | str = "cpu",
                 autocast: Autocast = nullcontext, cache_images: int = 512, release_every: int = 8):
        self.model, self.task, self.img_db = model, task, img_db
        self.img_keys, self.texts = list(img_keys), list(texts)
        self.pad_id, self.device, self.autocast = pad_id, torch.device(device), autocast
        self.cache_images = cache_images
        self._cache: OrderedDict[int, tuple[Tensor, Tensor]] = OrderedDict()
        self.pairs_scored = 0
        self._release = _malloc_trim() if release_every > 0 else None
        self._release_every, self._blocks = release_every, 0

    def regions(self, idx: Sequence[int]) -> dict[str, Tensor]:
        """img_feat / img_pos_feat / img_mask of the images ``idx``, padded."""
        feats, boxes = [], []
        for m in idx:
            if m in self._cache:
                self._cache.move_to_end(m)
            else:
                region = self.img_db.get(self.img_keys[m])
                self._cache[m] = (region.features, region.boxes)
                if len(self._cache) > self.cache_images:
                    self._cache.popitem(last=False)
            feats.append(self._cache[m][0])
            boxes.append(self._cache[m][1])
        lens = torch.tensor([f.shape[0] for f in feats])
        n = int(lens.max())
        return {"img_feat": _stack_padded(feats, n), "img_pos_feat": _stack_padded(boxes, n),
                "img_mask": torch.arange(n) < lens[:, None]}

    def text_batch(self, idx: Sequence[int]) -> dict[str, Tensor]:
        """input_ids / position_ids / txt_mask of the texts ``idx``, padded."""
        ids = [self.texts[t] for t in idx]
        lens = torch.tensor([len(x) for x in ids])
        lt = int(lens.max())
        input_ids = torch.full((len(ids), lt), self.pad_id, dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, : len(x)] = x
        return {"input_ids": input_ids, "position_ids": torch.arange(lt).repeat(len(ids), 1),
                "txt_mask": torch.arange(lt) < lens[:, None]}

    @torch.no_grad()
    def __call__(self, img_idx: Tensor, txt_idx: Tensor) -> Tensor:
        """Scores [I, T] of images ``img_idx`` x texts ``txt_idx``, the model in eval mode (no dropout)."""
        n_img, n_txt = img_idx.numel(), txt_idx.numel()
        images = _to(self.regions(img_idx.tolist()), self.device)
        texts = _to(self.text_batch(txt_idx.tolist()), self.device)
        img_rows = torch.arange(n_img, device=self.device).repeat_interleave(n_txt)
        txt_rows = torch.arange(n_txt, device=self.device).repeat(n_img)
        with self.autocast(), evaluating(self.model):
            scores, _ = self.task.score(self.model, pair_batch(texts, images, txt_rows, img_rows))
        self.pairs_scored += n_img * n_txt
        self._blocks += 1
        if self._release is not None and self._blocks % self._release_every == 0:
            self._release(0)
        return scores.view(n_img, n_txt)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """The model in eval mode inside the block, its previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _stack_padded(rows: Sequence[Tensor], length: int) -> Tensor:
    out = rows[0].new_zeros((len(rows), length, *rows[0].shape[1:]))
    for b, row in enumerate(rows):
        out[b, : row.shape[0]] = row
    return out


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def text_only(model: UniterModel, texts: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Model inputs of the texts with no regions (N = 0)."""
    b, device = texts["input_ids"].shape[0], texts["input_ids"].device
    return {**{k: texts[k] for k in TEXT_FIELDS},
            "img_feat": torch.zeros(b, 0, model.config.img_dim, device=device),
            "img_pos_feat": torch.zeros(b, 0, model.config.pos_dim, device=device),
            "img_mask": torch.zeros(b, 0, dtype=torch.bool, device=device)}


def image_only(images: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Model inputs of the images with no text (Lt = 0)."""
    b, device = images["img_feat"].shape[0], images["img_feat"].device
    empty = torch.zeros(b, 0, dtype=torch.long, device=device)
    return {"input_ids": empty, "position_ids": empty, "txt_mask": empty.bool(),
            **{k: images[k] for k in IMAGE_FIELDS}}


def mean_output(model: UniterModel, inputs: Mapping[str, Tensor]) -> Tensor:
    """L2-normalized mean of the encoder outputs over the real positions: a unimodal embedding when the
    inputs hold one modality only (``text_only`` / ``image_only``)."""
    seq = model(**inputs).sequence_output.float()
    mask = torch.cat([inputs["txt_mask"], inputs["img_mask"]], dim=1)
    mean = (seq * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
    return F.normalize(mean, dim=-1)


@torch.no_grad()
def unimodal_similarity(scorer: PairScorer, chunk: int = 256) -> Tensor:
    """Cosine similarity [n_img, n_txt] of the encoder's mean outputs on each image alone and each text
    alone (the shortlist signal: one pass per item instead of one per pair), computed in chunks."""
    model, device = scorer.model, scorer.device
    txt_emb, img_emb = [], []
    with scorer.autocast(), evaluating(model):
        for t0 in range(0, len(scorer.texts), chunk):
            texts = _to(scorer.text_batch(range(t0, min(t0 + chunk, len(scorer.texts)))), device)
            txt_emb.append(mean_output(model, text_only(model, texts)))
        for i0 in range(0, len(scorer.img_keys), chunk):
            images = _to(scorer.regions(range(i0, min(i0 + chunk, len(scorer.img_keys)))), device)
            img_emb.append(mean_output(model, image_only(images)))
    return (torch.cat(img_emb) @ torch.cat(txt_emb).T).cpu()


@torch.no_grad()
def itc_similarity(scorer: PairScorer, itc: Any, chunk: int = 256) -> Tensor:
    """Cosine similarity [n_img, n_txt] of the pretraining itc task's projected unimodal embeddings
    (``vlp.objectives.itc.ITC.embed_texts`` / ``embed_images``: ALBEF's contrastive shortlist)."""
    model, device = scorer.model, scorer.device
    txt_emb, img_emb = [], []
    with scorer.autocast(), evaluating(model), evaluating(itc):
        for t0 in range(0, len(scorer.texts), chunk):
            texts = _to(scorer.text_batch(range(t0, min(t0 + chunk, len(scorer.texts)))), device)
            txt_emb.append(itc.embed_texts(model, *(texts[k] for k in TEXT_FIELDS)))
        for i0 in range(0, len(scorer.img_keys), chunk):
            images = _to(scorer.regions(range(i0, min(i0 + chunk, len(scorer.img_keys)))), device)
            img_emb.append(itc.embed_images(model, *(images[k] for k in IMAGE_FIELDS)))
    return (torch.cat(img_emb) @ torch.cat(txt_emb).T).float().cpu()


@dataclass(frozen=True)
class EntityPhrase:
    first_word: int  # index of the phrase's first word in the sentence split on spaces
    n_words: int
    chain: str  # Entities chain id: the phrases of one chain in a sentence are one object
    boxes: tuple[tuple[float, float, float, float], ...]  # x1, y1, x2, y2 in pixels of the original image


@dataclass(frozen=True)
class EntitySentence:
    """One Flickr30k Entities sentence of an image with its annotated phrases (the unit ISDa scores)."""

    img_key: str
    words: tuple[str, ...]
    phrases: tuple[EntityPhrase, ...]


# Regions of one object: (image key, the object's annotated boxes, the store's normalized x1y1x2y2 region
# boxes [N, 4]) -> region indices.
Locate = Callable[[str, Sequence[Sequence[float]], Tensor], list[int]]


def annotated_regions(boxes_by_image: Mapping[str, Sequence[Sequence[float]]]) -> Locate:
    """Regions of a store pooled at the annotated boxes themselves, one region per box, whose row order is
    ``boxes_by_image[key]`` (the paper's ISDa: features at the Entities ground-truth boxes)."""

    def locate(key: str, boxes: Sequence[Sequence[float]], region_boxes: Tensor) -> list[int]:
        index = {tuple(float(v) for v in box): r for r, box in enumerate(boxes_by_image.get(key, ()))}
        rows = (index.get(tuple(float(v) for v in box)) for box in boxes)
        return sorted({r for r in rows if r is not None and r < len(region_boxes)})

    return locate


def detected_regions_by_iou(image_sizes: Mapping[str, tuple[int, int]], iou_threshold: float = 0.5) -> Locate:
    """Detected regions whose box has IoU >= ``iou_threshold`` with one of the object's boxes; the store's
    normalized boxes are scaled by ``image_sizes[key]`` = (width, height) to the annotation's pixels."""

    def locate(key: str, boxes: Sequence[Sequence[float]], region_boxes: Tensor) -> list[int]:
        width, height = image_sizes[key]
        scale = torch.tensor([width, height, width, height], dtype=torch.float64)
        return detected_regions(region_boxes.double() * scale, boxes, iou_threshold)

    return locate


def entity_inputs(tokenizer: Any, sentence: EntitySentence, cls_id: int, sep_id: int,
                  max_txt_len: int) -> tuple[Tensor, list[list[int]]]:
    """Input ids ([CLS] words [SEP], at most ``max_txt_len`` word pieces) and each phrase's positions.

    Words are tokenized as split by the annotation (``is_split_into_words``), so the tokenizer's word
    indices are the annotation's; pieces cut off by the length cap leave their phrase shorter or empty.
    """
    encoding = tokenizer(list(sentence.words), is_split_into_words=True, add_special_tokens=False)
    ids, word_ids = encoding["input_ids"][:max_txt_len], encoding.word_ids()[:max_txt_len]
    positions = [[pos + 1 for pos, w in enumerate(word_ids)
                  if w is not None and p.first_word <= w < p.first_word + p.n_words]
                 for p in sentence.phrases]
    return torch.tensor([cls_id, *ids, sep_id], dtype=torch.long), positions


def entity_objects(sentence: EntitySentence, positions: Sequence[Sequence[int]], region_boxes: Tensor,
                   locate: Locate) -> list[tuple[list[int], list[int]]]:
    """ISDa objects of a sentence: one per chain, (the tokens of all its phrases, its boxes' regions)."""
    chains: dict[str, tuple[list[int], list[tuple[float, ...]]]] = {}
    for phrase, tokens in zip(sentence.phrases, positions, strict=True):
        chain_tokens, chain_boxes = chains.setdefault(phrase.chain, ([], []))
        chain_tokens += tokens
        chain_boxes += [b for b in phrase.boxes if b not in chain_boxes]
    return [(tokens, locate(sentence.img_key, boxes, region_boxes)) for tokens, boxes in chains.values()]


@torch.no_grad()
def sentence_isda(model: UniterModel, img_db: ImgDb, sentences: Sequence[EntitySentence], tokenizer: Any,
                  locate: Locate, *, cls_id: int, sep_id: int, max_txt_len: int = 60, batch_size: int = 16,
                  pad_id: int = 0, device: torch.device | str = "cpu",
                  autocast: Autocast = nullcontext) -> list[float | None]:
    """ISDa (vlp.eval.isda) of each sentence with its image's regions in ``img_db`` (the Entities boxes'
    store, or the detected regions), in the last layer's attention; None when the pair has fewer than
    two objects with tokens and regions. ``locate`` gives an object's regions (``annotated_regions``,
    ``detected_regions_by_iou``)."""
    values: list[float | None] = []
    with evaluating(model):
        for s0 in range(0, len(sentences), batch_size):
            chunk = sentences[s0 : s0 + batch_size]
            inputs = [entity_inputs(tokenizer, s, cls_id, sep_id, max_txt_len) for s in chunk]
            regions = [img_db.get(s.img_key) for s in chunk]
            batch = collate([{"input_ids": ids, "img_feat": r.features, "img_pos_feat": r.boxes,
                              "img_key": s.img_key, "txt_id": str(s0 + j)}
                             for j, ((ids, _), r, s) in enumerate(zip(inputs, regions, chunk, strict=True))],
                            pad_id=pad_id)
            with autocast():
                attention = model(**{k: batch[k].to(device) for k in (*TEXT_FIELDS, *IMAGE_FIELDS)},
                                  attn_layer=-1).attention
            lt = batch["input_ids"].shape[1]
            for j, ((_, positions), region, s) in enumerate(zip(inputs, regions, chunk, strict=True)):
                objects = entity_objects(s, positions, region.boxes[:, :4], locate)
                values.append(isda(attention[j], lt, len(region.boxes), objects))
    return values


@torch.no_grad()
def text_to_image_attention(scorer: PairScorer, image: int, text: int, layer: int = -1) -> Tensor:
    """Attention [text tokens, regions] of one pair in ``layer`` (averaged over heads): how much each word
    piece attends to each region, the real positions only."""
    texts = _to(scorer.text_batch([text]), scorer.device)
    images = _to(scorer.regions([image]), scorer.device)
    with scorer.autocast(), evaluating(scorer.model):
        attention = scorer.model(**texts, **images, attn_layer=layer).attention[0].mean(0)
    lt, n = texts["input_ids"].shape[1], images["img_feat"].shape[1]
    return attention[:lt, lt : lt + n].float().cpu()
