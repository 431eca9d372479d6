"""A real two-node Ray cluster on this machine (cluster/local_cluster.py), with an unrelated Ray instance
running beside it the whole time:

- the README's cluster path: `ray job submit --working-dir .` runs the pipeline (micro config, up to
  pretraining, two workers spread over the two nodes), results read back through the cluster's MLflow server
  on 127.0.0.1 (REST API);
- a worker node SIGKILLed mid-pretraining: the run resumes from its last checkpoint on the node left and
  finishes with the step count intact; the node then returns;
- a run whose workers cannot be placed fails after a finite number of attempts with one line;
- `stop` ends exactly the cluster's processes: the unrelated instance still runs tasks afterwards.
(A worker *process* killed mid-pretraining: tests/test_pretrain.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from test_pretrain import build_store, checkpoint_steps

from pipeline.config import REPO_ROOT
from stages.pretrain.stage import RUN_NAME

pytestmark = pytest.mark.slow

LAUNCHER = REPO_ROOT / "cluster" / "local_cluster.py"
BYSTANDER = REPO_ROOT / "tests" / "bystander_ray.py"
MARK = "VLP_CLUSTER_NODE"


def launcher(root: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(LAUNCHER), "--dir", str(root), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"launcher {args}: {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
    return proc


def status(root: Path) -> dict:
    return json.loads(launcher(root, "status", "--json").stdout)


def marked_processes(prefix: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if f"{MARK}={prefix}".encode() in env:
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def bystander():
    """Another user's Ray on this machine (its own temp dir: Ray's default one is whoever else's here)."""
    root = Path(tempfile.mkdtemp(prefix="vlpb-", dir="/tmp"))
    subprocess.run([sys.executable, str(BYSTANDER), "start", str(root), "--temp-dir", str(root / "ray")],
                   check=True, timeout=300)
    yield root
    subprocess.run([sys.executable, str(BYSTANDER), "stop", str(root)], timeout=120)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(bystander):
    """Head (2 CPUs) + one worker node (1 CPU); a short --dir, for Ray's socket paths."""
    root = Path(tempfile.mkdtemp(prefix="vlpc-", dir="/tmp"))
    launcher(root, "start", "--workers", "1", "--head-cpus", "2", "--worker-cpus", "1",
             "--object-store-mb", "512", "--workdir", str(root / "work"))
    info = status(root)
    try:
        yield root, info
    finally:
        out = launcher(root, "stop").stdout
        assert "stopped" in out
        # Exactly its own processes are gone; the unrelated instance still runs tasks.
        assert marked_processes(f"{info['id']}/") == []
        check = subprocess.run([sys.executable, str(BYSTANDER), "check", str(bystander)], capture_output=True,
                               text=True)
        assert check.returncode == 0, check.stderr
        shutil.rmtree(root, ignore_errors=True)


def node_ids(info: dict) -> dict[str, str]:
    return {n["name"]: n["node_id"] for n in info["nodes"]}


def mlflow_get(base: str, path: str, **query) -> dict:
    url = f"{base}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def mlflow_post(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_job_submit_runs_pretraining_spread_over_both_nodes(cluster):
    root, info = cluster
    workdir = Path(info["workdir"])
    assert len(info["nodes"]) == 2 and all(n["alive"] for n in info["nodes"])
    assert info["mlflow_url"].startswith("http://127.0.0.1:")
    # The launcher's documented job line, with this entrypoint.
    submit = info["submit"][: info["submit"].index("--") + 1] + [
        "python", "pipeline/run.py", "--stage", "pretrain", "--config", "configs/micro.yaml",
        "--workdir", str(workdir), "pretrain.num_workers=2", "ray.placement.pretrain=spread"]
    env = os.environ | info["auth_env"]
    deadline = time.monotonic() + 300
    while True:  # the head's job agent may need a moment more after `start` (Ray: 'No available agent')
        proc = subprocess.run(submit, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1500)
        if "No available agent" not in proc.stdout + proc.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in output, output[-4000:]

    # The stages wrote to the absolute work dir (the job's cwd is a temp copy of the repo).
    (dedup,) = [p for p in (workdir / "dedup").iterdir() if not p.name.startswith(".")]
    report = json.loads((dedup / "report.json").read_text())
    (world,) = [p for p in (workdir / "world").iterdir() if not p.name.startswith(".")]
    truth = json.loads((world / "truth.json").read_text())
    assert {ds: {r: n for r, n in v.items() if n} for ds, v in report["removed"].items()} == truth["removed"]

    # Read back through the cluster's MLflow server: the pretrain run, its workers on both nodes.
    base = info["mlflow_url"]
    experiment = mlflow_get(base, "experiments/get-by-name", experiment_name="vlp-pipeline")["experiment"]
    runs = mlflow_post(base, "runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                             "filter": "tags.stage = 'pretrain'"})["runs"]
    (run,) = runs
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics["steps"] == 6 and metrics["workers/nodes"] == 2
    assert params["placement"] == "spread" and params["attempts"] == "1"
    assert sorted(params["worker_nodes"].split(",")) == sorted(node_ids(info).values())
    # Every stage of the job tracked through the server (one child run per stage, all finished).
    all_runs = mlflow_post(base, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in all_runs]
    assert {t["stage"] for t in tags if "stage" in t} >= {"world", "download", "dedup", "features", "txtdb",
                                                          "pretrain"}
    assert {r["info"]["status"] for r in all_runs} == {"FINISHED"}


# A driver of the cluster in its own process (Ray reads RAY_AUTH_MODE once per process, and this one's Ray
# stays out of it): one pretraining run through build_trainer/fit, its outcome written as JSON.
DRIVER = r"""
import json, os, sys, time
from dataclasses import dataclass
from pathlib import Path

import ray
from stages.base import StageError
from stages.outputs.features import FeaturesOutput
from stages.outputs.txt_db import TxtDbOutput
from stages.pretrain import checkpointing
from stages.pretrain.data import PretrainInputs
from stages.pretrain.stage import build_trainer, fit
from test_pretrain import FP32, SEED, LogSteps, loop_config


@dataclass
class PauseAt:
    # Every rank waits at `step` until `release` exists (at most 2 minutes), once.
    step: int
    release: str
    waiting: str

    def __call__(self, event):
        if event.step != self.step or os.path.exists(self.release):
            return
        Path(f"{self.waiting}.{event.rank}").touch()
        deadline = time.time() + 120
        while not os.path.exists(self.release) and time.time() < deadline:
            time.sleep(0.1)


a = json.loads(sys.argv[1])
ray.init(address=a["gcs"], logging_level="WARNING", runtime_env={"env_vars": {
    "PYTHONPATH": os.environ["PYTHONPATH"], "RAY_ADDRESS": a["gcs"],
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"}})
store = PretrainInputs(TxtDbOutput(Path(a["store"]) / "txtdb"), FeaturesOutput(Path(a["store"]) / "features"))
hooks = [LogSteps(a["steps_log"]), PauseAt(5, a["release"], a["waiting"])] if a.get("pause") else []
trainer = build_trainer(loop_config(**a["cfg"]), store, Path(a["storage"]), seed=SEED, runtime=FP32,
                        placement=a["placement"], controller_failure_limit=a["limit"], hooks=hooks)
try:
    result = fit(trainer, Path(a["storage"]))
    with result.checkpoint.as_directory() as d:
        state = checkpointing.load_state(Path(d))
        out = {"step": result.metrics["step"], "progress": checkpointing.load_progress(Path(d)),
               "state_step": state["step"], "sampler_step": state["task_sampler"]["step"]}
except StageError as err:
    out = {"error": str(err)}
Path(a["out"]).write_text(json.dumps(out))
"""


def drive(info: dict, tmp_path: Path, store, **args) -> subprocess.Popen:
    args = {"gcs": info["gcs_address"], "store": str(store.txtdb.root.parent), "placement": "spread",
            "out": str(tmp_path / "out.json"), "storage": str(tmp_path / "ray_train"), "limit": 3} | args
    env = os.environ | info["auth_env"] | {"PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'tests'}"}
    return subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(args)], cwd=tmp_path, env=env,
                            stdout=open(tmp_path / "driver.log", "w"), stderr=subprocess.STDOUT)


def outcome(proc: subprocess.Popen, tmp_path: Path, timeout: float = 900) -> dict:
    proc.wait(timeout=timeout)
    log = (tmp_path / "driver.log").read_text()
    assert proc.returncode == 0 and (tmp_path / "out.json").is_file(), log[-4000:]
    return json.loads((tmp_path / "out.json").read_text())


def alive_node_ids(info: dict) -> set[str]:
    code = (f"import json, ray; ray.init(address={info['gcs_address']!r}, logging_level='ERROR'); "
            "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))")
    proc = subprocess.run([sys.executable, "-c", code], env=os.environ | info["auth_env"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("store"), n_images=40)


def test_a_killed_worker_node_resumes_from_the_last_checkpoint_with_the_step_count_intact(
        cluster, store, tmp_path):
    root, info = cluster
    ids = node_ids(info)
    storage, steps_log = tmp_path / "ray_train", tmp_path / "steps.txt"
    snapshot = storage / RUN_NAME / "checkpoint_manager_snapshot.json"
    # 8 steps, a checkpoint every 2, two workers spread over the two nodes; all wait at step 5.
    driver = drive(info, tmp_path, store, cfg={"max_failures": 2}, pause=True, steps_log=str(steps_log),
                   release=str(tmp_path / "release"), waiting=str(tmp_path / "waiting"))
    killed = None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and driver.poll() is None:
        latest = {}
        if snapshot.is_file():
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
        if latest.get("metrics", {}).get("step", 0) >= 4 and len(list(tmp_path.glob("waiting.*"))) == 2:
            killed = launcher(root, "kill-node", "w1").stdout  # SIGKILL of its raylet, mid-step 5
            break
        time.sleep(0.2)
    (tmp_path / "release").touch()
    result = outcome(driver, tmp_path)
    assert killed and "SIGKILL" in killed

    # Steps 1-5 on both nodes (step 5's update lost with the node), then 5-8 resumed from step 4's checkpoint.
    assert [int(s) for s in steps_log.read_text().split()] == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    assert checkpoint_steps(storage) == [2, 4, 6, 8]
    assert result["step"] == result["state_step"] == result["sampler_step"] == 8
    first, *_, last = result["progress"]["attempts"]
    assert first["step"] == 0 and sorted(first["nodes"]) == sorted(ids.values())  # spread over both nodes
    assert last["step"] == 4 and set(last["nodes"]) == {ids["head"]}  # resumed on the node left

    # The node returns: a fresh raylet under the same name joins, and Ray counts two live nodes again.
    assert {n["name"]: n["alive"] for n in status(root)["nodes"]} == {"head": True, "w1": False}
    launcher(root, "add-node", "--name", "w1")
    back = {n["name"]: n for n in status(root)["nodes"]}
    assert back["w1"]["alive"] and back["w1"]["node_id"] != ids["w1"]
    assert alive_node_ids(info) == {ids["head"], back["w1"]["node_id"]}


def test_workers_that_cannot_be_placed_fail_after_a_finite_number_of_attempts(cluster, store, tmp_path):
    _, info = cluster
    # Three workers, one per node, on two nodes: the placement group never fits; two attempts of 10 s each.
    start = time.monotonic()
    result = outcome(drive(info, tmp_path, store, cfg={"num_workers": 3}, placement="strict_spread", limit=1),
                     tmp_path)
    message = result["error"]
    assert "\n" not in message
    assert message.startswith("pretrain: 3 workers (STRICT_SPREAD") and "after 2 attempts" in message, message
    assert time.monotonic() - start < 300
