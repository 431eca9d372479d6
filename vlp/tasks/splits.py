"""The splits finetuning and evaluation read, with the missing-image policy.

Every split is built with the task's own ``skip_missing`` on, then checked here: images the feature store
lacks are an error (how many, which ids, and the setting that skips them) unless ``skip``, in which case
their examples are left out and the same line is logged. Errors are one-line ``TaskDataError``s naming
the task and split.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from vlp.data.img_db import ImgDb
from vlp.data.txt_db import TxtDb, TxtDbError
from vlp.tasks.common import TaskDataError, TaskDataset, missing_report, read_image_sizes
from vlp.tasks.registry import TASKS
from vlp.tasks.retrieval import RetrievalDataset, Sides


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def check_missing(task: str, split: str, missing: Sequence[str], report: str, *, skip: bool, setting: str,
                  log: logging.Logger) -> None:
    if not missing:
        return
    line = f"task {task} split {split}: {report}"
    if not skip:
        raise TaskDataError(f"{line} (set {setting} to skip their examples)")
    log.warning("%s; their examples are skipped", line)


def task_split(task: str, tables_dir: Path, img_db: ImgDb, tokenizer_dir: Path, split: str,
               options: Mapping[str, Any], *, skip: bool, setting: str, log: logging.Logger,
               **extra: Any) -> TaskDataset:
    """The ``split`` of one of ``TASKS`` from ``tables_dir/task_<task>.parquet`` (``extra``: RefCOCO's
    image_sizes / gt_img_db)."""
    try:
        data = TASKS[task].build_data(tables_dir, img_db, tokenizer_dir, split, skip_missing=True, **options,
                                      **extra)
    except ValueError as err:
        raise TaskDataError(f"task {task} split {split}: {_one_line(err)}") from None
    check_missing(task, split, data.missing, data.missing_report(), skip=skip, setting=setting, log=log)
    return data


def task_image_sizes(task: str, tables_dir: Path, images_dir: Path) -> dict[str, tuple[int, int]]:
    """(width, height) of the images of a task table, read from the image shards (RefCOCO needs them)."""
    table = pq.read_table(tables_dir / f"task_{task}.parquet", columns=["image_key"])
    try:
        return read_image_sizes(images_dir, set(table.column("image_key").to_pylist()))
    except ValueError as err:
        raise TaskDataError(f"task {task}: {_one_line(err)}") from None


def retrieval_split(db_paths: Sequence[Path], split: str, img_db: ImgDb, *, skip: bool, setting: str,
                    log: logging.Logger, neg_samples: int = 0, seed: int = 0,
                    sides: Sides = "shared") -> RetrievalDataset:
    """Retrieval texts of the text dbs ``db_paths`` with their images (``split`` names it in errors); texts
    are read as the text db stage wrote them (already cut to its max_txt_len)."""
    try:
        dbs = [TxtDb(path) for path in db_paths]
        data = RetrievalDataset(dbs, img_db, max_txt_len=None, neg_samples=neg_samples, seed=seed,
                                sides=sides)
    except (TxtDbError, ValueError) as err:
        raise TaskDataError(f"task retrieval split {split}: {_one_line(err)}") from None
    n_images = len(data.missing) + (len(data.index.img_keys) if data.index is not None else 0)
    report = missing_report(data.missing, n_images, img_db)
    check_missing("retrieval", split, data.missing, report, skip=skip, setting=setting, log=log)
    if len(data) == 0:
        names = [p.name.removesuffix(".db") for p in db_paths]
        raise TaskDataError(f"task retrieval split {split}: no text of {names} has an image in {img_db.path}")
    return data
