"""Places the world's metadata at the configured URLs, packing archives the way the real data ships.

A role's URL is either a plain file, ``<archive url>#<member path>`` (the role is one member of that
archive), or an archive URL whose role holds a whole set of members (Flickr30k Entities). Archives are
byte-deterministic: fixed timestamps, sorted members.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import zipfile

from worldgen.errors import WorldError

_EPOCH_ZIP = (1980, 1, 1, 0, 0, 0)
_EPOCH_TAR = 1_262_304_000  # 2010-01-01, when the SBU archive was published


def place_metadata(
    metadata: dict[tuple[str, str], bytes | dict[str, bytes]], sources: dict[str, dict[str, str]]
) -> dict[str, bytes]:
    """URL -> bytes of every metadata file and archive, at the URLs ``sources`` gives each role.

    ``sources``: dataset -> role -> URL, as in ``download.datasets.<dataset>.files`` (named in errors).
    """
    files: dict[str, bytes] = {}
    archives: dict[str, dict[str, bytes]] = {}
    for (dataset, role), content in sorted(metadata.items()):
        roles = sources.get(dataset)
        if roles is None or role not in roles:
            raise WorldError(
                f"download.datasets.{dataset}.files.{role}: not configured; the world publishes it "
                f"(configure its URL, e.g. from configs/demo.yaml)"
            )
        archive_url, has_member, member = roles[role].partition("#")
        if isinstance(content, dict):
            if has_member:
                raise WorldError(
                    f"download.datasets.{dataset}.files.{role}: {roles[role]!r} names a member, "
                    f"but this role is a whole archive"
                )
            archives.setdefault(archive_url, {}).update(content)
        elif has_member:
            archives.setdefault(archive_url, {})[member] = content
        else:
            files[archive_url] = content
    for dataset, roles in sorted(sources.items()):
        for role in sorted(roles):
            if (dataset, role) not in metadata:
                raise WorldError(
                    f"download.datasets.{dataset}.files.{role}: the synthetic world publishes no such file"
                )
    for url, members in archives.items():
        files[url] = pack(url, members)
    return files


def pack(url: str, members: dict[str, bytes]) -> bytes:
    path = url.split("?", 1)[0].lower()
    if path.endswith(".zip"):
        return _zip(members)
    if path.endswith((".tar.gz", ".tgz")):
        return _tar_gz(members)
    raise WorldError(f"{url}: archive members are configured, but the URL is neither .zip nor .tar.gz")


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=_EPOCH_ZIP)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, members[name])
    return buf.getvalue()


def _tar_gz(members: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        dirs = sorted({name.rsplit("/", 1)[0] for name in members if "/" in name})
        for d in dirs:
            info = tarfile.TarInfo(d + "/")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, _EPOCH_TAR
            tf.addfile(info)
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(members[name]), 0o644, _EPOCH_TAR
            tf.addfile(info, io.BytesIO(members[name]))
    return gzip.compress(raw.getvalue(), mtime=0)
