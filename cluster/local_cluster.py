#!/usr/bin/env python
"""A Ray cluster of several nodes on this machine: a head and worker nodes as separate raylets, each with its
own CPUs, custom resource, label, ports and temp dir, token auth on, and (with worker nodes) an MLflow
tracking server on 127.0.0.1 beside the head.

    python cluster/local_cluster.py start [--workers 1] [--head-cpus 2] [--worker-cpus 1] [--workdir W]
    python cluster/local_cluster.py status [--json]
    python cluster/local_cluster.py env                 # exports and the `ray job submit` line
    python cluster/local_cluster.py kill-node w1        # SIGKILL every process of that node (a crash)
    python cluster/local_cluster.py add-node [--name w2] [--cpus 1]   # a node joins (or a lost one returns)
    python cluster/local_cluster.py stop

Everything lives under ``--dir`` (default ``$VLP_CLUSTER_DIR`` or ``/tmp/vlp-cluster-<uid>``):
``cluster.json`` (the nodes, their PIDs and ports), ``auth_token`` (this cluster's own Ray token, mode
0600), one temp dir and one log per node. Every process the launcher starts carries
``VLP_CLUSTER_NODE=<cluster id>/<node>`` in its environment, and Ray hands a node's environment down to
everything it spawns on it (raylet, GCS, agents, workers, job drivers), so ``stop`` finds exactly this
cluster's processes, even workers Ray renamed ``ray::IDLE`` or orphaned, and signals them by PID. It never
runs ``ray stop``, which stops every Ray on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # ray and mlflow of this interpreter's environment
STATE = "cluster.json"
MARK = "VLP_CLUSTER_NODE"
MLFLOW = "mlflow"  # the name of the tracking server in cluster.json's process table
# A Unix socket path holds at most 107 bytes; Ray puts <temp dir>/session_<date>_<pid>/sockets/plasma_store.
SOCKET_TAIL = len("/session_2026-12-03_09-32-58_201073_60280/sockets/plasma_store")
# What a job's --working-dir upload leaves out besides .gitignore'd paths (work/ is one) and Ray's defaults
# (.git, .venv): data and outputs at the top of the repository. Patterns are gitwildmatch: anchored with a
# leading '/', since a bare 'data/' would also drop vlp/data/ and worldgen/data/.
EXCLUDES = ["/data/", "/work/", "/mlruns/", "/mlartifacts/", "/*.db", "/ray_results/", "/.cluster/"]


class ClusterError(RuntimeError):
    """One line for the user."""


def default_dir() -> Path:
    return Path(os.environ.get("VLP_CLUSTER_DIR") or f"/tmp/vlp-cluster-{os.getuid()}")


# --- processes, by PID -------------------------------------------------------------------------------------

def _proc_env(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    out = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _is_running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def marked(value: str, prefix: bool = False) -> list[int]:
    """PIDs of the processes whose environment has ``VLP_CLUSTER_NODE=value`` (or starting with it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        got = _proc_env(pid).get(MARK)
        if got is not None and (got.startswith(value) if prefix else got == value) and _is_running(pid):
            pids.append(pid)
    return sorted(pids)


def raylet_pid(mark: str) -> int | None:
    for pid in marked(mark):
        cmd = _cmdline(pid)
        if cmd and Path(cmd[0]).name == "raylet":
            return pid
    return None


def raylet_node_id(pid: int) -> str | None:
    for arg in _cmdline(pid):
        if arg.startswith("--node_id="):
            return arg.split("=", 1)[1]
    return None


def terminate(pids: list[int], grace_s: float = 10.0) -> list[int]:
    """SIGTERM ``pids``, SIGKILL what is left after ``grace_s``; returns the PIDs signalled."""
    sent = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            sent.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_is_running(p) for p in sent):
        time.sleep(0.2)
    for pid in sent:
        if _is_running(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return sent


# --- ports ----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:  # Ray's servers bind every interface: the port must be free on all of them
        s.bind(("", 0))
        return s.getsockname()[1]


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def worker_port_range(count: int, taken: list[tuple[int, int]]) -> tuple[int, int]:
    """``count`` consecutive free ports in 20000-32767 (below Linux's ephemeral range), clear of ``taken``."""
    rng = random.Random()
    for _ in range(200):
        lo = rng.randrange(20000, 32768 - count)
        hi = lo + count - 1
        if any(lo <= t_hi and t_lo <= hi for t_lo, t_hi in taken):
            continue
        if all(_bindable(p) for p in range(lo, hi + 1)):
            return lo, hi
    raise ClusterError(f"no {count} consecutive free ports found in 20000-32767 for Ray's worker processes")


# --- state ----------------------------------------------------------------------------------------------

class Cluster:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.path = self.root / STATE
        self.state: dict = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1, sort_keys=True) + "\n")
        tmp.replace(self.path)

    @property
    def token_path(self) -> Path:
        return self.root / "auth_token"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.state['gcs_port']}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.state['dashboard_port']}"

    @property
    def mlflow_url(self) -> str | None:
        port = self.state.get("mlflow_port")
        return f"http://127.0.0.1:{port}" if port else None

    def mark(self, name: str) -> str:
        return f"{self.state['id']}/{name}"

    def auth_env(self) -> dict[str, str]:
        """What a client of this cluster (ray job submit, ray.init(address=...)) needs in its environment."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token_path.read_text().strip()}"}

    def node_env(self, name: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_API_SERVER_ADDRESS", MARK)}
        # A job's entrypoint runs `python` from the head's PATH: make it this environment's.
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        return env | self.auth_env() | {MARK: self.mark(name)}

    def alive(self) -> bool:
        return bool(self.state) and bool(marked(f"{self.state['id']}/", prefix=True))


# --- commands -------------------------------------------------------------------------------------------

def _wait_for_log(proc: subprocess.Popen, log: Path, text: str, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.is_file() and text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
            tail = " | ".join(lines[-3:])
            raise ClusterError(f"{what} exited with status {proc.returncode}: {tail} (log: {log})")
        time.sleep(0.3)
    raise ClusterError(f"{what} did not come up within {timeout_s:.0f}s (log: {log})")


def _http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _wait_http(url: str, timeout_s: float, what: str, headers: dict[str, str] | None = None,
               proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _http_ok(url, headers):
            return
        if proc is not None and proc.poll() is not None:
            raise ClusterError(f"{what} exited with status {proc.returncode}")
        time.sleep(0.5)
    raise ClusterError(f"{what} did not answer on {url} within {timeout_s:.0f}s")


def start_node(c: Cluster, name: str, cpus: int, head: bool, object_store_mb: int,
               worker_ports: int = 200, timeout_s: float = 180) -> dict:
    tmp = c.root / name
    tmp.mkdir(parents=True, exist_ok=True)
    taken = [tuple(n["worker_ports"]) for n in c.state["nodes"].values()]
    lo, hi = worker_port_range(worker_ports, taken)
    ports = {k: free_port() for k in ("node_manager", "object_manager", "agent_listen", "agent_grpc",
                                      "metrics_export", "runtime_env_agent")}
    cmd = [
        str(BIN / "ray"), "start", "--block", "--disable-usage-stats",
        "--temp-dir", str(tmp), "--node-ip-address", "127.0.0.1",
        "--num-cpus", str(cpus), "--num-gpus", "0",
        "--resources", json.dumps({f"vlp_{name}": 1}), "--labels", f"vlp-node={name}",
        "--object-store-memory", str(object_store_mb * 2**20),
        "--node-manager-port", str(ports["node_manager"]),
        "--object-manager-port", str(ports["object_manager"]),
        "--min-worker-port", str(lo), "--max-worker-port", str(hi),
        "--dashboard-agent-listen-port", str(ports["agent_listen"]),
        "--dashboard-agent-grpc-port", str(ports["agent_grpc"]),
        "--metrics-export-port", str(ports["metrics_export"]),
        "--runtime-env-agent-port", str(ports["runtime_env_agent"]),
    ]
    if head:
        cmd += ["--head", "--port", str(c.state["gcs_port"]), "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(c.state["dashboard_port"]), "--include-dashboard", "true",
                "--ray-client-server-port", str(c.state["client_port"])]
    else:
        cmd += ["--address", c.gcs_address]
    log = c.root / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=c.node_env(name), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=c.root)
    node = {"name": name, "head": head, "cpus": cpus, "resource": f"vlp_{name}", "label": f"vlp-node={name}",
            "temp_dir": str(tmp), "log": str(log), "pid": proc.pid, "ports": ports, "worker_ports": [lo, hi]}
    c.state["nodes"][name] = node
    c.save()  # before waiting: a node that fails to come up is still stopped by `stop`
    _wait_for_log(proc, log, "block forever", timeout_s, f"node {name!r} (`ray start`, pid {proc.pid})")
    deadline = time.monotonic() + 30
    while (pid := raylet_pid(c.mark(name))) is None and time.monotonic() < deadline:
        time.sleep(0.3)
    node["raylet_pid"] = pid
    node["node_id"] = raylet_node_id(pid) if pid else None
    c.save()
    return node


def start_mlflow(c: Cluster, workdir: Path, timeout_s: float = 180) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{workdir}/mlflow.db",
           "--artifacts-destination", str(workdir / "mlartifacts")]
    log = c.root / "mlflow.log"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {MARK: c.mark(MLFLOW)}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=workdir)
    c.state |= {"mlflow_port": port, "mlflow_pid": proc.pid, "mlflow_log": str(log),
                "mlflow_backend": f"sqlite:///{workdir}/mlflow.db"}
    c.save()
    _wait_http(f"http://127.0.0.1:{port}/health", timeout_s, f"mlflow server (pid {proc.pid}, log {log})",
               proc=proc)


def cmd_start(args: argparse.Namespace) -> int:
    root = Path(args.dir).resolve()
    if len(str(root)) + len("/head") + SOCKET_TAIL > 107:
        raise ClusterError(f"--dir {root}: too long for Ray's socket paths (at most "
                           f"{107 - SOCKET_TAIL - len('/head')} characters); pick a shorter one")
    c = Cluster(root)
    if c.alive():
        raise ClusterError(f"a cluster started from {root} is running; stop it first "
                           f"(python cluster/local_cluster.py stop --dir {root})")
    root.mkdir(parents=True, exist_ok=True)
    if not c.token_path.is_file():  # this cluster's own token; ~/.ray/auth_token stays untouched
        c.token_path.write_text(secrets.token_hex(32))
    c.token_path.chmod(0o600)
    workdir = Path(args.workdir).resolve()
    c.state = {"id": uuid.uuid4().hex[:12], "dir": str(root), "workdir": str(workdir), "nodes": {},
               "gcs_port": free_port(), "dashboard_port": free_port(), "client_port": free_port()}
    c.save()
    try:
        start_node(c, "head", args.head_cpus, True, args.object_store_mb)
        _wait_http(f"{c.dashboard_url}/api/version", 120, "the dashboard", headers=c.auth_headers())
        for i in range(1, args.workers + 1):
            start_node(c, f"w{i}", args.worker_cpus, False, args.object_store_mb)
        if args.mlflow or (args.mlflow is None and args.workers > 0):
            start_mlflow(c, workdir)
        # Job submission answers once the head's job agent is up (a few seconds after the dashboard).
        _wait_http(f"{c.dashboard_url}/api/jobs/", 120, "the job API", headers=c.auth_headers())
    except BaseException:
        stop(c)
        raise
    print_status(c)
    print()
    print_env(c)
    return 0


def cmd_add_node(args: argparse.Namespace) -> int:
    c = Cluster(args.dir)
    if not c.state or raylet_pid(c.mark("head")) is None:
        raise ClusterError(f"no running cluster in {c.root}; start one first")
    name = args.name or next(f"w{i}" for i in range(1, 1000) if f"w{i}" not in c.state["nodes"])
    old = c.state["nodes"].get(name)
    if old is not None and raylet_pid(c.mark(name)) is not None:
        raise ClusterError(f"node {name!r} is running (raylet pid {raylet_pid(c.mark(name))})")
    if old is not None:  # a lost node returns: whatever is left of its processes goes first
        terminate(marked(c.mark(name)), grace_s=5)
        del c.state["nodes"][name]
    node = start_node(c, name, args.cpus if args.cpus is not None else (old or {}).get("cpus", 1), False,
                      args.object_store_mb)
    print(f"node {name} joined: node id {node['node_id']}, ray start pid {node['pid']}, "
          f"raylet pid {node['raylet_pid']}")
    return 0


def cmd_kill_node(args: argparse.Namespace) -> int:
    """A node crash: SIGKILL to its raylet, then to every other process of the node (workers included), at
    once, as when the machine dies; the rest of the cluster sees the node lost."""
    c = Cluster(args.dir)
    node = c.state.get("nodes", {}).get(args.name)
    if node is None:
        names = ", ".join(c.state.get("nodes", {}))
        raise ClusterError(f"no node {args.name!r} in {c.root} (nodes: {names})")
    pid = raylet_pid(c.mark(args.name))
    if pid is None:
        raise ClusterError(f"node {args.name!r} has no running raylet")
    os.kill(pid, signal.SIGKILL)
    others = [p for p in marked(c.mark(args.name)) if p != pid]
    for other in others:
        try:
            os.kill(other, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while marked(c.mark(args.name)) and time.monotonic() < deadline:
        time.sleep(0.1)
    print(f"node {args.name}: SIGKILL to its raylet (pid {pid}) and its {len(others)} other processes")
    return 0


def stop(c: Cluster) -> list[int]:
    """Every process of this cluster (marked with its id): worker nodes, then the head, then MLflow."""
    if not c.state:
        return []
    names = [n for n in c.state.get("nodes", {}) if n != "head"] + ["head", MLFLOW]
    stopped = []
    for name in names:
        stopped += terminate(marked(c.mark(name)))
    stopped += terminate(marked(f"{c.state['id']}/", prefix=True), grace_s=3)  # anything left
    return list(dict.fromkeys(stopped))


def cmd_stop(args: argparse.Namespace) -> int:
    c = Cluster(args.dir)
    if not c.state:
        print(f"no cluster state in {c.root}: nothing to stop")
        return 0
    pids = stop(c)
    print(f"stopped {len(pids)} processes of cluster {c.state['id']} ({c.root}): {' '.join(map(str, pids))}")
    c.state["stopped"] = True
    c.save()
    return 0


def node_rows(c: Cluster) -> list[dict]:
    rows = []
    for name, node in c.state.get("nodes", {}).items():
        pid = raylet_pid(c.mark(name))
        count = len(marked(c.mark(name)))
        rows.append(node | {"alive": pid is not None, "raylet_pid": pid, "processes": count})
    return rows


def print_status(c: Cluster) -> None:
    print(f"cluster {c.state['id']} in {c.root}: GCS {c.gcs_address}, dashboard {c.dashboard_url}"
          + (f", MLflow {c.mlflow_url} (pid {c.state['mlflow_pid']}, "
             f"{'alive' if _is_running(c.state['mlflow_pid']) else 'dead'})" if c.mlflow_url else ""))
    print(f"{'node':6} {'state':6} {'CPUs':>4} {'resource':10} {'raylet':>7} {'procs':>5}  "
          f"{'ports (workers)':15}  {'node id':14} temp dir")
    for r in node_rows(c):
        print(f"{r['name']:6} {'alive' if r['alive'] else 'dead':6} {r['cpus']:>4} {r['resource']:10} "
              f"{r['raylet_pid'] or '-':>7} {r['processes']:>5}  "
              f"{r['worker_ports'][0]}-{r['worker_ports'][1]:<9}  "
              f"{(r.get('node_id') or '-')[:12]:14} {r['temp_dir']}")


def cmd_status(args: argparse.Namespace) -> int:
    c = Cluster(args.dir)
    if not c.state:
        raise ClusterError(f"no cluster state in {c.root}")
    if args.json:
        info = {k: v for k, v in c.state.items() if k != "nodes"}
        info |= {"gcs_address": c.gcs_address, "dashboard_url": c.dashboard_url, "mlflow_url": c.mlflow_url,
                 "auth_env": c.auth_env(), "nodes": node_rows(c), "submit": submit_command(c)}
        print(json.dumps(info, indent=1))
        return 0
    print_status(c)
    if raylet_pid(c.mark("head")) is not None:  # Ray's own view: nodes and resources
        subprocess.run([str(BIN / "ray"), "status", "--address", c.gcs_address],
                       env=os.environ | c.auth_env())
    return 0


def submit_command(c: Cluster, entrypoint: list[str] | None = None) -> list[str]:
    env_vars = {"MLFLOW_TRACKING_URI": c.mlflow_url} if c.mlflow_url else {}
    runtime_env = {"excludes": EXCLUDES} | ({"env_vars": env_vars} if env_vars else {})
    return [str(BIN / "ray"), "job", "submit", "--address", c.dashboard_url, "--working-dir", ".",
            "--runtime-env-json", json.dumps(runtime_env), "--",
            *(entrypoint or ["python", "pipeline/run.py", "--stage", "all", "--workdir", c.state["workdir"]])]


def print_env(c: Cluster) -> None:
    import shlex

    exports = c.auth_env() | {"RAY_API_SERVER_ADDRESS": c.dashboard_url}
    if c.mlflow_url:
        exports["MLFLOW_TRACKING_URI"] = c.mlflow_url
    for k, v in exports.items():
        print(f"export {k}={shlex.quote(v)}")
    print("# from the repository root:")
    print(shlex.join(submit_command(c)))


def cmd_env(args: argparse.Namespace) -> int:
    c = Cluster(args.dir)
    if not c.state:
        raise ClusterError(f"no cluster state in {c.root}")
    print_env(c)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dir", default=str(default_dir()),
                   help="state, token, temp dirs, logs (default $VLP_CLUSTER_DIR or /tmp/vlp-cluster-<uid>)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="start a head and worker nodes")
    s.add_argument("--workers", type=int, default=1, help="worker nodes (default 1)")
    s.add_argument("--head-cpus", type=int, default=1, help="CPUs of the head node (default 1)")
    s.add_argument("--worker-cpus", type=int, default=1, help="CPUs of each worker node (default 1)")
    s.add_argument("--object-store-mb", type=int, default=1024, help="object store per node (default 1024)")
    s.add_argument("--workdir", default=os.environ.get("VLP_WORKDIR", str(REPO_ROOT / "work")),
                   help="the pipeline's work dir: the MLflow server's store, the submit line's --workdir")
    s.add_argument("--mlflow", action=argparse.BooleanOptionalAction, default=None,
                   help="start an MLflow server on 127.0.0.1 (default: when there are worker nodes)")
    a = sub.add_parser("add-node", help="a worker node joins (or a killed one returns)")
    a.add_argument("--name", help="node name (default: the next free w<N>; a dead node's name restarts it)")
    a.add_argument("--cpus", type=int, help="CPUs (default: the node's former count, or 1)")
    a.add_argument("--object-store-mb", type=int, default=1024)
    k = sub.add_parser("kill-node", help="SIGKILL a node's raylet and all its processes (a node crash)")
    k.add_argument("name")
    st = sub.add_parser("status", help="the nodes, their processes and Ray's view of the cluster")
    st.add_argument("--json", action="store_true")
    sub.add_parser("env", help="shell exports for clients and the `ray job submit` line")
    sub.add_parser("stop", help="stop exactly the processes this cluster started")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handler = {"start": cmd_start, "add-node": cmd_add_node, "kill-node": cmd_kill_node, "status": cmd_status,
               "env": cmd_env, "stop": cmd_stop}[args.command]
    try:
        return handler(args)
    except ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
