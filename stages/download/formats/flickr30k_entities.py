"""Flickr30k Entities ``annotations.zip``: ``Sentences/<id>.txt`` phrases + ``Annotations/<id>.xml`` boxes.

Sentence markup is ``[/EN#<chain>/<type>[/<type>...] word word]``; the boxes of a phrase are those of
its coreference chain. Chain 0 means "not visual" and links nothing, so each such phrase gets its own
id ``0#<n>``. XML boxes are 1-based pixels (the official parser subtracts 1), and one ``<object>``
with several ``<name>`` elements is a box of every one of those chains. The archive may carry a
leading folder; an extracted directory works too.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable
from pathlib import Path

from stages.download.formats.base import FormatError, read_bytes, split_lines

# Digit stems only: skips macOS `__MACOSX/._123.txt` shadow files.
_MEMBER = re.compile(r"(?:^|/)(Sentences/\d+\.txt|Annotations/\d+\.xml)$")
_MARKER = re.compile(r"\[/EN#(\d+)((?:/[^/\s\]]+)+)$")
_CORNERS = ("xmin", "ymin", "xmax", "ymax")


def _members(path: Path) -> dict[str, tuple[str, bytes]]:
    """``Sentences/<id>.txt`` / ``Annotations/<id>.xml`` -> (name shown in errors, content)."""
    found: dict[str, tuple[str, bytes]] = {}

    def add(relative: str, shown: str, read: Callable[[], bytes]) -> None:
        match = _MEMBER.search(relative)
        if match is None:
            return
        if match[1] in found:
            raise FormatError(path, f"{match[1]} is there twice ({found[match[1]][0]} and {shown})")
        found[match[1]] = (shown, read())

    if path.is_dir():
        for file in sorted(path.rglob("*")):
            if file.is_file():
                add(file.relative_to(path).as_posix(), str(file), lambda file=file: read_bytes(file))
        return found
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                add(name, f"{path}#{name}", lambda name=name: archive.read(name))
    except (OSError, zipfile.BadZipFile) as err:
        raise FormatError(path, f"not a zip archive or directory ({err})") from err
    return found


def _chain_boxes(shown: str, data: bytes) -> dict[str, list[list[float]]]:
    try:
        root = ET.fromstring(data)
    except ET.ParseError as err:
        raise FormatError(shown, f"invalid XML: {err}") from err
    boxes: dict[str, list[list[float]]] = {}
    for index, obj in enumerate(root.iter("object")):
        names = [(name.text or "").strip() for name in obj.findall("name")]
        label = f"object {'/'.join(names) or '?'}"
        if not names or not all(name.isdigit() for name in names):
            raise FormatError(
                shown, f"expected chain ids, got {names}", record=index, record_id=label, field="name"
            )
        bndbox = obj.find("bndbox")
        if bndbox is None:  # a scene / nobndbox object: the chain has no box
            continue
        box = []
        for corner in _CORNERS:
            text = (bndbox.findtext(corner) or "").strip()
            try:
                box.append(float(text) - 1)
            except ValueError:
                raise FormatError(
                    shown,
                    f"expected a pixel coordinate, got {text!r}",
                    record=index,
                    record_id=label,
                    field=f"bndbox.{corner}",
                ) from None
        for name in dict.fromkeys(names):
            boxes.setdefault(name, []).append(box)
    return boxes


def _phrases(shown: str, index: int, line: str) -> tuple[list[str], list[dict]]:
    """Plain words of one sentence and its phrases (chain, types, first word index, words)."""
    words: list[str] = []
    phrases: list[dict] = []
    current: dict | None = None
    for token in line.split():
        if current is None and token.startswith("[/EN#"):
            match = _MARKER.fullmatch(token)
            if match is None:
                raise FormatError(
                    shown,
                    f"bad phrase marker {token!r} (expected [/EN#<chain>/<type>... words])",
                    record=index,
                    record_id=f"sentence {index}",
                    field="phrase",
                )
            current = {"chain": match[1], "types": match[2][1:].split("/"), "first": len(words), "words": []}
            continue
        if current is None:
            words.append(token)
            continue
        closes = token.endswith("]")
        word = token[:-1] if closes else token
        current["words"].append(word)
        words.append(word)
        if closes:
            phrases.append(current)
            current = None
    if current is not None:
        raise FormatError(
            shown,
            f"phrase [/EN#{current['chain']} starting at word {current['first']} is not closed",
            record=index,
            record_id=f"sentence {index}",
            field="phrase",
        )
    return words, phrases


def read_entities(path: Path) -> list[dict]:
    """tables.ENTITIES rows, one per phrase, images in id order."""
    members = _members(path)
    ids = {name.split("/")[1].split(".")[0] for name in members}
    if not ids:
        raise FormatError(path, "no Sentences/<id>.txt or Annotations/<id>.xml files in it")
    rows = []
    for photo_id in sorted(ids, key=int):
        sentences, annotations = f"Sentences/{photo_id}.txt", f"Annotations/{photo_id}.xml"
        for have, lack in ((sentences, annotations), (annotations, sentences)):
            if lack not in members:
                raise FormatError(members[have][0], f"has no matching {lack} in {path}")
        boxes = _chain_boxes(*members[annotations])
        shown, data = members[sentences]
        not_visual = 0
        for index, line in enumerate(split_lines(shown, data)):
            if not line.strip():
                continue
            words, phrases = _phrases(shown, index, line)
            for phrase in phrases:
                chain = phrase_id = phrase["chain"]
                if chain == "0":
                    phrase_id, not_visual = f"0#{not_visual}", not_visual + 1
                rows.append(
                    {
                        "image_key": f"flickr30k:{photo_id}",
                        "sentence_idx": index,
                        "sentence": " ".join(words),
                        "phrase": " ".join(phrase["words"]),
                        "phrase_id": phrase_id,
                        "phrase_types": phrase["types"],
                        "first_word_index": phrase["first"],
                        "boxes": [] if chain == "0" else [list(box) for box in boxes.get(chain, ())],
                    }
                )
    return rows
