"""Where the pipeline runs: the Ray cluster it starts or joins, the address everything it starts is given,
and what a cluster of several nodes needs (a work dir every node sees, a tracking server instead of sqlite).

Ray code that looks for "the" cluster without being told (Ray Train's placement-group cleaner queries the
State API that way) fails with ``ConnectionError: Found multiple active Ray instances`` while another Ray runs
on the machine, or finds the wrong one; every stage task therefore gets ``RAY_ADDRESS`` in its runtime
environment, and Ray hands it down to what the task starts (Train controllers, workers, cleaners).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from stages.base import StageError

log = logging.getLogger("vlp.pipeline")


def connect(num_cpus: int | None) -> tuple[str, bool]:
    """Join the cluster named by RAY_ADDRESS (as under ``ray job submit``) or start a local Ray for this run;
    returns the cluster's GCS address and whether this call connected. A caller already connected (a
    notebook, a test running many invocations) keeps its connection, and the run must leave it open."""
    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address, False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # "local", never None: None would join a cluster another `ray start` left in /tmp/ray. The dashboard
        # (on a free loopback port, not 8265, which a cluster started beside it may hold) serves the State
        # API, by which Ray Train's placement group cleaner sees that a run's controller is gone: without it,
        # the workers' CPUs of a run whose process ended first (a Tune trial) stayed reserved.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=_free_port("127.0.0.1"), log_to_driver=True)
    return ray.get_runtime_context().gcs_address, True


def runtime_env(gcs_address: str) -> dict[str, Any]:
    """The runtime environment of every stage task (and so of all it starts)."""
    return {"env_vars": {"RAY_ADDRESS": gcs_address}}


def alive_nodes() -> list[dict[str, Any]]:
    return [n for n in ray.nodes() if n.get("Alive")]


@ray.remote(num_cpus=0, max_retries=0)
def _sees(path: str) -> bool:
    return Path(path).is_file()


def check_shared_workdir(workdir: Path, nodes: list[dict[str, Any]], timeout_s: float = 300) -> None:
    """Stage outputs, checkpoints and the tracking store live in the work dir, which every node must see:
    a file written here is looked for by a task pinned to each node."""
    if len(nodes) < 2:
        return
    marker = workdir / f".nodes-check-{uuid.uuid4().hex}"
    marker.write_text("")
    try:
        refs = [_sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(marker)) for n in nodes]
        seen = ray.get(refs, timeout=timeout_s)
    finally:
        marker.unlink(missing_ok=True)
    blind = [n["NodeID"][:12] for n, ok in zip(nodes, seen, strict=True) if not ok]
    if blind:
        raise StageError(f"--workdir {workdir} is not visible on {len(blind)} of {len(nodes)} nodes "
                         f"({', '.join(blind)}): put it on storage every node mounts at the same path "
                         "(NFS, EFS, a ReadWriteMany volume)")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def tracking_server(workdir: Path, host: str, timeout_s: float = 180) -> Iterator[str]:
    """An ``mlflow server`` over ``sqlite:///<workdir>/mlflow.db`` (the store a one-node run writes directly)
    on ``host``, for the block; yields its URI. Stopped by PID when the block ends."""
    port = _free_port(host)
    mlflow = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow), "server", "--host", host, "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{workdir}/mlflow.db",
           "--artifacts-destination", str(workdir / "mlartifacts")]
    logfile = workdir / ".mlflow-server.log"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with open(logfile, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=workdir, start_new_session=True)
    uri = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise StageError(f"the MLflow server for this run did not start on {uri} (log: {logfile})")
            time.sleep(0.5)
        log.info("tracking through an MLflow server on %s (pid %d), store sqlite:///%s/mlflow.db", uri,
                 proc.pid, workdir)
        yield uri
    finally:
        # Its own process group (start_new_session): the server and the workers it forked, nothing else.
        for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 20)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        with suppress(ProcessLookupError):  # a worker the server forked that outlived it
            os.killpg(proc.pid, signal.SIGKILL)
