"""Builds the whole world in memory: every dataset's images and metadata, faults and truth."""

from __future__ import annotations

from worldgen.config import FAULT_NAMES, WorldConfig
from worldgen.mirror import mirror_path
from worldgen.publish_coco import build_coco
from worldgen.publish_flickr import build_flickr30k
from worldgen.publish_gqa import build_gqa
from worldgen.publish_nlvr2 import build_nlvr2
from worldgen.publish_vg import build_vg
from worldgen.publish_web import build_cc, build_sbu
from worldgen.records import World

# Faults go only where a failed download hurts nobody: never on eval, task or planted images.
FAULT_DATASETS = ("cc", "sbu", "vg")


def build_world(cfg: WorldConfig, flickr30k_image_base_url: str,
                gqa_image_base_url: str | None = None) -> World:
    """The world; GQA only with ``gqa_image_base_url`` (where its testdev images are served). GQA is built
    last, from its own random streams, so the rest of the world is the same with or without it."""
    world = World(cfg)
    flickr30k = build_flickr30k(world, flickr30k_image_base_url)
    coco = build_coco(world, flickr30k)
    vg = build_vg(world, coco, flickr30k)
    nlvr2 = build_nlvr2(world)
    build_cc(world, flickr30k, coco, nlvr2)
    build_sbu(world, flickr30k)
    _assign_faults(world)
    if gqa_image_base_url is not None:
        build_gqa(world, vg, gqa_image_base_url)
    return world


def _assign_faults(world: World) -> None:
    candidates = [img for ds in FAULT_DATASETS for img in world.images[ds] if img.planted is None]
    order = world.rng("faults").sample(candidates, len(candidates))
    counts = world.cfg.faults.counts()
    names = [name for name in FAULT_NAMES for _ in range(counts[name])]
    for img, name in zip(order, names, strict=False):
        img.fault = name


def faults_spec(world: World) -> dict:
    """faults.json for the mirror: paths as the mirror sees them (``/<host>/<path>`` of the URL)."""
    faults = world.cfg.faults
    paths = {mirror_path(img.url): img.fault for imgs in world.images.values() for img in imgs if img.fault}
    return {
        "slow_seconds": faults.slow_seconds,
        "huge_bytes": faults.huge_bytes,
        "paths": dict(sorted(paths.items())),
    }
