"""RefCOCO (UNC): ``refs(unc).p`` (a pickled list of refs) + ``instances.json`` (their boxes).

Refs carry no box: ``ann_id`` is joined to ``instances.json`` ``annotations[].id``. The pickle comes
from the web, so it is loaded with an unpickler that builds plain data only and refuses every class
(a pickle can otherwise run arbitrary code) but ``collections.OrderedDict``: refs re-saved by tools that
keep key order (Python 2's or 3's ``OrderedDict``) hold their refs and sentences as ordered dicts, which
are plain data too. A ``.json`` rendering of the same list is read too.
"""

from __future__ import annotations

import io
import pickle
import re
from collections import OrderedDict
from pathlib import Path

from stages.download.config import DatasetSource
from stages.download.formats.base import (
    FormatError,
    Parsed,
    check_roles,
    json_list,
    load_json,
    read_bytes,
    records,
)

SPLITS = ("train", "val", "test", "testA", "testB", "testC")
# `COCO_train2014_000000581857_16.jpg` names no file: the `_16` is the annotation's position.
_FILE_SUFFIX = re.compile(r"_\d+(?=\.\w+$)")


# The only class a refs pickle may name: building it runs no code of the pickle's choosing.
_ALLOWED_CLASSES = {("collections", "OrderedDict"): OrderedDict}


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = _ALLOWED_CLASSES.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data and "
                                         "collections.OrderedDict are allowed")
        return allowed


def _utf8_strings(value, memo: dict[int, object] | None = None):
    """Python 2 byte strings read as latin-1 are their exact bytes; most were typed as UTF-8.

    A pickle may reference one list or dict many times (nested, a few bytes per reference): each object
    is converted once and shared again (``memo``), so the work stays linear in the pickle's size instead
    of growing with the number of paths through the shared objects.
    """
    if isinstance(value, str):
        try:
            return value.encode("latin1").decode("utf-8")
        except UnicodeError:
            return value
    if not isinstance(value, list | dict):
        return value
    memo = {} if memo is None else memo
    if id(value) in memo:
        return memo[id(value)]
    if isinstance(value, list):
        out: list | dict = []
        memo[id(value)] = out
        out.extend(_utf8_strings(item, memo) for item in value)
    else:
        out = {}
        memo[id(value)] = out
        out.update((_utf8_strings(k, memo), _utf8_strings(v, memo)) for k, v in value.items())
    return out


def _load_refs(path: Path) -> list:
    if path.suffix == ".json":
        return json_list(path, load_json(path))
    data = read_bytes(path)
    try:
        try:
            refs = _PlainUnpickler(io.BytesIO(data)).load()
        except UnicodeDecodeError:
            # The real file is a Python 2 cPickle whose byte strings are not all ASCII.
            refs = _utf8_strings(_PlainUnpickler(io.BytesIO(data), encoding="latin1").load())
    except EOFError as err:
        raise FormatError(path, "invalid pickle: truncated") from err
    except Exception as err:  # a damaged pickle fails with many exception types; all mean the same
        raise FormatError(path, f"invalid pickle: {err}") from err
    return json_list(path, refs)


def _boxes(path: Path) -> dict[int, tuple[int, list[float]]]:
    """annotation id -> (image id, bbox)."""
    out = {}
    for rec in records(path, json_list(path, load_json(path), "annotations")):
        ann_id = rec.get_int("id")
        rec.label = f"annotation {ann_id}"
        out[ann_id] = (rec.get_int("image_id"), rec.get_box("bbox"))
    return out


def parse_refcoco(files: dict[str, Path], source: DatasetSource) -> Parsed:
    check_roles("refcoco", files, ["refs", "instances"])
    boxes = _boxes(files["instances"])
    path = files["refs"]
    rows = []
    for rec in records(path, _load_refs(path)):
        ref_id = rec.get_int("ref_id")
        rec.label = f"ref {ref_id}"
        ann_id, image_id = rec.get_int("ann_id"), rec.get_int("image_id")
        if ann_id not in boxes:
            raise rec.error("ann_id", f"annotation {ann_id} is not in {files['instances'].name}")
        if boxes[ann_id][0] != image_id:
            raise rec.error(
                "image_id", f"is image {image_id} but annotation {ann_id} is on image {boxes[ann_id][0]}"
            )
        split = rec.get_choice("split", SPLITS)
        sentences = [
            rec.child("sentences", i, item).get_str("raw").strip()
            for i, item in enumerate(rec.get_list("sentences"))
        ]
        file_name = rec.get_str("file_name", optional=True)
        rows.append(
            {
                "ref_id": ref_id,
                "ann_id": ann_id,
                "image_key": f"coco:{image_id}",
                "split": split,
                "sentences": sentences,
                "bbox": boxes[ann_id][1],
                "category_id": rec.get_int("category_id"),
                "file_name": None if file_name is None else _FILE_SUFFIX.sub("", file_name),
            }
        )
    return Parsed(tasks={"refcoco": rows})
