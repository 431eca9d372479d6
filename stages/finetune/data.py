"""Datasets of the downstream tasks for the finetune and eval stages, with the missing-image check.

Every split is built with the task's own ``skip_missing`` on, then checked here: images the feature store
lacks stop the stage with one line (how many, which ids) unless ``finetune.common.skip_missing_images``,
in which case their examples are left out and the same line is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from stages.base import StageError
from vlp.data.img_db import ImgDb
from vlp.data.txt_db import TxtDb, TxtDbError
from vlp.tasks import TASKS
from vlp.tasks.common import missing_report, read_image_sizes
from vlp.tasks.retrieval import RetrievalDataset

SKIP_SETTING = "finetune.common.skip_missing_images"


def open_store(path: Path, nbb: tuple[float, int, int], what: str = "feature store") -> ImgDb:
    try:
        return ImgDb(path, *nbb)
    except ValueError as err:
        raise StageError(f"{what} (nbb {tuple(nbb)}): {' '.join(str(err).split())}") from None


def check_missing(task: str, split: str, missing: list[str], report: str, skip: bool, log: logging.Logger,
                  setting: str = SKIP_SETTING) -> None:
    if not missing:
        return
    line = f"task {task} split {split}: {report}"
    if not skip:
        raise StageError(f"{line} (set {setting} to skip their examples)")
    log.warning("%s; their examples are skipped", line)


def task_tables(task: str, inputs: Mapping[str, Path]) -> Path:
    """Where a task's table is read: RefCOCO from download (dedup drops the COCO instances of the eval
    images, which the ground-truth regions need), the others from dedup."""
    return inputs["download"] / "tables" if task == "refcoco" else inputs["dedup"] / "tables"


def image_sizes(task: str, inputs: Mapping[str, Path]) -> dict[str, tuple[int, int]]:
    """(width, height) of the task's images, read from the download shards (RefCOCO needs them)."""
    table = pq.read_table(task_tables(task, inputs) / f"task_{task}.parquet", columns=["image_key"])
    try:
        return read_image_sizes(inputs["download"] / "images", set(table.column("image_key").to_pylist()))
    except ValueError as err:
        raise StageError(f"task {task}: {err}") from None


def task_data(task: str, split: str, inputs: Mapping[str, Path], img_db: ImgDb, tokenizer_dir: Path,
              options: Mapping[str, Any], skip: bool, log: logging.Logger, setting: str = SKIP_SETTING,
              **extra: Any) -> Any:
    """The ``split`` of one of vlp.tasks.TASKS (``extra``: RefCOCO's image_sizes / gt_img_db)."""
    try:
        data = TASKS[task].build_data(task_tables(task, inputs), img_db, tokenizer_dir, split,
                                      **options, skip_missing=True, **extra)
    except ValueError as err:
        raise StageError(f"task {task} split {split}: {' '.join(str(err).split())}") from None
    check_missing(task, split, data.missing, data.missing_report(), skip, log, setting)
    return data


def retrieval_db_dirs(inputs: Mapping[str, Path]) -> list[Path]:
    """Where retrieval text dbs are looked up by name: the txtdb stage's, then karpathy_txtdb's."""
    return [inputs["txtdb"], inputs["karpathy_txtdb"]]


def find_db(db_dirs: list[Path], name: str, split: str) -> Path:
    for directory in db_dirs:
        if (directory / f"{name}.db").is_dir():
            return directory / f"{name}.db"
    known = sorted(p.stem for d in db_dirs for p in d.glob("*.db"))
    raise StageError(f"task retrieval split {split}: no text db {name!r} (dbs: {', '.join(known)})")


def retrieval_data(db_dirs: list[Path], names: list[str], split: str, img_db: ImgDb, *, max_txt_len: int,
                   skip: bool, log: logging.Logger, neg_samples: int = 0, seed: int = 0,
                   setting: str = SKIP_SETTING) -> RetrievalDataset:
    """Retrieval texts of the text dbs ``names`` (found in ``db_dirs``) with their images (``split`` names
    it in errors)."""
    paths = [find_db(db_dirs, name, split) for name in names]
    try:
        dbs = [TxtDb(path) for path in paths]
        data = RetrievalDataset(dbs, img_db, max_txt_len=max_txt_len, neg_samples=neg_samples, seed=seed)
    except (TxtDbError, ValueError) as err:
        raise StageError(f"task retrieval split {split}: {' '.join(str(err).split())}") from None
    n_images = len(data.missing) + (len(data.index.img_keys) if data.index is not None else 0)
    report = missing_report(data.missing, n_images, img_db)
    check_missing("retrieval", split, data.missing, report, skip, log, setting)
    if len(data) == 0:
        raise StageError(f"task retrieval split {split}: no text of {names} has an image in {img_db.path}")
    return data
