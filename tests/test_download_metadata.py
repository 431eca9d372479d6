"""Metadata download through the real Mirror: plain files, zip / tar.gz members, resume and errors."""

from __future__ import annotations

import io
import logging
import socket
import tarfile
import zipfile
from pathlib import Path

import pytest

from stages.base import StageError
from stages.download.config import DatasetSource
from stages.download.metadata import ARCHIVES_DIR, MetadataFetcher
from stages.download.transport import HttpClient
from worldgen.mirror import Mirror

ZIP_URL = "http://data.example.org/ann/annotations_trainval.zip"
TAR_URL = "https://data.example.org/sbu/SBUCaptionedPhotoDataset.tar.gz"
PLAIN_URL = "https://raw.example.com/lists/train.txt"
MEMBERS = {
    "annotations/captions_train.json": b'{"images": []}',
    "annotations/instances_train.json": b'{"annotations": []}',
    "dataset/urls.txt": b"http://static.flickr.com/1/2_a.jpg\n",
    "dataset/captions.txt": b"a chair\n",
}


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _publish(www: Path, url: str, data: bytes) -> None:
    path = www / url.split("://", 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    www = tmp_path_factory.mktemp("www")
    _publish(www, ZIP_URL, _zip({k: v for k, v in MEMBERS.items() if k.startswith("annotations/")}))
    _publish(www, TAR_URL, _tar_gz({k: v for k, v in MEMBERS.items() if k.startswith("dataset/")}))
    _publish(www, PLAIN_URL, b"1000092795\n")
    _publish(www, "http://data.example.org/broken.zip", b"PK\x03\x04 not really a zip")
    with Mirror(www) as m:
        yield m


@pytest.fixture
def fetcher():
    """fetcher(out_dir, mirror_url) -> MetadataFetcher; their connections are closed after the test."""
    clients = []

    def make(out: Path, mirror_url: str | None) -> MetadataFetcher:
        clients.append(HttpClient(timeout_s=2, max_redirects=2, mirror_url=mirror_url))
        return MetadataFetcher(out, clients[-1], retries=1, backoff_s=0.01)

    yield make
    for client in clients:
        client.close()


DATASETS = {
    "coco": DatasetSource(files={
        "captions_train": f"{ZIP_URL}#annotations/captions_train.json",
        "instances_train": f"{ZIP_URL}#annotations/instances_train.json",
        "ids": PLAIN_URL,
    }),
    "sbu": DatasetSource(files={
        "urls": f"{TAR_URL}#dataset/urls.txt",
        "captions": f"{TAR_URL}#dataset/captions.txt",
    }),
}


def test_members_are_extracted_and_each_archive_downloaded_once(mirror, tmp_path, caplog, fetcher):
    caplog.set_level(logging.INFO, logger="vlp.download")
    files = fetcher(tmp_path, mirror.base_url).fetch_all(DATASETS)
    assert files == {
        "coco": {"captions_train": tmp_path / "metadata/coco/captions_train.json",
                 "instances_train": tmp_path / "metadata/coco/instances_train.json",
                 "ids": tmp_path / "metadata/coco/train.txt"},
        "sbu": {"urls": tmp_path / "metadata/sbu/urls.txt",
                "captions": tmp_path / "metadata/sbu/captions.txt"},
    }
    assert files["coco"]["captions_train"].read_bytes() == MEMBERS["annotations/captions_train.json"]
    assert files["coco"]["instances_train"].read_bytes() == MEMBERS["annotations/instances_train.json"]
    assert files["coco"]["ids"].read_bytes() == b"1000092795\n"
    assert files["sbu"]["urls"].read_bytes() == MEMBERS["dataset/urls.txt"]
    assert files["sbu"]["captions"].read_bytes() == MEMBERS["dataset/captions.txt"]
    downloads = [r.getMessage() for r in caplog.records if r.getMessage().startswith("metadata: downloaded")]
    assert sorted(d.split()[2] for d in downloads) == sorted([ZIP_URL, TAR_URL, PLAIN_URL])
    assert not (tmp_path / ARCHIVES_DIR).exists()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        ["captions_train.json", "instances_train.json", "train.txt", "urls.txt", "captions.txt"])

    # A rerun finds every file in place and needs no server at all.
    again = fetcher(tmp_path, f"http://127.0.0.1:{_closed_port()}").fetch_all(DATASETS)
    assert again == files


def test_same_file_name_from_two_roles_keeps_both(mirror, tmp_path, fetcher):
    source = DatasetSource(files={"a": f"{ZIP_URL}#annotations/captions_train.json",
                                  "b": "http://data.example.org/other/captions_train.json"})
    _publish(Path(mirror.www_root), source.files["b"], b"other")
    files = fetcher(tmp_path, mirror.base_url).fetch_dataset("x", source)
    assert files["a"].name == "a-captions_train.json" and files["b"].name == "b-captions_train.json"
    assert files["b"].read_bytes() == b"other"


@pytest.mark.parametrize("url, member", [(ZIP_URL, "annotations/captions_val.json"),
                                         (TAR_URL, "dataset/missing.txt")])
def test_missing_member_names_archive_and_member(mirror, tmp_path, url, member, fetcher):
    source = DatasetSource(files={"captions_val": f"{url}#{member}"})
    with pytest.raises(StageError) as err:
        fetcher(tmp_path, mirror.base_url).fetch_dataset("coco", source)
    message = str(err.value)
    assert message.startswith(
        f"download.datasets.coco.files.captions_val: archive {url} has no member '{member}'")
    assert "it has: " in message and "\n" not in message
    assert not (tmp_path / "metadata/coco").exists() or not any((tmp_path / "metadata/coco").iterdir())


def test_not_an_archive_is_named(mirror, tmp_path, fetcher):
    source = DatasetSource(files={"x": "http://data.example.org/broken.zip#a.json"})
    with pytest.raises(StageError,
                       match=r"files\.x: cannot read archive http://data\.example\.org/broken\.zip: "):
        fetcher(tmp_path, mirror.base_url).fetch_dataset("d", source)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_mirror_is_one_line_naming_the_url(tmp_path, fetcher):
    port = _closed_port()
    with pytest.raises(StageError) as err:
        fetcher(tmp_path, f"http://127.0.0.1:{port}").fetch_all(DATASETS)
    assert str(err.value) == (
        f"download.datasets.coco.files.captions_train: cannot download {ZIP_URL} "
        f"(via http://127.0.0.1:{port}/data.example.org/ann/annotations_trainval.zip): "
        "connection: ConnectionRefusedError: [Errno 111] Connection refused")


def test_missing_file_and_bad_scheme(mirror, tmp_path, fetcher):
    with pytest.raises(StageError, match=r"^download\.datasets\.vg\.files\.image_data: cannot download "
                                         r"http://data\.example\.org/nope\.json .*: "
                                         r"http_404: HTTP 404 Not Found$"):
        fetcher(tmp_path, mirror.base_url).fetch_dataset(
            "vg", DatasetSource(files={"image_data": "http://data.example.org/nope.json"}))
    for url in ("file:///etc/passwd", "ftp://data.example.org/x.json"):
        # The config refuses such a URL when it loads; the fetcher refuses it too, whoever built the source.
        with pytest.raises(ValueError, match="refusing"):
            DatasetSource(files={"objects": url})
        with pytest.raises(StageError,
                           match=r"^download\.datasets\.vg\.files\.objects: refusing '.*': scheme "):
            fetcher(tmp_path, mirror.base_url).fetch_dataset(
                "vg", DatasetSource.model_construct(files={"objects": url}))
