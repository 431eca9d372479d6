"""Reading a download output (stages/outputs/download.py), never holding more than one shard's images."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages.base import StageError
from stages.outputs.download import DownloadOutput

# IMAGES columns that identify an image; everything but the encoded bytes.
META_COLUMNS = ("corpus", "key", "url", "split", "status", "sha256", "coco_id", "flickr_id", "flickr_url")


def image_corpora(root: Path) -> list[str]:
    return DownloadOutput(root).corpora()


def image_shards(root: Path, corpus: str) -> list[Path]:
    return DownloadOutput(root).image_shards(corpus)


def open_parquet(path: Path, columns: tuple[str, ...]) -> pq.ParquetFile:
    """Open a Parquet file, failing with one line naming the file and the first missing column."""
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise StageError(f"{path}: not a readable Parquet file ({err})") from err
    names = set(parquet.schema_arrow.names)
    for column in columns:
        if column not in names:
            raise StageError(f"{path}: missing column {column!r}")
    return parquet


def read_meta_rows(path: Path) -> Iterator[dict]:
    """The identity columns of an IMAGES shard as dicts, one row group at a time."""
    parquet = open_parquet(path, META_COLUMNS)
    for group in range(parquet.num_row_groups):
        yield from parquet.read_row_group(group, columns=list(META_COLUMNS)).to_pylist()


def require_sha256(path: Path, row: dict) -> str:
    """Download computes the hash of every fetched image; an ok row without one is a corrupt table."""
    if not row["sha256"]:
        raise StageError(f"{path}: record {row['key']!r}: field 'sha256' is empty on an ok row")
    return row["sha256"]
