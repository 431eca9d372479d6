"""The two model formats: a dir holding each part's config next to its weights (nanoGPT: model args + state
dict), so that a model loads from its dir alone. A bad dir is a one-line ``CheckpointError`` naming the file.

Pretrained model (the pretrain stage's ``model/``)::

    config.json   the encoder's UniterConfig      model.pt   its state dict (``UniterModel.from_pretrained``)
    heads.json    each objective's options        heads.pt   the objectives' state dict

Finetuned task model (a variant dir of a finetune stage)::

    encoder/      the encoder, as above (config.json, model.pt)
    head.pt       the task head's state dict
    task.json     the head's config (task, options, state_extra), how it was trained, its last validation
    curves.json   the training and validation curves
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlp.model import UniterConfig, UniterModel
from vlp.model.uniter import CONFIG_FILE, WEIGHTS_FILE
from vlp.train.pretrain_model import PretrainModel, build_model

HEADS_FILE = "heads.pt"
HEADS_CONFIG = "heads.json"
ENCODER_DIR = "encoder"
HEAD_FILE = "head.pt"
TASK_FILE = "task.json"
CURVES_FILE = "curves.json"


class CheckpointError(ValueError):
    """A model dir that is incomplete, unreadable or does not fit the model it should hold."""


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _read_state(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as err:  # unpickling errors come in many types; all mean an unreadable file
        raise CheckpointError(f"{path}: cannot read ({type(err).__name__}: {_one_line(err)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a state dict")
    return state


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read ({_one_line(err)})") from None


def load_state(module: nn.Module, state: Mapping[str, Tensor], path: Path) -> None:
    """``module.load_state_dict(state)``; a mismatch names the file and its first difference."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), _one_line(err))
        raise CheckpointError(f"{path}: does not fit the model ({first})") from None


# --- pretrained encoder + objective heads ---------------------------------------------------------------

def save_pretrained(directory: Path, model: PretrainModel, options: Mapping[str, dict]) -> None:
    """``options``: the objectives' constructor options (``pretrain_model.objective_options``)."""
    model.encoder.save_pretrained(directory)
    torch.save(model.objectives.state_dict(), directory / HEADS_FILE)
    (directory / HEADS_CONFIG).write_text(json.dumps(options, indent=1, sort_keys=True) + "\n")


def pretrained_config(directory: Path, dropout: float | None = None) -> UniterConfig:
    """The encoder config of a pretrained model dir, with another dropout rate when ``dropout`` is set."""
    try:
        config = UniterConfig.from_json_file(directory / CONFIG_FILE)
    except ValueError as err:
        raise CheckpointError(_one_line(err)) from None
    if dropout is None:
        return config
    return config.model_copy(update={"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout})


def load_pretrained(directory: Path, dropout: float | None = None) -> PretrainModel:
    """The encoder and objective heads a pretrained model dir holds (on the CPU); no momentum teacher (a
    training device, not part of the model dir)."""
    model = build_model(pretrained_config(directory, dropout), _read_json(directory / HEADS_CONFIG),
                        teacher=False)
    load_state(model.encoder, _read_state(directory / WEIGHTS_FILE), directory / WEIGHTS_FILE)
    load_state(model.objectives, _read_state(directory / HEADS_FILE), directory / HEADS_FILE)
    return model


# --- finetuned encoder + task head ----------------------------------------------------------------------

@dataclass
class TaskModel:
    encoder: UniterModel
    head_state: dict[str, Tensor]
    record: dict[str, Any]  # task.json


def save_task_model(directory: Path, encoder: UniterModel, head: nn.Module, record: Mapping[str, Any],
                    curves: list[dict[str, Any]]) -> None:
    """``record`` must hold the head's config (``task``, ``options``, ``state_extra``)."""
    directory.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(directory / ENCODER_DIR)
    torch.save(head.state_dict(), directory / HEAD_FILE)
    (directory / TASK_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    (directory / CURVES_FILE).write_text(json.dumps(curves, indent=1) + "\n")


def load_task_model(directory: Path) -> TaskModel:
    """The encoder, the head's state dict and the record of a finetuned model dir; the head is rebuilt from
    the record's config (and, for a task whose head depends on its data, checked against the data)."""
    record = _read_json(directory / TASK_FILE)
    try:
        encoder = UniterModel.from_pretrained(directory / ENCODER_DIR)
    except ValueError as err:
        raise CheckpointError(_one_line(err)) from None
    return TaskModel(encoder, _read_state(directory / HEAD_FILE), record)


def load_head(head: nn.Module, model: TaskModel, directory: Path) -> None:
    load_state(head, model.head_state, directory / HEAD_FILE)
