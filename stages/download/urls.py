"""URL checks and the mirror rewrite shared by image and metadata downloads."""

from __future__ import annotations

from urllib.parse import quote, urljoin, urlsplit, urlunsplit

ALLOWED_SCHEMES = frozenset({"http", "https"})
# Characters left as they are when quoting a path or query: RFC 3986 reserved + unreserved + "%", so
# an already percent-encoded URL is sent unchanged and only spaces / non-ASCII get escaped.
_SAFE = "/%:@!$&'()*+,;=-._~?"


class BadScheme(ValueError):
    """Not an http(s) URL: another scheme (file://, ftp://, data:), none at all, or no valid host."""


def check_scheme(url: str) -> None:
    """Raise BadScheme unless ``url`` is an http(s) URL with a host that can be looked up."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
        if host:
            host.encode("idna")  # what the resolver will do; raises for empty or over-long labels
    except (TypeError, ValueError, AttributeError) as err:  # None, bytes, or an unparsable netloc
        raise BadScheme(f"refusing {url!r}: not a URL ({err})") from None
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        shown = f"{scheme}://" if scheme else "(none)"
        raise BadScheme(f"refusing {url!r}: scheme {shown} is not http:// or https://")
    if not host:
        raise BadScheme(f"refusing {url!r}: no host")


def to_mirror(url: str, mirror_url: str | None) -> str:
    """``http(s)://host[:port]/path?q`` -> ``<mirror_url>/host[:port]/path?q``; without a mirror, ``url``.

    The netloc is kept as written (minus any user:password@): the mirror serves ``<host>/<path>`` and
    itself falls back to the lowercased host without a default port. The fragment is dropped because
    it is never sent to a server.
    """
    check_scheme(url)
    parts = urlsplit(url)
    if not mirror_url:
        return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", parts.query, ""))
    netloc = parts.netloc.rpartition("@")[2]
    target = f"{mirror_url.rstrip('/')}/{netloc}{parts.path or '/'}"
    return f"{target}?{parts.query}" if parts.query else target


def unmirrored(url: str, mirror_url: str | None) -> str:
    """``url`` with the mirror's base written as ``<mirror>``: how error details name a mirrored URL, so
    that a mirror's address (a loopback mirror's port changes every run) never reaches the output."""
    if mirror_url and url.startswith(mirror_url.rstrip("/") + "/"):
        return "<mirror>" + url[len(mirror_url.rstrip("/")):]
    return url


def request_target(url: str) -> str:
    """The path+query sent on the request line, percent-escaped so http.client accepts it."""
    parts = urlsplit(url)
    target = quote(parts.path or "/", safe=_SAFE)
    return f"{target}?{quote(parts.query, safe=_SAFE)}" if parts.query else target


def resolve_redirect(current: str, location: str, mirror_url: str | None) -> str:
    """The next URL after a redirect from ``current``.

    Relative locations resolve against the URL actually requested. Behind a mirror, an absolute
    location on another host is itself rewritten through the mirror, so a redirect never leaves it.
    """
    target = urljoin(current, location)
    check_scheme(target)
    if mirror_url and urlsplit(target).netloc != urlsplit(mirror_url).netloc:
        return to_mirror(target, mirror_url)
    return target
