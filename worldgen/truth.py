"""Ground truth for download and dedup, computed from what the world published.

Blocklists are rebuilt from the published metadata (Karpathy splits, RefCOCO refs, Entities lists,
NLVR2 files) with the default dedup rule, and every pretraining image that downloads is checked in the
precedence order coco_id > flickr_id > url > content_hash. The planted overlaps must come out with the
reason they were planted for; anything else is a generator bug and stops the build.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from collections import Counter
from urllib.parse import urlsplit

from worldgen.identities import ENTITIES_SPLITS
from worldgen.publish_nlvr2 import EVAL_SPLITS
from worldgen.records import World, WorldImage

PRETRAIN = ("coco", "vg", "cc", "sbu")
IMAGE_DATASETS = ("coco", "vg", "cc", "sbu", "flickr30k", "nlvr2")
# GQA's evaluation splits (the default dedup.gqa_splits); "gqa" (testdev) images exist only with GQA.
GQA_BLOCKED_SPLITS = ("val", "testdev")
# Mirror fault -> the download error type it must produce; flaky_500 succeeds on retry instead.
FAULT_ERRORS = {
    "not_found": "http_404",
    "slow": "timeout",
    "truncated": "truncated",
    "not_image": "not_image",
    "bomb": "decompression_bomb",
    "huge": "too_large",
    "redirect_loop": "redirect_loop",
}
PLANTED_REASON = {
    "coco_flickr": "flickr_id",
    "vg_coco": "coco_id",
    "vg_flickr": "flickr_id",
    "sbu_flickr": "flickr_id",
    "cc_content_hash": "content_hash",
    "cc_url": "url",
}
_FLICKR_FILE = re.compile(r"^(\d+)_[0-9a-f]+(?:_[a-z0-9]+)?\.(?:jpe?g|png|gif)$")
_DEFAULT_PORTS = {80, 443}


def normalize_url(url: str) -> str:
    """Equal for URLs that differ only in http/https, host case, a default port or the fragment."""
    parts = urlsplit(url.strip())
    port = f":{parts.port}" if parts.port and parts.port not in _DEFAULT_PORTS else ""
    query = f"?{parts.query}" if parts.query else ""
    return f"//{(parts.hostname or '').lower()}{port}{parts.path or '/'}{query}"


def flickr_photo_id(url: str | None) -> int | None:
    """The photo id in a Flickr static URL (any host spelling, any size suffix), else None."""
    if not url:
        return None
    parts = urlsplit(url)
    if not (parts.hostname or "").endswith("flickr.com"):
        return None
    match = _FLICKR_FILE.match(parts.path.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def compute_truth(world: World) -> dict:
    images = world.images
    meta = world.metadata
    datasets = IMAGE_DATASETS + (("gqa",) if "gqa" in images else ())
    blocked_vg, gqa_eval = _gqa_blocked(world)
    blocked_coco: dict[int, str] = {}
    for rec in json.loads(meta[("coco", "karpathy")])["images"]:
        if rec["split"] in ("val", "test"):
            blocked_coco[rec["cocoid"]] = f"coco:{rec['cocoid']}"
    for ref in pickle.loads(meta[("refcoco", "refs")]):
        if ref["split"] != "train":
            blocked_coco[ref["image_id"]] = f"coco:{ref['image_id']}"
    for img in gqa_eval:  # a GQA evaluation image that is also a COCO image blocks that COCO copy too
        if img.coco_id is not None:
            blocked_coco.setdefault(img.coco_id, img.key)
    coco_by_id = {img.coco_id: img for img in images["coco"]}
    nlvr2_by_url = {img.url: img for img in images["nlvr2"]}
    nlvr2_eval = [
        nlvr2_by_url[line[side]]
        for split in EVAL_SPLITS
        for line in map(json.loads, meta[("nlvr2", split)].decode().splitlines())
        for side in ("left_url", "right_url")
    ]
    eval_images: list[WorldImage] = (
        [coco_by_id[c] for c in sorted(blocked_coco)] + images["flickr30k"] + nlvr2_eval + gqa_eval
    )

    blocked_flickr: dict[int, str] = {}
    for split in ENTITIES_SPLITS:
        for pid in meta[("flickr30k", f"entities_{split}")].decode().split():
            blocked_flickr[int(pid)] = f"flickr30k:{pid}"
    for img in gqa_eval:
        if img.flickr_id is not None:
            blocked_flickr.setdefault(img.flickr_id, img.key)
    for cid in sorted(blocked_coco):
        pid = flickr_photo_id(coco_by_id[cid].flickr_url)
        if pid is not None:
            blocked_flickr.setdefault(pid, f"coco:{cid}")
    blocked_urls = {normalize_url(img.url): img.key for img in eval_images}
    blocked_hashes = {hashlib.sha256(img.data).hexdigest(): img.key for img in eval_images}

    overlaps = []
    for dataset in PRETRAIN:
        for img in images[dataset]:
            if img.fault in FAULT_ERRORS:  # failed downloads never reach dedup
                continue
            match = _first_match(img, blocked_vg, blocked_coco, blocked_flickr, blocked_urls, blocked_hashes)
            if match:
                reason, eval_key = match
                overlaps.append(
                    {
                        "dataset": dataset,
                        "key": img.key,
                        "url": img.url,
                        "reason": reason,
                        "eval_key": eval_key,
                    }
                )
                _check_expected(img, reason, eval_key, blocked_vg, blocked_coco)
            elif img.planted:
                raise RuntimeError(f"world: planted {img.planted} image {img.key} matches no blocklist entry")

    removed = {ds: dict(Counter(o["reason"] for o in overlaps if o["dataset"] == ds)) for ds in PRETRAIN}
    failures = {
        ds: dict(Counter(FAULT_ERRORS[i.fault] for i in images[ds] if i.fault in FAULT_ERRORS))
        for ds in datasets
    }
    retried = {ds: sum(1 for i in images[ds] if i.fault == "flaky_500") for ds in datasets}
    planted = Counter(i.planted for ds in datasets for i in images[ds] if i.planted)
    return {
        "images": {ds: len(images[ds]) for ds in datasets},
        "expected_failures": failures,
        "expected_retried": retried,
        "overlaps": overlaps,
        "removed": removed,
        "planted": {kind: planted.get(kind, 0) for kind in PLANTED_REASON},
    }


def _gqa_blocked(world: World) -> tuple[dict[int, str], list[WorldImage]]:
    """(VG id -> key of the GQA evaluation images that are VG images, every GQA evaluation image), read from
    the published questions of GQA_BLOCKED_SPLITS; empty in a world without GQA."""
    if ("gqa", "questions_val") not in world.metadata:
        return {}, []
    ids = {q["imageId"] for split in GQA_BLOCKED_SPLITS
           for q in json.loads(world.metadata[("gqa", f"questions_{split}")]).values()}
    vg = [img for img in world.images["vg"] if img.key.split(":")[1] in ids]
    testdev = [img for img in world.images.get("gqa", []) if img.key.split(":")[1] in ids]
    return {int(img.key.split(":")[1]): img.key for img in vg}, vg + testdev


def _first_match(img: WorldImage, blocked_vg, blocked_coco, blocked_flickr, blocked_urls, blocked_hashes):
    if img.dataset == "vg" and int(img.key.split(":")[1]) in blocked_vg:
        return "vg_id", img.key
    if img.coco_id in blocked_coco:
        return "coco_id", blocked_coco[img.coco_id]
    for pid in (flickr_photo_id(img.url), flickr_photo_id(img.flickr_url), img.flickr_id):
        if pid in blocked_flickr:
            return "flickr_id", blocked_flickr[pid]
    if normalize_url(img.url) in blocked_urls:
        return "url", blocked_urls[normalize_url(img.url)]
    digest = hashlib.sha256(img.data).hexdigest()
    if digest in blocked_hashes:
        return "content_hash", blocked_hashes[digest]
    return None


def _check_expected(img: WorldImage, reason: str, eval_key: str, blocked_vg: dict[int, str],
                    blocked_coco: dict[int, str]) -> None:
    """Planted images match as planted; the only unplanted removals are the blocked COCO images themselves,
    the VG images of GQA's evaluation splits and the COCO copies of those."""
    if img.planted:
        expected = (PLANTED_REASON[img.planted], img.eval_key)
    elif img.dataset == "vg" and int(img.key.split(":")[1]) in blocked_vg:
        expected = ("vg_id", img.key)
    elif img.dataset == "coco" and img.coco_id in blocked_coco:
        expected = ("coco_id", blocked_coco[img.coco_id])
    else:
        expected = None
    if (reason, eval_key) != expected:
        raise RuntimeError(
            f"world: {img.key} ({img.url}) would be removed for {reason} via {eval_key}, expected {expected}"
        )
