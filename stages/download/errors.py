"""The download error vocabulary: one type per failed image, and the mapping from exceptions to it."""

from __future__ import annotations

import http.client
import re
import socket

from stages.download.urls import BadScheme

OK = "ok"
HTTP_404 = "http_404"
HTTP_4XX = "http_4xx"
HTTP_5XX = "http_5xx"
TIMEOUT = "timeout"
CONNECTION = "connection"
TRUNCATED = "truncated"
NOT_IMAGE = "not_image"
TOO_LARGE = "too_large"  # body over max_bytes
DECOMPRESSION_BOMB = "decompression_bomb"  # width * height over max_pixels
REDIRECT_LOOP = "redirect_loop"
BAD_SCHEME = "bad_scheme"

ERROR_TYPES = (
    HTTP_404, HTTP_4XX, HTTP_5XX, TIMEOUT, CONNECTION, TRUNCATED, NOT_IMAGE, TOO_LARGE,
    DECOMPRESSION_BOMB, REDIRECT_LOOP, BAD_SCHEME,
)
# Failures that another attempt may not repeat; everything else is a property of the URL or its bytes.
TRANSIENT = frozenset({HTTP_5XX, TIMEOUT, CONNECTION})


class FetchError(Exception):
    """A classified download failure: ``kind`` is one of ERROR_TYPES, the message a one-line detail."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


def http_status_type(status: int) -> str:
    if status == 404:
        return HTTP_404
    return HTTP_5XX if status >= 500 else HTTP_4XX


def classify(err: BaseException) -> str | None:
    """The error type of an exception raised by the transport; None for one that is not a network failure.

    Decoding classifies its own failures (any exception out of PIL means "not an image"), so here every
    OSError is a socket-level problem.
    """
    if isinstance(err, FetchError):
        return err.kind
    if isinstance(err, BadScheme):
        return BAD_SCHEME
    # Order matters: IncompleteRead is an HTTPException and socket.timeout an OSError.
    if isinstance(err, http.client.IncompleteRead):
        return TRUNCATED
    if isinstance(err, (TimeoutError, socket.timeout)):
        return TIMEOUT
    if isinstance(err, (http.client.HTTPException, OSError)):
        return CONNECTION
    if isinstance(err, ValueError):  # e.g. a host the resolver cannot encode: the URL is unusable
        return BAD_SCHEME
    return None


# " at 0x7f..." in an object's repr (PIL: "cannot identify image file <_io.BytesIO object at 0x7f...>")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def describe(err: BaseException) -> str:
    """A one-line detail for the ``error`` column, the same in every run (no object addresses)."""
    text = _ADDRESS.sub("", " ".join(str(err).split())) or type(err).__name__
    return text if isinstance(err, FetchError) else f"{type(err).__name__}: {text}"
