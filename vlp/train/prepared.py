"""Loaders of pretraining batches whose randomness depends on the batch, not on who loads it.

Each task's dynamic batch sampler shards batches by rank, so every worker reads only its own batches. The
objective's ``prepare`` (masking, negatives) runs in the loader with a generator seeded from (seed, stream,
epoch, global batch index): a batch gets the same masks whichever worker and how many workers process it,
and a resumed run rebuilds them exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vlp.data.batching import UnitBatchSampler
from vlp.data.collate import collate
from vlp.data.pretrain_dataset import PretrainDataset
from vlp.objectives.itm import corpus_negatives
from vlp.train.seeds import seed_of


class ItmPairs(Dataset):
    """ITM's corpus negatives (``vlp.objectives.itm.corpus_negatives``): in every epoch each caption keeps
    its image or, with probability ``neg_prob``, is paired with another image of its text db, as UNITER's
    ``ItmDataset.new_epoch`` does. The draw of epoch e depends on (seed, e) only, so every worker and a
    resumed run see the same pairs. ``img_lens`` bounds every epoch's region counts (the most regions of an
    image in the caption's pool), ``epoch_img_lens(e)`` gives them (batches are packed with them).
    """

    def __init__(self, dataset: PretrainDataset, neg_prob: float, seed: int):
        self.dataset, self.neg_prob, self.seed = dataset, neg_prob, seed
        self.img_keys = sorted(set(dataset.img_keys))
        index = {key: m for m, key in enumerate(self.img_keys)}
        self.own = np.asarray([index[key] for key in dataset.img_keys], dtype=np.int64)
        self.pool = np.asarray(dataset.db_index, dtype=np.int64)
        self.nbb = np.zeros(len(self.img_keys), dtype=np.int64)
        self.nbb[self.own] = dataset.img_lens
        self.txt_lens = dataset.txt_lens
        self.img_lens = np.zeros(len(dataset), dtype=np.int64)
        for p in np.unique(self.pool):
            rows = self.pool == p
            self.img_lens[rows] = self.nbb[self.own[rows]].max()
        self._draws: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def draw(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(partner image index, target) of every example in ``epoch``."""
        if epoch not in self._draws:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
            self._draws = {e: d for e, d in self._draws.items() if e >= epoch - 1}  # current and previous
            self._draws[epoch] = corpus_negatives(self.own, self.pool, self.neg_prob, rng)
        return self._draws[epoch]

    def epoch_img_lens(self, epoch: int) -> np.ndarray:
        return self.nbb[self.draw(epoch)[0]]

    def example(self, epoch: int, i: int) -> dict:
        partner, targets = self.draw(epoch)
        return {**self.dataset.pair(i, self.img_keys[partner[i]]), "itm_target": int(targets[i])}


class PreparedBatches(Dataset):
    """Item ``(epoch, global batch index, example indices)`` -> the collated batch after ``prepare``."""

    def __init__(self, examples: Dataset, prepare: Callable[[dict, torch.Generator], dict], seed: int,
                 stream: str, pad_id: int):
        self.examples, self.prepare, self.seed = examples, prepare, seed
        self.stream, self.pad_id = stream, pad_id

    def __getitem__(self, item: tuple[int, int, list[int]]) -> dict:
        epoch, index, indices = item
        if isinstance(self.examples, ItmPairs):  # the pairs of this epoch
            rows = [self.examples.example(epoch, i) for i in indices]
        else:
            rows = [self.examples[i] for i in indices]
        batch = collate(rows, pad_id=self.pad_id)
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
