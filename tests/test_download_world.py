"""world (tiny) -> download over the loopback mirror: every count agrees with the world's truth.json."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import ray

from pipeline.config import load_config
from stages.base import StageContext
from stages.download.stage import run as download
from stages.world.stage import run as build_world
from vlp.data.tables import IMAGES
from worldgen.config import WorldConfig


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def test_download_of_the_tiny_world_matches_truth(ray_cluster, tmp_path):
    cfg = load_config()  # configs/demo.yaml: the official URLs, served by the mirror
    world_cfg = WorldConfig.tiny()
    # The tiny world's slow and huge faults sit at 2 s and 3 MB, under the download defaults.
    assert world_cfg.faults.slow_seconds > 1.0 and world_cfg.faults.huge_bytes > 2_000_000
    cfg = cfg.model_copy(update={
        "world": world_cfg,
        "download": cfg.download.model_copy(update=dict(
            timeout_s=1.0, retries=1, backoff_s=0.05, max_bytes=2_000_000, shard_size=32,
            # 2 tasks x 2 threads: no more simultaneous connects than the mirror's listen backlog (5)
            # takes without a SYN retry, which costs a full second and would trip the 1 s timeout.
            max_tasks_in_flight=2, threads_per_task=2)),
    })
    world, out = tmp_path / "world", tmp_path / "download"
    world.mkdir()
    out.mkdir()
    build_world(StageContext(cfg=cfg, workdir=tmp_path, out_dir=world, inputs={}))
    result = download(StageContext(cfg=cfg, workdir=tmp_path, out_dir=out, inputs={"world": world}))

    truth = json.loads((world / "truth.json").read_text())
    m = result.metrics
    for dataset, n_images in truth["images"].items():
        expected = truth["expected_failures"][dataset]
        failed = {k.rsplit(".", 1)[1]: v for k, v in m.items() if k.startswith(f"images.{dataset}.failed.")}
        assert failed == expected, dataset
        assert m[f"images.{dataset}.ok"] == n_images - sum(expected.values()), dataset
        assert m[f"images.{dataset}.retried"] == truth["expected_retried"][dataset], dataset
    assert m["images.total.images"] == sum(truth["images"].values())

    for dataset, n_images in truth["images"].items():
        table = pq.read_table(out / "images" / dataset, schema=IMAGES)
        keys = table.column("key").to_pylist()
        assert len(keys) == len(set(keys)) == n_images, dataset
    task_tables = sorted(p.name for p in (out / "tables").glob("task_*.parquet"))
    assert task_tables == ["task_nlvr2.parquet", "task_refcoco.parquet", "task_snli_ve.parquet",
                           "task_vqa.parquet"]
    assert pq.read_table(out / "tables" / "captions.parquet").num_rows > 0
