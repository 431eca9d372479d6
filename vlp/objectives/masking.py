"""Token and region masking for the masked-modeling objectives (MLM, MRFR, MRC, MRC-kl).

All randomness comes from the `torch.Generator` passed in, so a data-loading worker reproduces a batch's
masks exactly from its seed. Conditional masking (UNITER's default) masks only the objective's own
modality and leaves the other intact; joint masking (the ablation) masks both in the same example.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

IGNORE_INDEX = -100
MaskingMode = Literal["conditional", "joint"]
MASKING_MODES = ("conditional", "joint")
# BERT's split of the selected tokens: 80% [MASK], 10% a random token, the remaining 10% left unchanged.
MASK_FRACTION = 0.8
RANDOM_FRACTION = 0.1


@dataclass(frozen=True)
class TokenMasking:
    """Which tokens may be corrupted and into what. Special ids (and padding) are never selected nor drawn
    as random replacements; `build` adds mask_id to the special ids."""

    mask_id: int
    special_ids: tuple[int, ...]
    vocab_range: tuple[int, int]
    prob: float = 0.15

    def __post_init__(self) -> None:
        if not 0.0 < self.prob <= 1.0:
            raise ValueError(f"token mask probability must be in (0, 1], got {self.prob}")
        if self.replacement_ids().numel() == 0:
            raise ValueError(
                f"vocab_range {self.vocab_range} holds no non-special token to draw replacements from"
            )

    @classmethod
    def build(
        cls, mask_id: int, special_ids: Iterable[int], vocab_range: tuple[int, int], prob: float = 0.15
    ) -> "TokenMasking":
        special = tuple(sorted({int(i) for i in special_ids} | {int(mask_id)}))
        return cls(int(mask_id), special, (int(vocab_range[0]), int(vocab_range[1])), float(prob))

    def replacement_ids(self) -> Tensor:
        ids = torch.arange(self.vocab_range[0], self.vocab_range[1])
        return ids[~torch.isin(ids, torch.tensor(self.special_ids, dtype=torch.long))]


def check_masking(mode: str, prob: float) -> None:
    """Validate the masking options when an objective is built, before any data is loaded."""
    if mode not in MASKING_MODES:
        raise ValueError(f"masking must be one of {MASKING_MODES}, got {mode!r}")
    if not 0.0 < prob <= 1.0:
        raise ValueError(f"mask probability must be in (0, 1], got {prob}")


def select_positions(candidates: Tensor, prob: float, generator: torch.Generator) -> Tensor:
    """Bernoulli(prob) over the True entries of candidates [B, L]; an example that drew none but has
    candidates gets one chosen uniformly among them."""
    draws = torch.rand(candidates.shape, generator=generator)
    chosen = (draws < prob) & candidates
    fallback = torch.rand(candidates.shape, generator=generator).masked_fill(~candidates, -1.0).argmax(dim=1)
    needs_one = candidates.any(dim=1) & ~chosen.any(dim=1)
    rows = needs_one.nonzero(as_tuple=True)[0]
    chosen[rows, fallback[rows]] = True
    return chosen


def mask_tokens(
    input_ids: Tensor, txt_mask: Tensor, spec: TokenMasking, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Returns (corrupted input_ids, labels); labels hold the original id at selected positions, else -100."""
    candidates = txt_mask & ~torch.isin(input_ids, torch.tensor(spec.special_ids, dtype=input_ids.dtype))
    selected = select_positions(candidates, spec.prob, generator)
    action = torch.rand(input_ids.shape, generator=generator)
    pool = spec.replacement_ids()
    random_ids = pool[torch.randint(pool.numel(), input_ids.shape, generator=generator)].to(input_ids.dtype)
    to_mask = selected & (action < MASK_FRACTION)
    to_random = selected & (action >= MASK_FRACTION) & (action < MASK_FRACTION + RANDOM_FRACTION)
    corrupted = input_ids.masked_fill(to_mask, spec.mask_id)
    corrupted = torch.where(to_random, random_ids, corrupted)
    labels = input_ids.masked_fill(~selected, IGNORE_INDEX)
    return corrupted, labels


def mask_regions(img_mask: Tensor, prob: float, generator: torch.Generator) -> Tensor:
    """Bool [B, N]: regions whose features the model zeroes; at least one real region per example."""
    if not 0.0 < prob <= 1.0:
        raise ValueError(f"region mask probability must be in (0, 1], got {prob}")
    return select_positions(img_mask, prob, generator)


def apply_masking(
    batch: dict,
    generator: torch.Generator,
    *,
    target: Literal["text", "regions"],
    mode: MaskingMode,
    tokens: TokenMasking | None,
    region_prob: float,
) -> dict:
    """Copy of `batch` with `txt_labels` and `img_masked` added (and `input_ids` corrupted when text is
    masked). The target modality is always masked; the other only in joint mode."""
    check_masking(mode, region_prob)
    mask_text = target == "text" or mode == "joint"
    mask_image = target == "regions" or mode == "joint"
    out = dict(batch)
    if mask_text:
        if tokens is None:
            raise ValueError(f"{mode} masking of text needs mask_id / special_ids (token masking options)")
        out["input_ids"], out["txt_labels"] = mask_tokens(
            batch["input_ids"], batch["txt_mask"], tokens, generator
        )
    else:
        out["txt_labels"] = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    if mask_image:
        out["img_masked"] = mask_regions(batch["img_mask"], region_prob, generator)
    else:
        out["img_masked"] = torch.zeros_like(batch["img_mask"])
    return out
