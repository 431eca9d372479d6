"""Visual Genome 1.2/1.4: ``image_data.json`` + optional region, object and attribute files.

The four files are lists with one entry per image in the same order (the official loaders zip them
by position); a shifted file would attach every region to the wrong image, so positions and ids are
checked against ``image_data.json``. Image ids come from the metadata only: the url of image 2412112
names ``2370463.jpg``.
"""

from __future__ import annotations

from pathlib import Path

from stages.download.config import DatasetSource
from stages.download.formats.base import (
    FormatError,
    ImageRef,
    Parsed,
    Record,
    check_roles,
    dataset_label,
    json_list,
    load_json,
    records,
)

# VG ships as one set without splits.
SPLIT = "train"


def _aligned(path: Path, keys: tuple[str, ...], image_ids: list[int], image_data: Path) -> list[Record]:
    """The entries of a per-image file, checked to follow ``image_data.json`` position by position."""
    items = json_list(path, load_json(path))
    if len(items) != len(image_ids):
        raise FormatError(
            path,
            f"has {len(items)} images but {image_data.name} has {len(image_ids)}"
            " (the files are aligned by position)",
        )
    out = []
    for rec in records(path, items):
        name = rec.pick(keys)
        image_id = rec.get_int(name)
        rec.label = f"image {image_id}"
        expected = image_ids[rec.index]
        if image_id != expected:
            raise rec.error(
                name,
                f"is image {image_id} but {image_data.name} record {rec.index} is image {expected}"
                " (the files are aligned by position)",
            )
        out.append(rec)
    return out


def _attributes_by_object(entries: list[Record]) -> list[dict[int, list[str]]]:
    out = []
    for rec in entries:
        by_object = {}
        for position, item in enumerate(rec.get_list("attributes")):
            obj = rec.child("attributes", position, item)
            object_id = obj.get_int(obj.pick(("object_id", "id")))
            # Some objects have no `attributes` key at all (VG shade 5045).
            by_object[object_id] = obj.get_str_list("attributes", optional=True, nullable=True) or []
        out.append(by_object)
    return out


def parse_vg(files: dict[str, Path], source: DatasetSource) -> Parsed:
    check_roles("vg", files, ["image_data"], ["region_descriptions", "objects", "attributes"])
    if "attributes" in files and "objects" not in files:
        raise FormatError(
            dataset_label("vg"), "file role 'attributes' needs role 'objects' (it is joined to it)"
        )
    image_data = files["image_data"]
    images, image_ids, seen = [], [], {}
    for rec in records(image_data, json_list(image_data, load_json(image_data))):
        name = rec.pick(("image_id", "id"))
        image_id = rec.get_int(name)
        rec.label = f"image {image_id}"
        if image_id in seen:
            raise rec.error(name, f"image {image_id} is listed twice (also record {seen[image_id]})")
        seen[image_id] = rec.index
        images.append(
            ImageRef(
                "vg",
                f"vg:{image_id}",
                rec.get_str("url"),
                SPLIT,
                vg_id=image_id,
                coco_id=rec.get_int("coco_id", optional=True, nullable=True),
                flickr_id=rec.get_int("flickr_id", optional=True, nullable=True),
            )
        )
        image_ids.append(image_id)

    regions = []
    if "region_descriptions" in files:
        # The file's per-image key is `id`; the official readme shows `image_id`.
        for rec in _aligned(files["region_descriptions"], ("id", "image_id"), image_ids, image_data):
            key = f"vg:{image_ids[rec.index]}"
            for position, item in enumerate(rec.get_list("regions")):
                region = rec.child("regions", position, item)
                regions.append(
                    {
                        "corpus": "vg",
                        "image_key": key,
                        "region_id": region.get_int("region_id"),
                        "phrase": region.get_str("phrase").strip(),
                        "x": region.get_float("x"),
                        "y": region.get_float("y"),
                        "w": region.get_float("width"),
                        "h": region.get_float("height"),
                    }
                )

    objects = []
    if "objects" in files:
        entries = _aligned(files["objects"], ("image_id", "id"), image_ids, image_data)
        attributes = [{}] * len(entries)
        if "attributes" in files:
            attributes = _attributes_by_object(
                _aligned(files["attributes"], ("image_id", "id"), image_ids, image_data)
            )
        for rec, by_object in zip(entries, attributes, strict=True):
            key = f"vg:{image_ids[rec.index]}"
            for position, item in enumerate(rec.get_list("objects")):
                obj = rec.child("objects", position, item)
                object_id = obj.get_int(obj.pick(("object_id", "id")))
                # v1.4 objects merged some v1.2 objects; their attributes belong to the merged object.
                merged = obj.get_int_list("merged_object_ids", optional=True) or []
                attrs = [a for oid in (object_id, *merged) for a in by_object.get(oid, ())]
                objects.append(
                    {
                        "corpus": "vg",
                        "image_key": key,
                        "object_id": object_id,
                        "names": obj.get_str_list(obj.pick(("names", "object_names"))),
                        "attributes": list(dict.fromkeys(attrs)),
                        "x": obj.get_float("x"),
                        "y": obj.get_float("y"),
                        "w": obj.get_float("w"),
                        "h": obj.get_float("h"),
                    }
                )

    return Parsed(images=images, regions=regions, objects=objects)
