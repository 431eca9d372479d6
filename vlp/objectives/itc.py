"""Image-text contrastive alignment (ITC) on unimodal features of the one single-stream encoder.

ALBEF (Li et al. 2021, Eq. 1-2) aligns a text encoder's [CLS] with an image encoder's [CLS] by InfoNCE
before fusing them. UNITER has one encoder and no image [CLS]. The unimodal features (``ITC.embed``):

* ``fusion_start`` = 0 (UNITER): each caption and each image go through the whole encoder alone (text-only
  and image-only passes) and each is the mean of its outputs;
* ``fusion_start`` > 0 (align before fuse, ``vlp.model.encoder``): one pass through the first
  ``fusion_start`` layers, which attend within each modality only; the text's [CLS] and the mean of the
  regions at that depth.

Either is projected to ``embed_dim`` and L2-normalised (the shortlist signal of contrastive retrieval).
Captions of the same image are all positives (ALBEF's soft targets over equal ids).

Without a teacher (``queue_size`` 0 and ``distill`` 0, the default) the loss is the symmetric InfoNCE over
this worker's batch, student against student. With one (ALBEF / CODIS, Eq. 4-5): the candidates are the
momentum teacher's features of the batch followed by the feature queue (``vlp.objectives.momentum``), the
targets mix the one-hot positives with the teacher's softmax over the same candidates,
``y = (1 − distill)·positives + distill·softmax(z^m·candidatesᵀ / γ)`` (ALBEF's α_d = 0.4), and after the loss
the batch's teacher features are enqueued (gathered from every worker; only in training). The ``itc`` task
gives the cross-modal terms (t2i, i2t), the ``itc_intra`` task the intra-modal ones (t2t, i2i, CODIS) on the
same projections, temperature and queues; each loss is the mean of its two directions. The temperature γ is
learnable and clamped to [0.001, 0.5] (ALBEF).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.model.uniter import UniterModel
from vlp.objectives.common import init_head_weights
from vlp.objectives.momentum import FeatureQueue, key_ids

TEXT_FIELDS = ("input_ids", "position_ids", "txt_mask")
IMAGE_FIELDS = ("img_feat", "img_pos_feat", "img_mask")
TEMPERATURE_RANGE = (1e-3, 0.5)  # ALBEF clamps its learnable temperature to this range


def _mean(model: UniterModel, inputs: dict[str, Tensor]) -> Tensor:
    seq = model(**inputs).sequence_output.float()
    mask = torch.cat([inputs["txt_mask"], inputs["img_mask"]], dim=1).float()
    return (seq * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)


def text_only(model: UniterModel, input_ids: Tensor, position_ids: Tensor, txt_mask: Tensor
              ) -> dict[str, Tensor]:
    """The encoder inputs of the texts alone (no regions)."""
    b, config = input_ids.shape[0], model.config
    empty = input_ids.new_zeros((b, 0))
    feat = torch.zeros(b, 0, config.img_dim, device=input_ids.device)
    return {"input_ids": input_ids, "position_ids": position_ids, "txt_mask": txt_mask, "img_feat": feat,
            "img_pos_feat": torch.zeros(b, 0, config.pos_dim, device=input_ids.device),
            "img_mask": empty.bool()}


def image_only(img_feat: Tensor, img_pos_feat: Tensor, img_mask: Tensor) -> dict[str, Tensor]:
    """The encoder inputs of the images alone (no text)."""
    b, device = img_feat.shape[0], img_feat.device
    return {"input_ids": torch.zeros(b, 0, dtype=torch.long, device=device),
            "position_ids": torch.zeros(b, 0, dtype=torch.long, device=device),
            "txt_mask": torch.zeros(b, 0, dtype=torch.bool, device=device),
            "img_feat": img_feat, "img_pos_feat": img_pos_feat, "img_mask": img_mask}


def _region_mean(seq: Tensor, img_mask: Tensor) -> Tensor:
    mask = img_mask.float()
    return (seq * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)


def text_features(model: UniterModel, inputs: dict[str, Tensor]) -> Tensor:
    """[B, H] fp32 features of text-only inputs (``text_only``): the mean output of the whole encoder, or
    with ``fusion_start`` the [CLS] output at that depth."""
    depth = model.config.fusion_start
    if depth:
        return model(**inputs, depth=depth).sequence_output[:, 0].float()
    return _mean(model, inputs)


def image_features(model: UniterModel, inputs: dict[str, Tensor]) -> Tensor:
    """[B, H] fp32 features of image-only inputs (``image_only``): the mean output of the whole encoder, or
    with ``fusion_start`` the mean region output at that depth."""
    depth = model.config.fusion_start
    if depth:
        return _region_mean(model(**inputs, depth=depth).sequence_output.float(), inputs["img_mask"])
    return _mean(model, inputs)


def unimodal_features(model: UniterModel, batch: dict) -> tuple[Tensor, Tensor]:
    """(text [B, H], image [B, H]) fp32 features of a batch's captions and images before the projection (see
    the module doc); with ``fusion_start`` one within-modality pass over both, as two unimodal passes."""
    depth = model.config.fusion_start
    if depth:
        fields = {k: batch[k] for k in (*TEXT_FIELDS, *IMAGE_FIELDS)}
        seq = model(**fields, depth=depth).sequence_output.float()
        text_len = batch["input_ids"].shape[1]
        return seq[:, 0], _region_mean(seq[:, text_len:], batch["img_mask"])
    text = text_features(model, text_only(model, *(batch[k] for k in TEXT_FIELDS)))
    image = image_features(model, image_only(*(batch[k] for k in IMAGE_FIELDS)))
    return text, image


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


def distilled_contrastive_loss(query: Tensor, candidates: Tensor, pos: Tensor, valid: Tensor,
                               temperature: Tensor, teacher_query: Tensor | None = None,
                               distill: float = 0.0) -> tuple[Tensor, Tensor]:
    """One direction of momentum-distilled InfoNCE: (mean over rows of H(y, softmax(query·candᵀ/γ)), rows
    whose top candidate is a positive).

    query [B, d]; candidates [C, d]; pos Bool[B, C] (the row's positives; at least one valid per row);
    valid Bool[C] (unfilled queue rows are no candidates); targets y = (1 − distill)·pos / |pos| +
    distill·softmax(teacher_query·candᵀ / γ), the teacher's part without gradient. In fp32.
    """
    logits = (query.float() @ candidates.float().T / temperature).masked_fill(~valid, float("-inf"))
    pos = pos & valid
    targets = pos.float() / pos.sum(1, keepdim=True).clamp_min(1)
    if distill > 0:
        if teacher_query is None:
            raise ValueError("distilled_contrastive_loss: distill > 0 needs the teacher's queries")
        with torch.no_grad():
            soft = (teacher_query.float() @ candidates.float().T / temperature.detach())
            soft = soft.masked_fill(~valid, float("-inf")).softmax(dim=1)
        targets = (1.0 - distill) * targets + distill * soft
    # where(): an invalid column's -inf log-probability times its 0 target must not make NaN.
    terms = torch.where(valid, targets * F.log_softmax(logits, dim=1), torch.zeros((), device=logits.device))
    hits = pos.gather(1, logits.argmax(1, keepdim=True)).sum()
    return -terms.sum(1).mean(), hits


@dataclass
class Candidates:
    """What a momentum-contrastive step contrasts against: the batch's teacher features, then the queue."""

    text: Tensor  # [B + S, d]
    image: Tensor  # [B + S, d]
    ids: Tensor  # [B + S] image ids
    valid: Tensor  # Bool[B + S]
    teacher_text: Tensor  # [B, d]: the batch's teacher features (queries of the soft targets)
    teacher_image: Tensor
    batch_ids: Tensor  # [B]

    def positives(self) -> Tensor:
        return self.batch_ids[:, None] == self.ids[None, :]


def core(context: Any, task: str) -> ITC:
    """The ``itc`` objective a task builds on (its projections, temperature, queues)."""
    objectives = getattr(context, "objectives", None)
    if objectives is None or "itc" not in objectives:
        raise ValueError(f"task {task!r} needs the itc task (its projections, temperature and queues)")
    return objectives["itc"]


class ITC(nn.Module):
    requires: tuple[str, ...] = ()
    uses_context = True  # PretrainModel passes itself: the momentum teacher

    def __init__(self, model: UniterModel, *, embed_dim: int = 256, temperature: float = 0.07,
                 queue_size: int = 0, distill: float = 0.0, momentum: float = 0.995) -> None:
        super().__init__()
        low, high = TEMPERATURE_RANGE
        if not low <= temperature <= high:
            raise ValueError(f"ITC temperature must be in [{low}, {high}], got {temperature}")
        if queue_size < 0 or not 0.0 <= distill <= 1.0 or not 0.0 <= momentum < 1.0:
            raise ValueError(f"ITC needs queue_size >= 0, distill in [0, 1] and momentum in [0, 1), got "
                             f"{queue_size}, {distill}, {momentum}")
        hidden = model.config.hidden_size
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.image_proj = nn.Linear(hidden, embed_dim)
        init_head_weights(self, model.config.initializer_range)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        self.queue_size, self.distill, self.momentum = queue_size, distill, momentum
        self.queue = FeatureQueue(queue_size, embed_dim) if queue_size else None

    @property
    def wants_teacher(self) -> bool:
        """Queue and soft targets are the teacher's features: with either, PretrainModel holds a teacher."""
        return self.queue_size > 0 or self.distill > 0

    def teacher_parts(self) -> dict[str, nn.Module]:
        """The modules besides the encoder whose EMA copies the teacher holds."""
        return {"text_proj": self.text_proj, "image_proj": self.image_proj}

    def temperature(self) -> Tensor:
        return self.log_temperature.exp().clamp(*TEMPERATURE_RANGE)

    def prepare(self, batch: dict, generator: torch.Generator) -> dict:
        return batch

    def embed(self, model: UniterModel, batch: dict, text_proj: nn.Module | None = None,
              image_proj: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        """(text, image) L2-normalised fp32 embeddings [B, embed_dim] (the teacher passes its copies)."""
        text, image = unimodal_features(model, batch)
        text_proj = self.text_proj if text_proj is None else text_proj
        image_proj = self.image_proj if image_proj is None else image_proj
        return (F.normalize(text_proj(text).float(), dim=-1),
                F.normalize(image_proj(image).float(), dim=-1))

    def embed_texts(self, model: UniterModel, input_ids: Tensor, position_ids: Tensor, txt_mask: Tensor
                    ) -> Tensor:
        """L2-normalised fp32 embeddings [B, embed_dim] of texts alone (retrieval's shortlist)."""
        features = text_features(model, text_only(model, input_ids, position_ids, txt_mask))
        return F.normalize(self.text_proj(features).float(), dim=-1)

    def embed_images(self, model: UniterModel, img_feat: Tensor, img_pos_feat: Tensor, img_mask: Tensor
                     ) -> Tensor:
        """L2-normalised fp32 embeddings [B, embed_dim] of images alone (retrieval's shortlist)."""
        features = image_features(model, image_only(img_feat, img_pos_feat, img_mask))
        return F.normalize(self.image_proj(features).float(), dim=-1)

    def teacher_embed(self, model: UniterModel, batch: dict, context: Any) -> tuple[Tensor, Tensor] | None:
        """The momentum teacher's embeddings of the batch (no gradient), or None without a teacher."""
        teacher = getattr(context, "teacher", None)
        if teacher is None:
            return None
        with torch.no_grad():
            return self.embed(teacher["encoder"], batch, teacher["text_proj"], teacher["image_proj"])

    def candidates(self, model: UniterModel, batch: dict, context: Any, student: tuple[Tensor, Tensor]
                   ) -> Candidates:
        """The batch's teacher features (the student's, detached, without a teacher) then the queue; in
        training the batch's teacher features are then enqueued (all workers' rows)."""
        teacher = self.teacher_embed(model, batch, context)
        text, image = teacher if teacher is not None else (student[0].detach(), student[1].detach())
        ids = key_ids(batch["img_keys"]).to(text.device)
        valid = torch.ones(ids.shape[0], dtype=torch.bool, device=text.device)
        out = Candidates(text, image, ids, valid, text, image, ids)
        if self.queue is not None:
            queue = self.queue
            # torch.cat copies: enqueueing below does not touch what this step's loss saved for backward.
            out = Candidates(torch.cat([text, queue.features("text")]),
                             torch.cat([image, queue.features("image")]), torch.cat([ids, queue.ids]),
                             torch.cat([valid, queue.valid()]), text, image, ids)
            if self.training:
                queue.enqueue(ids, text=text, image=image)
        return out

    def forward(self, model: UniterModel, batch: dict, context: Any = None) -> dict[str, Tensor]:
        text, image = self.embed(model, batch)
        temperature = self.temperature()
        if not self.wants_teacher:  # in-batch InfoNCE, student against student
            pos = positives(batch["img_keys"]).to(text.device)
            loss, hits = contrastive_loss(text @ image.T / temperature, pos)
        else:
            cand = self.candidates(model, batch, context, (text, image))
            pos = cand.positives()
            t2i, hits_t = distilled_contrastive_loss(text, cand.image, pos, cand.valid, temperature,
                                                     cand.teacher_text, self.distill)
            i2t, hits_i = distilled_contrastive_loss(image, cand.text, pos, cand.valid, temperature,
                                                     cand.teacher_image, self.distill)
            loss, hits = (t2i + i2t) / 2, hits_t + hits_i
        return {"itc_loss": loss, "itc_correct": hits.detach(),
                "itc_count": torch.tensor(2 * text.shape[0], device=text.device)}

    def intra(self, model: UniterModel, batch: dict, context: Any) -> dict[str, Tensor]:
        """CODIS's intra-modal terms: each text against the text candidates (t2t), each image against the
        image candidates (i2i), with the same teacher, queues and soft targets."""
        if not self.wants_teacher:
            raise ValueError("itc_intra needs the momentum teacher: set the itc queue size or distill > 0")
        text, image = self.embed(model, batch)
        temperature = self.temperature()
        cand = self.candidates(model, batch, context, (text, image))
        pos = cand.positives()
        t2t, hits_t = distilled_contrastive_loss(text, cand.text, pos, cand.valid, temperature,
                                                 cand.teacher_text, self.distill)
        i2i, hits_i = distilled_contrastive_loss(image, cand.image, pos, cand.valid, temperature,
                                                 cand.teacher_image, self.distill)
        return {"itc_intra_loss": (t2t + i2i) / 2, "itc_intra_correct": (hits_t + hits_i).detach(),
                "itc_intra_count": torch.tensor(2 * text.shape[0], device=text.device)}


class ITCIntra(nn.Module):
    """The ``itc_intra`` task: intra-modal alignment (``ITC.intra``) on the ``itc`` task's heads and queues;
    it owns no parameter."""

    requires: tuple[str, ...] = ()
    uses_context = True

    def __init__(self, model: UniterModel) -> None:
        super().__init__()

    def prepare(self, batch: dict, generator: torch.Generator) -> dict:
        return batch

    def forward(self, model: UniterModel, batch: dict, context: Any = None) -> dict[str, Tensor]:
        return core(context, "itc_intra").intra(model, batch, context)
