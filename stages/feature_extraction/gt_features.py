"""The ``gt_features`` stage: RefCOCO's ground-truth region store, detector features pooled at every COCO
instance box of the RefCOCO images.

RefCOCO's "ground-truth regions" setting scores the annotated objects of an image instead of detections.
The detector backend's given-boxes mode (bottom-up-attention's ``bbox_feats``) pools features at those
boxes; they are stored in the img_db layout with confidence 1 in the instance order of
``tables/objects.parquet``, so every box is kept whatever the box-count rule (up to its max_bb). The output
is laid out as the features stage's (``stages/outputs/features.py``), with the same declared box rule.
Inputs: ``download`` (the RefCOCO table, the COCO instances dedup would drop, the images) and ``detector``
unless ``features.detector.weights`` names a file.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from stages.base import StageContext, StageError, StageResult
from stages.feature_extraction.actor import normalized_boxes, scaled_given_boxes
from stages.feature_extraction.config import FeatureConfig
from stages.feature_extraction.decode import Failure, decode_image
from stages.feature_extraction.detector.backend import load_backend
from stages.feature_extraction.pipeline import detector_input_size
from stages.feature_extraction.stage import detector_weights
from stages.outputs.features import FeaturesOutput
from vlp.data.img_db import ImgDbWriter
from vlp.tasks.refexp import coco_instance_boxes

BATCH = 8  # images per pooling call


def image_bytes(images_dir: Path, keys: set[str]) -> dict[str, bytes]:
    """Encoded bytes of the downloaded (status ok) images among ``keys``, from the IMAGES shards."""
    out: dict[str, bytes] = {}
    if not keys:
        return out
    for shard in sorted(images_dir.glob("*/shard-*.parquet")):
        table = pq.read_table(shard, columns=["key", "status", "image"],
                              filters=[("key", "in", sorted(keys))])
        for row in table.to_pylist():
            if row["status"] == "ok":
                out[row["key"]] = row["image"]
    return out


def build_gt_store(keys: Iterable[str], download_dir: Path, features: FeatureConfig, weights: Path,
                   out: Path, nbb: tuple[float, int, int]) -> int:
    """Write the store for the images ``keys`` that were downloaded; returns how many images it holds."""
    wanted = set(keys)
    try:
        instances = coco_instance_boxes(download_dir / "tables" / "objects.parquet", wanted)
    except ValueError as err:
        raise StageError(str(err)) from None
    encoded = image_bytes(download_dir / "images", wanted)
    backend = load_backend(features.detector, weights)
    short, long = detector_input_size(features)
    todo = sorted(k for k in encoded if len(instances[k][1]))
    with ImgDbWriter(out, nbb_configs=[nbb]) as writer:
        for start in range(0, len(todo), BATCH):
            images, boxes, sizes = [], [], []
            for key in todo[start : start + BATCH]:
                decoded = decode_image(encoded[key], short, long)
                if isinstance(decoded, Failure):
                    raise StageError(f"{download_dir / 'images'}: image {key!r}: {decoded.reason} "
                                     f"({decoded.detail})")
                rgb, orig = decoded
                size = (rgb.shape[1], rgb.shape[0])
                given = scaled_given_boxes(instances[key][1], orig, size)
                if len(given) != len(instances[key][1]):
                    outside = len(instances[key][1]) - len(given)
                    raise StageError(f"{download_dir / 'tables' / 'objects.parquet'}: image {key!r}: "
                                     f"{outside} COCO instance box(es) lie outside the "
                                     f"{orig[0]}x{orig[1]} image")
                images.append(rgb)
                boxes.append(given)
                sizes.append(size)
            pooled = backend.pool(images, boxes)
            for key, det, (width, height) in zip(todo[start : start + BATCH], pooled, sizes, strict=True):
                writer.put(key, features=det.features, norm_bb=normalized_boxes(det.boxes, width, height),
                           conf=np.ones(len(det), np.float32), soft_labels=det.soft_labels,
                           attr_labels=det.attr_labels)
    return len(todo)


def run(ctx: StageContext) -> StageResult:
    cfg: FeatureConfig = ctx.cfg.features
    download = ctx.inputs["download"]
    table = pq.read_table(download / "tables" / "task_refcoco.parquet", columns=["image_key"])
    out = FeaturesOutput(ctx.out_dir)
    count = build_gt_store(set(table.column("image_key").to_pylist()), download, cfg,
                           detector_weights(ctx, cfg), out.store_dir, cfg.nbb[0])
    ctx.log.info("gt_features: ground-truth regions of %d RefCOCO images pooled", count)
    out.write_stats({"images": count}, cfg.nbb[0], compress=False)
    return StageResult(metrics={"images": float(count)}, artifacts=[out.stats_path.name])
