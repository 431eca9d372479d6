"""GQA 1.2: ``questions_<split>`` (``<split>_balanced_questions.json``) and optional ``scene_graphs_<split>``
(``<split>_sceneGraphs.json``) files.

Both are one JSON object keyed by id: question ids are strings with leading zeros (``"00126851"``: never
parsed as numbers), scene graphs are keyed by image id. ``imageId`` is a string: a Visual Genome id
(``"2354786"``, whose image the VG download fetches: key ``vg:2354786``) or, for testdev, ``"n<digits>"``
(``"n161313"``), an image only GQA ships (key ``gqa:n161313``, fetched from ``image_base_url`` +
``<imageId>.jpg``: point it at where the extracted ``images.zip`` is served). ``annotations`` map a
whitespace-token index (``"2"``) or span (``"4:6"``, end exclusive) of the question, answer or full answer to
a scene-graph object id; spans are checked against the text. Splits without answers (test, challenge) give
rows with null answers. Records are numbered by their position in the file's object.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from stages.download.config import DatasetSource
from stages.download.formats.base import (
    FormatError,
    ImageRef,
    Parsed,
    Record,
    dataset_label,
    describe,
    json_object,
    load_json,
)

_ROLE = re.compile(r"(questions|scene_graphs)_([\w-]+)")
_VG_ID = re.compile(r"[0-9]+")
_OWN_ID = re.compile(r"n[0-9]+")
_SPAN = re.compile(r"([0-9]+)(?::([0-9]+))?")
POINTER_FIELDS = (("question", "question"), ("answer", "answer"), ("fullAnswer", "fullAnswer"))
STRUCTURAL = ("verify", "query", "choose", "logical", "compare")


def image_key(image_id: str) -> str:
    """``vg:<id>`` for a Visual Genome image id, ``gqa:<id>`` for one of GQA's own (``n161313``)."""
    return f"vg:{int(image_id)}" if _VG_ID.fullmatch(image_id) else f"gqa:{image_id}"


def parse_span(key: str) -> tuple[int, int] | None:
    """``"4"`` -> (4, 5), ``"4:6"`` -> (4, 6); None when the key is neither or the span is empty."""
    match = _SPAN.fullmatch(key)
    if match is None:
        return None
    start = int(match[1])
    end = int(match[2]) if match[2] is not None else start + 1
    return (start, end) if end > start else None


def _roles(files: dict[str, Path]) -> tuple[dict[str, Path], dict[str, Path]]:
    questions, graphs = {}, {}
    for role, path in files.items():
        match = _ROLE.fullmatch(role)
        if match is None:
            raise FormatError(dataset_label("gqa"),
                              f"unknown file role '{role}' (known: questions_<split>, scene_graphs_<split>)")
        (questions if match[1] == "questions" else graphs)[match[2]] = path
    if not questions:
        raise FormatError(dataset_label("gqa"), "missing required file role 'questions_<split>' (given: "
                          f"{', '.join(sorted(files)) or 'none'})")
    return questions, graphs


def _keyed_records(path: Path) -> list[tuple[str, Record]]:
    """(id, record) of a file that is one object keyed by id, numbered by position."""
    out = []
    for index, (key, value) in enumerate(json_object(path, load_json(path)).items()):
        if not isinstance(value, dict):
            raise FormatError(path, f"expected an object, got {describe(value)}", record=index,
                              record_id=key)
        out.append((key, Record(path, index, value)))
    return out


def _child(rec: Record, name: str) -> Record:
    """Field ``name`` (an object) as a record with the same file/record context, fields named ``name.x``."""
    return Record(rec.file, rec.index, rec.get_dict(name), rec.label, f"{rec.prefix}{name}.")


def _image_id(rec: Record) -> str:
    image_id = rec.get_str("imageId")
    if not (_VG_ID.fullmatch(image_id) or _OWN_ID.fullmatch(image_id)):
        raise rec.error("imageId", f"expected a Visual Genome id or 'n<digits>', got {image_id!r}")
    return image_id


def _str_list(rec: Record, name: str) -> list[str]:
    return rec.get_str_list(name, optional=True) or []


def _pointers(rec: Record, texts: dict[str, str | None]) -> list[dict]:
    if "annotations" not in rec.data:
        return []
    annotations = _child(rec, "annotations")
    rows = []
    for field, text_field in POINTER_FIELDS:
        if field not in annotations.data:
            continue
        mapping = _child(annotations, field)
        text = texts[text_field]
        n_words = len(text.split()) if text is not None else None
        for key, object_id in mapping.data.items():
            where = f"{field}.{key}"
            span = parse_span(key)
            if span is None:
                raise annotations.error(where, f"expected a word index '4' or span '4:6', got key {key!r}")
            if n_words is not None and span[1] > n_words:
                raise annotations.error(where, f"points past the {n_words} words of {text_field} {text!r}")
            if not isinstance(object_id, str):
                raise annotations.error(where, f"expected an object id string, got {describe(object_id)}")
            rows.append({"field": field, "start": span[0], "end": span[1], "object_id": object_id})
    return rows


def _question_row(qid: str, rec: Record, split: str) -> dict:
    rec.label = f"question {qid}"
    question = rec.get_str("question")
    answer = rec.get_str("answer", optional=True)
    full_answer = rec.get_str("fullAnswer", optional=True)
    image_id = _image_id(rec)
    types = _child(rec, "types") if "types" in rec.data else None
    groups = _child(rec, "groups") if "groups" in rec.data else None
    structural = types.get_str("structural", optional=True, nullable=True) if types else None
    if structural is not None and structural not in STRUCTURAL:
        raise types.error("structural", f"expected one of {', '.join(STRUCTURAL)}, got {structural!r}")
    semantic = rec.get_list("semantic", optional=True) or []
    for position, item in enumerate(semantic):
        step = rec.child("semantic", position, item)
        step.get_str("operation")
        step.get_str("argument")
        step.get_int_list("dependencies")
    return {
        "question_id": qid,
        "image_id": image_id,
        "image_key": image_key(image_id),
        "split": split,
        "question": question,
        "answer": answer,
        "full_answer": full_answer,
        "is_balanced": bool(rec.get_bool("isBalanced", optional=True)),
        "structural": structural,
        "semantic_type": types.get_str("semantic", optional=True, nullable=True) if types else None,
        "detailed": types.get_str("detailed", optional=True, nullable=True) if types else None,
        "global_group": groups.get_str("global", optional=True, nullable=True) if groups else None,
        "local_group": groups.get_str("local", optional=True, nullable=True) if groups else None,
        "entailed": _str_list(rec, "entailed"),
        "equivalent": _str_list(rec, "equivalent"),
        "semantic": json.dumps(semantic, separators=(",", ":")),
        "pointers": _pointers(rec, {"question": question, "answer": answer, "fullAnswer": full_answer}),
    }


def _scene_rows(path: Path, split: str) -> list[dict]:
    rows = []
    for image_id, rec in _keyed_records(path):
        rec.label = f"image {image_id}"
        if not (_VG_ID.fullmatch(image_id) or _OWN_ID.fullmatch(image_id)):
            raise rec.error(None, f"key {image_id!r} is not a Visual Genome id or 'n<digits>'")
        width, height = rec.get_int("width"), rec.get_int("height")
        objects = _child(rec, "objects")
        for object_id, value in objects.data.items():
            if not isinstance(value, dict):
                raise objects.error(object_id, f"expected an object, got {describe(value)}")
            obj = Record(rec.file, rec.index, value, rec.label, f"objects.{object_id}.")
            relations = []
            for position, item in enumerate(obj.get_list("relations", optional=True) or []):
                relation = obj.child("relations", position, item)
                target = relation.get_str("object")
                if target not in objects.data:
                    raise relation.error("object", f"{target!r} is no object of image {image_id}")
                relations.append({"name": relation.get_str("name"), "object": target})
            rows.append({
                "image_id": image_id, "image_key": image_key(image_id), "split": split, "width": width,
                "height": height, "object_id": object_id, "name": obj.get_str("name"),
                "attributes": obj.get_str_list("attributes", optional=True) or [], "relations": relations,
                "x": obj.get_float("x"), "y": obj.get_float("y"), "w": obj.get_float("w"),
                "h": obj.get_float("h"),
            })
    return rows


def parse_gqa(files: dict[str, Path], source: DatasetSource) -> Parsed:
    questions, graphs = _roles(files)
    rows, own_images, seen = [], {}, {}
    for split, path in sorted(questions.items()):
        for qid, rec in _keyed_records(path):
            row = _question_row(qid, rec, split)
            if qid in seen:
                raise rec.error(None, f"question id {qid!r} is also in {seen[qid].name}")
            seen[qid] = path
            rows.append(row)
            if row["image_key"].startswith("gqa:") and row["image_key"] not in own_images:
                if not source.image_base_url:
                    raise rec.error("imageId", f"{row['image_id']!r} is GQA's own image (not a Visual Genome "
                                    "one): download.datasets.gqa.image_base_url is required to fetch it")
                url = f"{source.image_base_url}{row['image_id']}.jpg"
                own_images[row["image_key"]] = ImageRef("gqa", row["image_key"], url, split)
    objects = [row for split, path in sorted(graphs.items()) for row in _scene_rows(path, split)]
    return Parsed(images=list(own_images.values()), tasks={"gqa": rows, "gqa_objects": objects})
