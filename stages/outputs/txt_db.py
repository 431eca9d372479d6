"""Output of the text-db stages (``txtdb``, ``karpathy_txtdb``): UNITER txt_db LMDBs looked up by name.

::

    <name>.db/     one txt_db (vlp/data/txt_db.py) per corpus split; its meta.json holds the tokenizer's ids
                   and ``max_txt_len``, the word pieces every text was cut to
    tokenizer/     (txtdb) the tokenizer every db was written with; karpathy_txtdb writes with txtdb's
    stats.json     per db: examples, images, tokens, lengths; txtdb also ``tokenizer``: name, vocab size,
                   lowercasing, max_txt_len
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from stages.base import StageError
from stages.outputs import StageOutput

DB_SUFFIX = ".db"


@dataclass(frozen=True)
class TxtDbOutput(StageOutput):
    REQUIRED: ClassVar[tuple[str, ...]] = ("stats.json",)

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def stats_path(self) -> Path:
        return self.root / "stats.json"

    def db_path(self, name: str) -> Path:
        return self.root / f"{name}{DB_SUFFIX}"

    def db_names(self) -> list[str]:
        return sorted(p.name[: -len(DB_SUFFIX)] for p in self.root.glob(f"*{DB_SUFFIX}") if p.is_dir())

    def write_stats(self, stats: dict[str, Any]) -> None:
        self.stats_path.write_text(json.dumps(stats, indent=2))

    def tokenizer_stats(self) -> dict[str, Any]:
        """txtdb's ``tokenizer`` stats: name, vocab_size, do_lower_case, max_txt_len."""
        try:
            return json.loads(self.stats_path.read_text())["tokenizer"]
        except (OSError, ValueError, KeyError) as err:
            raise StageError(f"{self.stats_path}: no readable field tokenizer ({type(err).__name__}: "
                             f"{err})") from None


def find_dbs(outputs: Sequence[TxtDbOutput], names: Sequence[str], what: str) -> list[Path]:
    """The paths of the dbs ``names``, each from the first output that has it; ``what`` names the reader
    in the error a missing db stops with."""
    paths = []
    for name in names:
        path = next((out.db_path(name) for out in outputs if out.db_path(name).is_dir()), None)
        if path is None:
            known = sorted(n for out in outputs for n in out.db_names())
            raise StageError(f"{what}: no text db {name!r} (dbs: {', '.join(known)})")
        paths.append(path)
    return paths


def max_txt_len(db_meta: dict[str, Any], db: Path) -> int:
    """The word pieces the producer cut every text of a db to (its meta.json ``max_txt_len``)."""
    value = db_meta.get("max_txt_len")
    if not isinstance(value, int) or value < 1:
        raise StageError(f"{db / 'meta.json'}: field max_txt_len is {value!r}, not the positive int the text "
                         "db stages write")
    return value
