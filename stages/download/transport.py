"""HTTP GET over keep-alive connections (one per host per thread), with redirects, size caps and retries.

Shared by the image fetcher and the metadata download. Built on http.client rather than urllib so a
connection is reused across requests to the same host, which is most of the cost for small images.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar
from urllib.parse import urlsplit

from stages.download.errors import (
    REDIRECT_LOOP,
    TOO_LARGE,
    TRANSIENT,
    FetchError,
    classify,
    http_status_type,
)
from stages.download.urls import request_target, resolve_redirect, to_mirror, unmirrored

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
HEADERS = {"User-Agent": "vlp-pipeline/0.1 (research dataset downloader)", "Accept": "*/*"}
_CHUNK = 1 << 16
_DRAIN_LIMIT = 1 << 16  # error/redirect bodies up to this size are read so the connection stays usable
T = TypeVar("T")


def _ack_promptly(sock: socket.socket) -> None:
    """Acknowledge the response's first segment at once instead of after the delayed-ACK timer.

    A server that writes headers and body separately with Nagle's algorithm on (Python's http.server
    does) holds the body until the headers are acknowledged; on a reused keep-alive connection Linux
    delays that ACK by ~40 ms, which would cap every connection at ~25 requests/s. New connections
    start in quick-ACK mode, so only keep-alive clients hit this.
    """
    if hasattr(socket, "TCP_QUICKACK"):  # Linux only; elsewhere the delayed ACK stays
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


class HttpClient:
    """GETs through an optional mirror; every thread that uses it gets its own keep-alive connections."""

    def __init__(self, timeout_s: float, max_redirects: int, mirror_url: str | None = None):
        self.timeout_s = timeout_s
        self.max_redirects = max_redirects
        self.mirror_url = mirror_url
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[dict[tuple[str, str], http.client.HTTPConnection]] = []

    def _connections(self) -> dict[tuple[str, str], http.client.HTTPConnection]:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
            with self._lock:
                self._all.append(conns)
        return conns

    def _connection(self, key: tuple[str, str]) -> tuple[http.client.HTTPConnection, bool]:
        conns = self._connections()
        conn = conns.get(key)
        if conn is not None:
            return conn, True
        scheme, netloc = key
        cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        conn = conns[key] = cls(netloc, timeout=self.timeout_s)
        return conn, False

    def _discard(self, key: tuple[str, str]) -> None:
        conn = self._connections().pop(key, None)
        if conn is not None:
            conn.close()

    def _send(self, url: str) -> tuple[http.client.HTTPResponse, tuple[str, str]]:
        parts = urlsplit(url)
        key = (parts.scheme.lower(), parts.netloc.rpartition("@")[2])
        target = request_target(url)
        while True:
            conn, reused = self._connection(key)
            try:
                conn.request("GET", target, headers=HEADERS)
                _ack_promptly(conn.sock)
                return conn.getresponse(), key
            except (ConnectionResetError, BrokenPipeError):
                self._discard(key)
                # The server closed an idle keep-alive connection before we wrote; a fresh one is not
                # a retry of the request, so it does not count against the retry budget.
                if not reused:
                    raise
            except BaseException:
                self._discard(key)
                raise

    def _release(self, resp: http.client.HTTPResponse, key: tuple[str, str]) -> None:
        """Finish with a response we do not want the body of, keeping the connection when cheap."""
        if resp.length is not None and resp.length <= _DRAIN_LIMIT:
            try:
                resp.read()
                return
            except (http.client.HTTPException, OSError):
                pass
        self._discard(key)

    @contextmanager
    def open(self, url: str) -> Iterator[http.client.HTTPResponse]:
        """GET ``url`` (rewritten through the mirror), following redirects; yields the 2xx response.

        Raises FetchError for an HTTP error status or a redirect loop, BadScheme for a non-http(s) URL,
        and socket errors as they come (``errors.classify`` names them). The connection is kept for the
        next request only if the caller read the body to its end.
        """
        current = to_mirror(url, self.mirror_url)
        seen = {current}
        for _ in range(self.max_redirects + 1):
            resp, key = self._send(current)
            if resp.status in REDIRECT_STATUSES and resp.getheader("Location"):
                location = resp.getheader("Location")
                self._release(resp, key)
                current = resolve_redirect(current, location, self.mirror_url)
                if current in seen:
                    back = unmirrored(current, self.mirror_url)
                    raise FetchError(REDIRECT_LOOP, f"redirect loop: {url} comes back to {back}")
                seen.add(current)
                continue
            if not 200 <= resp.status < 300:
                self._release(resp, key)
                raise FetchError(http_status_type(resp.status), f"HTTP {resp.status} {resp.reason}")
            try:
                yield resp
            except BaseException:
                self._discard(key)
                raise
            if not resp.isclosed():
                self._discard(key)
            return
        raise FetchError(REDIRECT_LOOP, f"more than {self.max_redirects} redirects from {url}")

    def get(self, url: str, max_bytes: int) -> bytes:
        with self.open(url) as resp:
            return read_capped(resp, max_bytes)

    def close(self) -> None:
        with self._lock:
            for conns in self._all:
                for conn in conns.values():
                    conn.close()
                conns.clear()


def read_capped(resp: http.client.HTTPResponse, max_bytes: int) -> bytes:
    """The whole body, refusing one over ``max_bytes`` by its Content-Length or while streaming.

    A body shorter than its Content-Length raises http.client.IncompleteRead (classified "truncated").
    """
    if resp.length is not None:
        if resp.length > max_bytes:
            raise FetchError(TOO_LARGE, f"Content-Length {resp.length} exceeds max_bytes {max_bytes}")
        return resp.read()
    chunks, total = [], 0
    while chunk := resp.read(_CHUNK):
        total += len(chunk)
        if total > max_bytes:
            raise FetchError(TOO_LARGE, f"body exceeds max_bytes {max_bytes} (no Content-Length)")
        chunks.append(chunk)
    return b"".join(chunks)


def with_retries(
    attempt: Callable[[], T], retries: int, backoff_s: float, transient: frozenset[str] = TRANSIENT
) -> tuple[T, int]:
    """``attempt()``, repeated after an exponential backoff while it fails with a transient error type.

    Returns the result and how many retries it took; the last failure propagates.
    """
    n = 0
    while True:
        try:
            return attempt(), n
        except Exception as err:
            if n >= retries or classify(err) not in transient:
                raise
        time.sleep(backoff_s * 2**n)
        n += 1
