"""The ``world`` stage: generates the synthetic world and writes what the mirror serves.

Output (in ``ctx.out_dir``)::

    www/<host>/<path>   every metadata file/archive and every image, at the path of its URL
    faults.json         the mirror's fault plan
    truth.json          image counts, expected download failures/retries, overlaps dedup must remove
    scenes.jsonl        per published image URL: dataset, key, objects with shape/colour/size/texture/box
"""

from __future__ import annotations

import json
import time

from stages.base import StageContext, StageError, StageResult
from stages.download.world.archives import place_metadata
from stages.download.world.build import build_world, faults_spec
from stages.download.world.mirror import mirror_path
from stages.download.world.truth import compute_truth


def run(ctx: StageContext) -> StageResult:
    start = time.perf_counter()
    sources = ctx.cfg.download.datasets
    flickr30k = sources.get("flickr30k")
    if flickr30k is None or not flickr30k.image_base_url:
        raise StageError(
            "download.datasets.flickr30k.image_base_url: required, the world publishes Flickr30k images there"
        )
    world = build_world(ctx.cfg.world, flickr30k.image_base_url)
    truth = compute_truth(world)
    files = place_metadata(world.metadata, sources)
    for imgs in world.images.values():
        for img in imgs:
            if files.setdefault(img.url, img.data) != img.data:
                raise StageError(f"world: {img.url} is published twice with different bytes")
    www = ctx.out_dir / "www"
    by_path: dict[str, str] = {}
    for url in sorted(files):
        path = mirror_path(url)
        if by_path.setdefault(path, url) != url:  # the mirror ignores query and fragment
            raise StageError(f"world: {url} and {by_path[path]} map to the same mirror path {path}")
        target = www / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(files[url])
    (ctx.out_dir / "faults.json").write_text(json.dumps(faults_spec(world), indent=1) + "\n")
    (ctx.out_dir / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    with open(ctx.out_dir / "scenes.jsonl", "w") as f:
        for imgs in world.images.values():
            for img in imgs:
                f.write(json.dumps(img.scene_record()) + "\n")

    seconds = time.perf_counter() - start
    ctx.log.info("world: %d images, %d files in %.1fs", sum(truth["images"].values()), len(files), seconds)
    metrics = {f"images_{ds}": float(n) for ds, n in truth["images"].items()}
    metrics |= {f"planted_{kind}": float(n) for kind, n in truth["planted"].items()}
    metrics |= {f"removed_{ds}": float(sum(r.values())) for ds, r in truth["removed"].items()}
    metrics["expected_failures"] = float(sum(sum(f.values()) for f in truth["expected_failures"].values()))
    metrics["build_seconds"] = seconds
    return StageResult(
        metrics=metrics, params={"world_seed": ctx.cfg.world.seed}, artifacts=["truth.json", "faults.json"]
    )
