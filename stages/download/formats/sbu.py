"""SBU Captioned Photos: line-aligned ``urls``/``captions`` txt files, or ``sbu-captions-all.json``.

There is no id: line ``i`` of both files is image ``sbu:<i>``, so the two must have the same length.
The JSON form is one object of parallel lists (``image_urls``, ``captions``, ``user_ids``).
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
    describe,
    json_object,
    load_json,
    read_lines,
)

# SBU ships as one set without splits.
SPLIT = "train"


def _from_txt(urls_path: Path, captions_path: Path) -> tuple[list[str], list[str], Path]:
    urls, captions = read_lines(urls_path), read_lines(captions_path)
    if len(urls) != len(captions):
        raise FormatError(
            captions_path,
            f"has {len(captions)} lines but {urls_path.name} has {len(urls)} (the files are line-aligned)",
        )
    return urls, captions, urls_path


def _from_json(path: Path) -> tuple[list[str], list[str], Path]:
    data = json_object(path, load_json(path))
    lists = {}
    for name in ("image_urls", "captions", "user_ids"):
        if name not in data:
            if name == "user_ids":
                continue
            raise FormatError(path, "missing", field=name)
        values = data[name]
        if not isinstance(values, list):
            raise FormatError(path, f"expected a list, got {describe(values)}", field=name)
        for index, value in enumerate(values):
            if not isinstance(value, str):
                raise FormatError(
                    path,
                    f"expected a string, got {describe(value)}",
                    record=index,
                    record_id=f"sbu:{index}",
                    field=name,
                )
        lists[name] = values
    lengths = {name: len(values) for name, values in lists.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{name} {n}" for name, n in lengths.items())
        raise FormatError(path, f"the parallel lists differ in length ({shown})")
    return lists["image_urls"], lists["captions"], path


def parse_sbu(files: dict[str, Path], source: DatasetSource) -> Parsed:
    if "json" in files:
        check_roles("sbu", files, ["json"], [])
        urls, texts, url_file = _from_json(files["json"])
    elif "urls" in files or "captions" in files:
        check_roles("sbu", files, ["urls", "captions"], [])
        urls, texts, url_file = _from_txt(files["urls"], files["captions"])
    else:
        given = ", ".join(sorted(files)) or "none"
        raise FormatError(
            dataset_label("sbu"),
            f"missing required file roles 'urls' + 'captions' or 'json' (given: {given})",
        )
    images, captions = [], []
    for index, (url, caption) in enumerate(zip(urls, texts, strict=True)):
        key = f"sbu:{index}"
        url = url.strip()
        if not url:
            raise FormatError(url_file, "empty", record=index, record_id=key, field="url")
        images.append(ImageRef("sbu", key, url, SPLIT))
        captions.append(
            {"corpus": "sbu", "image_key": key, "caption_id": key, "caption": caption.strip(), "split": SPLIT}
        )
    return Parsed(images=images, captions=captions)
