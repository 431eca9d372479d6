"""The corpus of pretraining: text dbs of the txtdb stage joined with the features stage's region store.

Texts are read as txtdb wrote them (cut to its ``max_txt_len``); regions with the box-count rule the
features stage declared. Batches come from ``vlp.train.prepared`` (randomness seeded per batch), one
stream of batches per (task, dataset) (``streams``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import ConcatDataset, Dataset

from stages.outputs.alignment import AlignmentOutput
from stages.outputs.features import FeaturesOutput
from stages.outputs.txt_db import TxtDbOutput
from stages.pretrain.config import PretrainConfig
from vlp.data.alignment import AlignmentDataset
from vlp.data.img_db import ImgDb
from vlp.data.pretrain_dataset import PretrainDataset
from vlp.data.txt_db import TxtDb
from vlp.objectives import REGISTRY
from vlp.train.prepared import ItmPairs
from vlp.train.seeds import seed_of


class PretrainSetupError(ValueError):
    """A configuration the data cannot satisfy; the message is one line naming the setting and the path."""


@dataclass(frozen=True)
class PretrainInputs:
    txtdb: TxtDbOutput
    features: FeaturesOutput
    alignment: AlignmentOutput | None = None  # with the owa task: the alignment stage's annotations


def open_txt_dbs(txtdb: TxtDbOutput, names: Sequence[str], setting: str) -> list[TxtDb]:
    available = txtdb.db_names()
    missing = [n for n in names if n not in available]
    if missing:
        raise PretrainSetupError(f"pretrain.{setting}: text db {missing[0]!r} not found in {txtdb.root} "
                                 f"(available: {', '.join(available) or 'none'})")
    return [TxtDb(txtdb.db_path(n)) for n in names]


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


def check_requirements(tasks: Sequence[str], fields: set[str], img_db: ImgDb) -> None:
    for task in sorted(tasks):
        lacking = [f for f in REGISTRY[task].requires if f not in fields]
        if lacking:
            raise PretrainSetupError(f"pretrain.tasks: task {task!r} needs {', '.join(lacking)}, which the "
                                     f"feature store {img_db.path} does not provide")


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
    # The training captions by dataset of train_dbs' named form ({ONE_CORPUS: train} for a list) and the
    # datasets' mix weights.
    parts: dict[str, PretrainDataset] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    # Object-word alignment (task owa): the annotated sentences to train on and to validate on (those of the
    # images validation holds out).
    alignment: PretrainDataset | None = None
    alignment_val: PretrainDataset | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.meta.get("vocab_size") or self.meta["v_range"][1])


ONE_CORPUS = ""  # the dataset name of train_dbs' list form
# Tasks whose heads validation scores the retrieval split with: ITM (zero-shot retrieval), vta / laviter
# (DAMSM recall, R-precision, captioning).
RETRIEVAL_TASKS = {"itm", "vta", "laviter"}


@dataclass(frozen=True)
class Stream:
    """One source of training batches: a task on a dataset. Each optimizer step draws one stream by ratio."""

    name: str  # the task on one corpus ("itm"), else "<task>/<dataset>" ("itm/coco")
    task: str
    dataset: str
    ratio: float


# Tasks whose examples are their own data, not the caption corpus: one stream each, at the task's ratio.
OWN_DATA_TASKS = ("owa",)


def streams(tasks: dict[str, float], weights: dict[str, float]) -> list[Stream]:
    """One stream per (task, dataset), ratio tasks[task] x weights[dataset] (UNITER's per-dataset mix_ratio,
    ``MetaLoader``); with one corpus the streams are the tasks with their ratios. A task with its own data
    (``owa``: the alignment annotations) is one stream at its ratio."""
    out = []
    for task, ratio in sorted(tasks.items()):
        if task in OWN_DATA_TASKS:
            out.append(Stream(task, task, ONE_CORPUS, ratio))
            continue
        out += [Stream(task if dataset == ONE_CORPUS else f"{task}/{dataset}", task, dataset, ratio * weight)
                for dataset, weight in sorted(weights.items())]
    return out


def stream_examples(stream: Stream, corpus: Corpus, cfg: PretrainConfig, seed: int
                    ) -> tuple[Dataset, np.ndarray, Callable[[int], np.ndarray] | None]:
    """(examples, region-count bound, per-epoch region counts or None) of a stream's batches: the dataset's
    captions, for ITM with corpus negatives paired anew every epoch (``vlp.train.prepared.ItmPairs``)."""
    if stream.task == "owa":
        return corpus.alignment, corpus.alignment.img_lens, None
    part = corpus.parts[stream.dataset]
    if stream.task == "itm" and cfg.itm_negatives == "corpus":
        pairs = ItmPairs(part, cfg.itm_neg_prob, seed_of(seed, "itm_negatives", stream.name))
        return pairs, pairs.img_lens, pairs.epoch_img_lens
    return part, part.img_lens, None


# meta.json fields that identify the tokenizer (vocab_digest: ours; UNITER's dbs have only the ids).
TOKENIZER_FIELDS = ("CLS", "SEP", "MASK", "UNK", "PAD", "v_range", "vocab_size", "vocab_digest")


def _same_tokenizer(dataset: PretrainDataset, reference: PretrainDataset, setting: str) -> None:
    diff = [k for k in TOKENIZER_FIELDS if dataset.meta.get(k) != reference.meta.get(k)]
    if diff:
        raise PretrainSetupError(f"pretrain.{setting}: meta.json fields {diff} differ from the train dbs' "
                                 "(text dbs built with another tokenizer)")


def build_corpus(cfg: PretrainConfig, seed: int, inputs: PretrainInputs) -> Corpus:
    """Every dataset of the run (``seed``: the root seed, which picks the held-out images); fails with one
    line on a missing db, an unmet task input or bad sizes."""
    img_db = inputs.features.img_db()
    fields, img_dim, label_dim = store_fields(img_db)
    check_requirements(cfg.tasks, fields, img_db)
    vcfg, txtdb = cfg.validation, inputs.txtdb
    train = PretrainDataset(open_txt_dbs(txtdb, cfg.db_names(), "train_dbs"), img_db)
    notes = [f"train: {line}" for line in train.drop_summary()]
    parts: list[PretrainDataset] = []
    if vcfg.dbs:
        val_dbs = PretrainDataset(open_txt_dbs(txtdb, vcfg.dbs, "validation.dbs"), img_db)
        _same_tokenizer(val_dbs, train, "validation.dbs")
        notes += [f"validation: {line}" for line in val_dbs.drop_summary()]
        parts.append(val_dbs)
    retrieval = None
    if vcfg.retrieval_db is not None and RETRIEVAL_TASKS & set(cfg.tasks):
        (db,) = open_txt_dbs(txtdb, [vcfg.retrieval_db], "validation.retrieval_db")
        retrieval = PretrainDataset([db], img_db)
        _same_tokenizer(retrieval, train, "validation.retrieval_db")
        if vcfg.retrieval_max_images is not None:
            first = set(list(dict.fromkeys(retrieval.img_keys))[: vcfg.retrieval_max_images])
            retrieval = retrieval.select([i for i, k in enumerate(retrieval.img_keys) if k in first])
        if len(retrieval) == 0:
            raise PretrainSetupError(f"pretrain.validation.retrieval_db: no caption of {vcfg.retrieval_db!r} "
                                     f"has an image in {img_db.path}")
    # An evaluation image seen in training would flatter ITM, MRM and zero-shot retrieval: train without it.
    evaluated = {k for d in [*parts, *([retrieval] if retrieval else [])] for k in d.img_keys}
    keep = ~np.isin(np.asarray(train.img_keys, dtype=object), np.asarray(sorted(evaluated), dtype=object))
    if not keep.all():
        notes.append(f"train: {int((~keep).sum())} captions of validation or retrieval images left out")
        train = train.select(np.flatnonzero(keep))
    validation_images = set(evaluated)
    if vcfg.holdout_images:
        if vcfg.holdout_images >= len(set(train.img_keys)):
            raise PretrainSetupError(f"pretrain.validation.holdout_images={vcfg.holdout_images} leaves no "
                                     f"training image (the train dbs have {len(set(train.img_keys))})")
        # split_by_image ranks the images by a keyed hash of (seed, key) itself.
        train, held = train.split_by_image(vcfg.holdout_images, seed=seed)
        notes.append(f"validation: {len(held)} captions of {vcfg.holdout_images} training images held out")
        parts.insert(0, held)
        validation_images |= set(held.img_keys)
    if len(train) == 0:
        raise PretrainSetupError(f"pretrain.train_dbs: no caption of {cfg.db_names()} has an image in "
                                 f"{img_db.path} outside validation")
    datasets, weights = {ONE_CORPUS: train}, {ONE_CORPUS: 1.0}
    if isinstance(cfg.train_dbs, dict):
        dataset_of_db = np.asarray([name for name, mix in cfg.train_dbs.items() for _ in mix.dbs],
                                   dtype=object)
        of_example = dataset_of_db[train.db_index]
        datasets = {name: train.select(np.flatnonzero(of_example == name)) for name in cfg.train_dbs}
        weights = {name: mix.weight for name, mix in cfg.train_dbs.items()}
        empty = [name for name, part in datasets.items() if len(part) == 0]
        if empty:
            raise PretrainSetupError(f"pretrain.train_dbs.{empty[0]}: no caption of "
                                     f"{cfg.train_dbs[empty[0]].dbs} has an image in {img_db.path} outside "
                                     "validation")
    parts = [p for p in parts if len(p)]
    val = val_lens = None
    if parts:
        val = parts[0] if len(parts) == 1 else ConcatDataset(parts)
        val_lens = (np.concatenate([p.txt_lens for p in parts]), np.concatenate([p.img_lens for p in parts]))
    corpus = Corpus(train, val, val_lens, retrieval, train.meta, img_dim, label_dim, notes, datasets, weights)
    if "owa" in cfg.tasks:
        corpus.alignment, corpus.alignment_val = alignment_data(inputs, img_db, train, validation_images,
                                                                seed, notes)
    return corpus


def alignment_data(inputs: PretrainInputs, img_db: ImgDb, train: PretrainDataset, validation_images: set[str],
                   seed: int, notes: list[str]) -> tuple[PretrainDataset, PretrainDataset | None]:
    """(train, validation) sentences of the alignment annotations: validation has those of the images the
    caption validation holds out (none there: 5% of the annotated images, drawn by ``seed``)."""
    if inputs.alignment is None:
        raise PretrainSetupError("pretrain.tasks: task 'owa' needs the alignment stage's annotations (input "
                                 "'alignment')")
    data = AlignmentDataset([TxtDb(inputs.alignment.db_path)], img_db)
    _same_tokenizer(data, train, "tasks.owa (the alignment stage's text db)")
    notes += [f"alignment: {line}" for line in data.drop_summary()]
    if len(data) == 0:
        raise PretrainSetupError(f"{inputs.alignment.db_path}: no annotated sentence has its image in "
                                 f"{img_db.path}")
    held = np.isin(np.asarray(data.img_keys, dtype=object),
                   np.asarray(sorted(validation_images), dtype=object))
    if held.any() and not held.all():
        fit, val = data.select(np.flatnonzero(~held)), data.select(np.flatnonzero(held))
    elif len(set(data.img_keys)) > 1:
        fit, val = data.split_by_image(0.05 if len(set(data.img_keys)) >= 20 else 1, seed=seed)
    else:
        fit, val = data, None
    notes.append(f"alignment: {len(fit)} annotated sentences to train on, {0 if val is None else len(val)} "
                 "held out for validation")
    return fit, val
