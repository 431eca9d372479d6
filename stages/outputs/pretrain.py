"""Output of the ``pretrain`` stage: the pretrained encoder with its objective heads, and its tokenizer.

::

    model/         the pretrained model (vlp/train/checkpoints.py): config.json + model.pt (the encoder,
                   ``UniterModel.from_pretrained``), heads.json + heads.pt (the objectives' options and
                   weights)
    tokenizer/     copy of the txtdb tokenizer the encoder's vocabulary belongs to
    metrics.json   validation of the untrained (step 0) and the final model, whole-run throughput
    ray_train/     Ray Train's checkpoints; a rerun of a killed stage (same key) resumes from them
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from stages.base import StageError
from stages.outputs import StageOutput
from vlp.model import UniterConfig
from vlp.train.checkpoints import CheckpointError, load_pretrained, pretrained_config, save_pretrained
from vlp.train.pretrain_model import PretrainModel


@dataclass(frozen=True)
class PretrainOutput(StageOutput):
    REQUIRED: ClassVar[tuple[str, ...]] = ("model/config.json", "model/model.pt", "model/heads.json",
                                           "model/heads.pt", "tokenizer", "metrics.json")

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.json"

    @property
    def train_dir(self) -> Path:
        return self.root / "ray_train"

    def write_model(self, model: PretrainModel, options: Mapping[str, dict], tokenizer_dir: Path) -> None:
        """The model (encoder + heads with the objectives' ``options``) and a copy of its tokenizer."""
        save_pretrained(self.model_dir, model, options)
        shutil.rmtree(self.tokenizer_dir, ignore_errors=True)
        shutil.copytree(tokenizer_dir, self.tokenizer_dir)

    def write_metrics(self, record: dict[str, Any]) -> None:
        self.metrics_path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")

    def encoder_config(self, dropout: float | None = None) -> UniterConfig:
        """The encoder's config (another dropout rate when ``dropout`` is set)."""
        try:
            return pretrained_config(self.model_dir, dropout)
        except CheckpointError as err:
            raise StageError(f"pretrained model: {err}") from None

    def model(self, dropout: float | None = None) -> PretrainModel:
        """The pretrained encoder and its objective heads (the ITM head starts retrieval)."""
        try:
            return load_pretrained(self.model_dir, dropout)
        except CheckpointError as err:
            raise StageError(f"pretrained model: {err}") from None
