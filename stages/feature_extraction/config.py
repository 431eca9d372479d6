"""Config of the features stage: Ray Data extraction of region features into the img_db LMDB store."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from stages.feature_extraction.detector.config import DetectorConfig


class ProbeConfig(BaseModel):
    """Feature-quality check on held-out images whose objects the world knows (world mode only)."""

    model_config = ConfigDict(extra="forbid")

    # Corpora the detector never trained on (it trains on VG; VG copies COCO scenes, so COCO is out).
    corpora: tuple[str, ...] = ("flickr30k", "nlvr2")
    iou: float = Field(0.5, gt=0, le=1)  # a detected box covers an annotated object at this IoU
    l2: float = Field(1e-3, ge=0)  # weight decay of the logistic-regression probe
    steps: int = Field(200, ge=1)  # L-BFGS iterations of the probe


class FeatureConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    # detect: the detector's own boxes (UNITER). given_boxes: pool features at the annotated boxes of
    # tables/objects.parquet (bottom-up-attention's bbox_feats); images without annotations are then
    # detected or skipped, per `unannotated`.
    mode: Literal["detect", "given_boxes"] = "detect"
    unannotated: Literal["detect", "skip"] = "detect"
    # Images are downscaled on CPU to at most the detector's input size (image_size / max_image_size,
    # or detectron2.min_size / max_size) before they travel to the detector; boxes are stored
    # normalized to the original size either way.
    resize: bool = True
    # Images per detector call (one Ray Data batch per actor call) and per decode task batch.
    batch_size: int = Field(16, ge=1)
    decode_batch_size: int = Field(64, ge=1)
    decode_memory_mb: int = Field(768, ge=1)  # reserved per decode task (worker, compressed + decoded batch)
    # Detector actors: None = one per GPU, or one on a CPU-only cluster. CPUs per actor (its torch
    # threads) when it runs on CPU.
    actors: int | None = Field(None, ge=1)
    actor_cpus: float = Field(1.0, gt=0)
    # Writer: LMDB commit every this many bytes of encoded values (a killed run loses at most one
    # uncommitted batch); npz-compressed values as UNITER's `--compress`.
    commit_bytes: int = Field(16 << 20, ge=1)
    compress: bool = False
    # (conf_th, max_bb, min_bb) box-count sidecars written next to the store; the first one is the rule the
    # stage declares in its output: what the probe, the stats and every consumer (pretrain, finetune, eval)
    # read the store with.
    nbb: tuple[tuple[float, int, int], ...] = ((0.2, 100, 10),)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)

    @model_validator(mode="after")
    def _consistent(self) -> FeatureConfig:
        if not self.nbb:
            raise ValueError("nbb must list at least one (conf_th, max_bb, min_bb)")
        return self
