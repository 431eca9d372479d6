"""Output of a ``finetune_<task>`` stage: one finetuned model per variant, and the list of variants.

::

    <variant>/      pretrained/, scratch/; retrieval: <dataset>/pretrained/, <dataset>/scratch/ and, with
                    IAIS compared, <dataset>/pretrained_no_iais/: a finetuned task model
                    (vlp/train/checkpoints.py: encoder/, head.pt, task.json, curves.json)
    variants.json   every variant's task.json record: name, init, IAIS, dataset, steps, seconds, options,
                    state_extra, last validation metrics (retrieval: its text dbs, ``data``)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from stages.base import StageError
from stages.outputs import StageOutput
from vlp.model import UniterModel
from vlp.train.checkpoints import CheckpointError, TaskModel, load_head, load_task_model, save_task_model


@dataclass(frozen=True)
class FinetuneOutput(StageOutput):
    REQUIRED: ClassVar[tuple[str, ...]] = ("variants.json",)

    @property
    def variants_path(self) -> Path:
        return self.root / "variants.json"

    def variant_dir(self, name: str) -> Path:
        return self.root / name

    def save_variant(self, encoder: UniterModel, head: nn.Module, record: Mapping[str, Any],
                     curves: list[dict[str, Any]]) -> None:
        save_task_model(self.variant_dir(record["name"]), encoder, head, record, curves)

    def write_variants(self, records: list[dict[str, Any]]) -> None:
        self.variants_path.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")

    def variants(self) -> list[dict[str, Any]]:
        try:
            return json.loads(self.variants_path.read_text())
        except (OSError, ValueError) as err:
            raise StageError(f"{self.variants_path}: cannot read the finetuned variants ({err})") from None

    def load_variant(self, name: str) -> TaskModel:
        try:
            return load_task_model(self.variant_dir(name))
        except CheckpointError as err:
            raise StageError(str(err)) from None

    def load_head(self, head: nn.Module, model: TaskModel, name: str) -> None:
        try:
            load_head(head, model, self.variant_dir(name))
        except CheckpointError as err:
            raise StageError(str(err)) from None


@dataclass(frozen=True)
class FinetuneIndexOutput(StageOutput):
    """The ``finetune`` aggregate: ``finetune.json``, each configured task's output dir and variants."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("finetune.json",)

    @property
    def index_path(self) -> Path:
        return self.root / "finetune.json"
