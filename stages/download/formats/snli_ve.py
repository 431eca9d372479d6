"""SNLI-VE ``snli_ve_<split>.jsonl``: SNLI records plus the Flickr30k image id of the premise.

The image-id key is spelled ``Flikr30kID`` (with or without ``.jpg``) by the parser's generator and
``Flickr30K_ID`` (no ``.jpg``) by the current one; all three forms are read.
"""

from __future__ import annotations

from pathlib import Path

from stages.download.config import DatasetSource
from stages.download.formats.base import Parsed, check_roles, read_json_lines

LABELS = ("entailment", "neutral", "contradiction")


def parse_snli_ve(files: dict[str, Path], source: DatasetSource) -> Parsed:
    check_roles("snli_ve", files, ["train", "dev", "test"])
    rows = []
    for split, path in files.items():
        for rec in read_json_lines(path):
            pair_id = rec.get_str("pairID")
            rec.label = f"pair {pair_id}"
            name = rec.pick(("Flikr30kID", "Flickr30K_ID"))
            image = rec.get_str(name)
            photo_id = image.removesuffix(".jpg")
            if not photo_id.isdigit():
                raise rec.error(name, f"expected a Flickr photo id ('<id>' or '<id>.jpg'), got {image!r}")
            label = rec.get_choice("gold_label", LABELS)
            rows.append(
                {
                    "pair_id": pair_id,
                    "image_key": f"flickr30k:{photo_id}",
                    "split": split,
                    "hypothesis": rec.get_str("sentence2"),
                    "label": label,
                    "premise": rec.get_str("sentence1"),
                }
            )
    return Parsed(tasks={"snli_ve": rows})
