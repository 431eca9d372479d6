"""Datasets and loaders of pretraining: text dbs of the txtdb stage joined with the features stage's store.

Each task has its own loader over the training examples; its dynamic batch sampler shards batches by rank,
so every worker reads only its own batches. The objective's ``prepare`` (masking, negatives) runs in the
loader with a generator seeded from (seed, task, epoch, global batch index): a batch gets the same
masks whichever worker and how many workers process it, and a resumed run rebuilds them exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from stages.pretrain.config import PretrainConfig
from vlp.data.batching import UnitBatchSampler
from vlp.data.collate import collate
from vlp.data.img_db import ImgDb
from vlp.data.pretrain_dataset import ImageTextIndex, PretrainDataset
from vlp.data.txt_db import TxtDb
from vlp.objectives import REGISTRY


class PretrainSetupError(ValueError):
    """A configuration the data cannot satisfy; the message is one line naming the setting and the path."""


def seed_of(*parts: Any) -> int:
    """A 63-bit seed from any values; stable across processes and library versions."""
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def open_txt_dbs(txt_db_dir: Path, names: Sequence[str], setting: str) -> list[TxtDb]:
    available = sorted(p.name[: -len(".db")] for p in txt_db_dir.glob("*.db") if p.is_dir())
    missing = [n for n in names if n not in available]
    if missing:
        raise PretrainSetupError(f"pretrain.{setting}: text db {missing[0]!r} not found in {txt_db_dir} "
                                 f"(available: {', '.join(available) or 'none'})")
    return [TxtDb(txt_db_dir / f"{n}.db") for n in names]


def open_img_db(img_db_dir: Path, cfg: PretrainConfig) -> ImgDb:
    try:
        return ImgDb(img_db_dir, *cfg.nbb)
    except ValueError as err:
        raise PretrainSetupError(f"pretrain.nbb {tuple(cfg.nbb)}: {err}") from None


def store_fields(img_db: ImgDb) -> tuple[set[str], int, int]:
    """(batch fields the store provides, feature dim, soft-label width C+1), read from its first image."""
    keys = img_db.keys()
    if not keys:
        raise PretrainSetupError(f"{img_db.path}: the feature store holds no image")
    arrays = img_db.read_arrays(keys[0])
    fields = {"img_feat", "img_pos_feat"}
    labels = arrays.get("soft_labels")
    label_dim = int(labels.shape[1]) if labels is not None and labels.ndim == 2 else 0
    if label_dim >= 2:  # background plus at least one class
        fields.add("soft_labels")
    return fields, int(arrays["features"].shape[1]), label_dim


def check_requirements(tasks: Sequence[str], fields: set[str], img_db_dir: Path) -> None:
    for task in sorted(tasks):
        lacking = [f for f in REGISTRY[task].requires if f not in fields]
        if lacking:
            raise PretrainSetupError(f"pretrain.tasks: task {task!r} needs {', '.join(lacking)}, which the "
                                     f"feature store {img_db_dir} does not provide")


@dataclass
class Corpus:
    train: PretrainDataset
    val: Dataset | None
    val_lens: tuple[np.ndarray, np.ndarray] | None
    retrieval: PretrainDataset | None
    meta: dict[str, Any]
    img_dim: int
    label_dim: int
    notes: list[str] = field(default_factory=list)  # what was dropped or held out, for the log


# meta.json fields that identify the tokenizer (vocab_digest: ours; UNITER's dbs have only the ids).
TOKENIZER_FIELDS = ("CLS", "SEP", "MASK", "UNK", "PAD", "v_range", "vocab_size", "vocab_digest")


def _same_tokenizer(dataset: PretrainDataset, reference: PretrainDataset, setting: str) -> None:
    diff = [k for k in TOKENIZER_FIELDS if dataset.meta.get(k) != reference.meta.get(k)]
    if diff:
        raise PretrainSetupError(f"pretrain.{setting}: meta.json fields {diff} differ from the train dbs' "
                                 "(text dbs built with another tokenizer)")


def build_corpus(cfg: PretrainConfig, txt_db_dir: Path, img_db_dir: Path) -> Corpus:
    """Every dataset of the run; fails with one line on a missing db, an unmet task input or bad sizes."""
    img_db = open_img_db(img_db_dir, cfg)
    fields, img_dim, label_dim = store_fields(img_db)
    check_requirements(cfg.tasks, fields, img_db_dir)
    vcfg = cfg.validation
    train = PretrainDataset(open_txt_dbs(txt_db_dir, cfg.train_dbs, "train_dbs"), img_db, cfg.max_txt_len)
    notes = [f"train: {line}" for line in train.drop_summary()]
    parts: list[PretrainDataset] = []
    if vcfg.dbs:
        val_dbs = PretrainDataset(open_txt_dbs(txt_db_dir, vcfg.dbs, "validation.dbs"), img_db,
                                  cfg.max_txt_len)
        _same_tokenizer(val_dbs, train, "validation.dbs")
        notes += [f"validation: {line}" for line in val_dbs.drop_summary()]
        parts.append(val_dbs)
    retrieval = None
    if vcfg.retrieval_db is not None and "itm" in cfg.tasks:
        (db,) = open_txt_dbs(txt_db_dir, [vcfg.retrieval_db], "validation.retrieval_db")
        retrieval = PretrainDataset([db], img_db, cfg.max_txt_len)
        _same_tokenizer(retrieval, train, "validation.retrieval_db")
        if vcfg.retrieval_max_images is not None:
            first = set(list(dict.fromkeys(retrieval.img_keys))[: vcfg.retrieval_max_images])
            retrieval = retrieval.select([i for i, k in enumerate(retrieval.img_keys) if k in first])
        if len(retrieval) == 0:
            raise PretrainSetupError(f"pretrain.validation.retrieval_db: no caption of {vcfg.retrieval_db!r} "
                                     f"has an image in {img_db_dir}")
    # An evaluation image seen in training would flatter ITM, MRM and zero-shot retrieval: train without it.
    evaluated = {k for d in [*parts, *([retrieval] if retrieval else [])] for k in d.img_keys}
    keep = ~np.isin(np.asarray(train.img_keys, dtype=object), np.asarray(sorted(evaluated), dtype=object))
    if not keep.all():
        notes.append(f"train: {int((~keep).sum())} captions of validation or retrieval images left out")
        train = train.select(np.flatnonzero(keep))
    if vcfg.holdout_images:
        if vcfg.holdout_images >= len(set(train.img_keys)):
            raise PretrainSetupError(f"pretrain.validation.holdout_images={vcfg.holdout_images} leaves no "
                                     f"training image (the train dbs have {len(set(train.img_keys))})")
        train, held = train.split_by_image(vcfg.holdout_images, seed=cfg.seed)
        notes.append(f"validation: {len(held)} captions of {vcfg.holdout_images} training images held out")
        parts.insert(0, held)
    if len(train) == 0:
        raise PretrainSetupError(f"pretrain.train_dbs: no caption of {cfg.train_dbs} has an image in "
                                 f"{img_db_dir} outside validation")
    parts = [p for p in parts if len(p)]
    val = val_lens = None
    if parts:
        val = parts[0] if len(parts) == 1 else ConcatDataset(parts)
        val_lens = (np.concatenate([p.txt_lens for p in parts]), np.concatenate([p.img_lens for p in parts]))
    return Corpus(train, val, val_lens, retrieval, train.meta, img_dim, label_dim, notes)


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


def loader(examples: Dataset, sampler: UnitBatchSampler, prepare: Callable, seed: int, stream: str,
           pad_id: int, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(
        PreparedBatches(examples, prepare, seed, stream, pad_id),
        sampler=NumberedBatches(sampler),
        batch_size=None,
        collate_fn=_identity,
        num_workers=workers,
        pin_memory=pin_memory,
    )


def retrieval_index(dataset: PretrainDataset) -> tuple[ImageTextIndex, list[torch.Tensor]]:
    """The image/text index of a retrieval split and each text's input ids ([CLS] ... [SEP])."""
    index = ImageTextIndex.from_dataset(dataset)
    texts = [dataset[j]["input_ids"] for j in range(len(dataset))]
    return index, texts
