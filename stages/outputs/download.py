"""The download stage's output (dedup writes the same layout, filtered, plus its reports: DedupOutput)::

    images/<corpus>/shard-<NNNNN>.parquet   IMAGES rows (vlp/data/tables.py), one per image URL attempted
    stats/<corpus>/shard-<NNNNN>.json       per-shard stats: {"ok": n, "failed": {error_type: n}, ...}
    stats/summary.json                      per-dataset totals, the shard count and the rows of each table
    tables/<name>.parquet                   captions, regions, objects, entities, splits (vlp/data/tables.py)
    tables/task_<task>.parquet              one table per downstream task set (vqa, nlvr2, snli_ve, refcoco)
    metadata/<dataset>/<file>               the raw metadata files as downloaded
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from stages.outputs import StageOutput


@dataclass(frozen=True)
class DownloadOutput(StageOutput):
    REQUIRED: ClassVar[tuple[str, ...]] = ("images", "tables", "stats/summary.json")

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def tables(self) -> Path:
        return self.root / "tables"

    @property
    def stats(self) -> Path:
        return self.root / "stats"

    @property
    def metadata(self) -> Path:
        return self.root / "metadata"

    @property
    def summary_file(self) -> Path:
        return self.stats / "summary.json"

    def table(self, name: str) -> Path:
        """``tables/<name>.parquet`` (``task_<task>`` for a downstream task set)."""
        return self.tables / f"{name}.parquet"

    def task_table(self, task: str) -> Path:
        return self.table(f"task_{task}")

    def shard(self, corpus: str, index: int) -> Path:
        return self.images / corpus / f"shard-{index:05d}.parquet"

    def shard_stats(self, corpus: str, index: int) -> Path:
        return self.stats / corpus / f"shard-{index:05d}.json"

    def corpora(self) -> list[str]:
        return sorted(p.name for p in self.images.iterdir() if p.is_dir()) if self.images.is_dir() else []

    def image_shards(self, corpus: str) -> list[Path]:
        return sorted((self.images / corpus).glob("shard-*.parquet"))

    def summary(self) -> dict[str, Any]:
        return json.loads(self.summary_file.read_text())

    def missing(self) -> list[str]:
        """The required paths, then every shard and table the summary counts."""
        lacking = super().missing()
        if lacking:
            return lacking
        try:
            summary = self.summary()
        except (OSError, ValueError):
            return [str(self.summary_file.relative_to(self.root))]
        for corpus, totals in sorted(summary.get("datasets", {}).items()):
            for index in range(int(totals.get("shards", 0))):
                for path in (self.shard(corpus, index), self.shard_stats(corpus, index)):
                    if not path.is_file():
                        lacking.append(str(path.relative_to(self.root)))
        lacking += [str(self.table(name).relative_to(self.root)) for name in sorted(summary.get("tables", {}))
                    if not self.table(name).is_file()]
        return lacking


@dataclass(frozen=True)
class DedupOutput(DownloadOutput):
    """A download layout holding only the images pretraining may see, plus what was removed and why."""

    REQUIRED: ClassVar[tuple[str, ...]] = (*DownloadOutput.REQUIRED, "removed.parquet", "report.json",
                                           "report.md")

    @property
    def removed_file(self) -> Path:
        return self.root / "removed.parquet"

    @property
    def report_file(self) -> Path:
        return self.root / "report.json"

    @property
    def report_markdown(self) -> Path:
        return self.root / "report.md"
