"""Config of the features stage: Ray Data extraction of region features into the img_db LMDB store."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from stages.feature_extraction.detector.config import DetectorConfig


class FeatureConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    detector: DetectorConfig = Field(default_factory=DetectorConfig)
