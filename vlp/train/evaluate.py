"""Batches of a downstream task split, and the evaluation pass of a task head over a whole split.

A task head is an ``nn.Module`` whose ``forward(model, batch)`` runs the encoder it is given and returns
named losses (``*_loss``), count sums (``*_correct`` / ``*_count`` / ``*_score_sum``) and per-example
``predictions``; a split is a dataset with ``txt_lens`` / ``img_lens`` (its examples' input units) and a
``collate``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from vlp.data.batching import UnitBatchSampler
from vlp.train.device import to_device
from vlp.train.metrics import MetricSums
from vlp.train.precision import Autocast


class BatchBudgetError(ValueError):
    """A batch budget below the largest example; the message names the setting."""


def batch_sampler(data: Any, max_units: int, *, seed: int = 0, train: bool, setting: str,
                  examples: int | None = None) -> UnitBatchSampler:
    """Dynamic batches of at most ``max_units`` padded input units: shuffled and endless for training, in
    order and once for evaluation. ``examples``: batches of that many examples instead (each counted as
    one unit, so the budget packs exactly that many; an epoch's last batch may hold fewer)."""
    txt_lens, img_lens = data.txt_lens, data.img_lens
    if examples is not None:
        txt_lens, img_lens, max_units = np.ones_like(txt_lens), np.zeros_like(img_lens), examples
    try:
        return UnitBatchSampler(txt_lens, img_lens, max_units, seed=seed, shuffle=train, even_shards=train,
                                infinite=train)
    except ValueError as err:
        raise BatchBudgetError(f"{setting}: {err}") from None


def split_loader(data: Any, sampler: UnitBatchSampler) -> DataLoader:
    return DataLoader(data, batch_sampler=sampler, collate_fn=data.collate, num_workers=0)


def examples_in(batch: dict[str, Any], out: dict[str, Any]) -> int:
    predictions = out.get("predictions")
    return len(predictions) if predictions is not None else batch["input_ids"].shape[0]


@torch.no_grad()
def evaluate_dataset(model: nn.Module, head: nn.Module, data: Any, max_units: int, *, device: torch.device,
                     autocast: Autocast, setting: str) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(metrics, predictions) of ``head`` over every example of ``data``, in eval mode; losses are means
    over the examples."""
    was = model.training, head.training
    model.eval()
    head.eval()
    sums, predictions = MetricSums(), []
    for batch in split_loader(data, batch_sampler(data, max_units, train=False, setting=setting)):
        batch = to_device(batch, device)
        with autocast():
            out = head(model, batch)
        sums.add(out, examples_in(batch, out))
        predictions += out.get("predictions", [])
    model.train(was[0])
    head.train(was[1])
    return sums.metrics(), predictions
