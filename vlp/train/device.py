"""Where a single-process run computes, and moving batches there."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with every tensor on ``device`` (other values, such as key lists, as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}
