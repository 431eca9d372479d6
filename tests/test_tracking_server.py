"""The MLflow server a run starts on a cluster of several nodes (pipeline/cluster.py): it serves the work
dir's sqlite store on 127.0.0.1 for the block, and none of its processes is left afterwards."""

import socket
from pathlib import Path
from urllib.parse import urlparse

from mlflow.tracking import MlflowClient

from pipeline.cluster import tracking_server
from pipeline.tracking import Tracker


def serving(store: Path) -> list[int]:
    """PIDs of the live processes whose command line names ``store``."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if str(store).encode() in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def test_the_run_scoped_server_serves_the_work_dirs_store_and_is_gone_after(tmp_path):
    with tracking_server(tmp_path, "127.0.0.1") as uri:
        address = urlparse(uri)
        assert address.hostname == "127.0.0.1"
        assert serving(tmp_path / "mlflow.db")
        tracker = Tracker(uri, "vlp-pipeline", tmp_path)
        # The stage runner's tags as it passes them: a seed is an int, or None when the plan has one seed.
        run_id = tracker.start_run("pretrain", tags={"stage": "pretrain", "seed": 1, "group": None})
        tracker.log(run_id, params={"worker_nodes": "a,b"})
        tracker.end(run_id)
    assert serving(tmp_path / "mlflow.db") == []
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", address.port)) != 0
    # The store the server wrote is the one a one-node run writes directly.
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id)
    assert run.data.params["worker_nodes"] == "a,b" and run.info.status == "FINISHED"
    assert run.data.tags["seed"] == "1" and "group" not in run.data.tags
