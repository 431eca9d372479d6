"""Pieces shared by the objectives: running the encoder on a batch, BERT's prediction-head transform and
head initialisation, and the count-based accuracy that validation sums across batches and workers."""

import torch
from torch import Tensor, nn

from vlp.model.uniter import UniterModel


def encode(model: UniterModel, batch: dict) -> Tensor:
    """Sequence output [B, Lt+N, H] of the UNITER encoder for a collated (and prepared) batch, pretraining's
    or a downstream task's."""
    output = model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        txt_mask=batch["txt_mask"],
        img_feat=batch["img_feat"],
        img_pos_feat=batch["img_pos_feat"],
        img_mask=batch["img_mask"],
        img_masked=batch.get("img_masked"),
        img_type_ids=batch.get("img_type_ids"),  # NLVR2's two images
    )
    return output.sequence_output


def prediction_transform(hidden_size: int, layer_norm_eps: float) -> nn.Sequential:
    """BERT's head transform (dense -> GELU -> LayerNorm) applied before a tied output projection."""
    return nn.Sequential(
        nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.LayerNorm(hidden_size, eps=layer_norm_eps)
    )


def init_head_weights(module: nn.Module, std: float) -> None:
    """BERT initialisation of the layers a head owns (tied weights belong to the encoder: untouched)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, mean=0.0, std=std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.LayerNorm):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


def accuracy_counts(name: str, predicted: Tensor, targets: Tensor) -> dict[str, Tensor]:
    return {
        f"{name}_correct": (predicted == targets).sum().detach(),
        f"{name}_count": torch.tensor(targets.numel(), device=targets.device),
    }
