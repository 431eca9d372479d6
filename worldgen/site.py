"""The world as a web site: every published file at its mirror path, with its fault plan, truth and scenes.

``publish`` returns all of it in memory; the ``world`` stage only writes it down. Files are keyed by their
path under the mirror's www root (``<host>/<path>`` of the URL, see ``mirror_path``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from worldgen.archives import place_metadata
from worldgen.build import build_world, faults_spec
from worldgen.config import WorldConfig
from worldgen.errors import WorldError
from worldgen.mirror import mirror_path
from worldgen.truth import compute_truth


@dataclass(frozen=True)
class Site:
    files: dict[str, bytes]  # path under the www root -> bytes
    faults: dict  # the mirror's fault plan (its faults file)
    truth: dict  # image counts, expected download failures/retries, overlaps dedup must remove
    scenes: list[dict]  # per published image URL: dataset, key, objects with their boxes


def publish(cfg: WorldConfig, sources: dict[str, dict[str, str]], flickr30k_image_base_url: str,
            gqa_image_base_url: str | None = None) -> Site:
    """Build the world and place it at the URLs of ``sources`` (dataset -> role -> metadata URL). GQA is
    published when ``sources`` has it, its testdev images under ``gqa_image_base_url``."""
    if "gqa" in sources and not gqa_image_base_url:
        raise WorldError("download.datasets.gqa.image_base_url: required, the world publishes GQA's testdev "
                         "images there")
    world = build_world(cfg, flickr30k_image_base_url, gqa_image_base_url if "gqa" in sources else None)
    truth = compute_truth(world)
    by_url = place_metadata(world.metadata, sources)
    for imgs in world.images.values():
        for img in imgs:
            if by_url.setdefault(img.url, img.data) != img.data:
                raise WorldError(f"world: {img.url} is published twice with different bytes")
    files: dict[str, bytes] = {}
    url_at: dict[str, str] = {}
    for url in sorted(by_url):
        path = mirror_path(url)
        if {".", ".."} & set(PurePosixPath(path).parts):  # would place a file outside the www root
            raise WorldError(f"world: refusing {url!r}: its path has '.' or '..' segments")
        if url_at.setdefault(path, url) != url:  # the mirror ignores query and fragment
            raise WorldError(f"world: {url} and {url_at[path]} map to the same mirror path {path}")
        files[path.lstrip("/")] = by_url[url]
    scenes = [img.scene_record() for imgs in world.images.values() for img in imgs]
    return Site(files=files, faults=faults_spec(world), truth=truth, scenes=scenes)
