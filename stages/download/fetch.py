"""Fetch one shard of images: concurrent GETs, verification by decoding, one IMAGES row per image.

A bad image never raises: it becomes a row whose ``status`` is its error type (see errors.py), so a
shard always completes and its stats say exactly what failed and why.
"""

from __future__ import annotations

import hashlib
import io
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageFile, JpegImagePlugin

from stages.download.config import DownloadConfig
from stages.download.errors import (
    DECOMPRESSION_BOMB,
    NOT_IMAGE,
    OK,
    FetchError,
    classify,
    describe,
)
from stages.download.transport import HttpClient, with_retries

# decode() enforces max_pixels itself before anything is decoded, so PIL's own warning for large
# images would only repeat that check as noise in every worker's log.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_REF_FIELDS = ("corpus", "key", "url", "split", "coco_id", "vg_id", "flickr_id", "flickr_url")


@dataclass(frozen=True)
class FetchSettings:
    timeout_s: float
    retries: int
    backoff_s: float
    max_bytes: int
    max_pixels: int
    max_redirects: int
    threads: int
    mirror_url: str | None = None

    @classmethod
    def from_config(cls, cfg: DownloadConfig, mirror_url: str | None) -> FetchSettings:
        return cls(
            timeout_s=cfg.timeout_s,
            retries=cfg.retries,
            backoff_s=cfg.backoff_s,
            max_bytes=cfg.max_bytes,
            max_pixels=cfg.max_pixels,
            max_redirects=cfg.max_redirects,
            threads=cfg.threads_per_task,
            mirror_url=mirror_url,
        )


def decode(body: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) of an image that decodes completely; FetchError otherwise.

    The pixel count is checked from the header before decoding, so a decompression bomb costs nothing.
    A ``load()`` (not ``verify()``) is what catches truncated or corrupt pixel data. A JPEG is loaded in
    draft mode: libjpeg's DCT scaling makes only 1/8-size pixels but still entropy-decodes the whole
    stream, so truncated or corrupt data fails as it does in a full decode (the tests compare the two),
    for about 3/4 of the CPU (on the benchmark's noisy JPEGs). Like a full decode, it relies on
    ``LOAD_TRUNCATED_IMAGES`` being False. The size reported is the header's, read before the draft
    shrinks ``im.size``.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # a global someone may set; it would let truncated data through
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated images would pass decode()")
    try:
        with Image.open(io.BytesIO(body)) as im:
            width, height = im.size
            if width * height > max_pixels:
                detail = f"{width}x{height} = {width * height} pixels exceeds max_pixels {max_pixels}"
                raise FetchError(DECOMPRESSION_BOMB, detail)
            if isinstance(im, JpegImagePlugin.JpegImageFile):
                im.draft(None, (1, 1))  # the largest DCT scale-down: 1/8 (less for sides under 8 px)
            im.load()
    except FetchError:
        raise
    except Image.DecompressionBombError as err:
        raise FetchError(DECOMPRESSION_BOMB, describe(err)) from None
    except Exception as err:  # noqa: BLE001 - PIL signals bad data with many exception types
        raise FetchError(NOT_IMAGE, describe(err)) from None
    return width, height


def _fetch_verified(client: HttpClient, url: str, settings: FetchSettings) -> tuple[bytes, int, int]:
    body = client.get(url, settings.max_bytes)
    width, height = decode(body, settings.max_pixels)
    return body, width, height


def fetch_one(ref: Any, client: HttpClient, settings: FetchSettings) -> tuple[dict[str, Any], int]:
    """The IMAGES row for one ImageRef and the number of retries it took."""
    row: dict[str, Any] = {name: getattr(ref, name) for name in _REF_FIELDS}
    row.update(status=OK, error=None, sha256=None, size=None, width=None, height=None, image=None)
    try:
        (body, width, height), retries = with_retries(
            lambda: _fetch_verified(client, ref.url, settings), settings.retries, settings.backoff_s
        )
    except Exception as err:
        kind = classify(err)
        if kind is None:
            raise
        row.update(status=kind, error=describe(err))
        return row, 0
    row.update(sha256=hashlib.sha256(body).hexdigest(), size=len(body), width=width, height=height,
               image=body)
    return row, retries


def fetch_shard(refs: list[Any], settings: FetchSettings) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (in the order of ``refs``) and stats ``{ok, failed: {type: n}, retried, bytes, seconds}``.

    ``retried`` counts images that succeeded only after at least one retry.
    """
    start = time.monotonic()
    client = HttpClient(settings.timeout_s, settings.max_redirects, settings.mirror_url)
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(settings.threads, len(refs)))) as pool:
            results = list(pool.map(lambda ref: fetch_one(ref, client, settings), refs))
    finally:
        client.close()
    rows = [row for row, _ in results]
    failed = Counter(row["status"] for row in rows if row["status"] != OK)
    stats = {
        "ok": sum(row["status"] == OK for row in rows),
        "failed": dict(sorted(failed.items())),
        "retried": sum(1 for row, retries in results if row["status"] == OK and retries > 0),
        "bytes": sum(row["size"] or 0 for row in rows),
        "seconds": round(time.monotonic() - start, 3),
    }
    return rows, stats
