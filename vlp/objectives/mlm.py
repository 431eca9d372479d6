"""Masked language modeling conditioned on the image: predict the original ids of the masked tokens."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.model.uniter import UniterModel
from vlp.objectives.common import accuracy_counts, encode, init_head_weights, prediction_transform
from vlp.objectives.masking import IGNORE_INDEX, MaskingMode, TokenMasking, apply_masking, check_masking


def mlm_loss(logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Mean cross-entropy over the masked tokens (logits [M, V], targets [M]); 0 when nothing is masked."""
    logits = logits.float()
    count = targets.numel()
    loss = F.cross_entropy(logits, targets, reduction="sum") / max(count, 1)
    return {"mlm_loss": loss, **accuracy_counts("mlm", logits.argmax(dim=-1), targets)}


class MLM(nn.Module):
    requires: tuple[str, ...] = ()

    def __init__(
        self,
        model: UniterModel,
        *,
        mask_id: int,
        special_ids: Sequence[int],
        vocab_range: tuple[int, int] | None = None,
        mask_prob: float = 0.15,
        masking: MaskingMode = "conditional",
    ) -> None:
        """vocab_range: [low, high) of the ids random replacements are drawn from (the txt_db meta's
        `v_range`); defaults to the whole vocabulary. Special ids are never masked nor drawn. mask_prob is
        also the region masking probability under joint masking."""
        super().__init__()
        check_masking(masking, mask_prob)
        config = model.config
        self.tokens = TokenMasking.build(
            mask_id, special_ids, vocab_range or (0, config.vocab_size), mask_prob
        )
        self.mask_prob = mask_prob
        self.masking = masking
        self.transform = prediction_transform(config.hidden_size, config.layer_norm_eps)
        init_head_weights(self.transform, config.initializer_range)
        # The decoder's weight is the encoder's word embedding matrix (read at forward time, so it is not a
        # second copy in this module's state); only the output bias is the head's own.
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def prepare(self, batch: dict, generator: torch.Generator) -> dict:
        return apply_masking(
            batch, generator, target="text", mode=self.masking, tokens=self.tokens, region_prob=self.mask_prob
        )

    def forward(self, model: UniterModel, batch: dict) -> dict[str, Tensor]:
        labels = batch["txt_labels"]
        text = encode(model, batch)[:, : labels.size(1)]
        selected = labels != IGNORE_INDEX
        hidden = self.transform(text[selected])
        logits = F.linear(hidden, model.embeddings.word_embeddings.weight, self.bias)
        return mlm_loss(logits, labels[selected])
