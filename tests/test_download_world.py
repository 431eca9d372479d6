"""world (micro) -> download over the loopback mirror the graph serves: every count agrees with truth.json."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import ray

from pipeline.config import load_config
from pipeline.dag import world_mirror
from stages.base import StageContext, StageError
from stages.download.stage import run as download
from vlp.data.tables import IMAGES
from worldgen.presets import micro


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def _config():
    cfg = load_config()  # configs/demo.yaml: the official URLs, served by the mirror
    return cfg.model_copy(update={
        "world": micro(),
        "download": cfg.download.model_copy(update=dict(
            timeout_s=1.0, retries=1, backoff_s=0.05, max_bytes=2_000_000, shard_size=8,
            # 2 tasks x 2 threads: no more simultaneous connects than the mirror's listen backlog (5)
            # takes without a SYN retry, which costs a full second and would trip the 1 s timeout.
            max_tasks_in_flight=2, threads_per_task=2)),
    })


def test_download_of_the_micro_world_matches_truth(ray_cluster, micro_world, tmp_path):
    cfg = _config()
    # The micro world's slow and huge faults sit at 2 s and 3 MB, above the timeout and size cap.
    assert cfg.world.faults.slow_seconds > 1.0 and cfg.world.faults.huge_bytes > 2_000_000
    out = tmp_path / "download"
    out.mkdir()
    with world_mirror("download", True, {"world": micro_world.root}) as mirror_url:
        ctx = StageContext(cfg=cfg, workdir=tmp_path, out_dir=out, inputs={"world": micro_world.root},
                           mirror_url=mirror_url)
        result = download(ctx)

    truth = micro_world.truth()
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
        # The mirror's random port never reaches the committed rows (errors name the published URLs).
        assert not any(mirror_url in (e or "") for e in table.column("error").to_pylist()), dataset
    task_tables = sorted(p.name for p in (out / "tables").glob("task_*.parquet"))
    assert task_tables == ["task_nlvr2.parquet", "task_refcoco.parquet", "task_snli_ve.parquet",
                           "task_vqa.parquet"]
    assert pq.read_table(out / "tables" / "captions.parquet").num_rows > 0


def test_world_mode_without_a_mirror_url_stops_in_one_line_before_writing(micro_world, tmp_path):
    out = tmp_path / "download"
    out.mkdir()
    ctx = StageContext(cfg=_config(), workdir=tmp_path, out_dir=out, inputs={"world": micro_world.root})
    with pytest.raises(StageError, match=r"^download.source is 'world' but no world mirror URL") as err:
        download(ctx)
    assert "\n" not in str(err.value)
    assert list(out.iterdir()) == []


def test_world_mirror_is_served_only_when_asked_for_and_needs_the_world(micro_world):
    with world_mirror("dedup", False, {}) as url:
        assert url is None
    with pytest.raises(ValueError, match="does not read the world stage"), world_mirror("x", True, {}):
        pass
