"""The download stage end to end on real Ray (2 CPUs), a real Mirror and real parquet: exact counts per
error type, tables, a SIGKILLed run that resumes to exactly the rows of an uninterrupted one, and the
in-process path writing the same files as Ray tasks."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from pipeline.config import PipelineConfig
from stages.base import StageContext, StageError
from stages.download.config import DownloadConfig
from stages.download.stage import fetches_in_process, run
from worldgen.mirror import Mirror

REPO = Path(__file__).resolve().parents[1]
HOST = "img.example.com"
TRAIN_URL = "https://storage.example.com/gcc/Train_GCC-training.tsv"
VAL_URL = "https://storage.example.com/gcc/Validation_GCC-1.1.0-Validation.tsv"
FAULTS = ("not_found", "flaky_500", "slow", "truncated", "not_image", "bomb", "huge", "redirect_loop")
N_TRAIN = 40  # train rows; every 4th is slow, so each 4-image shard takes one timeout
N_VAL = 10


def _jpeg(seed: int) -> bytes:
    im = Image.new("RGB", (40, 30), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    im.putpixel((seed % 40, seed % 30), (255, 255, 255))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _publish(www: Path, url: str, data: bytes) -> None:
    path = www / url.split("://", 1)[1].split("?", 1)[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def make_site(root: Path, slow_every: int | None) -> tuple[Path, Path]:
    """Conceptual-Captions-style TSVs on a www root. Val holds one image per fault and a non-http URL;
    with ``slow_every``, every such train row is slow (a timeout per shard keeps shards slow to fetch)."""
    www = root / "www"
    faults: dict[str, str] = {}
    train = []
    for i in range(N_TRAIN):
        url = f"http://{HOST}/train/{i}.jpg?imgmax=800"
        _publish(www, url, _jpeg(i))
        train.append(f"caption {i}\t{url}")
        if slow_every and i % slow_every == 0:
            faults[f"/{HOST}/train/{i}.jpg"] = "slow"
    val = []
    for i in range(N_VAL):
        url = f"http://{HOST}/val/{i}.jpg"
        _publish(www, url, _jpeg(1000 + i))
        val.append(f"val caption {i}\t{url}")
    for fault in FAULTS:
        url = f"https://{HOST}/val/{fault}.jpg"
        _publish(www, url, _jpeg(2000 + len(val)))
        faults[f"/{HOST}/val/{fault}.jpg"] = fault
        val.append(f"{fault} caption\t{url}")
    val.append(f"an ftp image\tftp://{HOST}/val/0.jpg")
    _publish(www, TRAIN_URL, ("\n".join(train) + "\n").encode())
    _publish(www, VAL_URL, ("\n".join(val) + "\n").encode())
    faults_file = root / "faults.json"
    faults_file.write_text(json.dumps({"slow_seconds": 3.0, "huge_bytes": 2_000_000, "paths": faults}))
    return www, faults_file


def config(mirror_url: str, **download) -> PipelineConfig:
    values = dict(
        # 2 tasks x 2 threads: no more connections at once than the mirror's accept backlog (5) holds
        source="web", mirror_url=mirror_url, shard_size=4, threads_per_task=2, max_tasks_in_flight=2,
        in_process_max_images=0,  # Ray tasks, unless a test picks the in-process path
        timeout_s=1.0, retries=1, backoff_s=0.05, max_bytes=1_000_000, max_pixels=4_000_000,
        datasets={"cc": {"files": {"train": TRAIN_URL, "val": VAL_URL}}},
    )
    return PipelineConfig(download=DownloadConfig.model_validate({**values, **download}))


def run_stage(cfg: PipelineConfig, out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    return run(StageContext(cfg=cfg, workdir=out_dir.parent, out_dir=out_dir, inputs={}))


def _identity(row: dict) -> tuple:
    return row["key"], row["status"], row["sha256"]


def image_rows(out_dir: Path) -> list[dict]:
    rows = []
    for path in sorted((out_dir / "images" / "cc").glob("shard-*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return rows


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return make_site(tmp_path_factory.mktemp("site"), slow_every=None)


def test_counts_every_error_type_and_writes_tables(ray_cluster, site, tmp_path):
    www, faults_file = site
    with Mirror(www, faults_file) as mirror:
        result = run_stage(config(mirror.base_url), tmp_path / "out")
    out = tmp_path / "out"
    m = result.metrics
    assert m["images.cc.ok"] == N_TRAIN + N_VAL + 1  # + the flaky image, fine on its retry
    assert m["images.cc.retried"] == 1
    prefix = "images.cc.failed."
    failed = {k.removeprefix(prefix): v for k, v in m.items() if k.startswith(prefix)}
    assert failed == {"http_404": 1, "timeout": 1, "truncated": 1, "not_image": 1, "decompression_bomb": 1,
                      "too_large": 1, "redirect_loop": 1, "bad_scheme": 1}
    assert m["images.cc.failed"] == 8 and m["images.total.failed"] == 8
    assert m["images.total.images"] == N_TRAIN + N_VAL + len(FAULTS) + 1 == m["images.fetched_this_run"]
    assert m["shards.total"] == 15 and m["shards.resumed"] == 0  # 59 images / 4 per shard
    assert m["images.per_second"] > 0

    rows = image_rows(out)
    assert [r["key"] for r in rows] == sorted(r["key"] for r in rows)
    assert len({r["key"] for r in rows}) == len(rows) == 59
    train0 = next(r for r in rows if r["key"] == "cc:train:0")
    assert train0["url"] == f"http://{HOST}/train/0.jpg?imgmax=800" and train0["split"] == "train"
    assert train0["image"] == (www / HOST / "train" / "0.jpg").read_bytes()
    assert sum(r["status"] == "ok" for r in rows) == m["images.cc.ok"]

    captions = pq.read_table(out / "tables" / "captions.parquet")
    assert captions.num_rows == 59
    for name in ("regions", "objects", "entities", "splits"):
        assert pq.read_table(out / "tables" / f"{name}.parquet").num_rows == 0
    assert sorted(p.name for p in (out / "metadata" / "cc").iterdir()) == [
        "Train_GCC-training.tsv", "Validation_GCC-1.1.0-Validation.tsv"]
    summary = json.loads((out / "stats" / "summary.json").read_text())
    assert summary["datasets"]["cc"]["failed"] == failed and summary["metrics"] == m
    assert result.artifacts == ["stats/summary.json"]
    shard_stats = json.loads((out / "stats" / "cc" / "shard-00000.json").read_text())
    assert shard_stats["images"] == 4 and shard_stats["corpus"] == "cc"

    # A second run over the same out_dir resumes everything and reports the same counts.
    with Mirror(www, faults_file) as mirror:
        again = run_stage(config(mirror.base_url), out)
    assert again.metrics["shards.resumed"] == 15 and again.metrics["images.fetched_this_run"] == 0
    assert {k: v for k, v in again.metrics.items() if k.startswith("images.cc.")} == {
        k: v for k, v in m.items() if k.startswith("images.cc.")}


def output_files(out: Path) -> dict[str, bytes]:
    """Every file of a download output, the timings (which differ run to run) taken out of the stats."""
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        name, data = str(path.relative_to(out)), path.read_bytes()
        if name.startswith("stats/"):
            stats = json.loads(data)
            for timing in ("seconds", "fetch_seconds"):
                stats.pop(timing, None)
            stats.get("metrics", {}).pop("images.per_second", None)
            data = json.dumps(stats, sort_keys=True).encode()
        files[name] = data
    return files


def test_in_process_path_writes_the_files_of_ray_tasks(ray_cluster, site, tmp_path):
    www, faults_file = site
    runs = {}
    # 59 images: at most 59 fetch in this process, fewer send them to Ray.
    for max_images, runner in ((58, "ray"), (59, "process")):
        with Mirror(www, faults_file) as mirror:
            result = run_stage(config(mirror.base_url, in_process_max_images=max_images), tmp_path / runner)
        assert result.params["download.runner"] == runner
        runs[runner] = output_files(tmp_path / runner)
    assert runs["process"] == runs["ray"]
    assert sum(name.startswith("images/cc/shard-") for name in runs["ray"]) == 15
    summary = json.loads(runs["ray"]["stats/summary.json"])
    assert summary["datasets"]["cc"]["ok"] == 51 and summary["datasets"]["cc"]["retried"] == 1
    assert sum(summary["datasets"]["cc"]["failed"].values()) == 8

    # The threshold counts the images a resumed run has left: two 4-image shards here.
    out = tmp_path / "process"
    for max_images, runner in ((7, "ray"), (8, "process")):
        for index in (0, 1):
            (out / "stats" / "cc" / f"shard-0000{index}.json").unlink()
        with Mirror(www, faults_file) as mirror:
            result = run_stage(config(mirror.base_url, in_process_max_images=max_images), out)
        assert result.params["download.runner"] == runner
        assert result.metrics["images.fetched_this_run"] == 8 and result.metrics["shards.resumed"] == 13
        files = output_files(out)
        # The summary also tells this run's resume counts; its per-dataset counts are those of a whole run.
        resumed, whole = (json.loads(f.pop("stats/summary.json")) for f in (files, dict(runs["ray"])))
        assert files == {name: data for name, data in runs["ray"].items() if name != "stats/summary.json"}
        assert resumed["datasets"] == whole["datasets"] and resumed["resumed_shards"] == 13
    assert fetches_in_process(0, 0) and not fetches_in_process(1, 0)


def test_malformed_metadata_is_one_line_and_fetches_nothing(ray_cluster, tmp_path):
    www = tmp_path / "www"
    _publish(www, TRAIN_URL, b"caption without a url\n")
    with Mirror(www) as mirror, pytest.raises(StageError) as err:
        run_stage(config(mirror.base_url, datasets={"cc": {"files": {"train": TRAIN_URL}}}), tmp_path / "out")
    assert str(err.value) == (f"{tmp_path}/out/metadata/cc/Train_GCC-training.tsv: record 0 (cc:train:0): "
                              "field 'url': expected 'caption<TAB>url', got 1 tab-separated fields")
    assert not (tmp_path / "out" / "images").exists()


def _session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (Ray puts each worker in its own process group, not session)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, _pgrp, session = stat.read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, ValueError):
            continue
        if int(session) == sid and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


def kill_session(sid: int) -> None:
    """SIGKILL every process of the session, until none is left that could still write a file."""
    deadline = time.monotonic() + 10
    while pids := _session_members(sid):
        assert time.monotonic() < deadline, f"processes {pids} survive SIGKILL"
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


_CHILD = """
import json, sys
from pathlib import Path
import ray
from pipeline.config import PipelineConfig
from stages.base import StageContext
from stages.download.stage import fetches_in_process, run
cfg = PipelineConfig.model_validate(json.loads(sys.argv[1]))
out = Path(sys.argv[2])
ray.init(address="local", num_cpus=2, include_dashboard=False)
run(StageContext(cfg=cfg, workdir=out.parent, out_dir=out, inputs={}))
"""


def test_killed_run_resumes_to_the_rows_of_an_uninterrupted_run(ray_cluster, tmp_path):
    www, faults_file = make_site(tmp_path / "site", slow_every=4)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    killed.mkdir()
    with Mirror(www, faults_file) as mirror:
        cfg = config(mirror.base_url, retries=0, datasets={"cc": {"files": {"train": TRAIN_URL}}})
        # In its own session, so the kill can take its whole local Ray cluster down, workers mid-write.
        child = subprocess.Popen([sys.executable, "-c", _CHILD, cfg.model_dump_json(), str(killed)],
                                 cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
        stats_dir = killed / "stats" / "cc"
        # The child starts its own local Ray first: on a loaded machine that alone took over a minute.
        deadline = time.monotonic() + 240
        try:
            while len(list(stats_dir.glob("shard-*.json"))) < 2:
                assert child.poll() is None, "the stage finished before it could be killed"
                assert time.monotonic() < deadline, "no shard committed within 240 s"
                time.sleep(0.05)
        finally:
            kill_session(child.pid)
            child.wait()
        committed = len(list(stats_dir.glob("shard-*.json")))
        assert 2 <= committed < 10, committed

        # What a kill between the parquet and the stats write leaves: the shard must be redone.
        sorted(stats_dir.glob("shard-*.json"))[0].unlink()
        (killed / "images" / "cc" / "shard-00009.parquet.x1y2.tmp").write_bytes(b"half a parquet")

        resumed = run_stage(cfg, killed)
        uninterrupted = run_stage(cfg, clean)

    assert not list(killed.rglob("*.tmp"))
    assert resumed.metrics["shards.resumed"] == committed - 1
    assert resumed.metrics["images.fetched_this_run"] == 40 - 4 * (committed - 1)
    got, want = image_rows(killed), image_rows(clean)
    assert [_identity(r) for r in got] == [_identity(r) for r in want]
    assert len({r["key"] for r in got}) == len(got) == N_TRAIN
    assert sum(r["status"] == "timeout" for r in got) == N_TRAIN // 4
    for name in ("ok", "failed", "retried", "bytes"):
        assert resumed.metrics[f"images.cc.{name}"] == uninterrupted.metrics[f"images.cc.{name}"]
