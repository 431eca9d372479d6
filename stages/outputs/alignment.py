"""Output of the ``alignment`` stage: object-word alignment annotations of pretraining images.

::

    alignment.db/          a text db (vlp.data.txt_db) of the annotated sentences: input_ids, img_fname, raw,
                           dataset (the source), align_spans [[piece start, piece end, pointer]] and
                           align_targets [[A* over the image's regions]] (vlp.data.alignment)
    annotations.parquet    one row per sentence: txt_id, image_key, source, text, pointers (word spans, pixel
                           boxes)
    stats.json             sentences and pointers per source, images, what was left out and why, the
                           similarity used, the box rule the targets were computed with
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from stages.base import StageError
from stages.outputs import StageOutput


@dataclass(frozen=True)
class AlignmentOutput(StageOutput):
    REQUIRED: ClassVar[tuple[str, ...]] = ("alignment.db", "annotations.parquet", "stats.json")

    @property
    def db_path(self) -> Path:
        return self.root / "alignment.db"

    @property
    def annotations_path(self) -> Path:
        return self.root / "annotations.parquet"

    @property
    def stats_path(self) -> Path:
        return self.root / "stats.json"

    def write_stats(self, stats: dict[str, Any]) -> None:
        self.stats_path.write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n")

    def stats(self) -> dict[str, Any]:
        try:
            return json.loads(self.stats_path.read_text())
        except (OSError, ValueError) as err:
            raise StageError(f"{self.stats_path}: cannot read the alignment stats ({err})") from None
