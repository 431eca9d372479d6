"""Config of the synthetic world (the embedded default's miniature internet)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class WorldConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = 0
