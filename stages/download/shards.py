"""Shards: the unit of parallelism and of resume.

A corpus's ImageRefs, sorted by key, are cut into fixed-size shards. Each shard writes
``images/<corpus>/shard-NNNNN.parquet`` and then ``stats/<corpus>/shard-NNNNN.json``, each through a
temporary file and ``os.replace``; the stats file is written last and is the shard's commit marker. It
records a digest of the shard's keys, so a rerun skips exactly the shards that finished with the same
images and redoes the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from stages.outputs.download import DownloadOutput
from vlp.data.tables import IMAGES

_TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class Shard:
    corpus: str
    index: int
    refs: tuple[Any, ...]  # ImageRefs, sorted by key

    @property
    def keys_digest(self) -> str:
        return hashlib.sha256("\n".join(ref.key for ref in self.refs).encode()).hexdigest()

    def images_path(self, out_dir: Path) -> Path:
        return DownloadOutput(out_dir).shard(self.corpus, self.index)

    def stats_path(self, out_dir: Path) -> Path:
        return DownloadOutput(out_dir).shard_stats(self.corpus, self.index)


def plan_shards(refs: list[Any], shard_size: int) -> list[Shard]:
    """Shards of every corpus in ``refs``: deterministic for the same refs, whatever their order."""
    by_corpus: dict[str, list[Any]] = {}
    for ref in refs:
        by_corpus.setdefault(ref.corpus, []).append(ref)
    shards = []
    for corpus in sorted(by_corpus):
        ordered = sorted(by_corpus[corpus], key=lambda ref: ref.key)
        for index, start in enumerate(range(0, len(ordered), shard_size)):
            shards.append(Shard(corpus, index, tuple(ordered[start : start + shard_size])))
    return shards


def read_stats(out_dir: Path, shard: Shard) -> dict[str, Any] | None:
    """The stats of a committed shard, or None when it has to be (re)done."""
    try:
        stats = json.loads(shard.stats_path(out_dir).read_text())
    except (OSError, ValueError):
        return None
    if stats.get("keys_sha256") != shard.keys_digest or not shard.images_path(out_dir).is_file():
        return None
    return stats


def discard_partial_files(out_dir: Path) -> int:
    """Remove temporary files a killed run left behind; returns how many."""
    removed = 0
    for sub in ("images", "stats"):
        for path in (out_dir / sub).glob(f"*/*{_TMP_SUFFIX}"):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=_TMP_SUFFIX)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def commit_shard(
    out_dir: Path, shard: Shard, rows: list[dict[str, Any]], stats: dict[str, Any]
) -> dict[str, Any]:
    """Write the shard's rows, then its stats (the commit marker); returns the stats as written."""
    table = pa.Table.from_pylist(rows, schema=IMAGES)
    _write_atomic(shard.images_path(out_dir), lambda tmp: pq.write_table(table, tmp))
    stats = {"corpus": shard.corpus, "shard": shard.index, "images": len(rows), **stats,
             "keys_sha256": shard.keys_digest}
    _write_atomic(shard.stats_path(out_dir), lambda tmp: tmp.write_text(json.dumps(stats, indent=1)))
    return stats
