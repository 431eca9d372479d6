"""Pads pretraining examples into the batch dict the model and the objectives share.

Layout: text [B, Lt] and regions [B, N], each padded at its end; the model concatenates them into
[text ; image], so text outputs are ``seq[:, :Lt]`` and region outputs ``seq[:, Lt:]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def _pad_rows(rows: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """Stack [n_i, ...] tensors into [B, length, ...], zero after each row's n_i."""
    out = rows[0].new_zeros((len(rows), length, *rows[0].shape[1:]))
    for b, row in enumerate(rows):
        out[b, : row.shape[0]] = row
    return out


def collate(examples: Sequence[dict[str, Any]], pad_id: int = 0) -> dict[str, Any]:
    """``PretrainDataset`` examples -> the batch dict (``soft_labels`` when every example has them)."""
    if not examples:
        raise ValueError("collate: empty batch")
    txt_lens = torch.tensor([ex["input_ids"].shape[0] for ex in examples])
    img_lens = torch.tensor([ex["img_feat"].shape[0] for ex in examples])
    lt, n = int(txt_lens.max()), int(img_lens.max())
    input_ids = torch.full((len(examples), lt), pad_id, dtype=torch.long)
    for b, ex in enumerate(examples):
        input_ids[b, : ex["input_ids"].shape[0]] = ex["input_ids"]
    batch = {
        "input_ids": input_ids,
        # A real tensor, not an expand() view: objectives may write into batch tensors in place.
        "position_ids": torch.arange(lt).repeat(len(examples), 1),
        "txt_mask": torch.arange(lt) < txt_lens[:, None],
        "img_feat": _pad_rows([ex["img_feat"] for ex in examples], n),
        "img_pos_feat": _pad_rows([ex["img_pos_feat"] for ex in examples], n),
        "img_mask": torch.arange(n) < img_lens[:, None],
    }
    if all(ex.get("soft_labels") is not None for ex in examples):
        batch["soft_labels"] = _pad_rows([ex["soft_labels"] for ex in examples], n)
    batch["img_keys"] = [ex["img_key"] for ex in examples]
    batch["txt_ids"] = [ex["txt_id"] for ex in examples]
    if all("align_targets" in ex for ex in examples):  # object-word alignment: [Lt_i, N_i] rows per token
        targets = torch.zeros(len(examples), lt, n)
        for b, ex in enumerate(examples):
            rows, cols = ex["align_targets"].shape
            targets[b, :rows, :cols] = ex["align_targets"]
        batch["align_targets"] = targets
    if all("itm_target" in ex for ex in examples):  # pairs drawn by the data (ITM's corpus negatives)
        batch["itm_targets"] = torch.tensor([int(ex["itm_target"]) for ex in examples], dtype=torch.long)
    return batch


def padding_fraction(batch: dict[str, Any]) -> float:
    """Padded positions / all positions of the [B, Lt + N] sequence the model runs on."""
    total = batch["txt_mask"].numel() + batch["img_mask"].numel()
    real = int(batch["txt_mask"].sum()) + int(batch["img_mask"].sum())
    return 1.0 - real / total if total else 0.0


def padded_units(txt_lens: Sequence[int] | np.ndarray, img_lens: Sequence[int] | np.ndarray) -> int:
    """Size B * (max text length + max regions) of the batch these examples would collate into."""
    if len(txt_lens) == 0:
        return 0
    return len(txt_lens) * (int(np.max(txt_lens)) + int(np.max(img_lens)))


def padding_fraction_of_lengths(batches: Sequence[Sequence[int]], txt_lens: np.ndarray,
                                img_lens: np.ndarray) -> float:
    """Padding fraction over many batches of example indices, from lengths alone (no data read)."""
    total = sum(padded_units(txt_lens[b], img_lens[b]) for b in batches)
    real = sum(int(txt_lens[b].sum() + img_lens[b].sum()) for b in batches)
    return 1.0 - real / total if total else 0.0
