"""SNLI-VE finetuning: does a Flickr30k image entail, contradict or leave open a hypothesis? A 3-way
classifier (UNITER's VQA MLP) over the pooled [CLS] of [hypothesis ; image]; the premise is not an input."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from vlp.data.img_db import ImgDb
from vlp.model.config import UniterConfig
from vlp.model.uniter import UniterModel
from vlp.objectives.common import encode
from vlp.tasks.common import (
    TaskDataError,
    TaskDataset,
    TaskHead,
    accuracy_counts,
    classifier_mlp,
    finish_records,
    read_task_rows,
    require,
    validate_options,
)

LABELS = ("entailment", "neutral", "contradiction")


class SNLIVEDataset(TaskDataset):
    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.example(i, self.records[i]["img_keys"][0])

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().collate(examples)
        records = [self.records[ex["index"]] for ex in examples]
        batch["targets"] = torch.tensor([r["label"] for r in records], dtype=torch.long)
        batch["pair_ids"] = [r["id"] for r in records]
        return batch


class SNLIVE(TaskHead):
    name: ClassVar[str] = "snli_ve"
    metric: ClassVar[str] = "snli_ve_acc"

    def __init__(self, encoder_config: UniterConfig, **options: Any):
        super().__init__(encoder_config, **options)
        self.classifier = classifier_mlp(encoder_config, len(LABELS))

    @classmethod
    def build_data(cls, tables_dir: Path, img_db: ImgDb, tokenizer_dir: Path, split: str, *,
                   skip_missing: bool = False, **options: Any) -> SNLIVEDataset:
        opts = validate_options(cls.name, cls.Options, options)
        source, rows = read_task_rows(tables_dir, cls.name, split)
        records = []
        for row in rows:
            where = f"{source}: pair {row['pair_id']!r}"
            label = require(row["label"], where, "label")
            if label not in LABELS:
                raise TaskDataError(f"{where}: field label is {label!r}, not one of {', '.join(LABELS)}")
            records.append({
                "id": require(row["pair_id"], where, "pair_id"),
                "img_keys": (require(row["image_key"], where, "image_key"),),
                "text": require(row["hypothesis"], where, "hypothesis"),
                "label": LABELS.index(label),
            })
        where = f"{source} split {split}"
        records, missing, num_images = finish_records(records, img_db, tokenizer_dir, opts, where,
                                                      skip_missing)
        return SNLIVEDataset(split, source, img_db, records, missing, num_images)

    def forward(self, model: UniterModel, batch: dict[str, Any]) -> dict[str, Any]:
        logits = self.classifier(model.pool(encode(model, batch))).float()
        targets = batch["targets"]
        predicted = logits.argmax(dim=1)
        return {
            "snli_ve_loss": F.cross_entropy(logits, targets),
            **accuracy_counts("snli_ve", predicted == targets),
            "predictions": [
                {"pair_id": i, "prediction": LABELS[p], "label": LABELS[t]}
                for i, p, t in zip(batch["pair_ids"], predicted.tolist(), targets.tolist(), strict=True)
            ],
        }
