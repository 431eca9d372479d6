"""Write the parsed metadata of all datasets as ``tables/<name>.parquet`` (schemas in vlp/data/tables.py)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages.download.formats.base import Parsed
from vlp.data import tables

ROW_TABLES = {
    "captions": tables.CAPTIONS,
    "regions": tables.REGIONS,
    "objects": tables.OBJECTS,
    "entities": tables.ENTITIES,
    "splits": tables.SPLITS,
}


def _write(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_tables(tables_dir: Path, parsed: Iterable[Parsed]) -> dict[str, int]:
    """Every row table (empty ones too, so readers never special-case a missing file) and one
    ``task_<name>`` table per downstream task set present; returns rows per table."""
    parsed = list(parsed)
    tables_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, schema in ROW_TABLES.items():
        rows = [row for p in parsed for row in getattr(p, name)]
        _write(tables_dir / f"{name}.parquet", pa.Table.from_pylist(rows, schema=schema))
        counts[name] = len(rows)
    task_rows: dict[str, list[dict]] = {}
    for p in parsed:
        for task, rows in p.tasks.items():
            task_rows.setdefault(task, []).extend(rows)
    for task, rows in sorted(task_rows.items()):
        table = pa.Table.from_pylist(rows, schema=tables.TASK_TABLES[task])
        _write(tables_dir / f"task_{task}.parquet", table)
        counts[f"task_{task}"] = len(rows)
    return counts
