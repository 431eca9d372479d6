"""The real CLI on the tiny world: stage graph on a local Ray, cache behaviour, MLflow runs, bad input."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from mlflow.tracking import MlflowClient

from pipeline.config import REPO_ROOT
from pipeline.run import main
from stages.outputs.world import WorldOutput

TINY = REPO_ROOT / "configs" / "tiny.yaml"

pytestmark = pytest.mark.slow


def run(workdir: Path, *args: str) -> int:
    return main(["--config", str(TINY), "--workdir", str(workdir), *args])


def outputs(workdir: Path, stage: str) -> list[str]:
    return sorted(p.name for p in (workdir / stage).iterdir() if not p.name.startswith("."))


def child_runs(workdir: Path) -> dict[str, list]:
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    exp = client.get_experiment_by_name("vlp-pipeline")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    by_parent: dict[str, list] = {p.info.run_id: [] for p in parents}
    for r in runs:
        if "mlflow.parentRunId" in r.data.tags:
            by_parent[r.data.tags["mlflow.parentRunId"]].append(r)
    return {p.info.run_id: by_parent[p.info.run_id] for p in parents}


# These two run before the module's shared Ray (below) exists: each invocation starts and stops its own.
def test_bad_config_is_one_line_and_runs_nothing(tmp_path, capsys):
    assert run(tmp_path, "--stage", "dedup", "download.timeout_s=oops") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "download.timeout_s" in err
    assert not (tmp_path / "download").exists()


def test_unreachable_mirror_fails_cleanly(tmp_path, capsys):
    code = run(
        tmp_path, "--stage", "download", "download.source=web", "download.mirror_url=http://127.0.0.1:9"
    )
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "127.0.0.1:9" in err[-1]
    assert outputs(tmp_path, "download") == []
    runs = list(child_runs(tmp_path).values())[-1]
    assert [r.info.status for r in runs] == ["FAILED"]


@pytest.fixture(scope="module")
def shared_ray():
    """One Ray for the module's CLI runs (the CLI keeps a connection its caller made; one per run costs
    seconds each). Runs that start their own: tests/test_graph.py and the two tests above."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, shared_ray):
    wd = tmp_path_factory.mktemp("work")
    assert run(wd, "--stage", "dedup") == 0
    return wd


def world_truth(workdir: Path) -> dict:
    return WorldOutput(workdir / "world" / outputs(workdir, "world")[0]).truth()


def test_dedup_removes_exactly_the_planted_overlaps(workdir):
    truth = world_truth(workdir)
    dedup = workdir / "dedup" / outputs(workdir, "dedup")[0]
    report = json.loads((dedup / "report.json").read_text())
    removed = {ds: {r: n for r, n in reasons.items() if n} for ds, reasons in report["removed"].items()}
    assert removed == truth["removed"]
    removed_keys = {(r["corpus"], r["key"]) for r in pq.read_table(dedup / "removed.parquet").to_pylist()}
    truth_keys = {(o["dataset"], o["key"]) for o in truth["overlaps"]}
    assert removed_keys == truth_keys


def test_download_counts_every_fault_under_its_own_type(workdir):
    truth = world_truth(workdir)
    download = workdir / "download" / outputs(workdir, "download")[0]
    manifest = (download / "manifest.json").read_text()
    metrics = json.loads(manifest)["metrics"]
    # The graph served the world on a loopback mirror; its address (a random port) is in no output.
    for text in (manifest, (download / "stats" / "summary.json").read_text()):
        assert "127.0.0.1" not in text
    errors = pq.read_table(download / "images", columns=["error"]).column("error").to_pylist()
    assert not [e for e in errors if e and "127.0.0.1" in e]
    for ds, errors in truth["expected_failures"].items():
        for error, n in errors.items():
            assert metrics[f"images.{ds}.failed.{error}"] == n, (ds, error)
    for ds, n_images in truth["images"].items():
        failed = sum(truth["expected_failures"].get(ds, {}).values())
        assert metrics[f"images.{ds}.ok"] == n_images - failed, ds
        assert metrics.get(f"images.{ds}.retried", 0) == truth["expected_retried"].get(ds, 0), ds


def test_mlflow_holds_parent_and_stage_runs_with_reports(workdir):
    ((parent, children),) = child_runs(workdir).items()
    names = [r.info.run_name for r in children]
    assert sorted(names) == ["dedup", "download", "world"]
    by_name = {r.info.run_name: r for r in children}
    assert all(r.data.tags["cached"] == "false" for r in children)
    assert by_name["dedup"].data.metrics["removed.total"] > 0
    assert by_name["download"].data.metrics["images.cc.failed.timeout"] == 1
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    assert {"report.json", "report.md", "removed.parquet"} <= {
        a.path for a in client.list_artifacts(by_name["dedup"].info.run_id)
    }
    assert "config.yaml" in {a.path for a in client.list_artifacts(parent)}
    assert client.get_run(parent).data.params["download.timeout_s"] == "1.0"


def test_cache_hits_and_invalidation(workdir, monkeypatch):
    before = {s: outputs(workdir, s) for s in ("world", "download", "dedup")}
    # Nothing changed: everything is skipped and every stage run says so, without touching Ray.
    with monkeypatch.context() as m:
        m.setattr("pipeline.run.connect", lambda *_: pytest.fail("a fully cached run connected to Ray"))
        assert run(workdir, "--stage", "dedup") == 0
    last = list(child_runs(workdir).values())[-1]
    assert {r.data.tags["cached"] for r in last} == {"true"}
    assert [r.info.status for r in last] == ["FINISHED"] * 3
    assert {s: outputs(workdir, s) for s in before} == before

    # A value only dedup reads: dedup reruns, nothing upstream does.
    assert run(workdir, "--stage", "dedup", "dedup.reasons.url=false") == 0
    last = {r.info.run_name: r.data.tags["cached"] for r in list(child_runs(workdir).values())[-1]}
    assert last == {"world": "true", "download": "true", "dedup": "false"}
    assert len(outputs(workdir, "dedup")) == 2 and outputs(workdir, "download") == before["download"]

    # A value download reads: download and everything downstream rerun, the world does not.
    assert run(workdir, "--stage", "dedup", "download.retries=2") == 0
    last = {r.info.run_name: r.data.tags["cached"] for r in list(child_runs(workdir).values())[-1]}
    assert last == {"world": "true", "download": "false", "dedup": "false"}
    assert outputs(workdir, "world") == before["world"]

    # --stage X runs only X and its upstream; --force recomputes only X.
    assert run(workdir, "--stage", "world", "--force") == 0
    last = {r.info.run_name: r.data.tags["cached"] for r in list(child_runs(workdir).values())[-1]}
    assert last == {"world": "false"}
    assert outputs(workdir, "world") == before["world"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_results_browsable_through_a_real_mlflow_server(workdir):
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    server = subprocess.Popen(
        [
            mlflow_bin,
            "server",
            "--backend-store-uri",
            f"sqlite:///{workdir}/mlflow.db",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).read()
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "mlflow server did not come up"
                time.sleep(0.5)
        exp = json.loads(
            urllib.request.urlopen(
                f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=vlp-pipeline"
            ).read()
        )
        exp_id = exp["experiment"]["experiment_id"]
        req = urllib.request.Request(
            f"{base}/api/2.0/mlflow/runs/search",
            data=json.dumps({"experiment_ids": [exp_id], "filter": "tags.stage = 'dedup'"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        runs = json.loads(urllib.request.urlopen(req).read())["runs"]
        first = min(runs, key=lambda r: r["info"]["start_time"])
        metrics = {m["key"]: m["value"] for m in first["data"]["metrics"]}
        truth = world_truth(workdir)
        assert metrics["removed.total"] == sum(
            n for reasons in truth["removed"].values() for n in reasons.values()
        )
        report = json.loads(
            urllib.request.urlopen(
                f"{base}/get-artifact?path=report.json&run_uuid={first['info']['run_id']}"
            ).read()
        )
        assert report["removed"]["cc"]["content_hash"] == metrics["removed.cc.content_hash"]
    finally:
        server.terminate()
        server.wait(timeout=30)
