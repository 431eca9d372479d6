"""The download stage: metadata -> tables, then every corpus's images as resumable shards: Ray tasks, or
threads of this process when few images are left to fetch (``download.in_process_max_images``).

Web mode fetches the configured URLs (optionally through ``download.mirror_url``); world mode fetches
them through the mirror of the synthetic world that the pipeline serves around this stage and names in
``ctx.mirror_url``. Either way the stage sees a mirror URL and nothing else, and the code path is the
same. See ``vlp/data/tables.py`` for the output layout.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import ray
from tqdm import tqdm

from stages.base import StageContext, StageError, StageResult
from stages.download.config import DatasetSource, DownloadConfig
from stages.download.fetch import FetchSettings, fetch_shard
from stages.download.formats import parse_dataset
from stages.download.formats.base import ImageRef, Parsed
from stages.download.metadata import Caps, MetadataFetcher
from stages.download.shards import Shard, commit_shard, discard_partial_files, plan_shards, read_stats
from stages.download.table_writer import write_tables
from stages.download.transport import HttpClient
from stages.outputs.download import DownloadOutput


def download_shard(out_dir: str, shard: Shard, settings: FetchSettings) -> dict[str, Any]:
    """Fetch one shard and commit it; runs as a Ray task (one CPU each) or a thread of the stage."""
    rows, stats = fetch_shard(list(shard.refs), settings)
    return commit_shard(Path(out_dir), shard, rows, stats)


def _mirror_url(ctx: StageContext) -> str | None:
    cfg: DownloadConfig = ctx.cfg.download
    if cfg.source == "web":
        return cfg.mirror_url
    if ctx.mirror_url is None:
        raise StageError("download.source is 'world' but no world mirror URL was given to the stage "
                         "(pipeline/run.py serves the world stage's output and passes its URL)")
    return ctx.mirror_url


def _parse(name: str, files: dict[str, Path], source: DatasetSource) -> Parsed:
    """The dataset's parsed metadata; files that fail to parse are discarded, so that a rerun after the
    source is fixed downloads them again instead of failing on the kept copy."""
    try:
        return parse_dataset(name, files, source)
    except StageError:
        for path in files.values():
            path.unlink(missing_ok=True)
        raise


def _image_refs(parsed: dict[str, Parsed]) -> list[ImageRef]:
    """Every dataset's ImageRefs; a key repeated within a corpus is a parser bug, reported by name."""
    first_by: dict[tuple[str, str], str] = {}
    refs = []
    for dataset, result in parsed.items():
        for ref in result.images:
            first = first_by.get((ref.corpus, ref.key))
            if first is not None:
                raise StageError(f"dataset '{dataset}': image key {ref.key!r} of corpus '{ref.corpus}' "
                                 f"is listed twice (first by dataset '{first}')")
            first_by[(ref.corpus, ref.key)] = dataset
            refs.append(ref)
    return refs


def fetches_in_process(images: int, in_process_max_images: int) -> bool:
    """Whether a run with ``images`` left to fetch fetches them in this process rather than as Ray tasks."""
    return images <= in_process_max_images


def _in_ray_tasks(out_dir: Path, shards: list[Shard], todo: list[int], settings: FetchSettings,
                  max_in_flight: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index, stats) of each shard in ``todo`` as its Ray task (one CPU) finishes."""
    task = ray.remote(num_cpus=1)(download_shard)
    pending: dict[ray.ObjectRef, int] = {}
    queue = iter(todo)
    while True:
        while len(pending) < max_in_flight and (i := next(queue, None)) is not None:
            pending[task.remote(str(out_dir), shards[i], settings)] = i
        if not pending:
            return
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            yield pending.pop(ref), ray.get(ref)


def _in_threads(out_dir: Path, shards: list[Shard], todo: list[int], settings: FetchSettings,
                max_in_flight: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """The same shards through the same ``download_shard``, as threads of this process: no Ray worker to
    start, which costs a small list more than its fetch (threads suffice there: sockets, PIL's decoders
    and sha256 release the GIL)."""
    pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="download-shard")
    try:
        futures = {pool.submit(download_shard, str(out_dir), shards[i], settings): i for i in todo}
        for future in as_completed(futures):
            yield futures[future], future.result()
    finally:
        pool.shutdown(cancel_futures=True)  # a failed shard stops the run, as a failed Ray task does


def run_shards(out_dir: Path, shards: list[Shard], settings: FetchSettings, max_in_flight: int,
               in_process_max_images: int, log) -> tuple[list[dict[str, Any]], list[Shard], str]:
    """Stats of every shard (committed earlier or now), the shards fetched by this run and where they were
    fetched ("process" or "ray"). Either way each shard is one ``download_shard`` call, at most
    ``max_in_flight`` at once, so the files written are the same."""
    discarded = discard_partial_files(out_dir)
    if discarded:
        log.info("download: discarded %d partial files from an interrupted run", discarded)
    done = [read_stats(out_dir, shard) for shard in shards]
    todo = [i for i, stats in enumerate(done) if stats is None]
    resumed = len(shards) - len(todo)
    if resumed:
        log.info("download: resuming, %d of %d shards already committed", resumed, len(shards))
    images = sum(len(shards[i].refs) for i in todo)
    runner = "process" if fetches_in_process(images, in_process_max_images) else "ray"
    log.info("download: fetching %d images in %d shards %s", images, len(todo),
             "in this process" if runner == "process" else "as Ray tasks")
    run = _in_threads if runner == "process" else _in_ray_tasks
    with tqdm(total=len(shards), initial=resumed, desc="download shards", unit="shard",
              file=sys.stderr, mininterval=1.0) as bar:
        for i, stats in run(out_dir, shards, todo, settings, max_in_flight):
            done[i] = stats
            bar.update(1)
    return done, [shards[i] for i in todo], runner


def _summarize(datasets: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    per_dataset = {}
    for corpus, stats in datasets.items():
        failed: dict[str, int] = {}
        for s in stats:
            for kind, n in s["failed"].items():
                failed[kind] = failed.get(kind, 0) + n
        per_dataset[corpus] = {
            "images": sum(s["images"] for s in stats),
            "ok": sum(s["ok"] for s in stats),
            "failed": dict(sorted(failed.items())),
            "retried": sum(s["retried"] for s in stats),
            "bytes": sum(s["bytes"] for s in stats),
            "shards": len(stats),
        }
    return per_dataset


def _metrics(per_dataset: dict[str, Any], fetched: int, fetch_seconds: float, resumed: int,
             shards: int) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for corpus, s in per_dataset.items():
        metrics[f"images.{corpus}.ok"] = s["ok"]
        metrics[f"images.{corpus}.failed"] = sum(s["failed"].values())
        for kind, n in s["failed"].items():
            metrics[f"images.{corpus}.failed.{kind}"] = n
        metrics[f"images.{corpus}.retried"] = s["retried"]
        metrics[f"images.{corpus}.bytes"] = s["bytes"]
    for name in ("images", "ok", "retried", "bytes"):
        metrics[f"images.total.{name}"] = sum(s[name] for s in per_dataset.values())
    metrics["images.total.failed"] = sum(sum(s["failed"].values()) for s in per_dataset.values())
    metrics["images.fetched_this_run"] = fetched
    metrics["images.per_second"] = round(fetched / fetch_seconds, 2) if fetch_seconds > 0 else 0.0
    metrics["shards.total"] = shards
    metrics["shards.resumed"] = resumed
    return metrics


def run(ctx: StageContext) -> StageResult:
    cfg: DownloadConfig = ctx.cfg.download
    if not cfg.datasets:
        raise StageError("download.datasets is empty: nothing to download")
    out_dir = Path(ctx.out_dir)
    layout = DownloadOutput(out_dir)
    mirror_url = _mirror_url(ctx)
    client = HttpClient(cfg.timeout_s, cfg.max_redirects, mirror_url)
    try:
        caps = Caps(cfg.metadata_max_bytes, cfg.member_max_bytes, cfg.member_max_ratio)
        files = MetadataFetcher(out_dir, client, cfg.retries, cfg.backoff_s, caps).fetch_all(cfg.datasets)
    finally:
        client.close()
    parsed = {name: _parse(name, files[name], source) for name, source in cfg.datasets.items()}
    table_rows = write_tables(layout.tables, parsed.values())
    shards = plan_shards(_image_refs(parsed), cfg.shard_size)
    settings = FetchSettings.from_config(cfg, mirror_url)
    start = time.monotonic()
    stats, fetched_shards, runner = run_shards(out_dir, shards, settings, cfg.max_tasks_in_flight,
                                               cfg.in_process_max_images, ctx.log)
    fetch_seconds = time.monotonic() - start

    by_corpus: dict[str, list[dict[str, Any]]] = {}
    for shard, s in zip(shards, stats, strict=True):
        by_corpus.setdefault(shard.corpus, []).append(s)
    per_dataset = _summarize(by_corpus)
    fetched = sum(len(shard.refs) for shard in fetched_shards)
    resumed = len(shards) - len(fetched_shards)
    summary = {
        "datasets": per_dataset,
        "tables": table_rows,
        "shards": len(shards),
        "resumed_shards": resumed,
        "fetch_seconds": round(fetch_seconds, 3),
    }
    metrics = _metrics(per_dataset, fetched, fetch_seconds, resumed, len(shards))
    # Records a format marks unusable (SNLI's no-consensus pairs), left out of the tables on purpose.
    summary["dropped_records"] = {name: dict(p.dropped) for name, p in parsed.items() if p.dropped}
    for name, reasons in summary["dropped_records"].items():
        for reason, n in reasons.items():
            metrics[f"records.{name}.dropped.{reason}"] = n
            ctx.log.info("download %s: %d records dropped: %s", name, n, reason)
    summary["metrics"] = metrics
    layout.summary_file.parent.mkdir(parents=True, exist_ok=True)
    layout.summary_file.write_text(json.dumps(summary, indent=1, sort_keys=True))
    for corpus, s in per_dataset.items():
        ctx.log.info("download %s: %d ok, %d failed %s, %d retried", corpus, s["ok"],
                     sum(s["failed"].values()), s["failed"], s["retried"])
    return StageResult(
        metrics=metrics,
        params={"download.shards": len(shards), "download.runner": runner},
        artifacts=[str(layout.summary_file.relative_to(out_dir))],
    )
