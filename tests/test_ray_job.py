"""The README's cluster path for real: a local Ray head, `ray job submit --working-dir .`, the CLI inside."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import REPO_ROOT

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture()
def cluster():
    import ray

    if ray.is_initialized():  # `ray stop` below ends every Ray process on this machine
        ray.shutdown()
    subprocess.run(
        ["bash", "cluster/local_cluster.sh", "start", "0", "2"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
    )
    try:
        yield "http://127.0.0.1:8265"
    finally:
        subprocess.run(["bash", "cluster/local_cluster.sh", "stop"], cwd=REPO_ROOT, capture_output=True)


def test_job_submit_runs_the_pipeline_on_the_cluster(cluster, tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    cmd = [
        RAY,
        "job",
        "submit",
        "--address",
        cluster,
        "--working-dir",
        ".",
        "--",
        "python",
        "pipeline/run.py",
        "--stage",
        "dedup",
        "--config",
        "configs/tiny.yaml",
        "--workdir",
        str(tmp_path),
    ]
    # The head's job agent starts some seconds after `ray start` returns (over a minute on a loaded machine).
    deadline = time.monotonic() + 300
    while True:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in proc.stdout + proc.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    (dedup,) = [p for p in (tmp_path / "dedup").iterdir() if not p.name.startswith(".")]
    report = json.loads((dedup / "report.json").read_text())
    (world,) = [p for p in (tmp_path / "world").iterdir() if not p.name.startswith(".")]
    truth = json.loads((world / "truth.json").read_text())
    assert {ds: {r: n for r, n in v.items() if n} for ds, v in report["removed"].items()} == truth["removed"]
    assert (tmp_path / "mlflow.db").is_file()
