"""Pieces every downstream task shares: reading a task table split, tokenizing, the missing-image check,
the dataset base class, running the encoder and the classifier MLP.

A task is an ``nn.Module`` head over an encoder it does not own, plus ``build_data`` that makes its
``TaskDataset``. Options live in one pydantic model per task (``Task.Options``) so that the same config
dict can go to ``build_data`` and to the head, and a misspelt option fails at once.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor, nn
from torch.utils.data import Dataset

from vlp.data.collate import collate as collate_pretrain
from vlp.data.img_db import ImgDb
from vlp.data.tables import TASK_TABLES
from vlp.data.tokenizer import encode, load_tokenizer, special_ids
from vlp.model.config import UniterConfig
from vlp.model.uniter import UniterModel
from vlp.objectives.common import init_head_weights

# How many missing image keys a report lists before "and N more".
_LISTED_MISSING = 20


class TaskDataError(ValueError):
    """Bad or inconsistent task data; the message names the file or store, the record and the field."""


class TaskOptions(BaseModel):
    """Options every task has; each task extends them with its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_txt_len: int = Field(60, ge=1)  # word pieces kept per text, [CLS]/[SEP] not counted


def validate_options(task: str, options_cls: type[TaskOptions], options: dict[str, Any]) -> TaskOptions:
    try:
        return options_cls.model_validate(options)
    except ValidationError as err:
        problems = "; ".join(
            f"unknown option {'.'.join(map(str, e['loc']))!r}" if e["type"] == "extra_forbidden"
            else f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
            for e in err.errors()
        )
        raise ValueError(f"task {task} options: {problems}") from None


def read_task_rows(tables_dir: Path, task: str, split: str) -> tuple[Path, list[dict[str, Any]]]:
    """(table path, rows of ``split``) of ``tables/task_<task>.parquet``, after checking its columns."""
    path, all_rows = read_task_table(tables_dir, task)
    rows = [row for row in all_rows if row["split"] == split]
    if not rows:
        present = ", ".join(sorted({r["split"] for r in all_rows if r["split"] is not None})) or "none"
        raise TaskDataError(f"{path}: no rows of split {split!r} (splits present: {present})")
    return path, rows


def read_task_table(tables_dir: Path, task: str) -> tuple[Path, list[dict[str, Any]]]:
    """(table path, every row) of ``tables/task_<task>.parquet``, after checking its columns."""
    path = Path(tables_dir) / f"task_{task}.parquet"
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise TaskDataError(f"{path}: task table not found") from None
    except (OSError, pa.ArrowInvalid) as err:
        raise TaskDataError(f"{path}: cannot read ({' '.join(str(err).split())})") from None
    expected = TASK_TABLES[task]
    for field in expected:
        if field.name not in table.column_names:
            raise TaskDataError(f"{path}: column {field.name!r} is missing")
        found = table.schema.field(field.name).type
        if not found.equals(field.type):
            raise TaskDataError(f"{path}: column {field.name!r} has type {found}, expected {field.type}")
    return path, table.select(expected.names).to_pylist()


def require(value: Any, where: str, field: str) -> Any:
    """``value`` unless it is null, which is an error naming the record and field."""
    if value is None:
        raise TaskDataError(f"{where}: field {field} is null")
    return value


def tokenize(tokenizer_dir: Path, texts: Sequence[str], max_txt_len: int) -> list[list[int]]:
    """[CLS] word pieces [SEP] of each text, the word pieces cut to ``max_txt_len``."""
    tok = load_tokenizer(tokenizer_dir)
    ids = special_ids(tok)
    return [[ids["CLS"], *pieces[:max_txt_len], ids["SEP"]] for pieces in encode(tok, texts)]


def missing_images(keys: Iterable[str], img_db: ImgDb) -> tuple[list[str], int]:
    """(sorted keys absent from the store, number of distinct keys)."""
    distinct = set(keys)
    return sorted(k for k in distinct if k not in img_db.name2nbb), len(distinct)


def missing_report(missing: Sequence[str], num_images: int, img_db: ImgDb) -> str:
    """``N of M images missing from the feature store <path>: ids...`` (the first 20 ids)."""
    listed = ", ".join(missing[:_LISTED_MISSING])
    more = f" and {len(missing) - _LISTED_MISSING} more" if len(missing) > _LISTED_MISSING else ""
    return (f"{len(missing)} of {num_images} images missing from the feature store {img_db.path}: "
            f"{listed}{more}")


def read_image_sizes(images_dir: Path, keys: Iterable[str] | None = None) -> dict[str, tuple[int, int]]:
    """key -> (width, height) of the downloaded images in ``<images_dir>/<corpus>/shard-*.parquet`` (IMAGES
    shards of download / dedup), only images with status ok; ``keys`` limits the result to those keys."""
    wanted = None if keys is None else set(keys)
    sizes: dict[str, tuple[int, int]] = {}
    shards = sorted(glob.glob(str(Path(images_dir) / "*" / "shard-*.parquet")))
    if not shards:
        raise TaskDataError(f"{images_dir}: no image shards <corpus>/shard-*.parquet")
    columns = ["key", "status", "width", "height"]
    for shard in shards:
        try:
            table = pq.read_table(shard, columns=columns)
        except (OSError, pa.ArrowInvalid) as err:
            raise TaskDataError(f"{shard}: cannot read ({' '.join(str(err).split())})") from None
        for key, status, width, height in zip(*(table.column(c).to_pylist() for c in columns), strict=True):
            if status == "ok" and (wanted is None or key in wanted):
                if not width or not height:
                    raise TaskDataError(f"{shard}: image {key!r}: field width/height is {width}x{height}")
                sizes[key] = (int(width), int(height))
    return sizes


class TaskDataset(Dataset):
    """Examples of one task split over one region-feature store.

    Subclasses fill ``records`` (one dict per example with at least ``id``, ``input_ids`` and ``img_keys``)
    and implement ``__getitem__`` / ``collate``. ``txt_lens`` / ``img_lens`` are the units one example adds
    to the padded batch the collate builds, so ``UnitBatchSampler(txt_lens, img_lens, max_units)`` bounds
    its real size; ``lengths`` is their sum. ``missing`` lists the split's image keys the store lacks
    (their examples are gone when ``skip_missing`` let the split be built).
    """

    def __init__(self, split: str, source: Path, img_db: ImgDb, records: list[dict[str, Any]],
                 missing: list[str], num_images: int):
        self.split = split
        self.source = source
        self.img_db = img_db
        self.records = records
        self.missing = missing
        self.num_images = num_images
        units = np.asarray([self._units(r) for r in records], dtype=np.int64).reshape(-1, 2)
        self.txt_lens, self.img_lens = units[:, 0].copy(), units[:, 1].copy()

    def _units(self, record: dict[str, Any]) -> tuple[int, int]:
        return len(record["input_ids"]), sum(self.img_db.name2nbb[k] for k in record["img_keys"])

    @property
    def lengths(self) -> np.ndarray:
        return self.txt_lens + self.img_lens

    @property
    def head_options(self) -> dict[str, Any]:
        """Keyword arguments the task head needs from the data (VQA's answer vocabulary)."""
        return {}

    def missing_report(self) -> str:
        return missing_report(self.missing, self.num_images, self.img_db)

    def __len__(self) -> int:
        return len(self.records)

    def example(self, i: int, img_key: str) -> dict[str, Any]:
        """Example ``i``'s text with the regions of ``img_key``, as ``vlp.data.collate.collate`` takes it."""
        record = self.records[i]
        regions = self.img_db.get(img_key)
        return {
            "input_ids": torch.tensor(record["input_ids"], dtype=torch.long),
            "img_feat": regions.features,
            "img_pos_feat": regions.boxes,
            "img_key": img_key,
            "txt_id": record["id"],
            "index": i,
        }

    def collate(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate_pretrain(examples)


def select_present(records: list[dict[str, Any]], img_db: ImgDb, skip_missing: bool, where: str
                   ) -> tuple[list[dict[str, Any]], list[str], int]:
    """(records whose images are all in the store, missing keys, distinct keys); missing images are an error
    naming how many and which unless ``skip_missing``."""
    missing, num_images = missing_images((k for r in records for k in r["img_keys"]), img_db)
    if missing and not skip_missing:
        raise TaskDataError(f"{where}: {missing_report(missing, num_images, img_db)} "
                            "(set skip_missing to drop their examples)")
    gone = set(missing)
    kept = [r for r in records if not gone.intersection(r["img_keys"])]
    if not kept:
        raise TaskDataError(f"{where}: no example left: {missing_report(missing, num_images, img_db)}")
    return kept, missing, num_images


def finish_records(records: list[dict[str, Any]], img_db: ImgDb, tokenizer_dir: Path, options: TaskOptions,
                   where: str, skip_missing: bool) -> tuple[list[dict[str, Any]], list[str], int]:
    """``select_present``, then each kept record's ``text`` replaced by its ``input_ids``."""
    records, missing, num_images = select_present(records, img_db, skip_missing, where)
    texts = [r.pop("text") for r in records]
    for record, ids in zip(records, tokenize(tokenizer_dir, texts, options.max_txt_len), strict=True):
        record["input_ids"] = ids
    return records, missing, num_images


def classifier_mlp(config: UniterConfig, num_outputs: int) -> nn.Sequential:
    """UNITER's VQA / VE classifier over the pooled [CLS]: Linear(H, 2H) - GELU - LayerNorm - Linear."""
    hidden = 2 * config.hidden_size
    mlp = nn.Sequential(
        nn.Linear(config.hidden_size, hidden),
        nn.GELU(),
        nn.LayerNorm(hidden, eps=config.layer_norm_eps),
        nn.Linear(hidden, num_outputs),
    )
    init_head_weights(mlp, config.initializer_range)
    return mlp


def accuracy_counts(prefix: str, correct: Tensor) -> dict[str, Tensor]:
    """``<prefix>_correct`` / ``<prefix>_count`` from a Bool[B] of per-example hits."""
    return {
        f"{prefix}_correct": correct.sum().detach(),
        f"{prefix}_count": torch.tensor(correct.numel(), device=correct.device),
    }


class TaskHead(nn.Module):
    """A task's head; ``forward(model, batch)`` runs the encoder it is given and returns ``<name>_loss``,
    the metric sums and ``predictions`` (one JSON-able dict per example)."""

    name: ClassVar[str]
    metric: ClassVar[str]
    Options: ClassVar[type[TaskOptions]] = TaskOptions

    def __init__(self, encoder_config: UniterConfig, **options: Any):
        super().__init__()
        self.options = validate_options(self.name, self.Options, options)

    def adapt_encoder(self, model: UniterModel) -> None:
        """Changes the encoder needs before finetuning (call before building the optimizer)."""

    def state_extra(self) -> dict[str, Any]:
        """What a finetuned checkpoint stores next to the weights to rebuild and check this head."""
        return {"task": self.name, "options": self.options.model_dump()}

    def check_state_extra(self, extra: dict[str, Any]) -> None:
        """Raise a one-line error when a checkpoint's ``state_extra`` does not fit this head and its data."""
        if extra.get("task") != self.name:
            raise ValueError(f"checkpoint is for task {extra.get('task')!r}, not {self.name!r}")


def check_answer_labels(task: str, ans2label: dict[str, int]) -> None:
    """An answer vocabulary must map its n answers to the labels 0..n-1, each once."""
    if not ans2label or sorted(ans2label.values()) != list(range(len(ans2label))):
        raise ValueError(f"{task} ans2label must map {len(ans2label)} answers to labels 0..n-1, each once")
