"""Masked region feature regression: regress the input feature of each masked region."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.model.uniter import UniterModel
from vlp.objectives.common import init_head_weights, prediction_transform
from vlp.objectives.mrm import MaskedRegionObjective


def mrfr_loss(predicted: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Squared error averaged over masked regions and feature dimensions ([M, D] each), as UNITER's
    element-wise MSE; 0 when nothing is masked."""
    squared = (predicted.float() - target.float()).pow(2).sum()
    return {"mrfr_loss": squared / max(target.numel(), 1)}


class MRFR(MaskedRegionObjective):
    def __init__(self, model: UniterModel, **options) -> None:
        """Options: see MaskedRegionObjective (mask_prob, masking, and token ids for joint masking)."""
        super().__init__(model, **options)
        config = model.config
        self.transform = prediction_transform(config.hidden_size, config.layer_norm_eps)
        init_head_weights(self.transform, config.initializer_range)
        # Output projection H -> D reuses the transpose of the image embedder's D -> H weight.
        self.bias = nn.Parameter(torch.zeros(config.img_dim))

    def forward(self, model: UniterModel, batch: dict) -> dict[str, Tensor]:
        hidden = self.transform(self.masked_region_outputs(model, batch))
        predicted = F.linear(hidden, model.img_embeddings.img_linear.weight.t(), self.bias)
        return mrfr_loss(predicted, batch["img_feat"][batch["img_masked"]])
