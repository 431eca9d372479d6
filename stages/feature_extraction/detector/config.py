"""Config of the region detector: which backend, which weights, and (without weights) how to train one."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class DetectorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: Literal["torchvision", "detectron2"] = "torchvision"
    # A weight file for the backend. None (torchvision only): train one on the world's Visual-Genome-
    # style objects + attributes in the cached `detector` stage, as the original was trained on VG.
    weights: str | None = None
