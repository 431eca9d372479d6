"""The models finetuning starts from (pretrain stage output or scratch) and the finetuned checkpoints.

A finetuned variant dir holds::

    encoder/      the encoder (UniterModel.save_pretrained: config.json, model.pt)
    head.pt       the task head's state dict
    task.json     task, variant, init, head options, the head's state_extra, steps, last validation
    curves.json   the training and validation curves (also in the stage's MLflow run)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stages.base import StageError
from vlp.model import UniterConfig, UniterModel

ENCODER_DIR = "encoder"
HEAD_FILE = "head.pt"
TASK_FILE = "task.json"
CURVES_FILE = "curves.json"


@dataclass(frozen=True)
class Pretrained:
    """The pretrain stage's output: ``model/`` (encoder + heads.pt) and ``tokenizer/``."""

    root: Path

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    def config(self, dropout: float | None = None) -> UniterConfig:
        try:
            config = UniterConfig.from_json_file(self.model_dir / "config.json")
        except ValueError as err:
            raise StageError(f"pretrained model: {err}") from None
        if dropout is None:
            return config
        rates = {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
        return config.model_copy(update=rates)

    def encoder(self, init: str, dropout: float | None, seed: int) -> UniterModel:
        """The pretrained encoder, or (``init="scratch"``) the same architecture freshly initialised."""
        config = self.config(dropout)
        torch.manual_seed(seed)
        model = UniterModel(config)
        if init == "pretrained":
            try:
                model.load_state_dict(UniterModel.from_pretrained(self.model_dir).state_dict())
            except ValueError as err:
                raise StageError(f"pretrained model: {err}") from None
        return model

    def heads(self) -> dict[str, Tensor]:
        path = self.model_dir / "heads.pt"
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise StageError(f"{path}: the pretrained heads are missing (needed for the ITM head)") from None


def save_finetuned(directory: Path, model: UniterModel, head: nn.Module, record: dict[str, Any],
                   curves: list[dict[str, Any]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory / ENCODER_DIR)
    torch.save(head.state_dict(), directory / HEAD_FILE)
    (directory / TASK_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    (directory / CURVES_FILE).write_text(json.dumps(curves, indent=1) + "\n")


def load_finetuned(directory: Path) -> tuple[UniterModel, dict[str, Tensor], dict[str, Any]]:
    """(encoder, head state dict, task record) of a finetuned variant dir."""
    try:
        record = json.loads((directory / TASK_FILE).read_text())
        model = UniterModel.from_pretrained(directory / ENCODER_DIR)
        state = torch.load(directory / HEAD_FILE, map_location="cpu", weights_only=True)
    except (OSError, ValueError) as err:
        raise StageError(f"{directory}: not a finetuned checkpoint ({' '.join(str(err).split())})") from None
    return model, state, record


def load_head(head: nn.Module, state: dict[str, Tensor], directory: Path) -> None:
    try:
        head.load_state_dict(state)
    except RuntimeError as err:
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise StageError(f"{directory / HEAD_FILE}: does not fit the task head ({first})") from None
