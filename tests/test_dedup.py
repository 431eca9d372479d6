"""Dedup: canonical keys, URL normalization, and the stage on a hand-built download output."""

from __future__ import annotations

import filecmp
import hashlib
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from stages.base import StageContext, StageError
from stages.dedup import stage
from stages.dedup.config import DedupConfig
from stages.dedup.keys import flickr_photo_id, image_keys, normalize_url
from vlp.data.tables import CAPTIONS, ENTITIES, IMAGES, OBJECTS, REGIONS, SPLITS

# ---------------------------------------------------------------------------------------------- keys

FLICKR_URLS = [
    # FORMATS.md: COCO flickr_url, SBU without size suffix, live host of COCO 2017
    ("http://farm2.staticflickr.com/1150/1016887272_5a3c9e1f0b_z.jpg", 1016887272),
    ("https://farm2.staticflickr.com/1150/1016887272_5a3c9e1f0b_z.jpg", 1016887272),
    ("http://static.flickr.com/1150/1016887272_5a3c9e1f0b.jpg", 1016887272),
    ("https://live.staticflickr.com/7245/7162685234_d4e1b8a2c6_z.jpg", 7162685234),
    ("http://static.flickr.com/2729/4385058960_b0f291553e.jpg", 4385058960),
    ("http://farm3.static.flickr.com/2041/4971484184_6d0c3d1b77_m.jpg", 4971484184),
    ("https://c1.staticflickr.com/1/1150/1016887272_5a3c9e1f0b_b.jpg", 1016887272),
    ("https://c2.staticflickr.com/8/7245/7162685234_d4e1b8a2c6_c.jpg", 7162685234),
    # originals and large sizes have their own secret
    ("https://live.staticflickr.com/1150/1016887272_9f8e7d6c5b_o.png", 1016887272),
    ("https://farm2.staticflickr.com/1150/1016887272_9f8e7d6c5b_o.gif", 1016887272),
    ("https://live.staticflickr.com/1150/1016887272_4b3a2c1d0e_3k.jpg", 1016887272),
    ("https://live.staticflickr.com/1150/1016887272_5a3c9e1f0b_z_d.jpg", 1016887272),
    ("http://farm2.staticflickr.com/1150/1016887272_5a3c9e1f0b_z.jpg?zz=1&w=640", 1016887272),
    ("HTTP://FARM2.STATICFLICKR.COM/1150/1016887272_5a3c9e1f0b_Z.JPG", 1016887272),
    ("  http://farm2.staticflickr.com:80/1150/1016887272_5a3c9e1f0b_z.jpg#top\n", 1016887272),
    ("https://www.flickr.com/photos/47889917@N08/4385058960/", 4385058960),
    ("https://flickr.com/photos/someone/4385058960/in/photostream", 4385058960),
]

NOT_FLICKR = [
    None,
    "",
    "http://images.cocodataset.org/train2014/COCO_train2014_000000057870.jpg",
    "https://example.com/1150/1016887272_5a3c9e1f0b_z.jpg",
    "http://staticflickr.com.evil.example/1150/1016887272_5a3c9e1f0b_z.jpg",
    "http://notstaticflickr.com/1150/1016887272_5a3c9e1f0b_z.jpg",
    "http://farm2.staticflickr.com/1150/buddyicon.jpg",
    "http://farm2.staticflickr.com/1150/1016887272_5a3c9e1f0b_z.txt",
    "https://www.flickr.com/photos/someone/albums/72157600000000000",
    "http://shannon.cs.illinois.edu/DenotationGraph/data/flickr30k-images/1016887272.jpg",
]


@pytest.mark.parametrize(("url", "photo_id"), FLICKR_URLS)
def test_flickr_photo_id_parses_every_spelling(url, photo_id):
    assert flickr_photo_id(url) == photo_id


@pytest.mark.parametrize("url", NOT_FLICKR)
def test_flickr_photo_id_is_none_off_flickr(url):
    assert flickr_photo_id(url) is None


SAME_URL = [
    ("HTTP://Example.COM/a", "http://example.com/a"),
    ("https://example.com/a", "http://example.com/a"),
    ("http://example.com:80/a", "http://example.com/a"),
    ("https://example.com:443/a", "http://example.com/a"),
    ("http://example.com/a#frag", "http://example.com/a"),
    ("http://example.com/a?b=2&a=1", "http://example.com/a?a=1&b=2"),
    ("http://example.com/a?x=1&&y=2", "http://example.com/a?x=1&y=2"),
    ("http://example.com/a?", "http://example.com/a"),
    ("http://example.com/%7Euser/%41", "http://example.com/~user/A"),
    ("http://example.com/a%2fb", "http://example.com/a%2Fb"),
    ("http://example.com/a b", "http://example.com/a%20b"),
    ("http://example.com/café.jpg", "http://example.com/caf%C3%A9.jpg"),
    ("http://example.com/100%", "http://example.com/100%25"),
    ("http://example.com/a/", "http://example.com/a"),
    ("http://example.com", "http://example.com/"),
    ("http://example.com./a", "http://example.com/a"),
    ("http://bücher.example/", "http://xn--bcher-kva.example/"),
]

DIFFERENT_URL = [
    ("http://example.com:8080/a", "http://example.com/a"),
    ("http://example.com/A", "http://example.com/a"),
    ("http://example.com/a?x=1", "http://example.com/a?x=2"),
    ("http://example.com/a%2Fb", "http://example.com/a/b"),
    ("http://www.example.com/a", "http://example.com/a"),
]


@pytest.mark.parametrize(("a", "b"), SAME_URL)
def test_normalize_url_unifies_spellings(a, b):
    assert normalize_url(a) == normalize_url(b) == b


@pytest.mark.parametrize(("a", "b"), DIFFERENT_URL)
def test_normalize_url_keeps_distinct_resources_apart(a, b):
    assert normalize_url(a) != normalize_url(b)


def test_normalize_url_exact_form_and_idempotence():
    url = " HTTPS://Images.CocoDataset.org:443/val2014/x.jpg/?b=2&a=%7e1#frag "
    assert normalize_url(url) == "http://images.cocodataset.org/val2014/x.jpg?a=~1&b=2"
    for a, b in SAME_URL + DIFFERENT_URL:
        for u in (a, b):
            assert normalize_url(normalize_url(u)) == normalize_url(u)
    assert normalize_url("http://[::1]:8080/x") == "http://[::1]:8080/x"
    assert normalize_url("not a url") == "not a url"


def test_image_keys_of_coco_vg_and_flickr30k_rows():
    coco = {"key": "coco:600421", "url": "http://images.cocodataset.org/train2014/x.jpg", "sha256": "AB",
            "coco_id": 600421, "flickr_id": None,
            "flickr_url": "http://farm2.staticflickr.com/1150/1016887272_5a3c9e1f0b_z.jpg"}
    assert image_keys(coco) == {"vg_id": set(), "coco_id": {600421}, "flickr_id": {1016887272},
                                "url": {"http://images.cocodataset.org/train2014/x.jpg"},
                                "content_hash": {"ab"}}
    vg = {"key": "vg:2418001", "url": "https://cs.stanford.edu/people/rak248/VG_100K/2418001.jpg",
          "sha256": None, "coco_id": 600421, "flickr_id": 1016887272, "flickr_url": None}
    assert image_keys(vg) == {"vg_id": {2418001}, "coco_id": {600421}, "flickr_id": {1016887272},
                              "url": {"http://cs.stanford.edu/people/rak248/VG_100K/2418001.jpg"},
                              "content_hash": set()}
    f30k = {"key": "flickr30k:3416050480", "url": None, "sha256": None, "coco_id": None, "flickr_id": None,
            "flickr_url": None}
    assert image_keys(f30k)["flickr_id"] == {3416050480}
    with pytest.raises(ValueError, match="coco:abc"):
        image_keys({"key": "coco:abc"})


def test_config_defaults_and_validation():
    cfg = DedupConfig()
    assert cfg.flickr30k_entities_splits == ["train", "val", "test"]
    assert cfg.coco_karpathy_splits == ["val", "test"]
    assert cfg.refcoco_splits == ["val", "testA", "testB"]
    assert cfg.nlvr2_splits == ["dev", "test1"]
    assert cfg.gqa_splits == ["val", "testdev"]
    assert cfg.reasons.model_dump() == {"coco_id": True, "vg_id": True, "flickr_id": True, "url": True,
                                        "content_hash": True}
    with pytest.raises(ValidationError):
        DedupConfig(blocked=["x"])
    with pytest.raises(ValidationError):
        DedupConfig(refcoco_splits=["tesTA"])
    with pytest.raises(ValidationError):
        DedupConfig(reasons={"phash": True})


# ------------------------------------------------------------------------------- hand-built download

SHANNON = "http://shannon.cs.illinois.edu/DenotationGraph/data/flickr30k-images/"
COCO_URL = "http://images.cocodataset.org/{}/COCO_{}_{:012d}.jpg"
NLVR2_DEV_LEFT = "https://i.kinja-img.com/gawker-media/image/upload/s--UyhVSznS--/18iy0hwo5wdrpjpg.jpg"
NLVR2_DEV_RIGHT = "https://cdn.pixabay.com/photo/2015/09/21/12/57/beer-bottles-949793_960_720.jpg"
NLVR2_TEST1 = "https://example.org/nlvr/pics/a.jpg?w=960&fmt=jpg"
NLVR2_TRAIN = "https://example.org/train/left.png"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image(corpus, key, url, split="train", status="ok", content=None, **ids):
    ok = status == "ok"
    data = (content or f"pixels of {key}".encode()) if ok else None
    return {"corpus": corpus, "key": key, "url": url, "split": split, "status": status,
            "error": None if ok else f"{status} for {url}", "sha256": sha(data) if ok else None,
            "size": len(data) if ok else None, "width": 8 if ok else None, "height": 6 if ok else None,
            "image": data, "coco_id": ids.get("coco_id"), "vg_id": ids.get("vg_id"),
            "flickr_id": ids.get("flickr_id"), "flickr_url": ids.get("flickr_url")}


def coco(image_id, split="train2014", **kw):
    folder = "val2014" if split.startswith("val") else "train2014"
    return image("coco", f"coco:{image_id}", COCO_URL.format(folder, folder, image_id), split,
                 coco_id=image_id, **kw)


def vg(image_id, url=None, **kw):
    return image("vg", f"vg:{image_id}", url or f"https://cs.stanford.edu/people/rak248/VG_100K/{image_id}.jpg",
                 vg_id=image_id, **kw)


def flickr30k(photo_id, **kw):
    return image("flickr30k", f"flickr30k:{photo_id}", f"{SHANNON}{photo_id}.jpg", flickr_id=photo_id, **kw)


F1, F2, N1, N4 = b"flickr 1016887272", b"flickr 4971484184", b"nlvr2 dev left", b"nlvr2 train left"

SHARDS = {
    "coco": [
        [coco(57870, flickr_url="http://farm4.staticflickr.com/3153/2970773875_164f0c0b83_z.jpg"),
         coco(600421, flickr_url="http://farm2.staticflickr.com/1150/1016887272_5a3c9e1f0b_z.jpg"),
         coco(600422, "val2017", flickr_url="https://live.staticflickr.com/7245/7162685234_d4e1b8a2c6_z.jpg"),
         coco(100, status="http_404")],
        [coco(391895, "val2014", flickr_url="http://farm3.staticflickr.com/2000/8186000001_abcdef0123_z.jpg"),
         coco(101),
         coco(102, "val2014", flickr_url="http://farm3.staticflickr.com/2000/8186000002_abcdef0123_z.jpg")],
    ],
    "vg": [[
        vg(1, url="https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg"),
        vg(2418001, coco_id=600421, flickr_id=1016887272),
        vg(2418002, flickr_id=8186000001),
        vg(2418003, url="HTTPS://Images.CocoDataset.org:443/val2014/COCO_val2014_000000391895.jpg#x"),
        vg(2418004, content=F2),
        vg(2418005, status="timeout"),
    ]],
    "cc": [[
        image("cc", "cc:train:0", "http://example.org/nlvr/pics/a.jpg?fmt=jpg&w=960"),
        image("cc", "cc:train:1", "https://unrelated.example.net/x.jpg", content=N1),
        image("cc", "cc:train:2", NLVR2_TRAIN, content=N4),
        image("cc", "cc:train:3", NLVR2_DEV_RIGHT.replace("cdn.pixabay", "CDN.Pixabay"), content=F1),
        image("cc", "cc:train:4", "http://www.cc-host.example/img/Flickr%20pic.jpg?imgmax=800"),
        image("cc", "cc:val:0", "http://www.cc-host.example/val.jpg", split="val", status="timeout"),
    ]],
    "sbu": [[
        image("sbu", "sbu:0", "http://static.flickr.com/2729/4385058960_b0f291553e.jpg"),
        image("sbu", "sbu:1", "http://static.flickr.com/4086/4971484184_6d0c3d1b77.jpg"),
        image("sbu", "sbu:2", "http://static.flickr.com/1150/1016887272_5a3c9e1f0b.jpg"),
        image("sbu", "sbu:3", "https://farm6.static.flickr.com/5003/1000092795_0123456789_b.jpg"),
    ]],
    "flickr30k": [[
        flickr30k(1016887272, content=F1),
        flickr30k(4971484184, content=F2),
        flickr30k(3416050480, status="http_404"),
    ]],
    "nlvr2": [[
        image("nlvr2", "nlvr2:dev-850-0-img0", NLVR2_DEV_LEFT, "dev", content=N1),
        image("nlvr2", "nlvr2:dev-850-0-img1", NLVR2_DEV_RIGHT, "dev", status="http_404"),
        image("nlvr2", "nlvr2:test1-0-1-img0", NLVR2_TEST1, "test1"),
        image("nlvr2", "nlvr2:train-10171-0-img0", NLVR2_TRAIN, "train", content=N4),
    ]],
}

ENTITIES_LISTS = {"train": [1000092795], "val": [2000000001],
                  "test": [1016887272, 7162685234, 4971484184, 3416050480]}
KARPATHY = {"train": [57870, 101], "restval": [600421], "val": [102], "test": [391895]}
REFCOCO = [(50001, "coco:600421", "testA"), (0, "coco:57870", "train"), (7, "coco:999999", "val")]


def caption(corpus, key, n=0):
    return {"corpus": corpus, "image_key": key, "caption_id": f"{key}#{n}",
            "caption": f"caption {n} of {key}", "split": "train"}


CAPTIONED = ["coco:57870", "coco:57870", "coco:600421", "coco:100", "coco:555", "cc:train:0", "cc:train:2",
             "cc:val:0", "sbu:0", "sbu:1", "flickr30k:3416050480"]
CAPTION_ROWS = [caption(key.partition(":")[0], key, n) for n, key in enumerate(CAPTIONED)]


def box(table_row):
    return {**table_row, "x": 1.0, "y": 2.0, "w": 3.0, "h": 4.0}


REGION_ROWS = [box({"corpus": "vg", "image_key": k, "region_id": i, "phrase": f"region {i}"})
               for i, k in enumerate(["vg:1", "vg:2418001", "vg:2418005", "vg:1"])]
OBJECT_KEYS = [("coco", "coco:57870"), ("coco", "coco:600421"), ("vg", "vg:2418004"), ("vg", "vg:1")]
OBJECT_ROWS = [box({"corpus": c, "image_key": k, "object_id": i, "names": ["shape"], "attributes": ["red"]})
               for i, (c, k) in enumerate(OBJECT_KEYS)]


def write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def build_download(root: Path) -> None:
    for corpus, shards in SHARDS.items():
        for i, rows in enumerate(shards):
            shard = root / "images" / corpus / f"shard-{i:05d}.parquet"
            write(pa.Table.from_pylist(rows, schema=IMAGES), shard)
            ok = sum(r["status"] == "ok" for r in rows)
            stats = {"ok": ok, "failed": {r["status"]: 1 for r in rows if r["status"] != "ok"}}
            (root / "stats" / corpus).mkdir(parents=True, exist_ok=True)
            (root / "stats" / corpus / f"shard-{i:05d}.json").write_text(json.dumps(stats))
    splits = [{"corpus": "flickr30k", "scheme": "entities", "split": s, "image_key": f"flickr30k:{i}"}
              for s, ids in ENTITIES_LISTS.items() for i in ids]
    splits += [{"corpus": "coco", "scheme": "karpathy", "split": s, "image_key": f"coco:{i}"}
               for s, ids in KARPATHY.items() for i in ids]
    write(pa.Table.from_pylist(splits, schema=SPLITS), root / "tables" / "splits.parquet")
    write(pa.Table.from_pylist([{"ref_id": r, "image_key": k, "split": s, "sentence": f"ref {r}"}
                                for r, k, s in REFCOCO]), root / "tables" / "task_refcoco.parquet")
    nlvr2_task = [{"identifier": "dev-850-0-0", "left": "nlvr2:dev-850-0-img0", "label": False}]
    write(pa.Table.from_pylist(nlvr2_task), root / "tables" / "task_nlvr2.parquet")
    write(pa.Table.from_pylist(CAPTION_ROWS, schema=CAPTIONS), root / "tables" / "captions.parquet")
    write(pa.Table.from_pylist(REGION_ROWS, schema=REGIONS), root / "tables" / "regions.parquet")
    write(pa.Table.from_pylist(OBJECT_ROWS, schema=OBJECTS), root / "tables" / "objects.parquet")
    entities = [{"image_key": "flickr30k:3416050480", "sentence_idx": 0, "sentence": "A man plays .",
                 "phrase": "A man", "phrase_id": "1", "phrase_types": ["people"], "first_word_index": 0,
                 "boxes": [[1.0, 2.0, 30.0, 40.0]]}]
    write(pa.Table.from_pylist(entities, schema=ENTITIES), root / "tables" / "entities.parquet")
    (root / "metadata" / "coco").mkdir(parents=True)
    (root / "metadata" / "coco" / "captions_train2014.json").write_text('{"images": [], "annotations": []}')


def run_stage(tmp_path: Path, cfg: DedupConfig, name: str = "out"):
    root = tmp_path / "download"
    if not root.exists():
        build_download(root)
    ctx = StageContext(cfg=SimpleNamespace(dedup=cfg), workdir=tmp_path, out_dir=tmp_path / name,
                       inputs={"download": root}, log=logging.getLogger("test.dedup"))
    return root, ctx.out_dir, stage.run(ctx)


VAL391895 = "http://images.cocodataset.org/val2014/COCO_val2014_000000391895.jpg"
EXPECTED_REMOVED = {
    ("coco", "coco:600421", "coco_id", "600421"),  # also flickr_id, url and hash: coco_id comes first
    ("coco", "coco:600422", "flickr_id", "7162685234"),
    ("coco", "coco:391895", "coco_id", "391895"),
    ("coco", "coco:102", "coco_id", "102"),
    ("vg", "vg:2418001", "coco_id", "600421"),  # its flickr_id is blocked too
    ("vg", "vg:2418002", "flickr_id", "8186000001"),  # photo of a blocked COCO image
    ("vg", "vg:2418003", "url", VAL391895),
    ("vg", "vg:2418004", "content_hash", sha(F2)),
    ("cc", "cc:train:0", "url", "http://example.org/nlvr/pics/a.jpg?fmt=jpg&w=960"),
    ("cc", "cc:train:1", "content_hash", sha(N1)),
    # URL of an NLVR2 dev image that failed to download; the same bytes as a Flickr30k image come second
    ("cc", "cc:train:3", "url", "http://cdn.pixabay.com/photo/2015/09/21/12/57/beer-bottles-949793_960_720.jpg"),
    ("sbu", "sbu:1", "flickr_id", "4971484184"),
    ("sbu", "sbu:2", "flickr_id", "1016887272"),
    ("sbu", "sbu:3", "flickr_id", "1000092795"),  # Entities train list
}
FAILED = {"coco:100", "vg:2418005", "cc:val:0", "flickr30k:3416050480", "nlvr2:dev-850-0-img1"}


def removed_set(out: Path) -> set[tuple]:
    rows = pq.read_table(out / "removed.parquet").to_pylist()
    assert len(rows) == len({r["key"] for r in rows})
    return {(r["corpus"], r["key"], r["reason"], r["matched"]) for r in rows}


def assert_images_filtered(root: Path, out: Path, removed_keys: set[str]) -> None:
    """Every input shard has an output shard holding exactly the surviving rows, unchanged."""
    for src in sorted((root / "images").rglob("*.parquet")):
        table = pq.read_table(src)
        keep = [r["status"] == "ok" and r["key"] not in removed_keys for r in table.to_pylist()]
        result = pq.read_table(out / src.relative_to(root))
        assert result.schema == table.schema
        assert result.equals(table.filter(pa.array(keep)))


def test_stage_removes_planted_overlaps_and_reports(tmp_path):
    root, out, result = run_stage(tmp_path, DedupConfig())

    assert removed_set(out) == EXPECTED_REMOVED
    removed = pq.read_table(out / "removed.parquet")
    assert removed.schema == stage.REMOVED
    url_of = {r["key"]: r["url"] for rows in SHARDS.values() for shard in rows for r in shard}
    assert all(url_of[r["key"]] == r["url"] for r in removed.to_pylist())
    assert_images_filtered(root, out, {key for _, key, _, _ in EXPECTED_REMOVED})

    report = json.loads((out / "report.json").read_text())
    assert report == {
        "removed": {
            "coco": {"coco_id": 3, "flickr_id": 1, "url": 0, "content_hash": 0},
            "vg": {"coco_id": 1, "flickr_id": 1, "url": 1, "content_hash": 1},
            "cc": {"coco_id": 0, "flickr_id": 0, "url": 2, "content_hash": 1},
            "sbu": {"coco_id": 0, "flickr_id": 3, "url": 0, "content_hash": 0},
        },
        "kept": {"coco": 2, "vg": 1, "cc": 2, "sbu": 1, "flickr30k": 2, "nlvr2": 3},
        "failed_dropped": {"coco": 1, "vg": 1, "cc": 1, "sbu": 0, "flickr30k": 1, "nlvr2": 1},
        # coco: Karpathy val/test 102, 391895 + RefCOCO 600421, 999999; flickr: 6 Entities ids + the
        # photos of COCO 391895 and 102; urls: 3 blocked COCO + 3 Flickr30k + 3 NLVR2 dev/test1 (failed
        # ones too); hashes: the 7 of those that were downloaded
        "blocklist": {"coco_ids": 4, "flickr_ids": 8, "urls": 9, "hashes": 7},
    }
    markdown = (out / "report.md").read_text()
    header = "| dataset | kept | failed dropped | coco_id | flickr_id | url | content_hash | removed |"
    assert header in markdown
    assert "| coco | 2 | 1 | 3 | 1 | 0 | 0 | 4 |" in markdown
    assert "| nlvr2 | 3 | 1 | - | - | - | - | - |" in markdown
    assert "4 COCO ids, 8 Flickr photo ids, 9 URLs, 7 content hashes" in markdown

    assert result.metrics["removed.coco.coco_id"] == 3
    assert result.metrics["removed.cc.url"] == 2
    assert result.metrics["removed.sbu.content_hash"] == 0
    assert result.metrics["kept.nlvr2"] == 3
    assert result.metrics["failed_dropped.vg"] == 1
    assert result.metrics["removed.total"] == 14
    assert result.metrics["kept.total"] == 11
    assert result.metrics["failed_dropped.total"] == 5
    assert result.metrics["blocklist.urls"] == 9
    assert sorted(result.artifacts) == ["removed.parquet", "report.json", "report.md"]
    assert all((out / a).is_file() for a in result.artifacts)


def test_stage_drops_rows_of_dropped_images_and_copies_the_rest(tmp_path):
    root, out, _ = run_stage(tmp_path, DedupConfig())
    gone = {key for _, key, _, _ in EXPECTED_REMOVED} | (FAILED - {"flickr30k:3416050480"})

    for name in ("captions", "regions", "objects"):
        source = pq.read_table(root / "tables" / f"{name}.parquet")
        result = pq.read_table(out / "tables" / f"{name}.parquet")
        expected = [r for r in source.to_pylist() if r["image_key"] not in gone]
        assert result.schema == source.schema
        assert result.to_pylist() == expected
    captions = pq.read_table(out / "tables" / "captions.parquet").column("image_key").to_pylist()
    # an image without IMAGES row and the captions of a failed downstream image stay
    assert captions == ["coco:57870", "coco:57870", "coco:555", "cc:train:2", "sbu:0", "flickr30k:3416050480"]

    unchanged = ["tables/splits.parquet", "tables/entities.parquet", "tables/task_refcoco.parquet",
                 "tables/task_nlvr2.parquet", "metadata/coco/captions_train2014.json",
                 "stats/coco/shard-00000.json", "stats/coco/shard-00001.json", "stats/nlvr2/shard-00000.json"]
    for rel in unchanged:
        assert filecmp.cmp(root / rel, out / rel, shallow=False), rel


def test_stage_reason_switches_and_entities_splits(tmp_path):
    cfg = DedupConfig(flickr30k_entities_splits=["test"], reasons={"coco_id": False, "url": False})
    root, out, result = run_stage(tmp_path, cfg)

    assert removed_set(out) == {
        ("coco", "coco:600421", "flickr_id", "1016887272"),
        ("coco", "coco:600422", "flickr_id", "7162685234"),
        ("coco", "coco:391895", "flickr_id", "8186000001"),
        ("coco", "coco:102", "flickr_id", "8186000002"),
        ("vg", "vg:2418001", "flickr_id", "1016887272"),
        ("vg", "vg:2418002", "flickr_id", "8186000001"),
        ("vg", "vg:2418004", "content_hash", sha(F2)),
        ("cc", "cc:train:1", "content_hash", sha(N1)),
        ("cc", "cc:train:3", "content_hash", sha(F1)),
        ("sbu", "sbu:1", "flickr_id", "4971484184"),
        ("sbu", "sbu:2", "flickr_id", "1016887272"),
    }
    report = json.loads((out / "report.json").read_text())
    assert report["kept"] == {"coco": 2, "vg": 2, "cc": 3, "sbu": 2, "flickr30k": 2, "nlvr2": 3}
    # the blocklist does not depend on the switches; 1000092795 and 2000000001 are not in the test list
    assert report["blocklist"] == {"coco_ids": 4, "flickr_ids": 6, "urls": 9, "hashes": 7}
    assert result.params["reasons"] == "flickr_id,content_hash"
    assert result.params["flickr30k_entities_splits"] == "test"


def test_stage_warns_when_a_blocked_source_is_absent(tmp_path, caplog):
    root = tmp_path / "download"
    write(pa.Table.from_pylist([vg(1)], schema=IMAGES), root / "images" / "vg" / "shard-00000.parquet")
    dev = image("nlvr2", "nlvr2:dev-0-img0", "http://lil.nlp.cornell.edu/nlvr/dev-0-img0.png", "dev")
    write(pa.Table.from_pylist([dev], schema=IMAGES), root / "images" / "nlvr2" / "shard-00000.parquet")
    ctx = StageContext(cfg=SimpleNamespace(dedup=DedupConfig()), workdir=tmp_path, out_dir=tmp_path / "out",
                       inputs={"download": root})
    with caplog.at_level(logging.WARNING):
        result = stage.run(ctx)
    warned = sorted(r.getMessage().split(" images found")[0] for r in caplog.records)
    assert warned == ["dedup: no COCO Karpathy", "dedup: no Flickr30k Entities", "dedup: no RefCOCO"]
    assert result.metrics["kept.vg"] == 1 and result.metrics["blocklist.urls"] == 1


def test_stage_refuses_an_empty_blocklist_when_evaluation_splits_are_configured(tmp_path):
    # An incomplete download output (no evaluation table or image) once gave an empty blocklist: every
    # evaluation image would have entered pretraining.
    root = tmp_path / "download"
    write(pa.Table.from_pylist([vg(1)], schema=IMAGES), root / "images" / "vg" / "shard-00000.parquet")
    ctx = StageContext(cfg=SimpleNamespace(dedup=DedupConfig()), workdir=tmp_path, out_dir=tmp_path / "out",
                       inputs={"download": root})
    with pytest.raises(StageError) as err:
        stage.run(ctx)
    assert str(err.value).startswith(f"{root}: empty blocklist although dedup.flickr30k_entities_splits")
    none = SimpleNamespace(dedup=DedupConfig(flickr30k_entities_splits=[], coco_karpathy_splits=[],
                                             refcoco_splits=[], nlvr2_splits=[]))
    assert stage.run(StageContext(cfg=none, workdir=tmp_path, out_dir=tmp_path / "out2",
                                  inputs={"download": root})).metrics["kept.vg"] == 1


def test_stage_rejects_bad_input_with_one_line(tmp_path):
    cfg = SimpleNamespace(dedup=DedupConfig())
    ctx = StageContext(cfg=cfg, workdir=tmp_path, out_dir=tmp_path / "out", inputs={})
    with pytest.raises(StageError, match="missing input 'download'"):
        stage.run(ctx)

    root = tmp_path / "download"
    shard = root / "images" / "coco" / "shard-00000.parquet"
    ctx.inputs["download"] = root
    write(pa.Table.from_pylist([coco(5), image("coco", "coco:abc", "http://x.example/a.jpg")], schema=IMAGES),
          shard)
    with pytest.raises(StageError) as err:
        stage.run(ctx)
    assert str(err.value) == (f"{shard}: record 'coco:abc': field 'key': "
                              "image key 'coco:abc' does not end in a numeric id")

    write(pa.Table.from_pylist([{**coco(5), "sha256": None}], schema=IMAGES), shard)
    with pytest.raises(StageError, match=r"record 'coco:5': field 'sha256' is empty on an ok row"):
        stage.run(ctx)

    write(pa.Table.from_pylist([vg(5)], schema=IMAGES), shard)
    with pytest.raises(StageError, match=r"record 'vg:5': field 'corpus' is 'vg', expected 'coco'"):
        stage.run(ctx)

    write(pa.Table.from_pylist([coco(5)], schema=IMAGES).drop_columns(["flickr_url"]), shard)
    with pytest.raises(StageError, match=r"shard-00000.parquet: missing column 'flickr_url'"):
        stage.run(ctx)


# ------------------------------------------------------------------------------------------------------ GQA


def test_gqa_evaluation_images_are_blocked_only_with_gqa(tmp_path):
    """GQA val / testdev images: their VG images by VG id, the COCO copy of one by its COCO id, a CC copy of a
    testdev image by its bytes; GQA train images stay. Without a GQA table the report is as before."""
    from vlp.data.tables import TASK_GQA

    root = tmp_path / "download"
    build_download(root)
    n7 = b"gqa testdev n7"
    extra = {
        ("vg", 1): [vg(2418010, coco_id=101), vg(2418011)],
        ("gqa", 0): [image("gqa", "gqa:n7", "https://downloads.cs.stanford.edu/nlp/data/gqa/images/n7.jpg",
                           "testdev", content=n7)],
        ("cc", 1): [image("cc", "cc:train:9", "https://another.example/copy.jpg", content=n7)],
    }
    for (corpus, i), rows in extra.items():
        write(pa.Table.from_pylist(rows, schema=IMAGES), root / "images" / corpus / f"shard-{i:05d}.parquet")
        (root / "stats" / corpus).mkdir(parents=True, exist_ok=True)
        stats = json.dumps({"ok": len(rows), "failed": {}})
        (root / "stats" / corpus / f"shard-{i:05d}.json").write_text(stats)
    questions = [("00000001", "2418010", "vg:2418010", "val"), ("00000002", "2418011", "vg:2418011", "train"),
                 ("00000003", "n7", "gqa:n7", "testdev")]
    write(pa.Table.from_pylist([{"question_id": q, "image_id": i, "image_key": k, "split": s, "question": "?",
                                 "answer": "yes", "is_balanced": True, "entailed": [], "equivalent": [q],
                                 "semantic": "[]", "pointers": []} for q, i, k, s in questions],
                               schema=TASK_GQA), root / "tables" / "task_gqa.parquet")
    _, out, result = run_stage(tmp_path, DedupConfig())
    assert removed_set(out) == EXPECTED_REMOVED | {
        ("vg", "vg:2418010", "vg_id", "2418010"),
        ("coco", "coco:101", "coco_id", "101"),
        ("cc", "cc:train:9", "content_hash", sha(n7)),
    }
    report = json.loads((out / "report.json").read_text())
    assert report["removed"]["vg"] == {"vg_id": 1, "coco_id": 1, "flickr_id": 1, "url": 1, "content_hash": 1}
    assert report["blocklist"]["vg_ids"] == 1 and report["kept"]["gqa"] == 1
    assert "| dataset | kept | failed dropped | vg_id | coco_id |" in (out / "report.md").read_text()
    assert result.params["gqa_splits"] == "val,testdev"
    assert result.params["reasons"] == "vg_id,coco_id,flickr_id,url,content_hash"

    _, out, result = run_stage(tmp_path, DedupConfig(gqa_splits=["val"]), "val_only")
    assert ("cc", "cc:train:9", "content_hash", sha(n7)) not in removed_set(out)
    # the default run of the other tests never shows GQA's reason or setting
    plain = tmp_path / "plain"
    plain.mkdir()
    _, out, result = run_stage(plain, DedupConfig())
    assert "vg_id" not in json.loads((out / "report.json").read_text())["removed"]["vg"]
    assert "gqa_splits" not in result.params and "blocklist.vg_ids" not in result.metrics
