"""Config of the dedup stage: which evaluation splits form the blocklist."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Split names of each evaluation set, so that a misspelt split fails validation instead of blocking nothing.
EntitiesSplit = Literal["train", "val", "test"]
KarpathySplit = Literal["train", "restval", "val", "test"]
RefcocoSplit = Literal["train", "val", "test", "testA", "testB", "testC"]
Nlvr2Split = Literal["train", "dev", "test1", "test2"]
GqaSplit = Literal["train", "val", "testdev", "test", "challenge", "submission"]


class DedupReasons(BaseModel):
    """Which identity keys may remove a pretraining image (all on: the union is what UNITER removed)."""

    model_config = ConfigDict(extra="forbid")

    coco_id: bool = True
    vg_id: bool = True  # VG images of GQA's evaluation splits (in play only when GQA is downloaded)
    flickr_id: bool = True
    url: bool = True
    content_hash: bool = True


class DedupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Flickr30k Entities id lists (SPLITS scheme "entities"). All three by default, as UNITER did:
    # ITR evaluates on the Karpathy test split, which is not the Entities test list.
    flickr30k_entities_splits: list[EntitiesSplit] = ["train", "val", "test"]
    # COCO Karpathy splits (SPLITS scheme "karpathy") used for COCO retrieval / captioning evaluation.
    coco_karpathy_splits: list[KarpathySplit] = ["val", "test"]
    # RefCOCO-style referring-expression splits (tables/task_refcoco.parquet).
    refcoco_splits: list[RefcocoSplit] = ["val", "testA", "testB"]
    # NLVR2 image splits (split of nlvr2 IMAGES rows).
    nlvr2_splits: list[Nlvr2Split] = ["dev", "test1"]
    # GQA question splits (tables/task_gqa.parquet) whose images are blocked: their Visual Genome images by VG
    # id (and the COCO / Flickr photos, URLs and bytes of those), testdev's own images by URL and bytes. Only
    # in play when the download holds GQA (configs/gqa.yaml).
    gqa_splits: list[GqaSplit] = ["val", "testdev"]
    reasons: DedupReasons = Field(default_factory=DedupReasons)
