"""Image-text matching on the pooled [CLS] output, with word-region alignment (WRA) by optimal transport.

Negatives: each example becomes a negative with probability ``neg_prob`` by getting another image. Two
sources (``pretrain.itm_negatives``):

* ``corpus`` (default; UNITER's ``ItmDataset``, data/itm.py, and the paper's "randomly-selected one from other
  samples"): any other image of the example's text db, redrawn every epoch (``corpus_negatives``); the data
  loader swaps the image and sets ``itm_targets`` before ``prepare``, which then leaves the batch as it is.
* ``batch``: ``prepare`` gives the example the image of another example of the batch whose image key differs
  (``sample_negatives``), so a negative pair is never secretly a positive one.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.model.uniter import UniterModel
from vlp.objectives.common import accuracy_counts, encode, init_head_weights
from vlp.objectives.ipot import cosine_cost, ot_distance

# Per-example fields that travel with an image when it is swapped into another example.
IMAGE_FIELDS = ("img_feat", "img_pos_feat", "img_mask", "soft_labels")


def sample_negatives(
    img_keys: list[str], neg_prob: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """(source [B], targets [B]): example i takes the image of example source[i]; targets is 1 where that
    is its own image, 0 for a negative. Each example becomes a negative with probability neg_prob unless
    every image in the batch has its key; the donor is uniform among examples with a different key."""
    index = {key: i for i, key in enumerate(dict.fromkeys(img_keys))}
    key_ids = torch.tensor([index[key] for key in img_keys], dtype=torch.long)
    size = key_ids.numel()
    different = key_ids.unsqueeze(1) != key_ids.unsqueeze(0)
    negative = (torch.rand(size, generator=generator) < neg_prob) & different.any(dim=1)
    source = torch.arange(size)
    rows = negative.nonzero(as_tuple=True)[0]
    if rows.numel():
        # One batched draw in fp32 with same-key donors at weight 0: no per-row loop, no NaN rows.
        weights = different[rows].to(torch.float32)
        source[rows] = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return source, (~negative).long()


def corpus_negatives(own: np.ndarray, pool: np.ndarray, neg_prob: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(partner [E], targets [E]) for E examples: example i keeps its image ``own[i]`` (target 1) or, with
    probability ``neg_prob``, gets an image drawn uniformly from the other images of its pool ``pool[i]``
    (the images ``own`` holds for that pool's examples; target 0). A pool of one image gives no negative."""
    own, pool = np.asarray(own, dtype=np.int64), np.asarray(pool, dtype=np.int64)
    partner, targets = own.copy(), np.ones(len(own), dtype=np.int64)
    negative = rng.random(len(own)) < neg_prob
    for p in np.unique(pool):
        images = np.unique(own[pool == p])
        rows = np.flatnonzero(negative & (pool == p))
        if len(images) < 2 or not len(rows):
            continue
        draw = rng.integers(0, len(images) - 1, len(rows))  # over the pool minus the own image
        position = np.searchsorted(images, own[rows])
        partner[rows] = images[draw + (draw >= position)]
        targets[rows] = 0
    return partner, targets


def word_positions(txt_mask: Tensor, cls_sep: bool = False) -> Tensor:
    """The text positions WRA aligns: the words, txt_mask without [CLS] (position 0) and [SEP] (the last
    real position), as the paper's OT between words w and regions v; with ``cls_sep`` every real text
    position (the official code's OT masks only padding: itm_ot_collate's txt_pad)."""
    if cls_sep:
        return txt_mask.clone()
    words = txt_mask.clone()
    words[:, 0] = False
    last = (txt_mask.sum(dim=1) - 1).clamp_min(0)
    words[torch.arange(txt_mask.size(0)), last] = False
    return words


def itm_loss(logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Mean 2-way cross-entropy (class 1 = matched) and accuracy counts."""
    logits = logits.float()
    return {
        "itm_loss": F.cross_entropy(logits, targets),
        **accuracy_counts("itm", logits.argmax(dim=-1), targets),
    }


def wra_loss(distance: Tensor, targets: Tensor) -> Tensor:
    """UNITER's OT loss: (sum of positives' OT distances - sum of negatives') / batch size. Minimising it
    pulls matched words and regions together and pushes mismatched ones apart."""
    signed = torch.where(targets == 1, distance, -distance)
    return signed.sum() / max(distance.numel(), 1)


class ITM(nn.Module):
    requires: tuple[str, ...] = ()

    def __init__(
        self,
        model: UniterModel,
        *,
        neg_prob: float = 0.5,
        wra: bool = True,
        wra_beta: float = 0.5,
        wra_iters: int = 50,
        wra_cls_sep: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= neg_prob <= 1.0:
            raise ValueError(f"ITM neg_prob must be in [0, 1], got {neg_prob}")
        if wra_beta <= 0 or wra_iters < 1:
            raise ValueError(f"ITM needs wra_beta > 0 and wra_iters >= 1, got {wra_beta}, {wra_iters}")
        self.neg_prob = neg_prob
        self.wra = wra
        self.wra_beta = wra_beta
        self.wra_iters = wra_iters
        self.wra_cls_sep = wra_cls_sep
        self.head = nn.Linear(model.config.hidden_size, 2)
        init_head_weights(self.head, model.config.initializer_range)

    def prepare(self, batch: dict, generator: torch.Generator) -> dict:
        if "itm_targets" in batch:  # corpus negatives: the loader already swapped the images
            return batch
        source, targets = sample_negatives(batch["img_keys"], self.neg_prob, generator)
        out = dict(batch)
        for field in IMAGE_FIELDS:
            if field in batch:
                out[field] = batch[field][source]
        out["img_keys"] = [batch["img_keys"][i] for i in source.tolist()]
        out["itm_targets"] = targets
        return out

    def forward(self, model: UniterModel, batch: dict) -> dict[str, Tensor]:
        sequence = encode(model, batch)
        targets = batch["itm_targets"]
        result = itm_loss(self.head(model.pool(sequence)), targets)
        if self.wra:
            text_len = batch["input_ids"].size(1)
            # OT in fp32 even under autocast: exp(-cost / beta) and the scalings lose too much in bf16.
            with torch.autocast(device_type=sequence.device.type, enabled=False):
                cost = cosine_cost(sequence[:, :text_len].float(), sequence[:, text_len:].float())
                words = word_positions(batch["txt_mask"], self.wra_cls_sep)
                distance = ot_distance(cost, words, batch["img_mask"], self.wra_beta, self.wra_iters)
            result["wra_loss"] = wra_loss(distance, targets)
        return result
