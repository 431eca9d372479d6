"""An unrelated Ray instance on this machine, as another user's would be, to show that the pipeline and the
tests neither use nor stop it.

    python tests/bystander_ray.py start DIR [--temp-dir T]   # background: `ray start --head` + a heartbeat
    python tests/bystander_ray.py check DIR                  # exit 0 iff it still runs tasks
    python tests/bystander_ray.py stop DIR                   # stop it (its own process group only)

``start`` launches ``ray start --head --block`` (its own GCS port, no dashboard, auth disabled; Ray's default
temp dir unless ``--temp-dir``) and a driver that runs a task on it every 2 s, writing the time to
``DIR/heartbeat``. Both run in one new session, whose processes ``stop`` signals by PID (SIGTERM, then
SIGKILL).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
STALE_S = 120  # a heartbeat older than this: the instance no longer runs tasks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def serve(root: Path, temp_dir: str | None) -> int:
    """The group leader: starts the head, then drives it until SIGTERM."""
    import ray

    port = _free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--port", str(port), "--num-cpus", "1",
           "--include-dashboard", "false", "--disable-usage-stats"]
    if temp_dir:
        cmd += ["--temp-dir", temp_dir]
    with open(root / "ray.log", "w") as log:
        head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    stopping = False

    def on_term(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)

    @ray.remote(num_cpus=0)
    def ping() -> int:
        return os.getpid()

    deadline = time.monotonic() + 180
    while True:
        try:
            ray.init(address=f"127.0.0.1:{port}", logging_level="ERROR", log_to_driver=False)
            break
        except Exception:  # noqa: BLE001 - the head is still starting
            if time.monotonic() > deadline or head.poll() is not None:
                return 1
            time.sleep(1)
    (root / "address").write_text(f"127.0.0.1:{port}")
    while not stopping:
        try:
            ray.get(ping.remote(), timeout=60)
        except Exception:  # noqa: BLE001 - a slow machine: no heartbeat this time, `check` judges the age
            continue
        tmp = root / "heartbeat.tmp"
        tmp.write_text(str(time.time()))
        tmp.replace(root / "heartbeat")
        for _ in range(20):
            if stopping:
                break
            time.sleep(0.1)
    ray.shutdown()
    return 0


def start(root: Path, temp_dir: str | None, timeout_s: float = 240) -> int:
    root.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    args = [sys.executable, __file__, "serve", str(root)] + (["--temp-dir", temp_dir] if temp_dir else [])
    with open(root / "serve.log", "w") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    (root / "pgid").write_text(str(proc.pid))
    deadline = time.monotonic() + timeout_s
    while not (root / "heartbeat").is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            print(f"bystander Ray did not start (log: {root}/serve.log, {root}/ray.log)", file=sys.stderr)
            stop(root)
            return 1
        time.sleep(0.5)
    print(f"bystander Ray at {(root / 'address').read_text()} (process group {proc.pid})")
    return 0


def check(root: Path) -> int:
    beat = root / "heartbeat"
    age = time.time() - float(beat.read_text()) if beat.is_file() else float("inf")
    if age > STALE_S:
        print(f"bystander Ray is not running tasks (last heartbeat {age:.0f}s ago)", file=sys.stderr)
        return 1
    print(f"bystander Ray at {(root / 'address').read_text()} is alive (heartbeat {age:.1f}s ago)")
    return 0


def _session(sid: int) -> list[int]:
    """The running processes of session ``sid`` (Ray's workers leave the group, not the session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry.name))
    return pids


def stop(root: Path) -> int:
    sid = int((root / "pgid").read_text())
    # `ray start --block` drains for up to 30 s on SIGTERM: not worth waiting for here.
    for sig, wait_s in ((signal.SIGTERM, 8), (signal.SIGKILL, 10)):
        for pid in _session(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while _session(sid) and time.monotonic() < deadline:
            time.sleep(0.3)
        if not _session(sid):
            return 0
    return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["start", "check", "stop", "serve"])
    p.add_argument("dir", type=Path)
    p.add_argument("--temp-dir", help="Ray's temp dir (default: Ray's own, /tmp/ray)")
    args = p.parse_args(argv)
    root = args.dir.resolve()
    if args.command == "serve":
        return serve(root, args.temp_dir)
    if args.command == "start":
        return start(root, args.temp_dir)
    return check(root) if args.command == "check" else stop(root)


if __name__ == "__main__":
    sys.exit(main())
