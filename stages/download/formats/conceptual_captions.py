"""Conceptual Captions TSV: ``caption<TAB>url`` per line, no header and no id column.

The row index is the id (key ``cc:<role>:<row>``), so rows are never skipped or re-split. The url
keeps no trailing newline (the HF loader's ``row.split("\\t")`` leaves it on).
"""

from __future__ import annotations

from pathlib import Path

from stages.download.config import DatasetSource
from stages.download.formats.base import FormatError, ImageRef, Parsed, check_roles, read_lines


def parse_cc(files: dict[str, Path], source: DatasetSource) -> Parsed:
    # Any role is a split name (train, val); only train is required.
    check_roles("cc", files, ["train"], optional=None)
    images, captions = [], []
    for role, path in files.items():
        for row, line in enumerate(read_lines(path)):
            key = f"cc:{role}:{row}"
            fields = line.split("\t")
            if len(fields) != 2:
                raise FormatError(
                    path,
                    f"expected 'caption<TAB>url', got {len(fields)} tab-separated fields",
                    record=row,
                    record_id=key,
                    field="url",
                )
            caption, url = fields[0].strip(), fields[1].strip()
            for name, value in (("caption", caption), ("url", url)):
                if not value:
                    raise FormatError(path, "empty", record=row, record_id=key, field=name)
            images.append(ImageRef("cc", key, url, role))
            captions.append(
                {"corpus": "cc", "image_key": key, "caption_id": key, "caption": caption, "split": role}
            )
    return Parsed(images=images, captions=captions)
