"""What every format parser returns, its one-line error, and the checked readers they share.

A parser reads the metadata files of one dataset (already downloaded, archive members extracted) and
returns the image URLs to fetch plus table rows (see ``vlp.data.tables``). It either returns
everything or raises ``FormatError``: a half-parsed dataset would silently shrink a corpus or,
worse, an evaluation blocklist.

Record numbers in errors are 0-based positions in the file's record list (or line index for
text/JSON Lines files), the same numbering the row-based image keys (``cc:train:3``, ``sbu:2``) use.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.base import StageError


class FormatError(StageError):
    """``<file>: record <n> (<id>): field '<f>': <problem>``; the record and field parts when known."""

    def __init__(
        self,
        file: str | Path,
        problem: str,
        *,
        record: int | None = None,
        record_id: str = "?",
        field: str | None = None,
    ):
        self.file, self.problem = str(file), problem
        self.record, self.record_id, self.field = record, record_id, field
        parts = [self.file]
        if record is not None:
            parts.append(f"record {record} ({record_id})")
        if field is not None:
            parts.append(f"field '{field}'")
        parts.append(problem)
        super().__init__(" ".join(": ".join(parts).splitlines()))


@dataclass
class ImageRef:
    """One image URL the download stage will fetch, with the identity fields dedup keys on."""

    corpus: str
    key: str
    url: str
    split: str
    coco_id: int | None = None
    vg_id: int | None = None
    flickr_id: int | None = None
    flickr_url: str | None = None


@dataclass
class Parsed:
    images: list[ImageRef] = field(default_factory=list)  # keys unique within the dataset
    captions: list[dict] = field(default_factory=list)  # tables.CAPTIONS rows
    regions: list[dict] = field(default_factory=list)  # tables.REGIONS rows
    objects: list[dict] = field(default_factory=list)  # tables.OBJECTS rows
    entities: list[dict] = field(default_factory=list)  # tables.ENTITIES rows
    splits: list[dict] = field(default_factory=list)  # tables.SPLITS rows
    tasks: dict[str, list[dict]] = field(default_factory=dict)  # task name -> tables.TASK_TABLES[name] rows
    # Records the format itself marks as unusable, left out on purpose: reason -> count (download summary).
    dropped: dict[str, int] = field(default_factory=dict)


_JSON_TYPE_NAMES = {
    type(None): "null",
    bool: "bool",
    int: "int",
    float: "float",
    str: "str",
    list: "list",
    dict: "dict",
}


def describe(value: Any) -> str:
    """``str 'abc'`` / ``null`` / ``list of 3``: enough to recognise a wrong value in a one-line error."""
    name = _JSON_TYPE_NAMES.get(type(value), type(value).__name__)
    if value is None:
        return name
    if isinstance(value, list | dict):
        return f"{name} of {len(value)}"
    text = repr(value)
    return f"{name} {text if len(text) <= 60 else text[:57] + '...'}"


class Record:
    """One record of a file plus where it sits, so that every field check can name file, record and field."""

    __slots__ = ("file", "index", "data", "label", "prefix")

    def __init__(self, file: str | Path, index: int, data: dict, label: str = "?", prefix: str = ""):
        self.file, self.index, self.data, self.label, self.prefix = str(file), index, data, label, prefix

    def error(self, name: str | None, problem: str) -> FormatError:
        where = None if name is None else self.prefix + name
        return FormatError(self.file, problem, record=self.index, record_id=self.label, field=where)

    def child(self, name: str, position: int, value: Any) -> Record:
        """A nested object (``regions[2]``) checked with the same file/record context."""
        if not isinstance(value, dict):
            raise self.error(f"{name}[{position}]", f"expected an object, got {describe(value)}")
        return Record(self.file, self.index, value, self.label, f"{self.prefix}{name}[{position}].")

    def pick(self, names: tuple[str, ...]) -> str:
        """The first of several accepted spellings of a field that is present."""
        for name in names:
            if name in self.data:
                return name
        others = ", ".join(f"'{n}'" for n in names[1:])
        raise self.error(names[0], f"missing (also looked for {others})")

    def _get(self, name: str, types: tuple[type, ...], expected: str, optional: bool, nullable: bool) -> Any:
        if name not in self.data:
            if optional:
                return None
            raise self.error(name, "missing")
        value = self.data[name]
        if value is None and nullable:
            return None
        # bool is an int subclass; a JSON true is never a valid id or coordinate.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise self.error(name, f"expected {expected}, got {describe(value)}")
        return value

    def get_str(self, name: str, *, optional: bool = False, nullable: bool = False) -> str | None:
        return self._get(name, (str,), "a string", optional, nullable)

    def get_bool(self, name: str, *, optional: bool = False) -> bool | None:
        return self._get(name, (bool,), "a boolean", optional, False)

    def get_dict(self, name: str, *, optional: bool = False, nullable: bool = False) -> dict | None:
        return self._get(name, (dict,), "an object", optional, nullable)

    def get_choice(self, name: str, choices: tuple[str, ...]) -> str:
        value = self.get_str(name)
        if value not in choices:
            raise self.error(name, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def get_int(self, name: str, *, optional: bool = False, nullable: bool = False) -> int | None:
        return self._get(name, (int,), "an integer", optional, nullable)

    def get_float(self, name: str) -> float:
        return float(self._get(name, (int, float), "a number", False, False))

    def get_list(self, name: str, *, optional: bool = False, nullable: bool = False) -> list | None:
        return self._get(name, (list,), "a list", optional, nullable)

    def get_str_list(self, name: str, *, optional: bool = False, nullable: bool = False) -> list[str] | None:
        values = self.get_list(name, optional=optional, nullable=nullable)
        for position, value in enumerate(values or ()):
            if not isinstance(value, str):
                raise self.error(f"{name}[{position}]", f"expected a string, got {describe(value)}")
        return values

    def get_int_list(self, name: str, *, optional: bool = False) -> list[int] | None:
        values = self.get_list(name, optional=optional)
        for position, value in enumerate(values or ()):
            if not isinstance(value, int) or isinstance(value, bool):
                raise self.error(f"{name}[{position}]", f"expected an integer, got {describe(value)}")
        return values

    def get_box(self, name: str) -> list[float]:
        """A 4-number box, e.g. COCO ``bbox`` [x, y, w, h]."""
        values = self.get_list(name)
        if len(values) != 4 or any(not isinstance(v, int | float) or isinstance(v, bool) for v in values):
            raise self.error(name, f"expected 4 numbers, got {json.dumps(values)[:80]}")
        return [float(v) for v in values]


def read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise FormatError(path, f"cannot read: {err.strerror or err}") from err


def load_json(path: Path) -> Any:
    try:
        return json.loads(read_bytes(path))
    except UnicodeDecodeError as err:
        raise FormatError(path, f"not UTF-8 text (byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise FormatError(path, f"invalid JSON: {err.msg} (line {err.lineno} column {err.colno})") from err


def json_object(path: Path, data: Any) -> dict:
    if not isinstance(data, dict):
        raise FormatError(path, f"expected an object at top level, got {describe(data)}")
    return data


def json_list(path: Path, data: Any, key: str | None = None) -> list:
    """The top-level list, or the list under ``key`` of a top-level object."""
    if key is None:
        if not isinstance(data, list):
            raise FormatError(path, f"expected a list at top level, got {describe(data)}")
        return data
    data = json_object(path, data)
    if key not in data:
        raise FormatError(path, "missing", field=key)
    if not isinstance(data[key], list):
        raise FormatError(path, f"expected a list, got {describe(data[key])}", field=key)
    return data[key]


def records(path: Path, items: list, start: int = 0) -> Iterator[Record]:
    for index, item in enumerate(items, start):
        if not isinstance(item, dict):
            raise FormatError(path, f"expected an object, got {describe(item)}", record=index)
        yield Record(path, index, item)


def split_lines(file: str | Path, data: bytes) -> list[str]:
    """Lines split on ``\\n`` only, ``\\r`` stripped: ``str.splitlines`` would also split captions on
    U+2028 / U+0085, which web captions contain, and shift every later row index (= image key)."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    out = []
    for index, raw in enumerate(lines):
        try:
            out.append(raw.removesuffix(b"\r").decode("utf-8"))
        except UnicodeDecodeError as err:
            raise FormatError(file, f"not UTF-8 text (byte {err.start} of the line)", record=index) from err
    return out


def read_lines(path: Path) -> list[str]:
    return split_lines(path, read_bytes(path))


def read_json_lines(path: Path) -> Iterator[Record]:
    """JSON Lines records numbered by line index; blank lines (a trailing newline) are skipped."""
    for index, line in enumerate(read_lines(path)):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise FormatError(path, f"invalid JSON: {err.msg} (column {err.colno})", record=index) from err
        if not isinstance(data, dict):
            raise FormatError(path, f"expected an object, got {describe(data)}", record=index)
        yield Record(path, index, data)


def dataset_label(name: str) -> str:
    return f"dataset '{name}'"


def check_roles(
    dataset: str,
    files: Mapping[str, Path],
    required: Iterable[str],
    optional: Iterable[str] | None = (),
) -> None:
    """Missing required roles and (unless ``optional`` is None: any role allowed) unknown roles."""
    required = list(required)
    missing = [role for role in required if role not in files]
    if missing:
        names = ", ".join(f"'{role}'" for role in missing)
        given = ", ".join(sorted(files)) or "none"
        raise FormatError(dataset_label(dataset), f"missing required file role {names} (given: {given})")
    if optional is None:
        return
    known = set(required) | set(optional)
    unknown = sorted(set(files) - known)
    if unknown:
        raise FormatError(
            dataset_label(dataset),
            f"unknown file role '{unknown[0]}' (known: {', '.join(sorted(known))})",
        )
