"""The ``features`` stage: region features of every downloaded image, in UNITER's img_db layout.

One store serves pretraining and the downstream tasks, so it holds the images dedup removed from the
pretraining corpora too (VQA and RefCOCO evaluate on COCO images that dedup keeps out of pretraining):
what pretraining may see is decided by the text side (the txtdb stage reads dedup's filtered captions).

Output (``stages/outputs/features.py``): ``img_db/`` (the store, vlp/data/img_db.py: LMDB ``all`` + one nbb
sidecar per ``features.nbb`` entry), ``failures.parquet`` (images not stored: key, corpus, reason, detail),
``stats.json`` (the metrics below, the failure counts, the work plan and the declared box rule, the first
``features.nbb`` entry, which every consumer reads the store with), ``boxes_per_image.png`` (histogram of
the regions a reader gets per image with that rule).

Inputs: ``download`` (the images), ``dedup`` (tables, for ``given_boxes``), ``detector`` (its
``detector.pt``, unless ``features.detector.weights`` names a file) and, in world mode, ``world``
(``scenes.jsonl``: the truth for the feature-quality probe). A killed run resumes from the store it
left in ``ctx.out_dir``.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages.base import StageContext, StageError, StageResult
from stages.feature_extraction.config import FeatureConfig
from stages.feature_extraction.detector.backend import load_backend
from stages.feature_extraction.pipeline import Extraction, extract
from stages.feature_extraction.probe import load_scenes, probe_store
from stages.outputs.detector import DetectorOutput
from stages.outputs.features import FeaturesOutput
from stages.outputs.world import WorldOutput
from vlp.data.img_db import ImgDb, nbb_sidecar_name

FAILURES = pa.schema(
    [("key", pa.string()), ("corpus", pa.string()), ("reason", pa.string()), ("detail", pa.string())]
)


def detector_weights(ctx: StageContext, cfg: FeatureConfig) -> Path:
    if cfg.detector.weights is not None:
        return Path(cfg.detector.weights)
    if "detector" not in ctx.inputs:
        raise StageError("features.detector.weights is not set and there is no detector stage output to use")
    return DetectorOutput(ctx.inputs["detector"]).weights


def run(ctx: StageContext) -> StageResult:
    cfg: FeatureConfig = ctx.cfg.features
    weights = detector_weights(ctx, cfg)
    # Fail fast, with the backend's one-line message, on a missing or mismatching weight file: inside
    # the actors the same error would surface only after the pipeline started, wrapped by Ray.
    load_backend(cfg.detector, weights)
    out = FeaturesOutput(ctx.out_dir)

    def progress(done: int, todo: int, rate: float) -> None:
        ctx.log.info("features: %d/%d images, %.1f images/s", done, todo, rate)
        ctx.log_metrics({"progress/images": done, "progress/images_per_s": rate}, step=done)

    result = extract(ctx.inputs["download"], ctx.inputs["dedup"], out.store_dir, cfg, weights, progress)
    failures = sorted(result.failures, key=lambda f: (f["corpus"], f["key"]))
    pq.write_table(pa.Table.from_pylist(failures, schema=FAILURES), out.failures_path)

    store = ImgDb(out.store_dir, *cfg.nbb[0], compress=cfg.compress)
    try:
        metrics = _extraction_metrics(result, store, out.store_dir)
        if "world" in ctx.inputs:
            scenes = load_scenes(WorldOutput(ctx.inputs["world"]).scenes_file, cfg.probe.corpora)
            metrics |= probe_store(store, scenes, cfg.probe)
        box_counts = list(store.name2nbb.values())
    finally:
        store.close()
    _plot_histogram(box_counts, cfg.nbb[0], out.histogram_path)
    stats = {
        "metrics": metrics,
        "failed_by_reason": dict(sorted(Counter(f["reason"] for f in failures).items())),
        "plan": {"images": result.plan.total, "already_stored": result.plan.stored,
                 "skipped": result.plan.skipped, "shards_read": len(result.plan.files)},
        "weights": str(weights),
    }
    # The first box-count rule is the one every consumer reads the store with.
    out.write_stats(stats, cfg.nbb[0], cfg.compress)
    ctx.log.info("features: %d images stored, %d failed, %.1f images/s", metrics["images_ok"], len(failures),
                 metrics["images_per_s"])
    return StageResult(
        metrics=metrics,
        params={"mode": cfg.mode, "weights": str(weights), "backend": cfg.detector.backend},
        artifacts=[out.stats_path.name, out.failures_path.name, out.histogram_path.name],
    )


def _extraction_metrics(result: Extraction, store: ImgDb, store_dir: Path) -> dict[str, float]:
    counts = list(store.name2nbb.values())
    metrics = {
        "images_per_s": result.processed / result.seconds if result.seconds else 0.0,
        "startup_s": result.first_batch_s,
        "images_processed": float(result.processed),
        "images_ok": float(len(counts)),
        "images_failed": float(len(result.failures)),
        "images_skipped": float(result.plan.skipped),
        "images_resumed": float(result.plan.stored),
        "store_bytes": float(sum(f.stat().st_size for f in store_dir.rglob("*") if f.is_file())),
    }
    for reason, n in Counter(f["reason"] for f in result.failures).items():
        metrics[f"images_failed/{reason}"] = float(n)
    if counts:
        metrics |= {"boxes_per_image_mean": sum(counts) / len(counts),
                    "boxes_per_image_min": float(min(counts)), "boxes_per_image_max": float(max(counts))}
    return metrics


def _plot_histogram(counts: list[int], nbb: tuple[float, int, int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(counts, bins=range(0, max(counts, default=0) + 2), color="#4c72b0")
    ax.set_xlabel("regions per image (" + os.path.splitext(nbb_sidecar_name(*nbb))[0] + ")")
    ax.set_ylabel("images")
    ax.set_title(f"{len(counts)} images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
