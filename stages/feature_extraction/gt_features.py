"""Ground-truth region stores: detector features pooled at annotated boxes, one region per box.

Two stages, one way of pooling:

* ``gt_features``: RefCOCO's ground-truth regions, every COCO instance box of the RefCOCO images (the
  "ground-truth regions" setting scores the annotated objects of an image instead of detections).
* ``entity_features``: the Flickr30k Entities boxes of the images of the Entities splits ISDa is measured
  on (``eval.retrieval.isda_splits``): the IAIS authors extracted features at these boxes for ISDa
  (``generate_tsv_gt.py --split flickr30k_entities``). A box that several chains share is one region. The
  store's row order is written to ``boxes.json`` ({image key: [[x1, y1, x2, y2], ...]} in the annotation's
  0-based pixels), so ISDa finds each chain's regions by its boxes.

The detector backend's given-boxes mode (bottom-up-attention's ``bbox_feats``) pools the features; they are
stored in the img_db layout with confidence 1, so every box is kept whatever the box-count rule (up to its
max_bb), in the given order. The outputs are laid out as the features stage's (``stages/outputs/features.py``)
with the same declared box rule. Inputs: ``download`` (the tables, including what dedup would drop, and the
images) and ``detector`` unless ``features.detector.weights`` names a file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
from stages.outputs.features import EntityFeaturesOutput, FeaturesOutput
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


def entity_boxes(tables_dir: Path, splits: Iterable[str]) -> dict[str, np.ndarray]:
    """key -> pixel x1y1x2y2 Float32[N, 4]: the distinct Entities boxes of each image of the Entities
    ``splits``, in (sentence, phrase, box) order of ``entities.parquet``; images without a box left out."""
    try:
        split_rows = pq.read_table(tables_dir / "splits.parquet").to_pylist()
        rows = pq.read_table(tables_dir / "entities.parquet",
                             columns=["image_key", "sentence_idx", "boxes"]).to_pylist()
    except (OSError, ValueError) as err:
        raise StageError(f"{tables_dir}: cannot read the Flickr30k Entities tables ({err})") from None
    wanted = set(splits)
    keys = {r["image_key"] for r in split_rows
            if r["corpus"] == "flickr30k" and r["scheme"] == "entities" and r["split"] in wanted}
    by_image: dict[str, dict[tuple[float, ...], None]] = {}
    for row in rows:  # the table's row order is the annotation's (sentence, then phrase) order
        if row["image_key"] in keys:
            for box in row["boxes"] or ():
                by_image.setdefault(row["image_key"], {})[tuple(box)] = None
    return {key: np.asarray(list(boxes), dtype=np.float32).reshape(-1, 4)
            for key, boxes in sorted(by_image.items())}


def build_gt_store(boxes: Mapping[str, np.ndarray], source: Path, download_dir: Path, features: FeatureConfig,
                   weights: Path, out: Path, nbb: tuple[float, int, int]) -> list[str]:
    """Write the store of the images ``boxes`` names (pixel x1y1x2y2 per image, from the table ``source``)
    that were downloaded and have a box; returns their keys, in store order."""
    encoded = image_bytes(download_dir / "images", set(boxes))
    backend = load_backend(features.detector, weights)
    short, long = detector_input_size(features)
    todo = sorted(k for k in encoded if len(boxes[k]))
    with ImgDbWriter(out, nbb_configs=[nbb]) as writer:
        for start in range(0, len(todo), BATCH):
            images, given_boxes, sizes = [], [], []
            for key in todo[start : start + BATCH]:
                decoded = decode_image(encoded[key], short, long)
                if isinstance(decoded, Failure):
                    raise StageError(f"{download_dir / 'images'}: image {key!r}: {decoded.reason} "
                                     f"({decoded.detail})")
                rgb, orig = decoded
                size = (rgb.shape[1], rgb.shape[0])
                given = scaled_given_boxes(boxes[key], orig, size)
                if len(given) != len(boxes[key]):
                    outside = len(boxes[key]) - len(given)
                    raise StageError(f"{source}: image {key!r}: {outside} box(es) lie outside the "
                                     f"{orig[0]}x{orig[1]} image")
                images.append(rgb)
                given_boxes.append(given)
                sizes.append(size)
            pooled = backend.pool(images, given_boxes)
            for key, det, (width, height) in zip(todo[start : start + BATCH], pooled, sizes, strict=True):
                writer.put(key, features=det.features, norm_bb=normalized_boxes(det.boxes, width, height),
                           conf=np.ones(len(det), np.float32), soft_labels=det.soft_labels,
                           attr_labels=det.attr_labels)
    return todo


def run(ctx: StageContext) -> StageResult:
    cfg: FeatureConfig = ctx.cfg.features
    download = ctx.inputs["download"]
    table = pq.read_table(download / "tables" / "task_refcoco.parquet", columns=["image_key"])
    objects = download / "tables" / "objects.parquet"
    try:
        instances = coco_instance_boxes(objects, set(table.column("image_key").to_pylist()))
    except ValueError as err:
        raise StageError(str(err)) from None
    out = FeaturesOutput(ctx.out_dir)
    boxes = {key: xyxy for key, (_, xyxy) in instances.items()}
    count = len(build_gt_store(boxes, objects, download, cfg, detector_weights(ctx, cfg), out.store_dir,
                               cfg.nbb[0]))
    ctx.log.info("gt_features: ground-truth regions of %d RefCOCO images pooled", count)
    out.write_stats({"images": count}, cfg.nbb[0], compress=False)
    return StageResult(metrics={"images": float(count)}, artifacts=[out.stats_path.name])


def run_entities(ctx: StageContext) -> StageResult:
    cfg: FeatureConfig = ctx.cfg.features
    splits = tuple(ctx.cfg.eval.retrieval.isda_splits)
    download = ctx.inputs["download"]
    boxes = entity_boxes(download / "tables", splits)
    out = EntityFeaturesOutput(ctx.out_dir)
    keys = build_gt_store(boxes, download / "tables" / "entities.parquet", download, cfg,
                          detector_weights(ctx, cfg), out.store_dir, cfg.nbb[0])
    out.write_boxes({key: boxes[key].tolist() for key in keys})
    regions = sum(len(boxes[key]) for key in keys)
    ctx.log.info("entity_features: %d Flickr30k Entities boxes of %d images (splits %s) pooled", regions,
                 len(keys), list(splits))
    out.write_stats({"images": len(keys), "regions": regions, "splits": list(splits)}, cfg.nbb[0],
                    compress=False)
    return StageResult(metrics={"images": float(len(keys)), "regions": float(regions)},
                       artifacts=[out.stats_path.name])
