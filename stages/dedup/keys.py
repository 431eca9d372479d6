"""Canonical identity keys of an image: COCO id, Flickr photo id, normalized URL, content hash.

Pure functions (no Ray, no I/O) so that both the blocklist and the filter use exactly the same keys.
"""

from __future__ import annotations

import re
import string
from typing import Any
from urllib.parse import quote, urlsplit

# Match reasons in precedence order: an image matching several is reported under the first. vg_id (an image's
# own Visual Genome id, blocked by GQA's evaluation splits) comes first, as a blocked COCO image is removed by
# its own coco_id; it is in play only when GQA was downloaded (dedup's report lists it only then).
REASONS = ("vg_id", "coco_id", "flickr_id", "url", "content_hash")

# Static image hosts: farmN.staticflickr.com, live.staticflickr.com, c1.staticflickr.com,
# static.flickr.com, farmN.static.flickr.com, ...
_FLICKR_STATIC_HOST = re.compile(r"^(?:[a-z0-9-]+\.)*(?:staticflickr\.com|static\.flickr\.com)$")
_FLICKR_PAGE_HOST = re.compile(r"^(?:www\.|m\.)?flickr\.com$")
# <id>_<secret>[_<size>][_d].<ext>; the secret differs per size class, so only the id identifies a photo.
_FLICKR_FILE = re.compile(r"^(\d+)_[0-9A-Za-z]+(?:_[0-9a-z]{1,2})?(?:_d)?\.(?:jpe?g|png|gif)$", re.IGNORECASE)

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_STRAY_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_PATH_SAFE = "/:@!$&'()*+,;="
_QUERY_SAFE = _PATH_SAFE + "?"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def flickr_photo_id(url: str | None) -> int | None:
    """The Flickr photo id named by a static image URL or a photo page URL; None for anything else."""
    if not url:
        return None
    try:
        parts = urlsplit(url.strip())
        host = (parts.hostname or "").rstrip(".")
    except ValueError:
        return None
    segments = [s for s in parts.path.split("/") if s]
    if _FLICKR_STATIC_HOST.match(host) and segments:
        found = _FLICKR_FILE.match(segments[-1])
        return int(found.group(1)) if found else None
    # www.flickr.com/photos/<user>/<id>[/...]
    if _FLICKR_PAGE_HOST.match(host) and len(segments) >= 3 and segments[0] == "photos":
        return int(segments[2]) if segments[2].isdigit() else None
    return None


def _normalize_escapes(text: str, safe: str) -> str:
    """RFC 3986 percent-encoding normalization: decode unreserved octets, uppercase the other escapes,
    and encode what must be encoded (spaces, non-ASCII as UTF-8, stray '%')."""
    text = _STRAY_PERCENT.sub("%25", text)

    def fix(escape: re.Match[str]) -> str:
        char = chr(int(escape.group(1), 16))
        return char if char in _UNRESERVED else "%" + escape.group(1).upper()

    return quote(_ESCAPE.sub(fix, text), safe=safe + "%")


def _normalize_host(host: str) -> str:
    host = host.rstrip(".")
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        pass  # not a valid IDN: the lowercased spelling is still a stable key
    return f"[{host}]" if ":" in host else host  # IPv6 literal


def normalize_url(url: str) -> str:
    """One spelling per resource: lowercase scheme and host, http == https, no default port, no fragment,
    sorted query parameters, normalized percent-encoding, no trailing slash (root path is "/")."""
    text = url.strip()
    parts = urlsplit(text)
    if not parts.scheme or not parts.netloc:
        return text
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
        host = parts.netloc.rpartition("@")[2].lower()
    else:
        host = _normalize_host(parts.hostname or "")
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        host = f"{host}:{port}"
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}" if userinfo else host
    if scheme in _DEFAULT_PORTS:
        scheme = "http"
    path = _normalize_escapes(parts.path, _PATH_SAFE).rstrip("/") or "/"
    params = sorted(_normalize_escapes(p, _QUERY_SAFE) for p in parts.query.split("&") if p)
    query = "?" + "&".join(params) if params else ""
    return f"{scheme}://{netloc}{path}{query}"


def key_id(key: str) -> int:
    """The numeric id at the end of a canonical key such as "coco:57870" or "flickr30k:1016887272"."""
    tail = key.rpartition(":")[2]
    if not tail.isdigit():
        raise ValueError(f"image key {key!r} does not end in a numeric id")
    return int(tail)


def image_keys(row: dict[str, Any]) -> dict[str, set]:
    """Every identity key of an IMAGES row (see vlp/data/tables.py), by match reason."""
    key = row.get("key") or ""
    prefix = key.partition(":")[0]
    coco_ids = {row["coco_id"]} if row.get("coco_id") is not None else set()
    if prefix == "coco":
        coco_ids.add(key_id(key))
    flickr_ids = {row["flickr_id"]} if row.get("flickr_id") is not None else set()
    if prefix in ("flickr30k", "flickr"):
        flickr_ids.add(key_id(key))
    for field in ("url", "flickr_url"):
        photo_id = flickr_photo_id(row.get(field))
        if photo_id is not None:
            flickr_ids.add(photo_id)
    vg_ids = {row["vg_id"]} if row.get("vg_id") is not None else set()
    if prefix == "vg":
        vg_ids.add(key_id(key))
    url = row.get("url")
    sha256 = row.get("sha256")
    return {
        "vg_id": vg_ids,
        "coco_id": coco_ids,
        "flickr_id": flickr_ids,
        "url": {normalize_url(url)} if url else set(),
        "content_hash": {sha256.lower()} if sha256 else set(),
    }
