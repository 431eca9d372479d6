"""Ray Data region-feature extraction: Parquet shards -> decode -> detector actors -> img_db store.

    read_parquet(images/*/shard-*.parquet, key/corpus/image)        read tasks
      -> map_batches(decode_batch)                                   CPU tasks: decode, downscale
      -> map_batches(DetectorActor, ActorPoolStrategy)               one GPU per actor, or CPU threads
      -> iter_batches on the stage driver -> ImgDbWriter.put         one writer, LMDB commits in batches

Ray Data streams blocks through all operators at once, so reading, decoding, detection and writing
overlap; the driver only unpacks bytes and puts them while later batches are prefetched.

Resume: the store is opened in place and every key already in it is dropped before anything expensive
runs. Shards whose keys are all stored are not read at all; the rest are read and their stored keys
dropped before decoding. The writer commits whole images, so a killed run loses at most its last
uncommitted batch and a rerun ends with every key exactly once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray

from stages.base import StageError
from stages.feature_extraction.actor import DetectorActor, region_arrays
from stages.feature_extraction.config import FeatureConfig
from stages.feature_extraction.decode import decode_batch
from vlp.data.img_db import ImgDbWriter

log = logging.getLogger("vlp.stage.features")

READ_COLUMNS = ["key", "corpus", "image"]
PROGRESS_EVERY_S = 10.0


@dataclass
class WorkPlan:
    files: list[str]  # shards with at least one image left to process
    exclude: frozenset[str]  # keys inside those shards not to process (stored, or skipped)
    total: int  # images downloaded
    stored: int  # of which already in the store when the run started
    skipped: int  # of which not processed: no annotation in given_boxes mode with unannotated=skip


@dataclass
class Extraction:
    plan: WorkPlan
    new_ok: int = 0  # images written by this run
    failures: list[dict] = field(default_factory=list)  # key, corpus, reason, detail
    seconds: float = 0.0
    first_batch_s: float = 0.0  # until the first detector output arrived: startup of the pipeline

    @property
    def processed(self) -> int:
        return self.new_ok + len(self.failures)


def image_shards(images_dir: Path) -> list[Path]:
    shards = sorted(Path(images_dir).glob("images/*/shard-*.parquet"))
    if not shards:
        raise StageError(f"{images_dir}: no images/<corpus>/shard-*.parquet to extract features from")
    return shards


def plan_work(shards: list[Path], done: Callable[[str], bool], wanted: frozenset[str] | None) -> WorkPlan:
    """Which shards to read and which of their keys to drop, from the key column alone."""
    files, exclude = [], set()
    total = stored = skipped = 0
    for shard in shards:
        table = pq.read_table(shard, columns=["key", "status"])
        keys = table.column("key").to_pylist()
        drop = set()
        for key, status in zip(keys, table.column("status").to_pylist(), strict=True):
            if status != "ok":  # a download failure, counted by the download stage; no bytes to read
                drop.add(key)
                continue
            total += 1
            if done(key):
                stored += 1
                drop.add(key)
            elif wanted is not None and key not in wanted:
                skipped += 1
                drop.add(key)
        if len(drop) < len(set(keys)):
            files.append(str(shard))
            exclude |= drop
    return WorkPlan(files, frozenset(exclude), total, stored, skipped)


def annotated_boxes(dedup_dir: Path) -> dict[str, np.ndarray]:
    """image key -> (N, 4) float32 x1y1x2y2 pixel boxes from tables/objects.parquet (x, y, w, h)."""
    path = Path(dedup_dir) / "tables" / "objects.parquet"
    if not path.is_file():
        raise StageError(f"{path}: missing; features.mode=given_boxes needs the objects table")
    table = pq.read_table(path, columns=["image_key", "x", "y", "w", "h"]).sort_by("image_key")
    keys = table.column("image_key").to_numpy(zero_copy_only=False)
    xywh = np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in "xywh"], axis=1)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).astype(np.float32)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.array([], int)
    ends = np.r_[starts[1:], len(keys)]
    return {str(keys[s]): xyxy[s:e] for s, e in zip(starts, ends, strict=True)}


def _detector_resources(cfg: FeatureConfig) -> tuple[int, dict]:
    """Actor count and per-actor resources: one GPU each when the cluster has GPUs, else CPUs."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 0)
    if gpus:
        return cfg.actors or gpus, {"num_gpus": 1, "num_cpus": cfg.actor_cpus}
    actors = cfg.actors or 1
    if actors * cfg.actor_cpus >= cpus:
        raise StageError(f"features.actors={actors} x features.actor_cpus={cfg.actor_cpus} takes all "
                         f"{cpus:g} CPUs of the cluster, leaving none to read and decode images; lower them")
    return actors, {"num_gpus": 0, "num_cpus": cfg.actor_cpus}


def detector_input_size(cfg: FeatureConfig) -> tuple[int | None, int | None]:
    """(shorter, longer) side limits the decode step downscales to: the backend's own input size."""
    if not cfg.resize:
        return None, None
    det = cfg.detector
    if det.backend == "detectron2":
        return det.detectron2.min_size, det.detectron2.max_size
    return det.image_size, det.max_image_size


def build_dataset(plan: WorkPlan, cfg: FeatureConfig, weights: Path, given: dict[str, np.ndarray] | None):
    """The lazy Ray Data pipeline producing REGIONS batches for every image of ``plan``."""
    det = cfg.detector
    short, long = detector_input_size(cfg)
    actors, resources = _detector_resources(cfg)
    ds = ray.data.read_parquet(plan.files).select_columns(READ_COLUMNS)
    ds = ds.map_batches(
        decode_batch,
        batch_size=cfg.decode_batch_size,
        batch_format="pyarrow",
        fn_kwargs={"short_side": short, "long_side": long, "exclude": plan.exclude},
        num_cpus=1,
        # Besides sizing decode concurrency per node, a memory request the actors do not make keeps
        # Ray Data from fusing decoding into the detector actor, where it would run serially with the
        # model instead of overlapping with it.
        memory=cfg.decode_memory_mb << 20,
    )
    # Blocks of one detector batch each: an actor task then covers one batch and its output streams
    # to the writer at once, instead of waiting for a whole decode block to pass through the model.
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
    return ds.map_batches(
        DetectorActor,
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={
            "detector": det.model_dump(mode="json"),
            "weights": str(weights),
            "threads": max(1, int(cfg.actor_cpus)),
            "mode": cfg.mode,
            "unannotated": cfg.unannotated,
            # In a list so that Ray hands the actor the reference, fetched once in its constructor.
            "given_ref": [ray.put(given)] if given is not None else None,
        },
        **resources,
    )


def extract(
    images_dir: Path,
    tables_dir: Path,
    store_dir: Path,
    cfg: FeatureConfig,
    weights: Path,
    progress: Callable[[int, int, float], None] | None = None,
) -> Extraction:
    """Extract every downloaded image (``images_dir``: the download output) not yet in the store at
    ``store_dir``, then finalize it; annotated boxes for ``given_boxes`` come from ``tables_dir`` (dedup).

    ``progress(done, todo, images_per_s)`` is called every few seconds while images arrive.
    """
    shards = image_shards(images_dir)
    given = annotated_boxes(tables_dir) if cfg.mode == "given_boxes" else None
    wanted = frozenset(given) if given is not None and cfg.unannotated == "skip" else None
    writer = ImgDbWriter(store_dir, compress=cfg.compress, nbb_configs=cfg.nbb, batch_bytes=cfg.commit_bytes)
    with writer:
        plan = plan_work(shards, writer.__contains__, wanted)
        result = Extraction(plan)
        todo = plan.total - plan.stored - plan.skipped
        log.info("features: %d images, %d already stored, %d skipped, %d to extract from %d shards",
                 plan.total, plan.stored, plan.skipped, todo, len(plan.files))
        start = last_report = time.perf_counter()
        if plan.files:
            batches = build_dataset(plan, cfg, weights, given).iter_batches(
                batch_size=None, batch_format="pyarrow", prefetch_batches=4
            )
            for batch in batches:
                if not result.first_batch_s:
                    result.first_batch_s = time.perf_counter() - start
                for row in batch.to_pylist():
                    if row["status"] == "ok":
                        writer.put(row["key"], **region_arrays(row))
                        result.new_ok += 1
                    else:
                        result.failures.append({"key": row["key"], "corpus": row["corpus"],
                                                "reason": row["status"], "detail": row["error"]})
                now = time.perf_counter()
                if progress is not None and now - last_report >= PROGRESS_EVERY_S:
                    progress(result.processed, todo, result.processed / (now - start))
                    last_report = now
    result.seconds = time.perf_counter() - start
    return result
