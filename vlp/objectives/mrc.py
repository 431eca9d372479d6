"""Masked region classification against the detector's labels: MRC (cross-entropy to the argmax object
class, background excluded) and MRC-kl (KL divergence to the full soft-label distribution).

MRC-kl's reduction (``kl_norm``): ``region`` (default, the UNITER paper, Section 3.2: the KL of each masked
region's distribution, averaged over the regions) or ``element`` (the official code, model/pretrain.py
``forward_mrc``: ``kl_div(reduction="none")`` then ``.mean()`` over regions x classes, i.e. the per-region KL
divided by C+1).
"""

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from vlp.model.uniter import UniterModel
from vlp.objectives.common import accuracy_counts, init_head_weights, prediction_transform
from vlp.objectives.mrm import MaskedRegionObjective


def mrc_loss(logits: Tensor, soft_labels: Tensor) -> dict[str, Tensor]:
    """logits and soft_labels [M, C+1] with column 0 the background. The target is the most probable
    object class 1..C; mean cross-entropy over all C+1 logits; accuracy compares the argmax over 1..C."""
    logits = logits.float()
    targets = soft_labels[:, 1:].argmax(dim=-1) + 1
    loss = F.cross_entropy(logits, targets, reduction="sum") / max(targets.numel(), 1)
    return {"mrc_loss": loss, **accuracy_counts("mrc", logits[:, 1:].argmax(dim=-1) + 1, targets)}


KlNorm = Literal["region", "element"]


def mrc_kl_loss(logits: Tensor, soft_labels: Tensor, kl_norm: KlNorm = "region") -> dict[str, Tensor]:
    """KL(soft_labels || softmax(logits)) summed over the C+1 classes, averaged over the masked regions
    (``element``: also divided by C+1); accuracy compares the argmax over all C+1 classes (UNITER's
    validation)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    soft_labels = soft_labels.float()
    loss = F.kl_div(log_probs, soft_labels, reduction="sum") / max(soft_labels.size(0), 1)
    if kl_norm == "element":
        loss = loss / soft_labels.size(-1)
    return {
        "mrc_kl_loss": loss,
        **accuracy_counts("mrc_kl", log_probs.argmax(dim=-1), soft_labels.argmax(dim=-1)),
    }


class _RegionClassifier(MaskedRegionObjective):
    requires = ("soft_labels",)

    def __init__(self, model: UniterModel, *, label_dim: int, **options) -> None:
        """label_dim: C+1, the width of the store's soft labels (background first). Other options: see
        MaskedRegionObjective."""
        super().__init__(model, **options)
        config = model.config
        self.label_dim = label_dim
        self.head = nn.Sequential(
            prediction_transform(config.hidden_size, config.layer_norm_eps),
            nn.Linear(config.hidden_size, label_dim),
        )
        init_head_weights(self.head, config.initializer_range)

    def region_logits(self, model: UniterModel, batch: dict) -> tuple[Tensor, Tensor]:
        soft_labels = batch["soft_labels"]
        if soft_labels.size(-1) != self.label_dim:
            raise ValueError(
                f"{type(self).__name__} was built for {self.label_dim} label classes but the batch's "
                f"soft_labels have {soft_labels.size(-1)}"
            )
        logits = self.head(self.masked_region_outputs(model, batch))
        return logits, soft_labels[batch["img_masked"]]


class MRC(_RegionClassifier):
    def forward(self, model: UniterModel, batch: dict) -> dict[str, Tensor]:
        return mrc_loss(*self.region_logits(model, batch))


class MRCKL(_RegionClassifier):
    def __init__(self, model: UniterModel, *, label_dim: int, kl_norm: KlNorm = "region", **options) -> None:
        super().__init__(model, label_dim=label_dim, **options)
        if kl_norm not in ("region", "element"):
            raise ValueError(f"MRC-kl kl_norm must be 'region' or 'element', got {kl_norm!r}")
        self.kl_norm = kl_norm

    def forward(self, model: UniterModel, batch: dict) -> dict[str, Tensor]:
        return mrc_kl_loss(*self.region_logits(model, batch), self.kl_norm)
