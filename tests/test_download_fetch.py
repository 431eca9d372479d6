"""The image fetcher and metadata download over real loopback servers (the world's Mirror and a small
scripted server for what the mirror does not do: plain redirects, bodies without Content-Length)."""

from __future__ import annotations

import hashlib
import io
import json
import random
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from stages.download.errors import FetchError
from stages.download.fetch import FetchSettings, decode, fetch_shard
from stages.download.formats.base import ImageRef
from stages.download.transport import HttpClient
from stages.download.urls import to_mirror
from worldgen.mirror import Mirror

HOST = "img.example.com"
FAULTS = ("not_found", "flaky_500", "slow", "truncated", "not_image", "bomb", "huge", "redirect_loop")
EXPECTED = {  # fault -> status of its row
    "not_found": "http_404", "flaky_500": "ok", "slow": "timeout", "truncated": "truncated",
    "not_image": "not_image", "bomb": "decompression_bomb", "huge": "too_large",
    "redirect_loop": "redirect_loop",
}
N_OK = 6


def jpeg(seed: int, size: tuple[int, int] = (48, 32)) -> bytes:
    im = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    im.putpixel((seed % size[0], 0), (255, 255, 255))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def settings(mirror_url: str | None, **overrides) -> FetchSettings:
    values = dict(timeout_s=1.0, retries=1, backoff_s=0.05, max_bytes=1_000_000, max_pixels=4_000_000,
                  max_redirects=3, threads=4, mirror_url=mirror_url)
    return FetchSettings(**{**values, **overrides})


def ref(key: str, url: str) -> ImageRef:
    return ImageRef(corpus="cc", key=key, url=url, split="train")


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A www root with N_OK good images and one image per fault, plus its faults file."""
    root = tmp_path_factory.mktemp("fetch")
    www = root / "www"
    files = {}
    for i in range(N_OK):
        files[f"ok{i}"] = jpeg(i)
    for i, fault in enumerate(FAULTS):
        files[fault] = jpeg(100 + i)
    for name, data in files.items():
        _write(www / HOST / "p" / f"{name}.jpg", data)
    faults = {"slow_seconds": 3.0, "huge_bytes": 3_000_000,
              "paths": {f"/{HOST}/p/{fault}.jpg": fault for fault in FAULTS}}
    (root / "faults.json").write_text(json.dumps(faults))
    return www, root / "faults.json", files


def fault_refs() -> list[ImageRef]:
    refs = [ref(f"cc:train:{i}", f"http://{HOST}/p/ok{i}.jpg") for i in range(N_OK)]
    refs += [ref(f"cc:fault:{fault}", f"https://{HOST}/p/{fault}.jpg") for fault in FAULTS]
    refs += [ref("cc:scheme:file", "file:///etc/passwd"), ref("cc:scheme:ftp", f"ftp://{HOST}/p/ok0.jpg")]
    return refs


# The 100-megapixel bomb is refused by max_pixels before decoding; PIL still warns when it reads the header.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_every_fault_is_counted_under_its_own_type(world):
    www, faults_file, files = world
    with Mirror(www, faults_file) as mirror:
        rows, stats = fetch_shard(fault_refs(), settings(mirror.base_url))

    assert stats["ok"] == N_OK + 1  # the flaky image succeeds on its retry
    assert stats["failed"] == {"bad_scheme": 2, "decompression_bomb": 1, "http_404": 1, "not_image": 1,
                               "redirect_loop": 1, "timeout": 1, "too_large": 1, "truncated": 1}
    assert stats["retried"] == 1
    by_key = {row["key"]: row for row in rows}
    assert [row["key"] for row in rows] == [r.key for r in fault_refs()]  # order kept
    for fault, status in EXPECTED.items():
        assert by_key[f"cc:fault:{fault}"]["status"] == status, fault
    for i in range(N_OK):
        row = by_key[f"cc:train:{i}"]
        data = files[f"ok{i}"]
        assert (row["status"], row["error"]) == ("ok", None)
        assert row["image"] == data and row["size"] == len(data)
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert (row["width"], row["height"]) == (48, 32)
        assert row["url"] == f"http://{HOST}/p/ok{i}.jpg"  # as published, not the mirror URL
    assert stats["bytes"] == sum(len(files[f"ok{i}"]) for i in range(N_OK)) + len(files["flaky_500"])
    for row in rows:
        if row["status"] != "ok":
            assert row["image"] is None and row["sha256"] is None
            assert row["error"] and "\n" not in row["error"]
    assert "file://" in by_key["cc:scheme:file"]["error"] and "ftp://" in by_key["cc:scheme:ftp"]["error"]
    assert "Content-Length 3000000 exceeds max_bytes" in by_key["cc:fault:huge"]["error"]
    assert "10000x10000" in by_key["cc:fault:bomb"]["error"]
    # Details read the same in every run: no mirror address (a random port), no object addresses.
    assert by_key["cc:fault:redirect_loop"]["error"] == (f"redirect loop: https://{HOST}/p/redirect_loop.jpg "
                                                         f"comes back to <mirror>/{HOST}/p/redirect_loop.jpg")
    assert by_key["cc:fault:not_image"]["error"] == (
        "UnidentifiedImageError: cannot identify image file <_io.BytesIO object>")


def test_without_retries_a_flaky_server_is_a_5xx(world):
    www, faults_file, _ = world
    with Mirror(www, faults_file) as mirror:
        rows, stats = fetch_shard([ref("cc:f", f"http://{HOST}/p/flaky_500.jpg")],
                                  settings(mirror.base_url, retries=0))
    assert rows[0]["status"] == "http_5xx" and rows[0]["error"] == "HTTP 500 Internal Server Error"
    assert stats == {"ok": 0, "failed": {"http_5xx": 1}, "retried": 0, "bytes": 0,
                     "seconds": stats["seconds"]}


def test_decode_loads_pixels_so_truncated_data_is_not_an_image():
    data = jpeg(1, (256, 256))
    cut = data[: len(data) * 2 // 3]
    Image.open(io.BytesIO(cut)).verify()  # verify() alone would let it through
    with pytest.raises(FetchError) as err:
        decode(cut, 10_000_000)
    assert err.value.kind == "not_image"
    assert decode(data, 10_000_000) == (256, 256)
    with pytest.raises(FetchError) as err:
        decode(data, 256 * 256 - 1)
    assert err.value.kind == "decompression_bomb"


def _full_load_fails(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception:  # noqa: BLE001 - whatever PIL raises
        return True
    return False


@pytest.mark.parametrize(("mode", "size", "progressive"), [
    ("RGB", (203, 117), False), ("RGB", (131, 77), True), ("L", (97, 61), False), ("CMYK", (40, 24), False),
    ("RGB", (5, 3), False),
])
def test_jpeg_draft_decode_keeps_the_size_and_the_verdict_of_a_full_load(mode, size, progressive):
    """decode() loads a JPEG at reduced scale: the size must still be the header's, and every truncated or
    corrupted stream must get the same verdict as a full load."""
    rng = random.Random(f"{mode}{size}")
    im = Image.frombytes(mode, size, rng.randbytes(size[0] * size[1] * len(mode)))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85, progressive=progressive)
    data = buf.getvalue()
    assert decode(data, 10_000_000) == size
    for cut in (len(data) // 3, len(data) * 9 // 10):  # cut inside the entropy-coded scan
        with pytest.raises(FetchError) as err:
            decode(data[:cut], 10_000_000)
        assert err.value.kind == "not_image"
    variants = [data[: len(data) - 2]]  # only the EOI marker missing: whatever a full load says
    for _ in range(40):
        bad = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            bad[rng.randrange(len(bad) // 4, len(bad))] = rng.randrange(256)
        variants.append(bytes(bad))
    for bad in variants:
        try:
            decode(bad, 10_000_000)
            failed = False
        except FetchError as err:
            assert err.kind == "not_image"
            failed = True
        assert failed == _full_load_fails(bad)


def test_decode_refuses_to_run_when_pil_loads_truncated_images(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode(jpeg(1), 10_000_000)


class _Scripted(BaseHTTPRequestHandler):
    """Redirect chains, bodies without Content-Length, keep-alive; records each request's client port."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.requests.append((self.client_address[1], self.path))
        path = self.path
        if path.startswith("/hop/"):
            left = int(path.rsplit("/", 1)[1])
            location = "/img/0.png" if left == 0 else f"/hop/{left - 1}"
            self._reply(302, b"", {"Location": location})
        elif path == "/origin.example/away":  # serving as a mirror: an absolute redirect to another host
            self._reply(301, b"moved", {"Location": "http://other.example/img/1.png"})
        elif path.startswith("/stream/"):  # HTTP/1.0-style body delimited by closing the connection
            size = int(path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"\x00" * size)
            self.close_connection = True
        elif path.startswith("/other.example/img/") or path.startswith("/img/"):
            self._reply(200, self.server.images[path.removeprefix("/other.example")], {})
        else:
            self._reply(404, b"no", {})

    def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def scripted():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    server.daemon_threads = True
    server.requests = []
    server.images = {f"/img/{i}.png": jpeg(i) for i in range(12)}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_redirects_are_followed_up_to_the_limit(scripted):
    server, base = scripted
    refs = [ref("a", f"{base}/hop/3"), ref("b", f"{base}/hop/4")]  # 4 and 5 redirects
    rows, stats = fetch_shard(refs, settings(None, max_redirects=5))
    assert [row["status"] for row in rows] == ["ok", "ok"]
    assert rows[0]["image"] == server.images["/img/0.png"]
    rows, _ = fetch_shard(refs[1:2], settings(None, max_redirects=4))
    assert rows[0]["status"] == "redirect_loop" and "more than 4 redirects" in rows[0]["error"]


def test_absolute_redirect_behind_a_mirror_stays_on_the_mirror(scripted):
    server, base = scripted
    client = HttpClient(timeout_s=2, max_redirects=2, mirror_url=base)
    assert client.get("https://origin.example/away", max_bytes=100_000) == server.images["/img/1.png"]
    client.close()
    assert [path for _, path in server.requests] == ["/origin.example/away", "/other.example/img/1.png"]


def test_too_large_while_streaming_without_content_length(scripted):
    _, base = scripted
    rows, _ = fetch_shard([ref("big", f"{base}/stream/200000"), ref("small", f"{base}/stream/10")],
                          settings(None, max_bytes=100_000))
    assert rows[0]["status"] == "too_large" and "no Content-Length" in rows[0]["error"]
    assert rows[1]["status"] == "not_image"  # 10 zero bytes arrive in full and fail to decode


def test_keep_alive_reuses_one_connection_per_thread(scripted):
    server, base = scripted
    refs = [ref(f"k{i}", f"{base}/img/{i}.png") for i in range(12)]
    rows, stats = fetch_shard(refs, settings(None, threads=2))
    assert stats["ok"] == 12
    assert len({port for port, _ in server.requests}) <= 2


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_host_is_a_connection_error():
    rows, stats = fetch_shard([ref("x", f"http://127.0.0.1:{closed_port()}/a.jpg")], settings(None))
    assert stats["failed"] == {"connection": 1} and "Connection refused" in rows[0]["error"]


def test_to_mirror_keeps_host_path_and_query():
    assert to_mirror("https://Farm1.staticflickr.com/12/34_ab.jpg?imgmax=800#x", "http://127.0.0.1:9/") == (
        "http://127.0.0.1:9/Farm1.staticflickr.com/12/34_ab.jpg?imgmax=800")
    assert to_mirror("http://a.org:8080/x", "http://m:1") == "http://m:1/a.org:8080/x"


def test_malformed_urls_become_rows_not_exceptions():
    urls = ["http://example.com:99999/x.jpg", "http://example.com:abc/x.jpg", "http://a..b/x.jpg", "", None,
            "data:image/png;base64,iVBORw0KGgo=", "//no-scheme.example/x.jpg"]
    rows, stats = fetch_shard([ref(f"m{i}", url) for i, url in enumerate(urls)], settings(None))
    assert stats["failed"] == {"bad_scheme": len(urls)}
    assert [row["url"] for row in rows] == urls
