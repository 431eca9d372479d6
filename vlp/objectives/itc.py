"""Image-text contrastive alignment (ITC) on unimodal passes of the one single-stream encoder.

ALBEF (Li et al. 2021, Eq. 1-2) aligns a text encoder's [CLS] with an image encoder's [CLS] by InfoNCE
before fusing them. UNITER has one encoder and no image [CLS]: here each caption and each image go through
the same encoder alone (text-only and image-only passes), each is the L2-normalised mean of its outputs
projected to ``embed_dim`` (the shortlist signal of retrieval evaluation, ``vlp.tasks.retrieval``), and
the loss is the symmetric InfoNCE over the batch with a learnable temperature. Captions of the same image
in a batch are all its positives (ALBEF's soft targets over equal ids). Negatives are the batch's other
images and captions on this worker only; the CODIS issue adds momentum queues across workers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.model.uniter import UniterModel
from vlp.objectives.common import init_head_weights

TEXT_FIELDS = ("input_ids", "position_ids", "txt_mask")
IMAGE_FIELDS = ("img_feat", "img_pos_feat", "img_mask")
TEMPERATURE_RANGE = (1e-3, 0.5)  # ALBEF clamps its learnable temperature to this range


def _mean(model: UniterModel, inputs: dict[str, Tensor]) -> Tensor:
    seq = model(**inputs).sequence_output.float()
    mask = torch.cat([inputs["txt_mask"], inputs["img_mask"]], dim=1).float()
    return (seq * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)


def positives(img_keys: list[str]) -> Tensor:
    """[B, B] bool: row i's caption and column j's image belong together (same image key)."""
    index = {key: i for i, key in enumerate(dict.fromkeys(img_keys))}
    ids = torch.tensor([index[key] for key in img_keys])
    return ids[:, None] == ids[None, :]


def contrastive_loss(logits: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric InfoNCE with every positive of a row sharing its target mass; (loss, rows whose top
    column is a positive, counted over both directions)."""
    logits = logits.float()
    targets = pos.float() / pos.sum(1, keepdim=True)
    t2i = -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
    targets_t = pos.T.float() / pos.T.sum(1, keepdim=True)
    i2t = -(targets_t * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    hits = pos.gather(1, logits.argmax(1, keepdim=True)).sum()
    hits = hits + pos.T.gather(1, logits.T.argmax(1, keepdim=True)).sum()
    return (t2i + i2t) / 2, hits


class ITC(nn.Module):
    requires: tuple[str, ...] = ()

    def __init__(self, model: UniterModel, *, embed_dim: int = 256, temperature: float = 0.07) -> None:
        super().__init__()
        low, high = TEMPERATURE_RANGE
        if not low <= temperature <= high:
            raise ValueError(f"ITC temperature must be in [{low}, {high}], got {temperature}")
        hidden = model.config.hidden_size
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.image_proj = nn.Linear(hidden, embed_dim)
        init_head_weights(self, model.config.initializer_range)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))

    def prepare(self, batch: dict, generator: torch.Generator) -> dict:
        return batch

    def embed(self, model: UniterModel, batch: dict) -> tuple[Tensor, Tensor]:
        """(text, image) L2-normalised embeddings [B, embed_dim] from the unimodal passes."""
        b, device = batch["input_ids"].shape[0], batch["input_ids"].device
        no_regions = {"img_feat": batch["img_feat"][:, :0], "img_pos_feat": batch["img_pos_feat"][:, :0],
                      "img_mask": batch["img_mask"][:, :0]}
        no_text = {"input_ids": torch.zeros(b, 0, dtype=torch.long, device=device),
                   "position_ids": torch.zeros(b, 0, dtype=torch.long, device=device),
                   "txt_mask": torch.zeros(b, 0, dtype=torch.bool, device=device)}
        text = _mean(model, {**{k: batch[k] for k in TEXT_FIELDS}, **no_regions})
        image = _mean(model, {**no_text, **{k: batch[k] for k in IMAGE_FIELDS}})
        return (F.normalize(self.text_proj(text).float(), dim=-1),
                F.normalize(self.image_proj(image).float(), dim=-1))

    def forward(self, model: UniterModel, batch: dict) -> dict[str, Tensor]:
        text, image = self.embed(model, batch)
        temperature = self.log_temperature.exp().clamp(*TEMPERATURE_RANGE)
        pos = positives(batch["img_keys"]).to(text.device)
        loss, hits = contrastive_loss(text @ image.T / temperature, pos)
        return {"itc_loss": loss, "itc_correct": hits.detach(),
                "itc_count": torch.tensor(2 * pos.shape[0], device=text.device)}
