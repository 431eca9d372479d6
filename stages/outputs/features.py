"""Output of the ``features`` stage (and of ``gt_features`` / ``entity_features``, regions pooled at
annotated boxes): a region store in UNITER's img_db layout and the box-count rule its readers apply.

::

    img_db/               the store (vlp/data/img_db.py): LMDB + one nbb sidecar per box-count rule written
    stats.json            the producer's stats, and ``store``: {"box_rule": [conf_th, max_bb, min_bb],
                          "compress": bool}, the rule every consumer reads the store with
    failures.parquet      (features) images not stored: key, corpus, reason, detail
    boxes_per_image.png   (features) histogram of the regions a reader gets per image
    boxes.json            (entity_features) {image key: [[x1, y1, x2, y2], ...]}: the annotated pixel box of
                          each stored region, in the store's row order
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from stages.base import StageError
from stages.outputs import StageOutput
from vlp.data.img_db import ImgDb, nbb_sidecar_name

BoxRule = tuple[float, int, int]


@dataclass(frozen=True)
class FeaturesOutput(StageOutput):
    REQUIRED: ClassVar[tuple[str, ...]] = ("img_db", "stats.json")

    @property
    def store_dir(self) -> Path:
        return self.root / "img_db"

    @property
    def stats_path(self) -> Path:
        return self.root / "stats.json"

    @property
    def failures_path(self) -> Path:
        return self.root / "failures.parquet"

    @property
    def histogram_path(self) -> Path:
        return self.root / "boxes_per_image.png"

    def write_stats(self, stats: dict[str, Any], box_rule: BoxRule, compress: bool) -> None:
        store = {"box_rule": list(box_rule), "compress": compress}
        self.stats_path.write_text(json.dumps({**stats, "store": store}, indent=1, sort_keys=True) + "\n")

    def _store(self) -> dict[str, Any]:
        try:
            store = json.loads(self.stats_path.read_text())["store"]
            return {"box_rule": tuple(store["box_rule"]), "compress": bool(store["compress"])}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StageError(f"{self.stats_path}: no readable field store.box_rule / store.compress "
                             f"({type(err).__name__}: {err})") from None

    def box_rule(self) -> BoxRule:
        """(conf_th, max_bb, min_bb): the box count the producer declared for every reader."""
        return self._store()["box_rule"]

    def img_db(self) -> ImgDb:
        """The store, read with the declared box-count rule (whose sidecar it must hold)."""
        store = self._store()
        sidecar = self.store_dir / nbb_sidecar_name(*store["box_rule"])
        if not sidecar.is_file():
            raise StageError(f"{self.stats_path}: box rule {store['box_rule']} has no sidecar {sidecar.name} "
                             f"in {self.store_dir}")
        try:
            return ImgDb(self.store_dir, *store["box_rule"], compress=store["compress"])
        except ValueError as err:
            raise StageError(f"{self.store_dir}: {' '.join(str(err).split())}") from None


@dataclass(frozen=True)
class EntityFeaturesOutput(FeaturesOutput):
    """The Flickr30k Entities boxes' store (``entity_features``) plus each region's annotated box."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("img_db", "stats.json", "boxes.json")

    @property
    def boxes_path(self) -> Path:
        return self.root / "boxes.json"

    def write_boxes(self, boxes: Mapping[str, Sequence[Sequence[float]]]) -> None:
        self.boxes_path.write_text(json.dumps(boxes, sort_keys=True) + "\n")

    def boxes(self) -> dict[str, list[list[float]]]:
        try:
            return json.loads(self.boxes_path.read_text())
        except (OSError, ValueError) as err:
            raise StageError(f"{self.boxes_path}: cannot read the regions' boxes ({err})") from None
