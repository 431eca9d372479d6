"""The blocklist: identity keys of every evaluation image that pretraining must not see.

Built from a download output (layout in stages/outputs/download.py):
- COCO ids: Karpathy val/test (SPLITS scheme "karpathy") and RefCOCO val/testA/testB images;
- Flickr ids: Flickr30k Entities id lists and the photo ids in the URLs of the blocked COCO images;
- URLs: normalized URLs of the blocked COCO, Flickr30k and NLVR2 images (failed downloads included,
  since the URL alone identifies them);
- hashes: sha256 of the blocked images that were downloaded;
- VG ids: the Visual Genome images of GQA's evaluation splits (tables/task_gqa.parquet), whose COCO ids,
  Flickr ids, URLs and hashes are blocked too; GQA's own (testdev) images by URL and hash. Without GQA: none.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from stages.base import StageError
from stages.dedup.config import DedupConfig
from stages.dedup.keys import image_keys, key_id
from stages.dedup.shards import image_shards, open_parquet, read_meta_rows, require_sha256
from stages.outputs.download import DownloadOutput


@dataclass(frozen=True)
class Blocklist:
    coco_ids: frozenset[int]
    flickr_ids: frozenset[int]
    urls: frozenset[str]
    hashes: frozenset[str]
    vg_ids: frozenset[int] = frozenset()

    def entries(self, reason: str) -> frozenset:
        return {"vg_id": self.vg_ids, "coco_id": self.coco_ids, "flickr_id": self.flickr_ids,
                "url": self.urls, "content_hash": self.hashes}[reason]

    def first_match(self, keys: dict[str, set], reasons: Iterable[str]) -> tuple[str, str] | None:
        """(reason, blocklist entry hit) for the first reason in ``reasons`` whose keys are blocked."""
        for reason in reasons:
            hits = keys[reason] & self.entries(reason)
            if hits:
                return reason, str(min(hits))  # min: deterministic when several keys of one kind hit
        return None

    def counts(self) -> dict[str, int]:
        """Entries by kind (VG ids only when GQA blocks any)."""
        counts = {"coco_ids": len(self.coco_ids), "flickr_ids": len(self.flickr_ids), "urls": len(self.urls),
                  "hashes": len(self.hashes)}
        return counts | ({"vg_ids": len(self.vg_ids)} if self.vg_ids else {})


def _key_ids(path: Path, keys: Iterable[str]) -> set[int]:
    ids = set()
    for key in keys:
        try:
            ids.add(key_id(key))
        except ValueError as err:
            raise StageError(f"{path}: record {key!r}: field 'image_key': {err}") from err
    return ids


def _split_ids(root: Path, corpus: str, scheme: str, splits: list[str]) -> set[int]:
    path = DownloadOutput(root).table("splits")
    if not splits or not path.exists():
        return set()
    columns = ["corpus", "scheme", "split", "image_key"]
    table = open_parquet(path, tuple(columns)).read(columns=columns).to_pylist()
    return _key_ids(path, (r["image_key"] for r in table
                           if r["corpus"] == corpus and r["scheme"] == scheme and r["split"] in splits))


def _refcoco_ids(root: Path, splits: list[str]) -> set[int]:
    path = DownloadOutput(root).task_table("refcoco")
    if not splits or not path.exists():
        return set()
    table = open_parquet(path, ("image_key", "split")).read(columns=["image_key", "split"]).to_pylist()
    return _key_ids(path, (r["image_key"] for r in table if r["split"] in splits))


def _gqa_images(root: Path, splits: list[str]) -> set[str] | None:
    """Image keys of GQA's questions of ``splits`` (``vg:<id>``, ``gqa:n<id>``); None without a GQA table."""
    path = DownloadOutput(root).task_table("gqa")
    if not path.exists():
        return None
    if not splits:
        return set()
    table = open_parquet(path, ("image_key", "split")).read(columns=["image_key", "split"]).to_pylist()
    return {r["image_key"] for r in table if r["split"] in splits}


def _rows_keys(path: Path) -> Iterable[tuple[dict, dict[str, set]]]:
    for row in read_meta_rows(path):
        try:
            yield row, image_keys(row)
        except ValueError as err:
            raise StageError(f"{path}: record {row['key']!r}: field 'key': {err}") from err


def build_blocklist(root: Path, cfg: DedupConfig, log: logging.Logger) -> Blocklist:
    karpathy = _split_ids(root, "coco", "karpathy", cfg.coco_karpathy_splits)
    refcoco = _refcoco_ids(root, cfg.refcoco_splits)
    entities = _split_ids(root, "flickr30k", "entities", cfg.flickr30k_entities_splits)
    coco_ids = karpathy | refcoco
    flickr_ids = set(entities)
    urls: set[str] = set()
    hashes: set[str] = set()
    nlvr2_blocked = 0

    def block_image(path: Path, row: dict, keys: dict[str, set]) -> None:
        urls.update(keys["url"])
        if row["status"] == "ok":
            hashes.add(require_sha256(path, row).lower())

    # GQA first: a GQA evaluation image that is also a COCO image blocks that COCO image (and its photo).
    gqa = _gqa_images(root, cfg.gqa_splits)
    vg_ids = _key_ids(DownloadOutput(root).task_table("gqa"),
                      (k for k in gqa or () if k.startswith("vg:")))
    if vg_ids:
        for path in image_shards(root, "vg"):
            for row, keys in _rows_keys(path):
                if keys["vg_id"] & vg_ids:
                    coco_ids.update(keys["coco_id"])
                    flickr_ids.update(keys["flickr_id"])
                    block_image(path, row, keys)
    for path in image_shards(root, "gqa") if gqa else ():
        for row, keys in _rows_keys(path):
            if row["key"] in gqa:
                block_image(path, row, keys)

    for path in image_shards(root, "coco"):
        for row, keys in _rows_keys(path):
            if keys["coco_id"] & coco_ids:
                flickr_ids.update(keys["flickr_id"])
                block_image(path, row, keys)
    for path in image_shards(root, "flickr30k"):
        for row, keys in _rows_keys(path):
            if keys["flickr_id"] & entities:
                block_image(path, row, keys)
    for path in image_shards(root, "nlvr2"):
        for row, keys in _rows_keys(path):
            if row["split"] in cfg.nlvr2_splits:
                nlvr2_blocked += 1
                block_image(path, row, keys)

    # An empty source usually means the dataset was left out of the download: say so, do not fail.
    for name, splits, found in (("COCO Karpathy", cfg.coco_karpathy_splits, len(karpathy)),
                                ("RefCOCO", cfg.refcoco_splits, len(refcoco)),
                                ("Flickr30k Entities", cfg.flickr30k_entities_splits, len(entities)),
                                ("NLVR2", cfg.nlvr2_splits, nlvr2_blocked)):
        if splits and not found:
            log.warning("dedup: no %s images found for blocked splits %s in %s", name, splits, root)
    if gqa is not None and cfg.gqa_splits and not gqa:  # GQA is opt-in: silent when it was not downloaded
        log.warning("dedup: no GQA images found for blocked splits %s in %s", cfg.gqa_splits, root)
    return Blocklist(frozenset(coco_ids), frozenset(flickr_ids), frozenset(urls), frozenset(hashes),
                     frozenset(vg_ids))
