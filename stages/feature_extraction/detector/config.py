"""Config of the region detector: which backend, which weights, and (without weights) how to train one.

Three groups of fields: the architecture (stored inside every weight file and checked against it on
load, see ``ARCH_FIELDS``), the detection rule applied at extraction time (UNITER's: confidence 0.2,
10 to 100 boxes), and ``train`` (the cached ``detector`` stage that trains weights when none are given).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DetectorTrainConfig(BaseModel):
    """Training of the torchvision detector on Visual-Genome-style objects + attributes.

    Defaults fit the demo world (about 250 VG images of 96-260 px) in a few minutes on 2 CPU cores. The
    held-out draw, the initialisation and the batch order derive from the root ``seed``.
    """

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(2e-3, gt=0)  # AdamW peak rate, reached after `warmup_steps`, cosine-decayed to 0
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(30, ge=0)
    # (low, high): each training image's shorter side is drawn from this range (in steps of 16) instead
    # of being `image_size`. Off by default: every corpus of the world frames its objects alike, and
    # one scale learns the shapes in fewer steps.
    scale_jitter: tuple[int, int] | None = None
    # RoIs sampled per image for the box head: RoIAlign's backward dominates a CPU training step, so
    # far fewer than torchvision's 512.
    rois_per_image: int = Field(32, ge=8)
    # Scenes hold 1-4 objects: half the sampled RoIs foreground keeps the shape classifier fed.
    roi_positive_fraction: float = Field(0.5, gt=0, lt=1)
    # The attribute loss (summed over attributes) competes with the class loss for the shared features;
    # at full weight it slowed learning the object classes several-fold.
    attr_loss_weight: float = Field(0.25, ge=0)
    val_fraction: float = Field(0.1, gt=0, lt=1)  # VG images held out for the returned metrics
    # Vocabularies, as bottom-up-attention's VG 1600/400: the most frequent object names / attributes.
    max_classes: int = Field(1600, ge=1)
    max_attributes: int = Field(400, ge=1)
    min_count: int = Field(1, ge=1)  # a name or attribute must occur this often in training data
    threads: int = Field(2, ge=1)  # torch intra-op threads


class Detectron2Config(BaseModel):
    """bottom-up-attention's VG detector (the ``detectron2`` backend); defaults are the published model's."""

    model_config = ConfigDict(extra="forbid")

    num_classes: int = Field(1600, ge=1)
    num_attributes: int = Field(400, ge=1)
    # The published vocabularies (objects_vocab.txt / attributes_vocab.txt: one entry a line, synonyms
    # after commas); None names them class_<i> / attribute_<i>.
    classes_file: str | None = None
    attributes_file: str | None = None
    min_size: int = Field(600, ge=32)  # shorter image side, as the Caffe extractor
    max_size: int = Field(1000, ge=32)
    rpn_pre_nms_top_n: int = Field(6000, ge=1)


class DetectorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: Literal["torchvision", "detectron2"] = "torchvision"
    # A weight file for the backend. None (torchvision only): train one on the world's Visual-Genome-
    # style objects + attributes in the cached `detector` stage, as the original was trained on VG.
    weights: str | None = None

    # --- architecture of the torchvision backend (stored in its weight file; must match on load) ---
    # ResNet-18 trunk with one feature level and a two-layer MLP box head, small enough to train from
    # scratch on 2 CPU cores: to res3 (stride 8, 128 channels) or to res4 (stride 16, 256 channels, the
    # C4 layout). Stride 8 keeps the shape of objects of 20-60 px, which stride 16 blurs into 2-4 cells.
    backbone: Literal["resnet18_c3", "resnet18_c4"] = "resnet18_c3"
    feature_dim: int = Field(512, ge=16)  # width of the box head's representation = stored feature size
    pool_size: int = Field(7, ge=1)  # RoIAlign output side
    image_size: int = Field(128, ge=32)  # images are resized so their shorter side is this
    max_image_size: int = Field(256, ge=32)  # ... and their longer side at most this
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)

    # --- detection rule (any value works with any weights) ---
    conf_threshold: float = Field(0.2, ge=0, le=1)
    nms_threshold: float = Field(0.3, gt=0, le=1)  # per-class NMS over the box head's class boxes
    min_boxes: int = Field(10, ge=1)
    max_boxes: int = Field(100, ge=1)
    rpn_pre_nms_top_n: int = Field(600, ge=1)
    rpn_post_nms_top_n: int = Field(300, ge=1)  # proposals per image entering the box head
    # bf16 autocast of the convolutions and the box head; box coordinates, RoIAlign and NMS stay fp32.
    # Measured on a 2-core avx512_bf16 CPU: 20% less CPU time per detected image, 8% per training step.
    precision: Literal["fp32", "bf16"] = "bf16"

    train: DetectorTrainConfig = Field(default_factory=DetectorTrainConfig)
    detectron2: Detectron2Config = Field(default_factory=Detectron2Config)

    @model_validator(mode="after")
    def _consistent(self) -> DetectorConfig:
        if self.min_boxes > self.max_boxes:
            raise ValueError("min_boxes must be <= max_boxes")
        if self.image_size > self.max_image_size:
            raise ValueError("image_size must be <= max_image_size")
        if self.rpn_post_nms_top_n < self.min_boxes:
            raise ValueError("rpn_post_nms_top_n must be >= min_boxes (every kept box is a proposal)")
        jitter = self.train.scale_jitter
        if jitter is not None and not 32 <= jitter[0] <= jitter[1]:
            raise ValueError("train.scale_jitter must be (low, high) with 32 <= low <= high")
        return self


# The fields a torchvision weight file records and `load_backend` compares with the config.
ARCH_FIELDS = (
    "backbone",
    "feature_dim",
    "pool_size",
    "image_size",
    "max_image_size",
    "anchor_sizes",
    "aspect_ratios",
)
