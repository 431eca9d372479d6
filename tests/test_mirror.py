"""The loopback mirror: file serving, keep-alive and every injected fault, over real sockets."""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest
from PIL import Image

from worldgen.mirror import BOMB_SIDE, Mirror, canonical_path, mirror_path

REPO = Path(__file__).resolve().parents[1]
JPEG = bytes(range(256)) * 40  # 10240 bytes; content is irrelevant to the server
HUGE_BYTES = 3_000_000
SLOW_SECONDS = 1.5


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    for name in ("ok", "flaky", "slow", "truncated", "notimg", "bomb", "huge", "loop", "gone"):
        _write(root / "img.example.com" / "photos" / f"{name}.jpg", JPEG)
    _write(root / "data.example.org" / "meta" / "list.json", b'{"a": 1}')
    _write(root / "Mixed.Example.COM" / "x.jpg", b"exact spelling")
    _write(root / "mixed.example.com" / "x.jpg", b"canonical spelling")
    faults = {
        "slow_seconds": SLOW_SECONDS,
        "huge_bytes": HUGE_BYTES,
        "paths": {
            "/img.example.com/photos/gone.jpg": "not_found",
            "/img.example.com/photos/flaky.jpg": "flaky_500",
            "/img.example.com/photos/slow.jpg": "slow",
            "/img.example.com/photos/truncated.jpg": "truncated",
            "/img.example.com/photos/notimg.jpg": "not_image",
            "/img.example.com/photos/bomb.jpg": "bomb",
            "/img.example.com/photos/huge.jpg": "huge",
            "/img.example.com/photos/loop.jpg": "redirect_loop",
        },
    }
    faults_file = root.parent / "faults.json"
    faults_file.write_text(json.dumps(faults))
    with Mirror(root, faults_file) as m:
        yield m


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _conn(mirror: Mirror, timeout: float = 10.0) -> http.client.HTTPConnection:
    host, port = mirror.base_url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def _get(mirror: Mirror, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = _conn(mirror)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_base_url_is_loopback(mirror):
    assert mirror.base_url.startswith("http://127.0.0.1:")
    assert int(mirror.base_url.rsplit(":", 1)[1]) > 0


def test_serves_files_with_type_and_length_over_keep_alive(mirror):
    conn = _conn(mirror)
    conn.request("GET", "/img.example.com/photos/ok.jpg?imgmax=800")  # query is ignored for lookup
    resp = conn.getresponse()
    body = resp.read()
    assert (resp.status, resp.getheader("Content-Type"), resp.getheader("Content-Length")) == (
        200,
        "image/jpeg",
        str(len(JPEG)),
    )
    assert body == JPEG
    sock = conn.sock
    conn.request("GET", "/data.example.org/meta/list.json")
    resp = conn.getresponse()
    assert (resp.status, resp.getheader("Content-Type")) == (200, "application/json")
    assert resp.read() == b'{"a": 1}'
    assert conn.sock is sock  # the same TCP connection answered both requests
    conn.close()


def test_missing_file_and_traversal_are_404(mirror):
    assert _get(mirror, "/img.example.com/photos/nope.jpg")[0] == 404
    assert _get(mirror, "/img.example.com/../../etc/passwd")[0] == 404


def test_exact_host_spelling_wins_then_canonical_fallback(mirror):
    assert _get(mirror, "/Mixed.Example.COM/x.jpg")[2] == b"exact spelling"
    assert _get(mirror, "/mixed.example.com:443/x.jpg")[2] == b"canonical spelling"
    assert _get(mirror, "/IMG.example.com:80/photos/ok.jpg")[2] == JPEG


def test_not_found_fault(mirror):
    assert _get(mirror, "/img.example.com/photos/gone.jpg")[0] == 404


def test_flaky_500_fails_once_then_serves(mirror):
    assert _get(mirror, "/img.example.com/photos/flaky.jpg")[0] == 500
    status, _, body = _get(mirror, "/img.example.com/photos/flaky.jpg")
    assert (status, body) == (200, JPEG)
    assert _get(mirror, "/img.example.com/photos/flaky.jpg")[0] == 200


def test_slow_fault_times_out_a_short_client_and_serves_a_patient_one(mirror):
    conn = _conn(mirror, timeout=0.5)
    start = time.monotonic()
    conn.request("GET", "/img.example.com/photos/slow.jpg")
    with pytest.raises(socket.timeout):
        conn.getresponse()
    assert time.monotonic() - start < SLOW_SECONDS
    conn.close()
    start = time.monotonic()
    status, _, body = _get(mirror, "/img.example.com/photos/slow.jpg")
    assert (status, body) == (200, JPEG)
    assert time.monotonic() - start >= SLOW_SECONDS


def test_truncated_fault_declares_full_length_and_sends_half(mirror):
    conn = _conn(mirror)
    conn.request("GET", "/img.example.com/photos/truncated.jpg")
    resp = conn.getresponse()
    assert (resp.status, resp.getheader("Content-Length")) == (200, str(len(JPEG)))
    with pytest.raises(http.client.IncompleteRead) as err:
        resp.read()
    assert len(err.value.partial) == len(JPEG) // 2
    conn.close()


def test_not_image_fault_is_html(mirror):
    status, headers, body = _get(mirror, "/img.example.com/photos/notimg.jpg")
    assert (status, headers["Content-Type"]) == (200, "text/html; charset=utf-8")
    assert body.startswith(b"<!doctype html>")


def test_bomb_fault_is_a_small_png_declaring_huge_size(mirror):
    status, headers, body = _get(mirror, "/img.example.com/photos/bomb.jpg")
    assert (status, headers["Content-Type"]) == (200, "image/png")
    assert len(body) < 50_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(body))  # reads the header only; pixels are never decoded
    assert (img.format, img.size) == ("PNG", (BOMB_SIDE, BOMB_SIDE))


def test_huge_fault_streams_declared_length(mirror):
    conn = _conn(mirror)
    conn.request("GET", "/img.example.com/photos/huge.jpg")
    resp = conn.getresponse()
    assert (resp.status, resp.getheader("Content-Length")) == (200, str(HUGE_BYTES))
    total = 0
    while chunk := resp.read(1 << 16):
        total += len(chunk)
    assert total == HUGE_BYTES
    conn.close()


def test_huge_fault_survives_a_client_hanging_up(mirror):
    conn = _conn(mirror)
    conn.request("GET", "/img.example.com/photos/huge.jpg")
    resp = conn.getresponse()
    resp.read(1000)  # a size-capped client stops reading and closes
    conn.close()
    assert _get(mirror, "/img.example.com/photos/ok.jpg")[0] == 200


def test_redirect_loop_points_at_itself(mirror):
    status, headers, _ = _get(mirror, "/img.example.com/photos/loop.jpg?x=1")
    assert (status, headers["Location"]) == (302, "/img.example.com/photos/loop.jpg?x=1")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{mirror.base_url}/img.example.com/photos/loop.jpg", timeout=10)
    assert "redirect" in str(err.value.reason).lower()


def test_mirror_path_and_canonical_path():
    assert mirror_path("https://Live.StaticFlickr.com:443/65535/1_ab_z.jpg?x=1#f") == (
        "/Live.StaticFlickr.com:443/65535/1_ab_z.jpg"
    )
    assert canonical_path("/Live.StaticFlickr.com:443/65535/1_ab_z.jpg") == (
        "/live.staticflickr.com/65535/1_ab_z.jpg"
    )


def test_stops_on_exit(tmp_path):
    (tmp_path / "h").mkdir()
    with Mirror(tmp_path) as m:
        url = m.base_url
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{url}/h/x", timeout=2)


def test_bad_faults_file_fails_to_start(tmp_path):
    bad = tmp_path / "faults.json"
    bad.write_text(json.dumps({"paths": {"/h/x.jpg": "explode"}}))
    with pytest.raises(RuntimeError, match="did not report its port"), Mirror(tmp_path, bad):
        pass


_MIRROR_PARENT = """
import sys, time
from pathlib import Path
from worldgen.mirror import Mirror
with Mirror(Path(sys.argv[1])) as mirror:
    print(mirror.pid, mirror.base_url.rsplit(":", 1)[1], flush=True)
    time.sleep(600)
"""


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (an unreaped zombie has exited and no longer listens)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_server_dies_with_the_process_that_started_it(tmp_path):
    (tmp_path / "h").mkdir()
    parent = subprocess.Popen([sys.executable, "-c", _MIRROR_PARENT, str(tmp_path)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    pid = None
    try:
        pid, port = (int(x) for x in parent.stdout.readline().split())
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        parent.kill()  # SIGKILL: no __exit__, no cleanup of any kind
        parent.wait()
        deadline = time.monotonic() + 5
        while _running(pid):
            assert time.monotonic() < deadline, f"mirror {pid} outlived its SIGKILLed parent"
            time.sleep(0.05)
        # The leader shows as a zombie while the other threads still exit; the socket closes with the last.
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            except ConnectionRefusedError:
                break
            assert time.monotonic() < deadline, f"port {port} still accepts after its mirror died"
            time.sleep(0.05)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
        if pid is not None and _running(pid):  # the orphan of a failed run: do not leave it listening
            os.kill(pid, signal.SIGKILL)
