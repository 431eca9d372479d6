"""Image-text matching on the pooled [CLS] output, with word-region alignment (WRA) by optimal transport.

Negatives (``pretrain.itm_negatives``):

* ``corpus`` (default; UNITER's ``ItmDataset``, data/itm.py, and the paper's "randomly-selected one from other
  samples"): each example becomes a negative with probability ``neg_prob`` by getting any other image of its
  text db, redrawn every epoch (``corpus_negatives``); the data loader swaps the image and sets
  ``itm_targets`` before ``prepare``, which then leaves the batch as it is.
* ``batch``: ``prepare`` gives the example, with probability ``neg_prob``, the image of another example of the
  batch whose image key differs (``sample_negatives``), so a negative pair is never secretly a positive one.
* ``contrastive`` (ALBEF, CODIS): every pair of the batch is kept as a positive, and each text gets one
  negative image and each image one negative text of the batch, drawn in proportion to the ``itc`` task's
  similarity softmax(z_t·z_vᵀ / γ) with the positives (same image key) at weight 0
  (``contrastive_negatives``: fp32, one batched ``multinomial``, seeded by the batch). A row whose every
  candidate is a positive (batch size 1, a batch of one image) gets no negative: its negative pair is left
  out. The similarity is the student's, from a gradient-free unimodal pass (ALBEF reuses its ITC logits,
  student against teacher). Validation keeps ``batch``'s random donors (``neg_prob``), so validation ITM
  accuracy means the same for every negative source.
"""

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.model.uniter import UniterModel
from vlp.objectives.common import accuracy_counts, encode, init_head_weights
from vlp.objectives.ipot import cosine_cost, ot_distance
from vlp.objectives.itc import core, positives

# Per-example fields that travel with an image when it is swapped into another example.
IMAGE_FIELDS = ("img_feat", "img_pos_feat", "img_mask", "soft_labels")
TEXT_FIELDS = ("input_ids", "position_ids", "txt_mask")
NEGATIVE_SOURCES = ("corpus", "batch", "contrastive")


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


def contrastive_negatives(sim: Tensor, pos: Tensor, generator: torch.Generator
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Hard negatives in proportion to the contrastive similarity (ALBEF's ITM sampling).

    sim [B, B]: text i x image j logits (any float dtype; computed in fp32); pos Bool[B, B]: pairs that are
    positives (same image key). Returns (image for each text [B], text for each image [B], has_image Bool[B],
    has_text Bool[B]): row i's draw has probability softmax over the non-positive entries, a positive never;
    a row without any non-positive entry (batch size 1) draws a placeholder and is False in its mask. One
    batched ``multinomial`` over the [2B, B] weights, on their device (``generator`` must live there), no
    host sync.
    """
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1] or pos.shape != sim.shape:
        raise ValueError(f"contrastive_negatives expects sim and pos [B, B], got {tuple(sim.shape)}, "
                         f"{tuple(pos.shape)}")
    size = sim.shape[0]
    logits = torch.cat([sim, sim.T]).float()  # texts' rows over images, then images' rows over texts
    blocked = torch.cat([pos, pos.T]).to(logits.device)
    has = (~blocked).any(dim=1)
    logits = logits.masked_fill(blocked, float("-inf"))
    # A row with nothing to draw gets uniform weights (its draw is discarded): no NaN row for multinomial.
    logits = torch.where(has[:, None], logits, torch.zeros((), device=logits.device))
    draw = torch.multinomial(logits.softmax(dim=1), 1, generator=generator).squeeze(1)
    return draw[:size], draw[size:], has[:size], has[size:]


def swap_images(batch: dict, source: Tensor, targets: Tensor) -> dict:
    """The batch with example i's image taken from example source[i], and ``itm_targets``."""
    out = dict(batch)
    for field in IMAGE_FIELDS:
        if field in batch:
            out[field] = batch[field][source.to(batch[field].device)]
    out["img_keys"] = [batch["img_keys"][i] for i in source.tolist()]
    out["itm_targets"] = targets.to(batch["input_ids"].device)
    return out


def pair_rows(batch: dict, text_rows: Tensor, image_rows: Tensor, targets: Tensor) -> dict:
    """A batch of pairs (the text of example text_rows[p], the image of example image_rows[p]) and their
    ``itm_targets``."""
    out: dict[str, Any] = {}
    for field in TEXT_FIELDS:
        out[field] = batch[field][text_rows]
    for field in IMAGE_FIELDS:
        if field in batch:
            out[field] = batch[field][image_rows]
    out["img_keys"] = [batch["img_keys"][i] for i in image_rows.tolist()]
    if "txt_ids" in batch:
        out["txt_ids"] = [batch["txt_ids"][i] for i in text_rows.tolist()]
    out["itm_targets"] = targets
    return out


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
    uses_context = True  # contrastive negatives: the itc task's embeddings

    def __init__(
        self,
        model: UniterModel,
        *,
        neg_prob: float = 0.5,
        wra: bool = True,
        wra_beta: float = 0.5,
        wra_iters: int = 50,
        wra_cls_sep: bool = False,
        negatives: str = "batch",
    ) -> None:
        super().__init__()
        if not 0.0 <= neg_prob <= 1.0:
            raise ValueError(f"ITM neg_prob must be in [0, 1], got {neg_prob}")
        if negatives not in NEGATIVE_SOURCES:
            raise ValueError(f"ITM negatives must be one of {NEGATIVE_SOURCES}, got {negatives!r}")
        self.negatives = negatives
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
        if self.negatives == "contrastive":  # drawn in forward, from this batch's seed
            return {**batch, "itm_seed": int(torch.randint(0, 2**62, (1,), generator=generator))}
        source, targets = sample_negatives(batch["img_keys"], self.neg_prob, generator)
        return swap_images(batch, source, targets)

    def contrastive_pairs(self, model: UniterModel, batch: dict, context: Any) -> dict:
        """Every pair of the batch (positive), then each text with a hard negative image and each image with
        a hard negative text (``contrastive_negatives``)."""
        itc = core(context, "itm with contrastive negatives")
        with torch.no_grad():
            text, image = itc.embed(model, batch)
            sim = text @ image.T / itc.temperature()
        device = sim.device
        generator = torch.Generator(device=device).manual_seed(batch["itm_seed"])
        pos = positives(batch["img_keys"]).to(device)
        image_of_text, text_of_image, has_image, has_text = contrastive_negatives(sim, pos, generator)
        rows = torch.arange(sim.shape[0], device=device)
        text_rows = torch.cat([rows, rows[has_image], text_of_image[has_text]])
        image_rows = torch.cat([rows, image_of_text[has_image], rows[has_text]])
        targets = (torch.arange(text_rows.shape[0], device=device) < rows.shape[0]).long()
        return pair_rows(batch, text_rows, image_rows, targets)

    def forward(self, model: UniterModel, batch: dict, context: Any = None) -> dict[str, Tensor]:
        if "itm_targets" not in batch:  # contrastive negatives (prepare left the batch as it was)
            if "itm_seed" not in batch:
                raise ValueError("ITM: the batch has neither itm_targets nor itm_seed (not prepared)")
            if self.training:
                batch = self.contrastive_pairs(model, batch, context)
            else:  # validation: batch's random donors, from the batch's seed
                generator = torch.Generator().manual_seed(batch["itm_seed"])
                batch = swap_images(batch, *sample_negatives(batch["img_keys"], self.neg_prob, generator))
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
