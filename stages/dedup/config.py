"""Config of the dedup stage: which evaluation splits form the blocklist."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Split names of each evaluation set, so that a misspelt split fails validation instead of blocking nothing.
EntitiesSplit = Literal["train", "val", "test"]
KarpathySplit = Literal["train", "restval", "val", "test"]
RefcocoSplit = Literal["train", "val", "test", "testA", "testB", "testC"]
Nlvr2Split = Literal["train", "dev", "test1", "test2"]


class DedupReasons(BaseModel):
    """Which identity keys may remove a pretraining image (all on: the union is what UNITER removed)."""

    model_config = ConfigDict(extra="forbid")

    coco_id: bool = True
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
    reasons: DedupReasons = Field(default_factory=DedupReasons)
