"""MS-COCO: ``captions_<split>.json``, optional ``instances_<split>.json`` and ``image_info_<split>.json``,
Karpathy ``dataset_coco.json``.

The split of an image is taken from its file's role (``captions_train2014`` -> ``train2014``), so
2014 and 2017 files work alike; the image id is the same across years. ``image_info_test2015.json`` (the
images of VQA's test-dev / test-std questions) lists images only: no ``annotations`` key, no
``flickr_url``. Captions keep the annotators' text with its runs of whitespace collapsed to one space
(the raw files have leading, trailing and repeated inner spaces).
"""

from __future__ import annotations

import re
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

_ROLE = re.compile(r"(captions|instances|image_info)_(\w+)")
KARPATHY_SPLITS = ("train", "restval", "val", "test")


def _roles(files: dict[str, Path]) -> dict[str, dict[str, Path]]:
    """kind (captions, instances, image_info) -> split -> file."""
    check_roles("coco", files, ["karpathy"], optional=None)
    by_kind: dict[str, dict[str, Path]] = {"captions": {}, "instances": {}, "image_info": {}}
    for role, path in files.items():
        if role == "karpathy":
            continue
        match = _ROLE.fullmatch(role)
        if match is None:
            raise FormatError(
                dataset_label("coco"),
                f"unknown file role '{role}' (known: captions_<split>, instances_<split>, "
                "image_info_<split>, karpathy)",
            )
        by_kind[match[1]][match[2]] = path
    captions = by_kind["captions"]
    if not captions:
        given = ", ".join(sorted(files))
        raise FormatError(
            dataset_label("coco"), f"missing required file role 'captions_<split>' (given: {given})"
        )
    return by_kind


def _read_images(path: Path, data: dict, split: str) -> dict[int, tuple[int, ImageRef]]:
    """image id -> (record index, ImageRef) for the ``images`` list of a captions or instances file."""
    out: dict[int, tuple[int, ImageRef]] = {}
    for rec in records(path, json_list(path, data, "images")):
        image_id = rec.get_int("id")
        rec.label = f"image {image_id}"
        if image_id in out:
            raise rec.error("id", f"image {image_id} is listed twice (also record {out[image_id][0]})")
        # The original 2015 release of the 2014 files has a bare `url` instead of coco_url/flickr_url.
        url = rec.get_str(rec.pick(("coco_url", "url")))
        flickr_url = rec.get_str("flickr_url", optional=True, nullable=True)
        ref = ImageRef("coco", f"coco:{image_id}", url, split, coco_id=image_id, flickr_url=flickr_url)
        out[image_id] = (rec.index, ref)
    return out


def _annotation_image(rec: Record, file_images: dict) -> int:
    ann_id = rec.get_int("id")
    rec.label = f"annotation {ann_id}"
    image_id = rec.get_int("image_id")
    if image_id not in file_images:
        raise rec.error("image_id", f"image {image_id} is not in this file's images")
    return image_id


def normalize_caption(text: str) -> str:
    """The caption with every run of whitespace (spaces, tabs, newlines) collapsed to one space, trimmed."""
    return " ".join(text.split())


def parse_coco(files: dict[str, Path], source: DatasetSource) -> Parsed:
    roles = _roles(files)
    caption_files, instance_files = roles["captions"], roles["instances"]
    images: dict[int, ImageRef] = {}
    listed_in: dict[int, Path] = {}
    captions = []
    for split, path in caption_files.items():
        data = load_json(path)
        file_images = _read_images(path, data, split)
        for image_id, (index, ref) in file_images.items():
            if image_id in listed_in:
                raise FormatError(
                    path,
                    f"image {image_id} is also in {listed_in[image_id]}",
                    record=index,
                    record_id=f"image {image_id}",
                    field="id",
                )
            listed_in[image_id] = path
            images[image_id] = ref
        for rec in records(path, json_list(path, data, "annotations")):
            image_id = _annotation_image(rec, file_images)
            caption = normalize_caption(rec.get_str("caption"))
            captions.append(
                {
                    "corpus": "coco",
                    "image_key": f"coco:{image_id}",
                    "caption_id": str(rec.data["id"]),
                    "caption": caption,
                    "split": split,
                }
            )

    objects = []
    for split, path in instance_files.items():
        data = load_json(path)
        file_images = _read_images(path, data, split)
        for image_id, (_, ref) in file_images.items():
            images.setdefault(image_id, ref)  # an image with boxes but no captions is still a COCO image
        categories = {}
        for rec in records(path, json_list(path, data, "categories")):
            category_id = rec.get_int("id")
            rec.label = f"category {category_id}"
            categories[category_id] = rec.get_str("name")
        for rec in records(path, json_list(path, data, "annotations")):
            image_id = _annotation_image(rec, file_images)
            category_id = rec.get_int("category_id")
            if category_id not in categories:
                raise rec.error("category_id", f"category {category_id} is not in this file's categories")
            x, y, w, h = rec.get_box("bbox")
            objects.append(
                {
                    "corpus": "coco",
                    "image_key": f"coco:{image_id}",
                    "object_id": rec.data["id"],
                    "names": [categories[category_id]],
                    "attributes": [],
                    "x": x,
                    "y": y,
                    "w": w,
                    "h": h,
                }
            )

    for split, path in roles["image_info"].items():  # images without annotations (COCO test2014/2015)
        for image_id, (_, ref) in _read_images(path, load_json(path), split).items():
            images.setdefault(image_id, ref)

    splits = []
    path = files["karpathy"]
    seen: dict[int, int] = {}
    given = ", ".join(p.name for kind in roles.values() for p in kind.values())
    for rec in records(path, json_list(path, load_json(path), "images")):
        coco_id = rec.get_int("cocoid")
        rec.label = f"image {coco_id}"
        if coco_id in seen:
            raise rec.error("cocoid", f"image {coco_id} is listed twice (also record {seen[coco_id]})")
        seen[coco_id] = rec.index
        split = rec.get_choice("split", KARPATHY_SPLITS)
        if coco_id not in images:
            raise rec.error("cocoid", f"image {coco_id} is in none of the COCO files given ({given})")
        splits.append(
            {"corpus": "coco", "scheme": "karpathy", "split": split, "image_key": f"coco:{coco_id}"}
        )

    return Parsed(images=list(images.values()), captions=captions, objects=objects, splits=splits)
