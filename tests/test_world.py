"""The synthetic world: determinism, real file formats at the demo URLs, planted overlaps and truth.

Built from worldgen's micro preset (tests/conftest.py); the demo world is checked for counts and speed.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import tarfile
import time
import urllib.request
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError

from pipeline.config import load_config
from stages.base import StageContext, StageError
from stages.world.stage import run
from worldgen import identities
from worldgen.build import build_world
from worldgen.config import FAULT_NAMES, WorldConfig
from worldgen.identities import entities_ids
from worldgen.mirror import Mirror, mirror_path
from worldgen.presets import micro
from worldgen.truth import IMAGE_DATASETS, PLANTED_REASON, compute_truth, flickr_photo_id, normalize_url

DEMO = load_config()  # configs/demo.yaml: the official URLs the world publishes at
SOURCES = DEMO.download.datasets
ENTITY_MARKUP = re.compile(r"\[/EN#(\d+)/([a-z/]+) ([^\]]+)\]")
MICRO = micro()


@pytest.fixture(scope="module")
def out(micro_world) -> Path:
    return micro_world.root


@pytest.fixture(scope="module")
def truth(micro_world) -> dict:
    return micro_world.truth()


def fetch(out: Path, url: str) -> bytes:
    """What the mirror serves for ``url``, or the member of the archive it names after '#'."""
    archive_url, _, member = url.partition("#")
    data = (out / "www" / mirror_path(archive_url).lstrip("/")).read_bytes()
    if not member:
        return data
    if archive_url.endswith(".zip"):
        return zipfile.ZipFile(io.BytesIO(data)).read(member)
    return tarfile.open(fileobj=io.BytesIO(data)).extractfile(member).read()


def served(out: Path, url: str) -> bytes:
    """The image bytes the mirror serves for ``url`` (its exact host spelling; no query or fragment)."""
    return (out / "www" / mirror_path(url).lstrip("/")).read_bytes()


def meta(out: Path, dataset: str, role: str) -> bytes:
    return fetch(out, SOURCES[dataset].files[role])


def jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines()]


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_stage_writes_its_whole_output_layout(micro_world):
    assert micro_world.missing() == []
    assert micro_world.faults()["paths"] and len(list(micro_world.scenes())) == sum(
        micro_world.truth()["images"].values())


def test_micro_world_has_every_dataset_overlap_and_fault(truth):
    assert set(truth["images"]) == set(IMAGE_DATASETS) and all(truth["images"].values())
    assert all(truth["planted"].values()) and truth["planted"].keys() == PLANTED_REASON.keys()
    removed = {(ds, reason) for ds, reasons in truth["removed"].items() for reason in reasons}
    assert {reason for _, reason in removed} == {"coco_id", "flickr_id", "url", "content_hash"}
    assert all(n == 1 for n in MICRO.faults.counts().values())
    assert sum(sum(f.values()) for f in truth["expected_failures"].values()) == len(FAULT_NAMES) - 1


def test_entities_lists_are_declared_package_data():
    here = Path(identities.__file__).parent
    assert all((here / rel).is_file() for rel in identities.PACKAGE_DATA)
    assert {split: len(ids) for split, ids in entities_ids().items()} == {
        split: len((here / rel).read_text().split())
        for split, rel in zip(identities.ENTITIES_SPLITS, identities.PACKAGE_DATA, strict=True)
    }


def test_same_seed_gives_identical_bytes_and_another_seed_differs(out, write_world, tmp_path):
    again = write_world(tmp_path / "b", MICRO).root
    assert all_files(again) == all_files(out)
    other = write_world(tmp_path / "c", micro(seed=1)).root
    assert (other / "truth.json").read_bytes() != (out / "truth.json").read_bytes()
    assert meta(other, "coco", "karpathy") != meta(out, "coco", "karpathy")


def test_every_configured_url_resolves(out):
    for dataset, source in SOURCES.items():
        for role, url in source.files.items():
            assert fetch(out, url), f"{dataset}.{role}: {url} is empty"


def _image_urls(out: Path) -> dict[str, list[str]]:
    """Every image URL the published metadata references, read back the way a downloader would."""
    coco = [
        img["coco_url"]
        for split in ("train2014", "val2014")
        for img in json.loads(meta(out, "coco", f"captions_{split}"))["images"]
    ]
    vg = [img["url"] for img in json.loads(meta(out, "vg", "image_data"))]
    cc = [
        line.split("\t")[1]
        for role in ("train", "val")
        for line in meta(out, "cc", role).decode().splitlines()
    ]
    sbu = meta(out, "sbu", "urls").decode().splitlines()
    base = SOURCES["flickr30k"].image_base_url
    flickr = [base + img["filename"] for img in json.loads(meta(out, "flickr30k", "karpathy"))["images"]]
    nlvr2 = [
        line[side]
        for split in ("train", "dev", "test1")
        for line in jsonl(meta(out, "nlvr2", split))
        for side in ("left_url", "right_url")
    ]
    return {"coco": coco, "vg": vg, "cc": cc, "sbu": sbu, "flickr30k": flickr, "nlvr2": nlvr2}


def test_every_image_url_resolves_to_a_decodable_image(out, truth):
    urls = _image_urls(out)
    assert {ds: len(u) for ds, u in urls.items()} == truth["images"]
    for dataset, dataset_urls in urls.items():
        for url in dataset_urls:
            data = served(out, url)
            expected = "PNG" if dataset == "nlvr2" or data[:4] == b"\x89PNG" else "JPEG"
            assert Image.open(io.BytesIO(data)).format == expected, url


def test_scenes_describe_every_image_with_boxes_inside_it(out, truth):
    scenes = jsonl((out / "scenes.jsonl").read_bytes())
    assert Counter(s["dataset"] for s in scenes) == truth["images"]
    for s in scenes:
        data = served(out, s["url"])
        assert Image.open(io.BytesIO(data)).size == (s["width"], s["height"])
        assert 1 <= len(s["objects"]) <= 4
        for obj in s["objects"]:
            x, y, w, h = obj["box"]
            assert 0 <= x and 0 <= y and x + w <= s["width"] and y + h <= s["height"] and w > 0 and h > 0


def test_coco_captions_instances_and_karpathy(out):
    cfg = MICRO
    s = cfg.sizes
    caps = json.loads(meta(out, "coco", "captions_train2014"))
    inst = json.loads(meta(out, "coco", "instances_train2014"))
    assert set(caps) == {"info", "images", "licenses", "annotations"}  # caption files have no categories
    assert {c["name"] for c in inst["categories"]} >= {
        "circle",
        "square",
        "triangle",
        "star",
        "hexagon",
        "cross",
    }
    img = caps["images"][0]
    assert set(img) == {
        "license",
        "file_name",
        "coco_url",
        "height",
        "width",
        "date_captured",
        "flickr_url",
        "id",
    }
    assert img["file_name"] == f"COCO_train2014_{img['id']:012d}.jpg"
    assert img["coco_url"] == f"http://images.cocodataset.org/train2014/{img['file_name']}"
    per_image = Counter(a["image_id"] for a in caps["annotations"])
    assert set(per_image.values()) == {cfg.captions_per_image}
    ann = inst["annotations"][0]
    assert set(ann) == {"segmentation", "area", "iscrowd", "image_id", "bbox", "category_id", "id"}
    assert isinstance(ann["bbox"][0], float) and ann["iscrowd"] == 0
    karpathy = json.loads(meta(out, "coco", "karpathy"))
    splits = Counter(r["split"] for r in karpathy["images"])
    restval = s.coco_val2014 - s.karpathy_coco_val - s.karpathy_coco_test
    assert splits == {"train": s.coco_train2014, "restval": restval, "val": s.karpathy_coco_val,
                      "test": s.karpathy_coco_test}
    rec = karpathy["images"][0]
    assert set(rec) == {"filepath", "sentids", "filename", "imgid", "split", "sentences", "cocoid"}
    assert set(rec["sentences"][0]) == {"tokens", "raw", "imgid", "sentid"}
    val_ids = {i["id"] for i in json.loads(meta(out, "coco", "captions_val2014"))["images"]}
    assert {r["cocoid"] for r in karpathy["images"] if r["split"] in ("val", "test", "restval")} == val_ids


def test_visual_genome_parallel_lists(out):
    files = {
        role: json.loads(meta(out, "vg", role))
        for role in ("image_data", "region_descriptions", "objects", "attributes")
    }
    ids = [r["image_id"] for r in files["image_data"]]
    assert len(ids) == MICRO.sizes.vg == len(set(ids))
    assert [r["id"] for r in files["region_descriptions"]] == ids  # per-image key is "id" in this file
    assert [r["image_id"] for r in files["objects"]] == ids
    assert [r["image_id"] for r in files["attributes"]] == ids
    assert set(files["image_data"][0]) == {"width", "url", "height", "image_id", "coco_id", "flickr_id"}
    region = files["region_descriptions"][0]["regions"][0]
    assert set(region) == {"region_id", "width", "height", "image_id", "phrase", "y", "x"}
    obj = files["objects"][0]["objects"][0]
    assert set(obj) == {"synsets", "h", "object_id", "merged_object_ids", "names", "w", "y", "x"}
    attrs = [a for rec in files["attributes"] for a in rec["attributes"]]
    assert any("attributes" not in a for a in attrs) and any("attributes" in a for a in attrs)


def test_cc_and_sbu_text_files(out):
    for role in ("train", "val"):
        for line in meta(out, "cc", role).decode().splitlines():
            caption, url = line.split("\t")
            assert caption == caption.lower() and url.startswith(("http://", "https://"))
    urls = meta(out, "sbu", "urls").decode().splitlines()
    captions = meta(out, "sbu", "captions").decode().splitlines()
    assert len(urls) == len(captions) == MICRO.sizes.sbu
    assert all(re.fullmatch(r"http://static\.flickr\.com/\d+/\d+_[0-9a-f]+\.jpg", u) for u in urls)
    archive = tarfile.open(fileobj=io.BytesIO(fetch(out, SOURCES["sbu"].files["urls"].split("#")[0])))
    assert {m.name for m in archive.getmembers() if m.isfile()} == {
        "dataset/SBU_captioned_photo_dataset_urls.txt",
        "dataset/SBU_captioned_photo_dataset_captions.txt",
    }


def test_flickr30k_ids_splits_and_entities(out):
    lists = {
        s: [int(x) for x in meta(out, "flickr30k", f"entities_{s}").decode().split()]
        for s in ("train", "val", "test")
    }
    s = MICRO.sizes
    assert {split: len(ids) for split, ids in lists.items()} == {
        "train": s.flickr30k_train, "val": s.flickr30k_val, "test": s.flickr30k_test}
    for split, ids in lists.items():
        assert set(ids) <= set(entities_ids()[split])  # real photo ids from the real split lists
    karpathy = json.loads(meta(out, "flickr30k", "karpathy"))
    assert karpathy["dataset"] == "flickr30k"
    by_split = {r["filename"]: r["split"] for r in karpathy["images"]}
    karpathy_train = MICRO.flickr30k_images - s.karpathy_flickr30k_val - s.karpathy_flickr30k_test
    assert Counter(by_split.values()) == {"train": karpathy_train, "val": s.karpathy_flickr30k_val,
                                          "test": s.karpathy_flickr30k_test}
    assert sorted(int(f[:-4]) for f in by_split) == sorted(i for ids in lists.values() for i in ids)
    # Karpathy test is not Entities test (the real quirk)
    assert {int(f[:-4]) for f, s in by_split.items() if s == "test"} != set(lists["test"])

    entities = zipfile.ZipFile(io.BytesIO(meta(out, "flickr30k", "entities")))
    scenes = {s["key"]: s for s in jsonl((out / "scenes.jsonl").read_bytes())}
    for rec in karpathy["images"]:
        pid = rec["filename"][:-4]
        lines = entities.read(f"Sentences/{pid}.txt").decode().splitlines()
        assert len(lines) == len(rec["sentences"])
        for line, sent in zip(lines, rec["sentences"], strict=True):
            plain = ENTITY_MARKUP.sub(lambda m: m.group(3), line)
            assert plain.replace(" .", ".").replace(" ,", ",") == sent["raw"].rstrip()
        root = ET.fromstring(entities.read(f"Annotations/{pid}.xml"))
        assert root.findtext("filename") == rec["filename"]
        boxes = [
            [int(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
            for o in root.iter("object")
            if o.find("bndbox") is not None
        ]
        expected = [
            [x + 1, y + 1, x + w, y + h]
            for x, y, w, h in (obj["box"] for obj in scenes[f"flickr30k:{pid}"]["objects"])
        ]
        assert boxes == expected  # 1-based pixel boxes of the scene's objects
        boxed_chains = {
            n.text for o in root.iter("object") if o.find("bndbox") is not None for n in o.iter("name")
        }
        for chain, types, _ in ENTITY_MARKUP.findall("\n".join(lines)):
            assert chain in boxed_chains or types in ("scene", "notvisual")


def test_snli_ve_follows_entities_test(out):
    records = {s: jsonl(meta(out, "snli_ve", s)) for s in ("train", "dev", "test")}
    test_ids = {int(x) for x in meta(out, "flickr30k", "entities_test").decode().split()}
    assert {int(r["Flikr30kID"].removesuffix(".jpg")) for r in records["test"]} == test_ids
    rec = records["train"][0]
    assert list(rec) == sorted(rec) and rec["Flikr30kID"].endswith(".jpg")
    assert rec["captionID"].startswith(rec["Flikr30kID"] + "#") and rec["pairID"].startswith(rec["captionID"])
    assert {"sentence1_parse", "sentence2_binary_parse", "annotator_labels"} <= set(rec)
    labels = Counter(r["gold_label"] for split in records.values() for r in split)
    assert set(labels) == {"entailment", "neutral", "contradiction"} and len(set(labels.values())) == 1


def test_nlvr2_is_json_lines_with_string_labels(out):
    for split in ("train", "dev", "test1"):
        lines = jsonl(meta(out, "nlvr2", split))
        assert {r["label"] for r in lines} == {"True", "False"}
        for r in lines:
            assert re.fullmatch(rf"{split}-\d+-[0-3]-0", r["identifier"])
            assert ("directory" in r) == (split == "train")
            assert isinstance(r["validation"], dict) and isinstance(r["extra_validations"], dict)


def test_vqa_has_ten_answers_per_question(out):
    for split in ("train2014", "val2014"):
        questions = json.loads(meta(out, "vqa", f"questions_{split}"))
        annotations = json.loads(meta(out, "vqa", f"annotations_{split}"))
        assert questions["data_subtype"] == annotations["data_subtype"] == split
        assert [q["question_id"] for q in questions["questions"]] == [
            a["question_id"] for a in annotations["annotations"]
        ]
        for a in annotations["annotations"]:
            assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            assert a["answer_type"] in ("yes/no", "number", "other")
            assert (
                Counter(x["answer"] for x in a["answers"]).most_common(1)[0][0] == a["multiple_choice_answer"]
            )
        coco_ids = {i["id"] for i in json.loads(meta(out, "coco", f"captions_{split}"))["images"]}
        assert {q["image_id"] for q in questions["questions"]} == coco_ids


def test_refcoco_refs_join_instances_on_train2014(out):
    refs = pickle.loads(meta(out, "refcoco", "refs"))
    instances = json.loads(meta(out, "refcoco", "instances"))
    assert isinstance(refs, list)
    assert set(refs[0]) == {
        "sent_ids",
        "file_name",
        "ann_id",
        "ref_id",
        "image_id",
        "split",
        "sentences",
        "category_id",
    }
    assert set(refs[0]["sentences"][0]) == {"tokens", "raw", "sent_id", "sent"}
    images_by_split = {
        s: {r["image_id"] for r in refs if r["split"] == s} for s in ("train", "val", "testA", "testB")
    }
    assert {s: len(v) for s, v in images_by_split.items()} == {
        s: getattr(MICRO.sizes, f"refcoco_{s}") for s in ("train", "val", "testA", "testB")}
    anns = {a["id"]: a for a in instances["annotations"]}
    coco_anns = {a["id"]: a for a in json.loads(meta(out, "coco", "instances_train2014"))["annotations"]}
    for ref in refs:
        assert anns[ref["ann_id"]] == coco_anns[ref["ann_id"]]
        assert anns[ref["ann_id"]]["image_id"] == ref["image_id"]
        assert ref["category_id"] == anns[ref["ann_id"]]["category_id"]


def test_planted_overlaps_match_config_and_the_published_files(out, truth):
    cfg = MICRO
    o = cfg.overlaps
    assert truth["planted"] == o.model_dump()
    refcoco_eval = cfg.refcoco_eval_images
    assert truth["removed"] == {
        "coco": {
            "coco_id": cfg.sizes.karpathy_coco_val + cfg.sizes.karpathy_coco_test + refcoco_eval,
            "flickr_id": o.coco_flickr,
        },
        "vg": {"coco_id": o.vg_coco, "flickr_id": o.vg_flickr},
        "cc": {"content_hash": o.cc_content_hash, "url": o.cc_url},
        "sbu": {"flickr_id": o.sbu_flickr},
    }
    # Recompute the Flickr30k photos from the published URLs and ids, independently of truth.json.
    flickr30k = {
        int(x) for s in ("train", "val", "test") for x in meta(out, "flickr30k", f"entities_{s}").split()
    }
    coco_hits = [
        i
        for i in json.loads(meta(out, "coco", "captions_train2014"))["images"]
        if flickr_photo_id(i["flickr_url"]) in flickr30k
    ]
    sbu_hits = [u for u in meta(out, "sbu", "urls").decode().splitlines() if flickr_photo_id(u) in flickr30k]
    vg_hits = [r for r in json.loads(meta(out, "vg", "image_data")) if r["flickr_id"] in flickr30k]
    assert (len(coco_hits), len(sbu_hits), len(vg_hits)) == (o.coco_flickr, o.sbu_flickr, o.vg_flickr)
    usual = r"http://farm\d\.staticflickr\.com/\d+/\d+_[0-9a-f]+_z\.jpg"  # every real COCO flickr_url
    assert not all(re.fullmatch(usual, i["flickr_url"]) for i in coco_hits)
    by_reason = {(ov["dataset"], ov["reason"]): [] for ov in truth["overlaps"]}
    for ov in truth["overlaps"]:
        by_reason[(ov["dataset"], ov["reason"])].append(ov)
    for ov in by_reason[("cc", "content_hash")]:
        eval_url = next(
            s["url"] for s in jsonl((out / "scenes.jsonl").read_bytes()) if s["key"] == ov["eval_key"]
        )
        assert served(out, ov["url"]) == served(out, eval_url) and ov["url"] != eval_url
    dev_urls = {
        normalize_url(r[side]): r[side]
        for r in jsonl(meta(out, "nlvr2", "dev"))
        for side in ("left_url", "right_url")
    }
    for ov in by_reason[("cc", "url")]:
        original = dev_urls[normalize_url(ov["url"])]
        assert ov["url"] != original and served(out, ov["url"]) != served(out, original)


def test_faults_only_on_unplanted_cc_sbu_vg_and_match_truth(out, truth):
    cfg = MICRO
    spec = json.loads((out / "faults.json").read_text())
    assert spec["slow_seconds"] == cfg.faults.slow_seconds and spec["huge_bytes"] == cfg.faults.huge_bytes
    assert Counter(spec["paths"].values()) == cfg.faults.counts()
    scenes = {mirror_path(s["url"]): s for s in jsonl((out / "scenes.jsonl").read_bytes())}
    removed_urls = {mirror_path(o["url"]) for o in truth["overlaps"]}
    for path in spec["paths"]:
        assert scenes[path]["dataset"] in ("cc", "sbu", "vg") and path not in removed_urls
        assert (out / "www" / path.lstrip("/")).is_file()
    counts = cfg.faults.counts()
    assert sum(sum(f.values()) for f in truth["expected_failures"].values()) == (
        sum(counts.values()) - counts["flaky_500"])
    assert sum(truth["expected_retried"].values()) == counts["flaky_500"]


def test_mirror_serves_the_world_with_its_faults(out):
    spec = json.loads((out / "faults.json").read_text())
    by_fault = {fault: path for path, fault in spec["paths"].items()}
    with Mirror(out / "www", out / "faults.json") as mirror:
        url = SOURCES["coco"].files["karpathy"].split("#")[0]
        with urllib.request.urlopen(mirror.base_url + mirror_path(url), timeout=10) as resp:
            assert resp.read() == fetch(out, url)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(mirror.base_url + by_fault["not_found"], timeout=10)
        assert err.value.code == 404


def test_url_and_flickr_helpers():
    assert normalize_url("HTTPS://I.Pinimg.com:443/a/b.jpg?x=1#frag") == normalize_url(
        "http://i.pinimg.com/a/b.jpg?x=1"
    )
    assert normalize_url("http://h.com:8080/a") != normalize_url("http://h.com/a")
    assert flickr_photo_id("https://live.staticflickr.com/7245/7162685234_d4e1b8a2c6_z.jpg") == 7162685234
    assert flickr_photo_id("http://farm3.static.flickr.com/1150/1016887272_5a3c9e1f0b_o.png") == 1016887272
    assert flickr_photo_id("http://static.flickr.com/1150/1016887272_5a3c9e1f0b.jpg") == 1016887272
    assert flickr_photo_id("http://images.cocodataset.org/train2014/COCO_train2014_000000057870.jpg") is None


def test_invalid_counts_are_rejected_with_the_field_named():
    with pytest.raises(ValidationError, match="overlaps.vg_coco exceeds"):
        WorldConfig(overlaps={"vg_coco": 500})
    with pytest.raises(ValidationError, match="extra"):
        WorldConfig(sizes={"coco": 3})


def test_stage_names_a_missing_role(tmp_path):
    datasets = {k: v for k, v in SOURCES.items() if k != "vqa"}
    cfg = DEMO.model_copy(
        update={
            "world": MICRO,
            "download": DEMO.download.model_copy(update={"datasets": datasets}),
        }
    )
    with pytest.raises(
        StageError, match=r"download\.datasets\.vqa\.files\.annotations_train2014: not configured"
    ):
        run(StageContext(cfg=cfg, workdir=tmp_path, out_dir=tmp_path, inputs={}))


def test_demo_world_counts_and_speed():
    start = time.perf_counter()
    world = build_world(DEMO.world, SOURCES["flickr30k"].image_base_url)
    truth = compute_truth(world)
    assert time.perf_counter() - start < 40
    assert truth["images"] == {"coco": 400, "vg": 300, "cc": 600, "sbu": 300, "flickr30k": 300, "nlvr2": 680}
    assert truth["removed"] == {
        "coco": {"coco_id": 110, "flickr_id": 8},
        "vg": {"coco_id": 8, "flickr_id": 8},
        "cc": {"content_hash": 8, "url": 6},
        "sbu": {"flickr_id": 8},
    }
    assert sum(sum(f.values()) for f in truth["expected_failures"].values()) == 17
    assert sum(truth["expected_retried"].values()) == 3
    hashes = Counter(hashlib.sha256(i.data).hexdigest() for imgs in world.images.values() for i in imgs)
    assert sum(n - 1 for n in hashes.values()) == 8  # the only repeated bytes are the planted CC copies
