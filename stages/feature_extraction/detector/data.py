"""Training data of the detector: Visual Genome images with their objects and attributes, from dedup's output.

As bottom-up-attention trained on VG: the class of an object is its first name, the vocabularies are
the most frequent names / attributes, and a held-out slice of the images measures the result.
"""

from __future__ import annotations

import io
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from stages.base import StageError
from stages.feature_extraction.detector.config import DetectorTrainConfig

log = logging.getLogger("vlp.detector")


@dataclass
class AnnotatedImage:
    key: str
    image: np.ndarray  # HxWx3 uint8 RGB
    boxes: np.ndarray  # (G, 4) float32 x1, y1, x2, y2
    names: list[str]  # the object's class name (its first VG name), one per box
    attributes: list[list[str]]  # the object's attributes, one list per box
    attr_known: list[bool]  # False where VG has no attribute record for the object


@dataclass
class Vocabulary:
    classes: list[str]
    attributes: list[str]


def load_vg(dedup_dir: Path) -> tuple[list[AnnotatedImage], dict[str, int]]:
    """Every decodable VG image with its objects, and counts of what was skipped and why."""
    shards = sorted((dedup_dir / "images" / "vg").glob("shard-*.parquet"))
    objects_path = dedup_dir / "tables" / "objects.parquet"
    if not shards:
        raise StageError(
            f"{dedup_dir / 'images' / 'vg'}: no Visual Genome image shards to train the detector on"
        )
    if not objects_path.is_file():
        raise StageError(f"{objects_path}: missing; the detector trains on Visual Genome objects")
    objects = pq.read_table(objects_path)
    objects = objects.filter(pc.equal(objects["corpus"], "vg")).to_pylist()
    by_image: dict[str, list[dict]] = {}
    for obj in objects:
        by_image.setdefault(obj["image_key"], []).append(obj)
    skipped: Counter[str] = Counter()
    images = []
    for shard in shards:
        for row in pq.read_table(shard, columns=["key", "image"]).to_pylist():
            try:
                with Image.open(io.BytesIO(row["image"])) as im:
                    pixels = np.asarray(im.convert("RGB"))
            except Exception:  # PIL raises many types for corrupt bytes; the image is just skipped
                skipped["undecodable_image"] += 1
                log.warning("%s: record %s: image bytes do not decode; skipped", shard, row["key"])
                continue
            images.append(_annotate(row["key"], pixels, by_image.get(row["key"], []), skipped))
    return images, dict(skipped)


def _annotate(key: str, pixels: np.ndarray, objects: list[dict], skipped: Counter[str]) -> AnnotatedImage:
    height, width = pixels.shape[:2]
    boxes, names, attributes, known = [], [], [], []
    for obj in objects:
        x1, y1 = max(0.0, obj["x"]), max(0.0, obj["y"])
        x2, y2 = min(float(width), obj["x"] + obj["w"]), min(float(height), obj["y"] + obj["h"])
        if x2 - x1 < 1 or y2 - y1 < 1 or not obj["names"]:
            skipped["degenerate_object"] += 1
            continue
        boxes.append((x1, y1, x2, y2))
        names.append(obj["names"][0].strip().lower())
        attributes.append([a.strip().lower() for a in obj["attributes"] or []])
        known.append(bool(obj["attributes"]))
    return AnnotatedImage(key, pixels, np.asarray(boxes, np.float32).reshape(-1, 4), names, attributes, known)


def build_vocabulary(images: list[AnnotatedImage], cfg: DetectorTrainConfig) -> Vocabulary:
    def top(counts: Counter[str], limit: int) -> list[str]:
        ranked = sorted((c for c in counts.items() if c[1] >= cfg.min_count), key=lambda c: (-c[1], c[0]))
        return [name for name, _ in ranked[:limit]]

    names = Counter(n for img in images for n in img.names)
    attrs = Counter(a for img in images for obj in img.attributes for a in set(obj))
    return Vocabulary(top(names, cfg.max_classes), top(attrs, cfg.max_attributes))


def split_images(
    images: list[AnnotatedImage], cfg: DetectorTrainConfig, seed: int
) -> tuple[list[AnnotatedImage], list[AnnotatedImage]]:
    """(train, held-out): a draw of ``val_fraction`` of the images seeded by ``seed``, at least one each."""
    if len(images) < 2:
        raise StageError(
            f"need at least 2 Visual Genome images to train and measure the detector, got {len(images)}"
        )
    ordered = sorted(images, key=lambda img: img.key)
    random.Random(seed).shuffle(ordered)
    n_val = min(max(1, round(len(ordered) * cfg.val_fraction)), len(ordered) - 1)
    return ordered[n_val:], ordered[:n_val]
