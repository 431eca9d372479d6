"""The ``world`` stage: publishes the synthetic world (``worldgen``) and writes down what the mirror serves.

Output: ``stages/outputs/world.py`` (``www/``, ``faults.json``, ``truth.json``, ``scenes.jsonl``). The
metadata files go to the URLs configured in ``download.datasets``, exactly where the download stage
will ask for them.
"""

from __future__ import annotations

import json
import time

from stages.base import StageContext, StageError, StageResult
from stages.outputs.world import WorldOutput
from worldgen.errors import WorldError
from worldgen.site import publish


def run(ctx: StageContext) -> StageResult:
    start = time.perf_counter()
    sources = ctx.cfg.download.datasets
    flickr30k = sources.get("flickr30k")
    if flickr30k is None or not flickr30k.image_base_url:
        raise StageError(
            "download.datasets.flickr30k.image_base_url: required, the world publishes Flickr30k images there"
        )
    try:
        urls = {name: source.files for name, source in sources.items()}
        gqa = sources.get("gqa")
        site = publish(ctx.cfg.world, urls, flickr30k.image_base_url, gqa.image_base_url if gqa else None)
    except WorldError as err:
        raise StageError(str(err)) from None
    out = WorldOutput(ctx.out_dir)
    for path, data in site.files.items():
        target = out.www / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    out.faults_file.write_text(json.dumps(site.faults, indent=1) + "\n")
    out.truth_file.write_text(json.dumps(site.truth, indent=1) + "\n")
    out.scenes_file.write_text("".join(json.dumps(scene) + "\n" for scene in site.scenes))

    truth = site.truth
    seconds = time.perf_counter() - start
    images = sum(truth["images"].values())
    ctx.log.info("world: %d images, %d files in %.1fs", images, len(site.files), seconds)
    metrics = {f"images_{ds}": float(n) for ds, n in truth["images"].items()}
    metrics |= {f"planted_{kind}": float(n) for kind, n in truth["planted"].items()}
    metrics |= {f"removed_{ds}": float(sum(r.values())) for ds, r in truth["removed"].items()}
    metrics["expected_failures"] = float(sum(sum(f.values()) for f in truth["expected_failures"].values()))
    metrics["build_seconds"] = seconds
    return StageResult(
        metrics=metrics,
        params={"world_seed": ctx.cfg.world.seed},
        artifacts=[out.truth_file.name, out.faults_file.name],
    )
