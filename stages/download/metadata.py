"""Download each dataset's metadata files into ``<out>/metadata/<dataset>/``.

A file spec is a URL, or ``<archive url>#<member path>`` for a file inside a .zip / .tar.gz. Every
archive is downloaded once however many members are taken from it (COCO's annotation zip serves four
roles, Karpathy's caption zip two datasets). Files already present are kept, so a resumed run does not
download them again; archives live in ``<out>/.archives/`` only until their members are extracted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO
from urllib.parse import unquote, urlsplit

from stages.base import StageError
from stages.download.config import DatasetSource
from stages.download.errors import TRANSIENT, TRUNCATED, FetchError, classify, describe
from stages.download.transport import HttpClient, with_retries
from stages.download.urls import BadScheme, check_scheme, to_mirror

ARCHIVES_DIR = ".archives"
_CHUNK = 1 << 20
# A metadata file cut off mid-way is worth downloading again, unlike an image (see errors.TRANSIENT).
_RETRYABLE = TRANSIENT | {TRUNCATED}

log = logging.getLogger("vlp.download")


@dataclass(frozen=True)
class Caps:
    """Size caps on metadata (``download.metadata_max_bytes``, ``member_max_bytes``, ``member_max_ratio``)."""

    file_bytes: int = 4_000_000_000
    member_bytes: int = 8_000_000_000
    member_ratio: float = 100.0


class OverCap(ValueError):
    """A metadata file or archive member larger than its cap; nothing of it is kept."""


def _copy_capped(src: IO[bytes], out: IO[bytes], cap: int, what: str) -> int:
    written = 0
    while chunk := src.read(_CHUNK):
        written += len(chunk)
        if written > cap:
            raise OverCap(f"{what} exceeds {cap:,} bytes")
        out.write(chunk)
    return written


def split_spec(spec: str) -> tuple[str, str | None]:
    """``"<url>#<member>"`` -> (url, member); a plain URL -> (url, None)."""
    url, sep, member = spec.partition("#")
    return url, (member if sep else None)


def _basename(url: str, member: str | None) -> str:
    """The file name a metadata file is kept under ('' when the URL or member names none usable)."""
    name = PurePosixPath(member if member else unquote(urlsplit(url).path)).name
    return "" if name in (".", "..") else name


def _stream_to(client: HttpClient, url: str, dest: Path, cap: int) -> None:
    """Stream ``url``'s body to ``dest`` (atomically); a body short of its Content-Length is 'truncated',
    one over ``cap`` bytes (declared or streamed) is refused with OverCap."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f"{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, client.open(url) as resp:
            declared = resp.length
            if declared is not None and declared > cap:
                raise OverCap(f"the body ({declared:,} bytes declared) exceeds {cap:,} bytes")
            written = _copy_capped(resp, out, cap, "the body")
            if declared is not None and written < declared:
                raise FetchError(TRUNCATED, f"got {written} of {declared} bytes")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _extract(archive: Path, member: str, dest: Path, caps: Caps) -> None:
    """Copy ``member`` out of a zip or tar archive into ``dest`` (atomically); KeyError if it is absent,
    OverCap once it grows past ``caps.member_bytes`` or ``caps.member_ratio`` x the archive's size."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    cap = min(caps.member_bytes, int(caps.member_ratio * max(archive.stat().st_size, 1)))
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f"{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, _open_member(archive, member) as src:
            _copy_capped(src, out, cap, f"member (archive of {archive.stat().st_size:,} bytes)")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _open_member(archive: Path, member: str) -> IO[bytes]:
    if zipfile.is_zipfile(archive):
        zf = zipfile.ZipFile(archive)
        try:
            return _ClosingMember(zf.open(member), zf)
        except KeyError:
            zf.close()
            raise KeyError(_listing(zf.namelist())) from None
    if tarfile.is_tarfile(archive):
        tf = tarfile.open(archive, "r:*")
        for name in (member, f"./{member}"):
            try:
                info = tf.getmember(name)
            except KeyError:
                continue
            if info.isfile():
                return _ClosingMember(tf.extractfile(info), tf)
        listing = _listing(tf.getnames())
        tf.close()
        raise KeyError(listing)
    raise ValueError("not a zip or tar archive")


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return f"it has: {shown}" if names else "it is empty"


class _ClosingMember:
    """A member's file object that also closes its archive."""

    def __init__(self, fileobj: IO[bytes], archive: zipfile.ZipFile | tarfile.TarFile):
        self._fileobj, self._archive = fileobj, archive

    def read(self, n: int = -1) -> bytes:
        return self._fileobj.read(n)

    def __enter__(self) -> _ClosingMember:
        return self

    def __exit__(self, *exc) -> None:
        self._fileobj.close()
        self._archive.close()


class MetadataFetcher:
    """Fetches metadata files for the stage; every failure is a StageError naming dataset, role and URL."""

    def __init__(self, out_dir: Path, client: HttpClient, retries: int, backoff_s: float,
                 caps: Caps = Caps()):
        self.out_dir = out_dir
        self.client = client
        self.retries = retries
        self.backoff_s = backoff_s
        self.caps = caps

    def fetch_all(self, datasets: dict[str, DatasetSource]) -> dict[str, dict[str, Path]]:
        """{dataset: {role: local path}} for every configured file."""
        files = {name: self.fetch_dataset(name, source) for name, source in datasets.items()}
        shutil.rmtree(self.out_dir / ARCHIVES_DIR, ignore_errors=True)
        return files

    def fetch_dataset(self, name: str, source: DatasetSource) -> dict[str, Path]:
        names = {role: _basename(*split_spec(spec)) or role for role, spec in source.files.items()}
        clashing = {n for n, count in Counter(names.values()).items() if count > 1}
        paths = {}
        for role, spec in source.files.items():
            # Two roles whose files share a name (same basename in different folders) keep both.
            filename = f"{role}-{names[role]}" if names[role] in clashing else names[role]
            paths[role] = self.fetch_file(name, role, spec, self.out_dir / "metadata" / name / filename)
        return paths

    def fetch_file(self, dataset: str, role: str, spec: str, dest: Path) -> Path:
        where = f"download.datasets.{dataset}.files.{role}"
        url, member = split_spec(spec)
        try:
            check_scheme(url)
        except BadScheme as err:
            raise StageError(f"{where}: {err}") from None
        if dest.is_file():
            return dest
        if member is None:
            self._download(where, url, dest)
            return dest
        if not member:
            raise StageError(f"{where}: {spec!r} names no member after '#'")
        archive = self._archive(where, url)
        try:
            _extract(archive, member, dest, self.caps)
        except OverCap as err:
            raise StageError(f"{where}: member {member!r} of {url}: {err} (download.member_max_bytes / "
                             "member_max_ratio)") from None
        except KeyError as err:
            raise StageError(f"{where}: archive {url} has no member {member!r} ({err.args[0]})") from None
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, tarfile.TarError) as err:
            raise StageError(f"{where}: cannot read archive {url}: {describe(err)}") from None
        log.debug("metadata %s/%s: %s from %s", dataset, role, member, url)
        return dest

    def _archive(self, where: str, url: str) -> Path:
        digest = hashlib.sha256(url.encode()).hexdigest()[:12]
        path = self.out_dir / ARCHIVES_DIR / f"{digest}-{_basename(url, None) or 'archive'}"
        if not path.is_file():
            self._download(where, url, path)
        return path

    def _download(self, where: str, url: str, dest: Path) -> None:
        try:
            with_retries(lambda: _stream_to(self.client, url, dest, self.caps.file_bytes), self.retries,
                         self.backoff_s, _RETRYABLE)
        except OverCap as err:
            raise StageError(f"{where}: cannot download {url}: {err} (download.metadata_max_bytes)") from None
        except Exception as err:
            kind = classify(err)
            if kind is None:
                raise
            fetched = to_mirror(url, self.client.mirror_url)
            via = f" (via {fetched})" if fetched != url else ""
            raise StageError(f"{where}: cannot download {url}{via}: {kind}: {describe(err)}") from None
        log.info("metadata: downloaded %s (%d bytes)", url, dest.stat().st_size)
