"""Shared part of the masked region modeling objectives (MRFR, MRC, MRC-kl): region masking in `prepare`
and the encoder outputs at the masked regions."""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from vlp.model.uniter import UniterModel
from vlp.objectives.common import encode
from vlp.objectives.masking import MaskingMode, TokenMasking, apply_masking, check_masking


class MaskedRegionObjective(nn.Module):
    requires: tuple[str, ...] = ()

    def __init__(
        self,
        model: UniterModel,
        *,
        mask_prob: float = 0.15,
        masking: MaskingMode = "conditional",
        mask_id: int | None = None,
        special_ids: Sequence[int] = (),
        vocab_range: tuple[int, int] | None = None,
    ) -> None:
        """Token options are needed only by joint masking, which also corrupts the text."""
        super().__init__()
        check_masking(masking, mask_prob)
        if masking == "joint" and mask_id is None:
            raise ValueError(f"{type(self).__name__}: joint masking corrupts text too and needs mask_id")
        self.mask_prob = mask_prob
        self.masking = masking
        self.tokens = (
            None
            if mask_id is None
            else TokenMasking.build(
                mask_id, special_ids, vocab_range or (0, model.config.vocab_size), mask_prob
            )
        )

    def prepare(self, batch: dict, generator: torch.Generator) -> dict:
        return apply_masking(
            batch,
            generator,
            target="regions",
            mode=self.masking,
            tokens=self.tokens,
            region_prob=self.mask_prob,
        )

    @staticmethod
    def masked_region_outputs(model: UniterModel, batch: dict) -> Tensor:
        """Encoder outputs [M, H] at the masked regions, in the row-major order of batch["img_masked"]."""
        regions = encode(model, batch)[:, batch["input_ids"].size(1) :]
        return regions[batch["img_masked"]]
