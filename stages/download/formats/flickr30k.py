"""Flickr30k: Karpathy ``dataset_flickr30k.json`` (images, captions, splits), Entities id lists and
(optionally) the Entities ``annotations.zip``.

The Karpathy test split is not the Entities ``test.txt`` (1007129816 is Karpathy test, Entities
train), so both schemes are kept as separate SPLITS rows. The metadata names files, not URLs: an
image's url is ``image_base_url + filename``.
"""

from __future__ import annotations

from pathlib import Path

from stages.download.config import DatasetSource
from stages.download.formats.base import (
    FormatError,
    ImageRef,
    Parsed,
    check_roles,
    dataset_label,
    json_list,
    load_json,
    read_lines,
    records,
)
from stages.download.formats.flickr30k_entities import read_entities

KARPATHY_SPLITS = ("train", "val", "test")
ENTITIES_SPLITS = ("train", "val", "test")


def _karpathy(path: Path, base_url: str) -> Parsed:
    images, captions, splits, seen = [], [], [], {}
    for rec in records(path, json_list(path, load_json(path), "images")):
        filename = rec.get_str("filename")
        photo_id = filename.rsplit(".", 1)[0]
        rec.label = f"image {filename}"
        if not photo_id.isdigit():
            raise rec.error("filename", f"expected '<flickr photo id>.jpg', got {filename!r}")
        if photo_id in seen:
            raise rec.error("filename", f"image {photo_id} is listed twice (also record {seen[photo_id]})")
        seen[photo_id] = rec.index
        split = rec.get_choice("split", KARPATHY_SPLITS)
        key = f"flickr30k:{photo_id}"
        images.append(ImageRef("flickr30k", key, base_url + filename, split, flickr_id=int(photo_id)))
        splits.append({"corpus": "flickr30k", "scheme": "karpathy", "split": split, "image_key": key})
        for position, item in enumerate(rec.get_list("sentences")):
            sentence = rec.child("sentences", position, item)
            captions.append(
                {
                    "corpus": "flickr30k",
                    "image_key": key,
                    "caption_id": str(sentence.get_int("sentid")),
                    "caption": sentence.get_str("raw").strip(),
                    "split": split,
                }
            )
    return Parsed(images=images, captions=captions, splits=splits)


def _entities_splits(files: dict[str, Path]) -> list[dict]:
    rows, listed_in = [], {}
    for split in ENTITIES_SPLITS:
        path = files[f"entities_{split}"]
        for index, line in enumerate(read_lines(path)):
            photo_id = line.strip()
            if not photo_id:
                continue
            if not photo_id.isdigit():
                raise FormatError(path, f"expected a Flickr photo id, got {photo_id!r}", record=index)
            if photo_id in listed_in:
                raise FormatError(
                    path,
                    f"image {photo_id} is also in {listed_in[photo_id]}",
                    record=index,
                    record_id=photo_id,
                )
            listed_in[photo_id] = path
            rows.append(
                {
                    "corpus": "flickr30k",
                    "scheme": "entities",
                    "split": split,
                    "image_key": f"flickr30k:{photo_id}",
                }
            )
    return rows


def parse_flickr30k(files: dict[str, Path], source: DatasetSource) -> Parsed:
    lists = [f"entities_{split}" for split in ENTITIES_SPLITS]
    check_roles("flickr30k", files, ["karpathy", *lists], ["entities"])
    if not source.image_base_url:
        raise FormatError(
            dataset_label("flickr30k"),
            "image_base_url is required (the metadata names image files, not URLs)",
        )
    parsed = _karpathy(files["karpathy"], source.image_base_url)
    parsed.splits.extend(_entities_splits(files))
    if "entities" in files:
        parsed.entities = read_entities(files["entities"])
    return parsed
