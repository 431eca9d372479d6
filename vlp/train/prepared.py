"""Loaders of pretraining batches whose randomness depends on the batch, not on who loads it.

Each task's dynamic batch sampler shards batches by rank, so every worker reads only its own batches. The
objective's ``prepare`` (masking, negatives) runs in the loader with a generator seeded from (seed, stream,
epoch, global batch index): a batch gets the same masks whichever worker and how many workers process it,
and a resumed run rebuilds them exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from vlp.data.batching import UnitBatchSampler
from vlp.data.collate import collate
from vlp.train.seeds import seed_of


class PreparedBatches(Dataset):
    """Item ``(epoch, global batch index, example indices)`` -> the collated batch after ``prepare``."""

    def __init__(self, examples: Dataset, prepare: Callable[[dict, torch.Generator], dict], seed: int,
                 stream: str, pad_id: int):
        self.examples, self.prepare, self.seed = examples, prepare, seed
        self.stream, self.pad_id = stream, pad_id

    def __getitem__(self, item: tuple[int, int, list[int]]) -> dict:
        epoch, index, indices = item
        batch = collate([self.examples[i] for i in indices], pad_id=self.pad_id)
        generator = torch.Generator().manual_seed(seed_of(self.seed, self.stream, epoch, index))
        return self.prepare(batch, generator)


class NumberedBatches:
    """Wraps a UnitBatchSampler to yield (epoch, global batch index, indices); the global index
    (position * world_size + rank) names a batch independently of how many workers share the epoch."""

    def __init__(self, sampler: UnitBatchSampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int, list[int]]]:
        s = self.sampler
        for indices in s:
            yield s.epoch, (s.position - 1) * s.world_size + s.rank, indices


def _identity(batch: dict) -> dict:
    return batch


def prepared_loader(examples: Dataset, sampler: UnitBatchSampler, prepare: Callable, seed: int, stream: str,
                    pad_id: int, workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """Batches of ``sampler`` over ``examples`` after ``prepare``; ``seed`` is the root seed, ``stream``
    names the purpose (``train/<task>``, ``val/<task>``)."""
    return DataLoader(
        PreparedBatches(examples, prepare, seed, stream, pad_id),
        sampler=NumberedBatches(sampler),
        batch_size=None,
        collate_fn=_identity,
        num_workers=workers,
        pin_memory=pin_memory,
    )
