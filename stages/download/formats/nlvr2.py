"""NLVR2 ``train.json`` / ``dev.json`` / ``test1.json``: JSON Lines despite the extension.

Identifier ``<split>-<set>-<pair>-<sentence>`` names the image pair ``<split>-<set>-<pair>-img0`` (left)
and ``-img1`` (right); the two sentences written for one pair share its images. Labels are the
strings ``"True"``/``"False"``.
"""

from __future__ import annotations

import re
from pathlib import Path

from stages.download.config import DatasetSource
from stages.download.formats.base import ImageRef, Parsed, check_roles, describe, read_json_lines

_IDENTIFIER = re.compile(r"(\w+)-(\d+)-(\d+)-(\d+)")
_LABELS = {"True": True, "False": False}


def parse_nlvr2(files: dict[str, Path], source: DatasetSource) -> Parsed:
    # test2 is not public: optional.
    check_roles("nlvr2", files, ["train", "dev", "test1"], ["test2"])
    images: dict[str, ImageRef] = {}
    rows = []
    for split, path in files.items():
        for rec in read_json_lines(path):
            identifier = rec.get_str("identifier")
            rec.label = identifier
            match = _IDENTIFIER.fullmatch(identifier)
            if match is None:
                raise rec.error("identifier", "expected '<split>-<set>-<pair>-<sentence>'")
            if match[1] != split:
                raise rec.error("identifier", f"split '{match[1]}' is not this file's role '{split}'")
            label = rec.data.get("label")
            if isinstance(label, str) and label in _LABELS:
                label = _LABELS[label]
            elif not isinstance(label, bool):
                raise rec.error("label", f'expected "True" or "False", got {describe(label)}')
            pair = identifier.rsplit("-", 1)[0]
            keys = []
            for side, name in enumerate(("left_url", "right_url")):
                key = f"nlvr2:{pair}-img{side}"
                url = rec.get_str(name)
                # Both sentences of a pair list the same two images: keep the first.
                images.setdefault(key, ImageRef("nlvr2", key, url, split))
                keys.append(key)
            rows.append(
                {
                    "identifier": identifier,
                    "split": split,
                    "sentence": rec.get_str("sentence"),
                    "left_key": keys[0],
                    "right_key": keys[1],
                    "label": label,
                }
            )
    return Parsed(images=list(images.values()), tasks={"nlvr2": rows})
