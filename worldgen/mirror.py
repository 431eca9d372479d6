"""Loopback HTTP mirror of the synthetic world, with injectable faults.

``GET /<host>/<path>`` serves ``<www root>/<host>/<path>``, so a downloader that rewrites
``http(s)://host/path`` to ``<mirror>/host/path`` exercises the same code path as on the real web.
The server runs as a separate process (``Mirror`` starts it) so that it never competes for the GIL
with the downloader under test. It exits when the process that started it dies, even by SIGKILL, so a
killed run never leaves a mirror listening.

Faults file (JSON): ``{"slow_seconds": s, "huge_bytes": n, "paths": {"/<host>/<path>": fault}}``,
fault one of ``FAULTS``.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import mimetypes
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

FAULTS = ("not_found", "flaky_500", "slow", "truncated", "not_image", "bomb", "huge", "redirect_loop")
BOMB_SIDE = 10_000
_CHUNK = 1 << 16
_DEFAULT_PORTS = (":80", ":443")
_REPO_ROOT = Path(__file__).resolve().parents[1]
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_PARENT_POLL_S = 0.5
mimetypes.add_type("text/tab-separated-values", ".tsv")
mimetypes.add_type("application/jsonl", ".jsonl")


def mirror_path(url: str) -> str:
    """The request path under which the mirror serves ``url``: ``/<netloc>/<path>`` (no query/fragment)."""
    parts = urlsplit(url)
    return f"/{parts.netloc}{parts.path or '/'}"


def canonical_path(path: str) -> str:
    """``path`` with its host segment lowercased and a default port dropped.

    Lookups fall back to this form, so the mirror answers whether or not the client normalizes the
    host; the world stores a URL's file under its exact spelling only when it must differ in bytes.
    """
    host, sep, rest = path.lstrip("/").partition("/")
    host = host.lower()
    for port in _DEFAULT_PORTS:
        host = host.removesuffix(port)
    return f"/{host}{sep}{rest}"


@functools.cache
def bomb_png() -> bytes:
    """A valid 1-bit grayscale PNG declaring BOMB_SIDE x BOMB_SIDE pixels, a few kB compressed."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + BOMB_SIDE // 8)  # filter byte + packed bits
    ihdr = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 1, 0, 0, 0, 0)
    idat = zlib.compress(row * BOMB_SIDE, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class _FaultPlan:
    def __init__(self, spec: dict):
        self.slow_seconds = float(spec.get("slow_seconds", 6.0))
        self.huge_bytes = int(spec.get("huge_bytes", 64_000_000))
        self.paths: dict[str, str] = {}
        for path, fault in spec.get("paths", {}).items():
            if fault not in FAULTS:
                raise ValueError(f"faults file: paths[{path!r}]: unknown fault {fault!r} (one of {FAULTS})")
            self.paths[canonical_path(unquote(path))] = fault
        self._flaky_seen: set[str] = set()
        self._lock = threading.Lock()

    def fault_for(self, path: str) -> str | None:
        key = canonical_path(path)
        fault = self.paths.get(key)
        if fault == "flaky_500":
            with self._lock:
                if key in self._flaky_seen:
                    return None
                self._flaky_seen.add(key)
        return fault


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response carries Content-Length
    # Headers and body go out as two writes: with Nagle on, a reused connection stalls ~40 ms on each.
    disable_nagle_algorithm = True
    server: _MirrorServer

    def log_message(self, *args):  # quiet: a download run makes many thousands of requests
        pass

    def do_GET(self):
        self._respond(send_body=True)

    def do_HEAD(self):
        self._respond(send_body=False)

    def _respond(self, send_body: bool):
        path = unquote(self.path.split("?", 1)[0].split("#", 1)[0])
        fault = self.server.faults.fault_for(path)
        try:
            if fault == "not_found":
                self._send(404, b"not found\n", "text/plain", send_body)
            elif fault == "flaky_500":
                self._send(500, b"internal server error\n", "text/plain", send_body)
            elif fault == "redirect_loop":
                self._send(302, b"", "text/plain", send_body, extra={"Location": self.path})
            elif fault == "not_image":
                body = b"<!doctype html><html><body><h1>This photo is unavailable</h1></body></html>\n"
                self._send(200, body, "text/html; charset=utf-8", send_body)
            elif fault == "bomb":
                self._send(200, bomb_png(), "image/png", send_body)
            elif fault == "huge":
                self._send_huge(send_body)
            else:
                self._serve_file(path, fault, send_body)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (timeout, size cap); nothing left to tell it.
            self.close_connection = True

    def _serve_file(self, path: str, fault: str | None, send_body: bool):
        file = self.server.lookup(path)
        if file is None:
            self._send(404, b"not found\n", "text/plain", send_body)
            return
        body = file.read_bytes()
        ctype = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        if fault == "slow":
            time.sleep(self.server.faults.slow_seconds)
        if fault == "truncated":
            self._send_headers(200, len(body), ctype)
            if send_body:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
            self.close_connection = True
            return
        self._send(200, body, ctype, send_body)

    def _send_huge(self, send_body: bool):
        size = self.server.faults.huge_bytes
        self._send_headers(200, size, "image/jpeg")
        if not send_body:
            return
        block = b"\xff" * _CHUNK
        left = size
        while left > 0:
            n = min(left, _CHUNK)
            self.wfile.write(block[:n])
            left -= n

    def _send_headers(self, status: int, length: int, ctype: str, extra: dict[str, str] | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()

    def _send(
        self, status: int, body: bytes, ctype: str, send_body: bool, extra: dict[str, str] | None = None
    ):
        self._send_headers(status, len(body), ctype, extra)
        if send_body:
            self.wfile.write(body)


class _MirrorServer(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 makes the 6th concurrent connect wait a 1 s SYN retry.
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], root: Path, faults: _FaultPlan):
        super().__init__(address, _Handler)
        self.root = root.resolve()
        self.faults = faults

    def lookup(self, path: str) -> Path | None:
        """The file for a request path: its exact spelling first, then the canonical host form."""
        for candidate in dict.fromkeys((path, canonical_path(path))):
            file = (self.root / candidate.lstrip("/")).resolve()
            if file.is_relative_to(self.root) and file.is_file():
                return file
        return None

    def handle_error(self, request, client_address):
        # Clients that hang up mid-response are expected (timeouts, size caps); stay quiet about them.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def exit_with_parent(parent_pid: int) -> None:
    """Make this process exit once ``parent_pid`` (its parent) is gone, however it died.

    Linux sends SIGTERM when the parent dies (PR_SET_PDEATHSIG; strictly, when the parent's thread that
    started us exits, and that thread is inside its ``with Mirror`` block until the block stops us). A
    thread polling ``getppid()`` covers other systems and a parent that died before the prctl took
    effect: an orphan is reparented, so its parent id changes.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # no prctl outside Linux: polling alone
        pass

    def poll() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os._exit(0)

    threading.Thread(target=poll, name="exit-with-parent", daemon=True).start()


class Mirror:
    """Runs the mirror server in a subprocess for the duration of a ``with`` block.

    The server dies with the process that entered the block (see ``exit_with_parent``).
    """

    def __init__(
        self,
        www_root: Path,
        faults_file: Path | None = None,
        host: str = "127.0.0.1",
        start_timeout_s: float = 30.0,
    ):
        self.www_root = Path(www_root)
        self.faults_file = Path(faults_file) if faults_file is not None else None
        self.host = host
        self.start_timeout_s = start_timeout_s
        self.base_url = ""
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> Mirror:
        if not self.www_root.is_dir():
            raise FileNotFoundError(f"mirror: www root {self.www_root} is not a directory")
        cmd = [
            sys.executable,
            "-m",
            "worldgen.mirror",
            "--root",
            str(self.www_root),
            "--host",
            self.host,
            "--port",
            "0",
            "--parent-pid",
            str(os.getpid()),
        ]
        if self.faults_file is not None:
            cmd += ["--faults", str(self.faults_file)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO_ROOT), env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=_REPO_ROOT)
        port = self._read_port()
        self.base_url = f"http://{self.host}:{port}"
        return self

    @property
    def pid(self) -> int | None:
        """The server process's id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def _read_port(self) -> int:
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self._proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(self.start_timeout_s)
        line = result[0].strip() if result else ""
        if not line.isdigit():
            self.__exit__(None, None, None)
            raise RuntimeError(f"mirror: server for {self.www_root} did not report its port (got {line!r})")
        return int(line)

    def __exit__(self, *exc) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc.stdout.close()
        self._proc = None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="www root: <root>/<host>/<path>")
    parser.add_argument("--faults", type=Path, help="faults JSON file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--parent-pid", type=int, help="exit when this process (our parent) dies")
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        exit_with_parent(args.parent_pid)
    try:
        plan = _FaultPlan(json.loads(args.faults.read_text()) if args.faults else {})
        server = _MirrorServer((args.host, args.port), args.root, plan)
    except (OSError, ValueError) as err:
        sys.exit(f"mirror: {err}")
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
