"""What a pretraining checkpoint holds, and the marker that stops retries of a deterministic failure.

A checkpoint dir (reported through ``ray.train.report`` by rank 0) holds::

    state.pt        model (encoder + heads, with the itc task's feature queues and, when configured, the
                    momentum teacher: both are part of the model's state dict), optimizer, LR schedule, loss
                    scaler, step, the batch samplers' positions per task and the task sampler's state
    progress.json   step and the validation metrics so far (readable without torch)

Randomness needs no saved state: dropout is reseeded from (seed, step, rank) every step and masking (and
ITM's contrastive negatives) from (seed, task, epoch, batch), so a resumed run continues exactly as an
uninterrupted one would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
PROGRESS_FILE = "progress.json"


class FatalTrainingError(RuntimeError):
    """A failure that a retry from the last checkpoint would only repeat (NaN loss, bad data or config)."""


def save(directory: Path, state: dict[str, Any], progress: dict[str, Any]) -> None:
    torch.save(state, directory / STATE_FILE)
    (directory / PROGRESS_FILE).write_text(json.dumps(progress, indent=1, sort_keys=True) + "\n")


def load_state(directory: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(directory / STATE_FILE, map_location=map_location, weights_only=True)


def load_progress(directory: Path) -> dict[str, Any]:
    return json.loads((directory / PROGRESS_FILE).read_text())


def write_fatal(marker: Path, message: str) -> None:
    """Record the error so that the workers Ray restarts after it fail at once with the same message."""
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(message)
    tmp.replace(marker)


def raise_if_fatal(marker: Path) -> None:
    if marker.is_file():
        raise FatalTrainingError(marker.read_text())
