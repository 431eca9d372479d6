"""The metadata parsers on the hand-written samples of the real published files.

The samples live in ``../shared/fixtures/formats`` (FORMATS.md there lists every quirk); they are
read in place. Files the samples lack (COCO's Karpathy split, NLVR2 test1, SNLI-VE dev, archives)
are built in tmp_path from the sample records, in the published layout.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from stages.base import StageError
from stages.dedup.keys import flickr_photo_id
from stages.download.config import DatasetSource
from stages.download.formats import PARSERS, FormatError, ImageRef, Parsed, parse_dataset
from vlp.data import tables

# ../shared/fixtures beside the checkout (a git worktree sits one level deeper: the nearest one up).
FIXTURES = next(p / "shared" / "fixtures" for p in Path(__file__).resolve().parents
                if (p / "shared" / "fixtures").is_dir())
F = FIXTURES / "formats"
# Hand-written samples of the real files the shared samples lack (tests/fixtures/formats/NOTES.md).
OWN = Path(__file__).resolve().parent / "fixtures" / "formats"
ENTITY_LISTS = {
    f"entities_{split}": FIXTURES / "flickr30k_entities" / f"{split}.txt"
    for split in ("train", "val", "test")
}
SOURCE = DatasetSource(files={})
F30K_BASE = "http://shannon.cs.illinois.edu/DenotationGraph/data/flickr30k-images/"
F30K_SOURCE = DatasetSource(files={}, image_base_url=F30K_BASE)

VG_FILES = {
    role: F / "visual_genome" / f"{role}.json"
    for role in ("image_data", "region_descriptions", "objects", "attributes")
}
CC_FILES = {
    "train": F / "conceptual_captions" / "Train_GCC-training.tsv",
    "val": F / "conceptual_captions" / "Validation_GCC-1.1.0-Validation.tsv",
}
SBU_TXT = {
    "urls": F / "sbu" / "SBU_captioned_photo_dataset_urls.txt",
    "captions": F / "sbu" / "SBU_captioned_photo_dataset_captions.txt",
}
VQA_FILES = {
    "questions_train2014": F / "vqa_v2" / "v2_OpenEnded_mscoco_train2014_questions.json",
    "annotations_train2014": F / "vqa_v2" / "v2_mscoco_train2014_annotations.json",
}
REFCOCO_FILES = {"refs": F / "refcoco" / "refs(unc).p", "instances": F / "refcoco" / "instances.json"}
GQA_FILES = {
    "questions_val": F / "gqa" / "val_balanced_questions.json",
    "questions_testdev": OWN / "gqa" / "testdev_balanced_questions.json",
    "scene_graphs_val": OWN / "gqa" / "val_sceneGraphs.json",
}
GQA_IMAGES = "https://downloads.cs.stanford.edu/nlp/data/gqa/images/"
GQA_SOURCE = DatasetSource(files={}, image_base_url=GQA_IMAGES)
# The Karpathy split of the sample COCO images (the real dataset_coco.json is not among the samples).
KARPATHY_SPLITS = {57870: "train", 600421: "restval", 397133: "val", 37777: "test", 600422: "test"}


def read_json(path: Path):
    return json.loads(path.read_text())


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_json_lines(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def coco_karpathy(tmp_path: Path, splits: dict[int, str] = KARPATHY_SPLITS) -> Path:
    """``dataset_coco.json`` in the published layout, from the sample caption files."""
    images = []
    for name in ("captions_train2014.json", "captions_val2017.json"):
        data = read_json(F / "coco" / name)
        for image in data["images"]:
            if image["id"] not in splits:
                continue
            captions = [a for a in data["annotations"] if a["image_id"] == image["id"]]
            sentences = [
                {
                    "tokens": a["caption"].lower().rstrip(" .").split(),
                    "raw": a["caption"],
                    "imgid": len(images),
                    "sentid": a["id"],
                }
                for a in captions
            ]
            images.append(
                {
                    "filepath": "train2014" if "train" in name else "val2014",
                    "sentids": [a["id"] for a in captions],
                    "filename": image["file_name"],
                    "imgid": len(images),
                    "split": splits[image["id"]],
                    "sentences": sentences,
                    "cocoid": image["id"],
                }
            )
    return write_json(tmp_path / "dataset_coco.json", {"images": images, "dataset": "coco"})


def coco_files(tmp_path: Path) -> dict[str, Path]:
    return {
        "captions_train2014": F / "coco" / "captions_train2014.json",
        "captions_val2017": F / "coco" / "captions_val2017.json",
        "instances_val2017": F / "coco" / "instances_val2017.json",
        "karpathy": coco_karpathy(tmp_path),
    }


def nlvr2_files(tmp_path: Path) -> dict[str, Path]:
    """The samples have train and dev; test1 is dev's records under test1 identifiers."""
    test1 = [
        {**r, "identifier": r["identifier"].replace("dev-", "test1-")}
        for r in read_json_lines(F / "nlvr2" / "dev.json")
    ]
    return {
        "train": F / "nlvr2" / "train.json",
        "dev": F / "nlvr2" / "dev.json",
        "test1": write_json_lines(tmp_path / "test1.json", test1),
    }


def snli_ve_files(tmp_path: Path) -> dict[str, Path]:
    """dev = the train records with the two other image-key spellings (current generator, IGLUE copies)."""
    first, second = read_json_lines(F / "snli_ve" / "snli_ve_train.jsonl")
    first["Flickr30K_ID"] = first.pop("Flikr30kID").removesuffix(".jpg")
    second["Flikr30kID"] = second["Flikr30kID"].removesuffix(".jpg")
    return {
        "train": F / "snli_ve" / "snli_ve_train.jsonl",
        "dev": write_json_lines(tmp_path / "snli_ve_dev.jsonl", [first, second]),
        "test": F / "snli_ve" / "snli_ve_test.jsonl",
    }


def entities_zip(tmp_path: Path, folder: str = "annotations/", drop: str | None = None) -> Path:
    """annotations.zip from the sample Sentences/Annotations, under a leading folder, with macOS litter."""
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "annotations.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted((F / "flickr30k_entities").rglob("*.*")):
            member = file.relative_to(F / "flickr30k_entities").as_posix()
            if member != drop:
                archive.write(file, folder + member)
                archive.writestr(f"__MACOSX/{folder}{file.parent.name}/._{file.name}", b"\x00\x05\x16\x07")
    return path


def flickr30k_files(tmp_path: Path, entities: Path | None = None) -> dict[str, Path]:
    return {
        "karpathy": F / "flickr30k" / "dataset_flickr30k.json",
        "entities": entities or entities_zip(tmp_path),
        **ENTITY_LISTS,
    }


def all_datasets(tmp_path: Path) -> dict[str, Parsed]:
    return {
        "coco": parse_dataset("coco", coco_files(tmp_path), SOURCE),
        "vg": parse_dataset("vg", VG_FILES, SOURCE),
        "cc": parse_dataset("cc", CC_FILES, SOURCE),
        "sbu": parse_dataset("sbu", SBU_TXT, SOURCE),
        "flickr30k": parse_dataset("flickr30k", flickr30k_files(tmp_path), F30K_SOURCE),
        "nlvr2": parse_dataset("nlvr2", nlvr2_files(tmp_path), SOURCE),
        "vqa": parse_dataset("vqa", VQA_FILES, SOURCE),
        "snli_ve": parse_dataset("snli_ve", snli_ve_files(tmp_path), SOURCE),
        "refcoco": parse_dataset("refcoco", REFCOCO_FILES, SOURCE),
        "gqa": parse_dataset("gqa", GQA_FILES, GQA_SOURCE),
    }


def image(parsed: Parsed, key: str) -> ImageRef:
    (found,) = [ref for ref in parsed.images if ref.key == key]
    return found


# ------------------------------------------------------------------------------------------ every parser


def test_every_dataset_of_the_demo_and_gqa_configs_has_a_parser():
    configs = Path(__file__).resolve().parents[1] / "configs"
    demo = yaml.safe_load((configs / "demo.yaml").read_text())["download"]["datasets"]
    gqa = yaml.safe_load((configs / "gqa.yaml").read_text())["download"]["datasets"]
    assert sorted(PARSERS) == sorted({*demo, *gqa}) and "gqa" not in demo


def test_rows_fit_the_table_schemas_and_image_keys_are_unique(tmp_path):
    schemas = {
        "captions": tables.CAPTIONS,
        "regions": tables.REGIONS,
        "objects": tables.OBJECTS,
        "entities": tables.ENTITIES,
        "splits": tables.SPLITS,
    }
    image_fields = ["corpus", "key", "url", "split", "coco_id", "vg_id", "flickr_id", "flickr_url"]
    image_schema = pa.schema([tables.IMAGES.field(name) for name in image_fields])
    for name, parsed in all_datasets(tmp_path).items():
        keys = [ref.key for ref in parsed.images]
        assert len(keys) == len(set(keys)), name
        assert all(ref.corpus == name and ref.key.startswith(f"{name}:") for ref in parsed.images)
        pa.Table.from_pylist([vars(ref) for ref in parsed.images], schema=image_schema)
        for table, schema in schemas.items():
            rows = getattr(parsed, table)
            assert pa.Table.from_pylist(rows, schema=schema).num_rows == len(rows)
        for task, rows in parsed.tasks.items():
            assert pa.Table.from_pylist(rows, schema=tables.TASK_TABLES[task]).num_rows == len(rows)


def test_planted_flickr_test_overlap_is_carried_by_exactly_five_records(tmp_path):
    """FORMATS.md's table: 3 Flickr photos of Entities test.txt sit in 5 pretraining records."""
    test_ids = {int(line) for line in ENTITY_LISTS["entities_test"].read_text().split()}
    parsed = all_datasets(tmp_path)
    hits = {}
    for corpus in tables.PRETRAIN_CORPORA:
        for ref in parsed[corpus].images:
            photos = {ref.flickr_id, flickr_photo_id(ref.url), flickr_photo_id(ref.flickr_url)} - {None}
            if photos & test_ids:
                hits[ref.key] = photos
    assert hits == {
        "coco:600421": {1016887272},
        "coco:600422": {7162685234},
        "vg:2418001": {1016887272},
        "sbu:1": {4971484184},
        "sbu:2": {1016887272},
    }
    assert image(parsed["vg"], "vg:2418001").coco_id == 600421
    assert [(r["ref_id"], r["split"], r["image_key"]) for r in parsed["refcoco"].tasks["refcoco"]][1] == (
        50001,
        "testA",
        "coco:600421",
    )


# -------------------------------------------------------------------------------------------------- coco


def test_coco_images_captions_objects_and_karpathy_splits(tmp_path):
    parsed = parse_dataset("coco", coco_files(tmp_path), SOURCE)
    assert [(ref.key, ref.split) for ref in parsed.images] == [
        ("coco:57870", "train2014"),
        ("coco:600421", "train2014"),
        ("coco:397133", "val2017"),
        ("coco:37777", "val2017"),
        ("coco:600422", "val2017"),
        ("coco:448263", "val2017"),  # only in instances_val2017.json: boxes, no captions
    ]
    assert image(parsed, "coco:600421") == ImageRef(
        corpus="coco",
        key="coco:600421",
        split="train2014",
        coco_id=600421,
        url="http://images.cocodataset.org/train2014/COCO_train2014_000000600421.jpg",
        flickr_url="http://farm2.staticflickr.com/1150/1016887272_5a3c9e1f0b_z.jpg",
    )
    assert (
        image(parsed, "coco:600422").flickr_url
        == "https://live.staticflickr.com/7245/7162685234_d4e1b8a2c6_z.jpg"
    )
    assert len(parsed.captions) == 8
    assert parsed.captions[2] == {
        "corpus": "coco",
        "image_key": "coco:57870",
        "caption_id": "789888",
        "split": "train2014",
        # the raw caption ends in a space
        "caption": "a long table with a plant on top of it surrounded with wooden chairs",
    }
    assert parsed.objects == [
        {
            "corpus": "coco",
            "image_key": "coco:448263",
            "object_id": 1188492,
            "names": ["person"],
            "attributes": [],
            "x": 215.22,
            "y": 62.82,
            "w": 23.49,
            "h": 45.55,
        },
        {
            "corpus": "coco",
            "image_key": "coco:448263",
            "object_id": 1208618,
            "names": ["person"],
            "attributes": [],
            "x": 199.88,
            "y": 13.67,
            "w": 17.86,
            "h": 25.51,
        },
    ]
    assert sorted((r["image_key"], r["split"]) for r in parsed.splits) == [
        ("coco:37777", "test"),
        ("coco:397133", "val"),
        ("coco:57870", "train"),
        ("coco:600421", "restval"),
        ("coco:600422", "test"),
    ]
    assert {(r["corpus"], r["scheme"]) for r in parsed.splits} == {("coco", "karpathy")}


def test_coco_original_2014_release_with_a_bare_url(tmp_path):
    data = read_json(F / "coco" / "captions_train2014.json")
    for record in data["images"]:
        record["url"] = record.pop("flickr_url")
        del record["coco_url"]
    files = {
        "captions_train2014": write_json(tmp_path / "captions_train2014.json", data),
        "karpathy": coco_karpathy(tmp_path, {57870: "train"}),
    }
    parsed = parse_dataset("coco", files, SOURCE)
    assert image(parsed, "coco:57870") == ImageRef(
        "coco",
        "coco:57870",
        "http://farm4.staticflickr.com/3153/2970773875_164f0c0b83_z.jpg",
        "train2014",
        coco_id=57870,
    )


def test_coco_image_info_test_file_without_annotations_and_captions_whitespace(tmp_path):
    data = read_json(F / "coco" / "captions_train2014.json")
    data["annotations"][0]["caption"] = "  A man  riding a\twave on\n top of a surfboard.  "
    files = {
        "captions_train2014": write_json(tmp_path / "captions_train2014.json", data),
        "image_info_test2015": OWN / "coco" / "image_info_test2015.json",
        "karpathy": coco_karpathy(tmp_path, {57870: "train"}),
    }
    assert "annotations" not in read_json(files["image_info_test2015"])
    parsed = parse_dataset("coco", files, SOURCE)
    assert [(ref.key, ref.split) for ref in parsed.images][-2:] == [
        ("coco:600500", "test2015"), ("coco:600501", "test2015")]
    assert image(parsed, "coco:600500") == ImageRef(
        "coco", "coco:600500", "http://mscoco.org/images/600500", "test2015", coco_id=600500)
    assert parsed.captions[0]["caption"] == "A man riding a wave on top of a surfboard."
    assert {r["image_key"] for r in parsed.captions} == {"coco:57870", "coco:600421"}
    assert parsed.objects == []


# ---------------------------------------------------------------------------------------- visual genome


def test_vg_ids_come_from_the_metadata_not_the_url():
    parsed = parse_dataset("vg", VG_FILES, SOURCE)
    assert [ref.key for ref in parsed.images] == ["vg:1", "vg:2", "vg:2412112", "vg:2418001"]
    assert image(parsed, "vg:2412112") == ImageRef(
        "vg",
        "vg:2412112",
        "https://cs.stanford.edu/people/rak248/VG_100K/2370463.jpg",
        "train",
        coco_id=547168,
        vg_id=2412112,
        flickr_id=8505158818,
    )
    assert image(parsed, "vg:1") == ImageRef(
        "vg", "vg:1", "https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg", "train", vg_id=1
    )
    assert image(parsed, "vg:2418001").flickr_id == 1016887272


def test_vg_regions_and_objects_joined_with_attributes(tmp_path):
    parsed = parse_dataset("vg", VG_FILES, SOURCE)
    assert [(r["image_key"], r["region_id"], r["phrase"]) for r in parsed.regions[:3]] == [
        ("vg:1", 1382, "the clock is green in colour"),
        ("vg:1", 1383, "shade is along the street"),  # trailing space stripped
        ("vg:1", 1384, "man is wearing sneakers"),
    ]
    assert parsed.regions[1] | {"phrase": None} == {
        "corpus": "vg",
        "image_key": "vg:1",
        "region_id": 1383,
        "phrase": None,
        "x": 194.0,
        "y": 372.0,
        "w": 182.0,
        "h": 109.0,
    }
    assert [(o["image_key"], o["object_id"], o["names"], o["attributes"]) for o in parsed.objects] == [
        ("vg:1", 1058549, ["trees"], []),
        ("vg:1", 1058534, ["sidewalk"], ["sidewalk"]),  # v1.4 merged v1.2 object 5046 into it
        ("vg:1", 1058508, ["building"], []),
        ("vg:2", 3900001, ["car"], ["parked", "red"]),
        ("vg:2412112", 3900002, ["plate"], ["white", "round"]),
        ("vg:2418001", 3900003, ["excavator"], []),
    ]
    assert parsed.objects[3] | {"names": None, "attributes": None} == {
        "corpus": "vg",
        "image_key": "vg:2",
        "object_id": 3900001,
        "names": None,
        "attributes": None,
        "x": 239.0,
        "y": 347.0,
        "w": 136.0,
        "h": 126.0,
    }

    # Shade 5045 has no `attributes` key in attributes.json: an object with that id gets [].
    objects = read_json(VG_FILES["objects"])
    objects[0]["objects"].append(
        {
            "synsets": ["shade.n.01"],
            "h": 192,
            "object_id": 5045,
            "merged_object_ids": [],
            "names": ["shade"],
            "w": 274,
            "y": 338,
            "x": 119,
        }
    )
    files = {**VG_FILES, "objects": write_json(tmp_path / "objects.json", objects)}
    shade = parse_dataset("vg", files, SOURCE).objects[3]
    assert (shade["object_id"], shade["names"], shade["attributes"]) == (5045, ["shade"], [])


def test_vg_accepts_the_other_id_spellings(tmp_path):
    image_data = read_json(VG_FILES["image_data"])
    for record in image_data:
        record["id"] = record.pop("image_id")
    regions = read_json(VG_FILES["region_descriptions"])
    for record in regions:
        record["image_id"] = record.pop("id")
    files = {
        **VG_FILES,
        "image_data": write_json(tmp_path / "image_data.json", image_data),
        "region_descriptions": write_json(tmp_path / "region_descriptions.json", regions),
    }
    assert parse_dataset("vg", files, SOURCE) == parse_dataset("vg", VG_FILES, SOURCE)


# -------------------------------------------------------------------------------------------- cc and sbu


def test_cc_rows_keys_and_url_newline_stripped():
    parsed = parse_dataset("cc", CC_FILES, SOURCE)
    assert [(ref.key, ref.split) for ref in parsed.images] == [
        ("cc:train:0", "train"),
        ("cc:train:1", "train"),
        ("cc:train:2", "train"),
        ("cc:val:0", "val"),
        ("cc:val:1", "val"),
    ]
    assert (
        parsed.images[0].url
        == "http://lh6.ggpht.com/-IvRtNLNcG8o/TpFyrudaT6I/AAAAAAAAM6o/_11MuAAKalQ/IMG_3422.JPG?imgmax=800"
    )
    assert parsed.images[2].url.endswith("picture-id511063329?s=612x612")  # last line: no "\n" left on it
    assert parsed.captions[4] == {
        "corpus": "cc",
        "image_key": "cc:val:1",
        "caption_id": "cc:val:1",
        "split": "val",
        "caption": "an angler fishes river on a snowy day .",
    }


def test_cc_row_index_survives_unicode_line_separators_and_crlf(tmp_path):
    lines = (F / "conceptual_captions" / "Train_GCC-training.tsv").read_text().splitlines()
    lines[0] = lines[0].replace("bus station", "bus\u2028station\x85stop")
    path = tmp_path / "Train_GCC-training.tsv"
    path.write_bytes("".join(line + "\r\n" for line in lines).encode())
    parsed = parse_dataset("cc", {"train": path}, SOURCE)
    assert [c["caption"] for c in parsed.captions][0] == "a very typical bus\u2028station\x85stop"
    assert [ref.url for ref in parsed.images] == [
        ref.url for ref in parse_dataset("cc", CC_FILES, SOURCE).images[:3]
    ]


def test_sbu_txt_pair_and_json_agree():
    parsed = parse_dataset("sbu", SBU_TXT, SOURCE)
    assert [(ref.key, ref.url) for ref in parsed.images] == [
        ("sbu:0", "http://static.flickr.com/2723/4385058960_b0f291553e.jpg"),
        ("sbu:1", "http://static.flickr.com/4102/4971484184_9e2b7c0d1a.jpg"),
        ("sbu:2", "http://static.flickr.com/1150/1016887272_5a3c9e1f0b.jpg"),
    ]
    assert parsed.captions[0] == {
        "corpus": "sbu",
        "image_key": "sbu:0",
        "caption_id": "sbu:0",
        "split": "train",
        "caption": "A wooden chair in the living room",
    }
    assert parse_dataset("sbu", {"json": F / "sbu" / "sbu-captions-all.json"}, SOURCE) == parsed


# -------------------------------------------------------------------------------------------- flickr30k


def test_flickr30k_karpathy_images_captions_and_both_split_schemes(tmp_path):
    parsed = parse_dataset("flickr30k", flickr30k_files(tmp_path), F30K_SOURCE)
    assert parsed.images == [
        ImageRef(
            "flickr30k", "flickr30k:1000092795", F30K_BASE + "1000092795.jpg", "train", flickr_id=1000092795
        ),
        ImageRef(
            "flickr30k", "flickr30k:1007129816", F30K_BASE + "1007129816.jpg", "test", flickr_id=1007129816
        ),
    ]
    assert len(parsed.captions) == 10
    assert parsed.captions[7] == {
        "corpus": "flickr30k",
        "image_key": "flickr30k:1007129816",
        "caption_id": "17",
        "split": "test",
        "caption": "A man with gauges and glasses is wearing a Blitz hat.",
    }
    splits = {(r["scheme"], r["split"], r["image_key"]) for r in parsed.splits}
    # Karpathy test is not Entities test: 1007129816 is Karpathy test but Entities train.
    assert ("karpathy", "test", "flickr30k:1007129816") in splits
    assert ("entities", "train", "flickr30k:1007129816") in splits
    assert ("entities", "test", "flickr30k:3416050480") in splits
    counts = {}
    for row in parsed.splits:
        counts[row["scheme"], row["split"]] = counts.get((row["scheme"], row["split"]), 0) + 1
    assert counts == {
        ("karpathy", "train"): 1,
        ("karpathy", "test"): 1,
        ("entities", "train"): 29783,
        ("entities", "val"): 1000,
        ("entities", "test"): 1000,
    }


def test_flickr30k_entities_phrases_and_boxes(tmp_path):
    rows = parse_dataset("flickr30k", flickr30k_files(tmp_path), F30K_SOURCE).entities
    assert len(rows) == 14 + 15
    assert rows[0] == {
        "image_key": "flickr30k:1000092795",
        "sentence_idx": 0,
        "phrase": "Two young guys",
        "phrase_id": "1",
        "sentence": "Two young guys with shaggy hair look at their hands while hanging out in the yard .",
        "phrase_types": ["people"],
        "first_word_index": 0,
        # XML 159,125,219,335 (1-based) and the box that also names chain 6
        "boxes": [[158.0, 124.0, 218.0, 334.0], [196.0, 109.0, 260.0, 372.0]],
    }
    by_id = {(r["image_key"], r["sentence_idx"], r["phrase_id"]): r for r in rows}
    man = by_id["flickr30k:1000092795", 3, "6"]
    assert (man["phrase"], man["first_word_index"], man["boxes"]) == (
        "A man",
        0,
        [[196.0, 109.0, 260.0, 372.0]],
    )
    bushes = by_id["flickr30k:1000092795", 1, "4"]
    assert (bushes["phrase"], bushes["first_word_index"]) == ("many bushes", 8)
    assert bushes["boxes"] == [[0.0, 219.0, 210.0, 472.0], [275.0, 214.0, 331.0, 336.0]]
    assert by_id["flickr30k:1000092795", 4, "10"]["boxes"] == []  # nobndbox
    assert by_id["flickr30k:1000092795", 0, "2"]["boxes"] == []  # chain without an object in the XML
    show = by_id["flickr30k:3416050480", 3, "0#0"]  # notvisual: its own singleton
    assert (show["phrase"], show["phrase_types"], show["first_word_index"], show["boxes"]) == (
        "the show",
        ["notvisual"],
        10,
        [],
    )
    assert by_id["flickr30k:3416050480", 4, "105"]["boxes"] == [[11.0, 179.0, 497.0, 359.0]]
    # The zip with a leading folder and macOS litter reads like the extracted directory.
    from_dir = flickr30k_files(tmp_path, entities=F / "flickr30k_entities")
    assert parse_dataset("flickr30k", from_dir, F30K_SOURCE).entities == rows
    flat = flickr30k_files(tmp_path, entities=entities_zip(tmp_path / "flat", folder=""))
    assert parse_dataset("flickr30k", flat, F30K_SOURCE).entities == rows


# -------------------------------------------------------------------------------------------- task sets


def test_nlvr2_json_lines_labels_and_pair_images(tmp_path):
    parsed = parse_dataset("nlvr2", nlvr2_files(tmp_path), SOURCE)
    rows = parsed.tasks["nlvr2"]
    assert [(r["identifier"], r["split"], r["label"]) for r in rows] == [
        ("train-10171-0-0", "train", False),
        ("train-10171-1-0", "train", True),
        ("dev-850-0-0", "dev", False),
        ("dev-850-2-0", "dev", True),
        ("dev-850-3-0", "dev", False),
        ("test1-850-0-0", "test1", False),
        ("test1-850-2-0", "test1", True),
        ("test1-850-3-0", "test1", False),
    ]
    assert rows[2] == {
        "identifier": "dev-850-0-0",
        "split": "dev",
        "label": False,
        "sentence": "The right image shows a curving walkway of dark glass circles embedded in dirt and"
        " flanked by foliage.",
        "left_key": "nlvr2:dev-850-0-img0",
        "right_key": "nlvr2:dev-850-0-img1",
    }
    assert len(parsed.images) == 16
    assert image(parsed, "nlvr2:dev-850-0-img1") == ImageRef(
        "nlvr2",
        "nlvr2:dev-850-0-img1",
        "https://cdn.pixabay.com/photo/2015/09/21/12/57/beer-bottles-949793_960_720.jpg",
        "dev",
    )
    # One url under two image names stays two images.
    assert image(parsed, "nlvr2:train-10171-0-img0").url == image(parsed, "nlvr2:train-10171-1-img1").url

    # The second sentence of a pair names the same two images.
    lines = read_json_lines(F / "nlvr2" / "train.json")
    second = {**lines[0], "identifier": "train-10171-0-1", "label": "True", "sentence": "Another sentence."}
    files = {**nlvr2_files(tmp_path), "train": write_json_lines(tmp_path / "train.json", [*lines, second])}
    again = parse_dataset("nlvr2", files, SOURCE)
    assert again.images == parsed.images
    assert again.tasks["nlvr2"][2] | {"sentence": None} == {
        "identifier": "train-10171-0-1",
        "split": "train",
        "sentence": None,
        "label": True,
        "left_key": "nlvr2:train-10171-0-img0",
        "right_key": "nlvr2:train-10171-0-img1",
    }


def test_vqa_questions_joined_with_their_ten_answers():
    parsed = parse_dataset("vqa", VQA_FILES, SOURCE)
    assert parsed.images == []
    rows = parsed.tasks["vqa"]
    assert [r["question_id"] for r in rows] == [458752000, 458752001, 458752002, 458752003]
    assert rows[1] == {
        "question_id": 458752001,
        "image_key": "coco:458752",
        "split": "train2014",
        "question": "What position is this man playing?",
        "answers": ["pitcher", "catcher"] + ["pitcher"] * 8,
        "multiple_choice_answer": "pitcher",
        "answer_type": "other",
    }
    assert (rows[3]["answer_type"], rows[3]["answers"][8]) == ("yes/no", "no")


def test_vqa_test_dev_questions_without_annotations():
    files = {**VQA_FILES,
             "questions_test-dev2015": OWN / "vqa_v2" / "v2_OpenEnded_mscoco_test-dev2015_questions.json"}
    rows = parse_dataset("vqa", files, SOURCE).tasks["vqa"]
    test_dev = [r for r in rows if r["split"] == "test-dev2015"]
    assert [r["question_id"] for r in test_dev] == [600500000, 600500001, 600501000]
    assert test_dev[2] == {"question_id": 600501000, "image_key": "coco:600501", "split": "test-dev2015",
                           "question": "How many people are there?", "answers": None,
                           "multiple_choice_answer": None, "answer_type": None}
    assert len(rows) == 4 + 3
    assert pa.Table.from_pylist(rows, schema=tables.TASK_VQA).num_rows == 7  # the rows fit the table schema
    # Only the test splits are published without annotations.
    val = {"questions_val2014": files["questions_test-dev2015"]}
    with pytest.raises(FormatError, match="missing required file role 'annotations_val2014'"):
        parse_dataset("vqa", val, SOURCE)


def test_snli_ve_reads_all_image_key_spellings(tmp_path):
    rows = parse_dataset("snli_ve", snli_ve_files(tmp_path), SOURCE).tasks["snli_ve"]
    assert [(r["split"], r["image_key"], r["label"]) for r in rows] == [
        ("train", "flickr30k:4705552913", "neutral"),
        ("train", "flickr30k:2677109430", "neutral"),
        ("dev", "flickr30k:4705552913", "neutral"),
        ("dev", "flickr30k:2677109430", "neutral"),
        ("test", "flickr30k:3416050480", "neutral"),
        ("test", "flickr30k:3416050480", "contradiction"),
        ("test", "flickr30k:3416050480", "entailment"),
    ]
    # The SNLI *train* pair lands in SNLI-VE test (its image is in Entities test.txt).
    assert rows[4] == {
        "pair_id": "3416050480.jpg#4r1n",
        "image_key": "flickr30k:3416050480",
        "split": "test",
        "label": "neutral",
        "hypothesis": "A person is training his horse for a competition.",
        "premise": "A person on a horse jumps over a broken down airplane.",
    }


def test_snli_ve_drops_no_consensus_pairs_and_counts_them(tmp_path):
    # SNLI's own files keep the pairs whose annotators had no majority, as gold_label "-" (SNLI 1.0 README).
    first, second = read_json_lines(F / "snli_ve" / "snli_ve_train.jsonl")
    split_vote = {**first, "pairID": "4705552913.jpg#2r1c", "gold_label": "-",
                  "annotator_labels": ["contradiction", "neutral", "entailment", "neutral", "contradiction"]}
    files = {**snli_ve_files(tmp_path),
             "train": write_json_lines(tmp_path / "snli_ve_train.jsonl", [first, split_vote, second])}
    parsed = parse_dataset("snli_ve", files, SOURCE)
    train = [r["pair_id"] for r in parsed.tasks["snli_ve"] if r["split"] == "train"]
    assert train == ["4705552913.jpg#2r1n", "2677109430.jpg#1r1n"]
    assert parsed.dropped == {"gold_label_no_consensus": 1}
    assert parse_dataset("snli_ve", snli_ve_files(tmp_path), SOURCE).dropped == {}


def py2_pickle(value) -> bytes:
    """What Python 2 cPickle (protocol 2) writes for plain data: ``str`` values are raw bytes."""
    out = bytearray(b"\x80\x02")

    def put(item):
        if isinstance(item, bytes):
            out.extend(b"U" + bytes([len(item)]) + item)  # SHORT_BINSTRING
        elif isinstance(item, str):
            put(item.encode("ascii"))
        elif isinstance(item, int):
            out.extend(b"J" + struct.pack("<i", item))  # BININT
        elif isinstance(item, float):
            out.extend(b"G" + struct.pack(">d", item))  # BINFLOAT
        elif isinstance(item, OrderedDict):
            # Python 2.7's OrderedDict.__reduce__: (OrderedDict, ([[key, value], ...],))
            out.extend(b"ccollections\nOrderedDict\n(")  # GLOBAL MARK
            put([[key, element] for key, element in item.items()])
            out.extend(b"tR")  # TUPLE REDUCE
        elif isinstance(item, list):
            out.extend(b"](")  # EMPTY_LIST MARK
            for element in item:
                put(element)
            out.extend(b"e")  # APPENDS
        else:
            out.extend(b"}(")  # EMPTY_DICT MARK
            for key, element in item.items():
                put(key)
                put(element)
            out.extend(b"u")  # SETITEMS

    put(value)
    return bytes(out + b".")


def test_refcoco_refs_joined_with_instance_boxes(tmp_path):
    rows = parse_dataset("refcoco", REFCOCO_FILES, SOURCE).tasks["refcoco"]
    assert rows[0] == {
        "ref_id": 0,
        "ann_id": 1719310,
        "image_key": "coco:581857",
        "split": "train",
        "sentences": ["THE LADY WITH THE BLUE SHIRT", "lady w back to us", "blue shirt"],
        "bbox": [103.93, 299.99, 134.22, 177.42],
        "category_id": 1,
        "file_name": "COCO_train2014_000000581857.jpg",  # the refs' "_16" suffix names no file
    }
    assert rows[1]["bbox"] == [40.0, 60.0, 100.0, 240.0]
    as_json = {**REFCOCO_FILES, "refs": F / "refcoco" / "refs(unc).json"}
    assert parse_dataset("refcoco", as_json, SOURCE).tasks["refcoco"] == rows

    # The real file is a Python 2 pickle; its non-ASCII byte strings need encoding="latin1".
    refs = read_json(F / "refcoco" / "refs(unc).json")
    refs[1]["sentences"][0]["raw"] = "man on left, café".encode()
    py2 = tmp_path / "refs(unc).p"
    py2.write_bytes(py2_pickle(refs))
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(py2.read_bytes())
    rows_py2 = parse_dataset("refcoco", {**REFCOCO_FILES, "refs": py2}, SOURCE).tasks["refcoco"]
    assert rows_py2[1]["sentences"] == ["man on left, café", "guy in orange vest!"]
    assert rows_py2[0] == rows[0]


def test_refcoco_pickle_of_ordered_dicts(tmp_path):
    # Refs re-saved by order-keeping tools: the refs and their sentences are collections.OrderedDict,
    # written by Python 3 (protocol 2) or by Python 2's cPickle (GLOBAL + REDUCE of [[key, value], ...]).
    refs = read_json(F / "refcoco" / "refs(unc).json")
    ordered = [OrderedDict((k, [OrderedDict(s) for s in v] if k == "sentences" else v)
                           for k, v in ref.items()) for ref in refs]
    expected = parse_dataset("refcoco", REFCOCO_FILES, SOURCE).tasks["refcoco"]
    for name, data in (("py3.p", pickle.dumps(ordered, protocol=2)), ("py2.p", py2_pickle(ordered))):
        path = tmp_path / name
        path.write_bytes(data)
        assert b"collections" in data and b"OrderedDict" in data
        assert parse_dataset("refcoco", {**REFCOCO_FILES, "refs": path}, SOURCE).tasks["refcoco"] == expected


# ------------------------------------------------------------------------------------------- bad inputs


def test_gqa_questions_keep_string_ids_and_pointer_spans():
    parsed = parse_dataset("gqa", GQA_FILES, GQA_SOURCE)
    rows = {r["question_id"]: r for r in parsed.tasks["gqa"]}
    # keys stay strings with their leading zeros, in file order, splits by name
    assert list(rows) == ["20968379", "02968381", "02968383", "00126851", "02930152", "07333408"]
    wall = rows["07333408"]
    assert (wall["image_id"], wall["image_key"], wall["split"]) == ("2375429", "vg:2375429", "val")
    assert (wall["answer"], wall["full_answer"]) == ("pipe", "The pipe is on the wall.")
    assert (wall["structural"], wall["semantic_type"], wall["detailed"]) == ("query", "rel", "relS")
    assert (wall["global_group"], wall["local_group"]) == ("", "14-wall_on,s")  # "" is not null
    assert wall["pointers"] == [
        {"field": "question", "start": 4, "end": 6, "object_id": "722332"},  # "4:6" = "white wall?"
        {"field": "answer", "start": 0, "end": 1, "object_id": "722335"},
        {"field": "fullAnswer", "start": 1, "end": 2, "object_id": "722335"},
        {"field": "fullAnswer", "start": 5, "end": 6, "object_id": "722332"},
    ]
    operations = [op["operation"] for op in json.loads(wall["semantic"])]
    assert operations == ["select", "filter color", "relate", "query"]
    sky = rows["02930152"]
    assert sky["entailed"][:2] == ["02930160", "02930158"] and sky["equivalent"] == ["02930152"]
    assert rows["00126851"]["global_group"] is None and rows["00126851"]["is_balanced"] is True
    cart = rows["00126851"]["pointers"]
    words = rows["00126851"]["question"].split()
    assert [words[p["start"]] for p in cart if p["field"] == "question"] == ["carts", "pond?"]


def test_gqa_testdev_images_are_gqa_own_n_prefixed_images():
    parsed = parse_dataset("gqa", GQA_FILES, GQA_SOURCE)
    testdev = [r for r in parsed.tasks["gqa"] if r["split"] == "testdev"]
    assert {r["image_id"] for r in testdev} == {"n161313", "n336443"}
    assert {r["image_key"] for r in testdev} == {"gqa:n161313", "gqa:n336443"}
    red = next(r for r in testdev if r["question_id"] == "20968379")
    assert [(p["field"], p["start"], p["end"]) for p in red["pointers"]] == [("question", 3, 5),
                                                                            ("fullAnswer", 4, 6)]
    assert red["question"].split()[3:5] == ["red", "circle?"]
    # Only GQA's own images are fetched by the gqa dataset (its VG images are the vg dataset's)
    assert sorted((ref.key, ref.url, ref.split) for ref in parsed.images) == [
        ("gqa:n161313", GQA_IMAGES + "n161313.jpg", "testdev"),
        ("gqa:n336443", GQA_IMAGES + "n336443.jpg", "testdev"),
    ]
    with pytest.raises(FormatError) as err:
        parse_dataset("gqa", GQA_FILES, SOURCE)
    assert str(err.value) == (
        f"{GQA_FILES['questions_testdev']}: record 0 (question 20968379): field 'imageId': 'n161313' is "
        "GQA's own image (not a Visual Genome one): download.datasets.gqa.image_base_url is required to "
        "fetch it")


def test_gqa_scene_graphs_one_row_per_object_with_relations():
    parsed = parse_dataset("gqa", GQA_FILES, GQA_SOURCE)
    objects = {r["object_id"]: r for r in parsed.tasks["gqa_objects"]}
    assert sorted(objects) == ["1039872", "1039893", "2486325", "722332", "722335"]
    cart = objects["1039872"]
    assert (cart["image_id"], cart["image_key"], cart["split"], cart["width"], cart["height"]) == (
        "1159529", "vg:1159529", "val", 500, 333)
    assert (cart["name"], cart["attributes"], (cart["x"], cart["y"], cart["w"], cart["h"])) == (
        "cart", ["wooden", "brown"], (20.0, 180.0, 80.0, 70.0))
    assert cart["relations"] == [{"name": "near", "object": "1039893"},
                                 {"name": "to the left of", "object": "1039893"}]
    assert objects["2486325"]["relations"] == []
    # the questions' pointers name objects of their image's scene graph
    for row in parsed.tasks["gqa"]:
        if row["split"] == "val":
            assert {p["object_id"] for p in row["pointers"]} <= {
                o for o, r in objects.items() if r["image_id"] == row["image_id"]}


def test_format_error_is_a_one_line_stage_error():
    err = FormatError("a.json", "invalid JSON:\nline two", record=3, record_id="image 7", field="url")
    assert isinstance(err, StageError)
    assert str(err) == "a.json: record 3 (image 7): field 'url': invalid JSON: line two"
    assert (err.file, err.record, err.record_id, err.field) == ("a.json", 3, "image 7", "url")


def _edit_json(tmp_path: Path, source: Path, edit) -> Path:
    data = read_json(source)
    edit(data)
    return write_json(tmp_path / "edited" / source.name, data)


def _edit_lines(tmp_path: Path, source: Path, edit) -> Path:
    records = read_json_lines(source)
    edit(records)
    path = tmp_path / "edited" / source.name
    path.parent.mkdir(exist_ok=True)
    return write_json_lines(path, records)


def _truncated(tmp_path: Path, source: Path, size: int) -> Path:
    path = tmp_path / "edited" / source.name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(source.read_bytes()[:size])
    return path


def bad_coco_truncated(tmp):
    files = {
        **coco_files(tmp),
        "captions_train2014": _truncated(tmp, F / "coco" / "captions_train2014.json", 2000),
    }
    return (
        "coco",
        files,
        "{captions_train2014}: invalid JSON: Unterminated string starting at (line 1 column 1969)",
    )


def bad_coco_id_type(tmp):
    def edit(data):
        data["images"][1]["id"] = "600421"

    files = {
        **coco_files(tmp),
        "captions_train2014": _edit_json(tmp, F / "coco" / "captions_train2014.json", edit),
    }
    return (
        "coco",
        files,
        "{captions_train2014}: record 1 (?): field 'id': expected an integer, got str '600421'",
    )


def bad_coco_no_url(tmp):
    def edit(data):
        del data["images"][2]["coco_url"]

    files = {
        **coco_files(tmp),
        "captions_val2017": _edit_json(tmp, F / "coco" / "captions_val2017.json", edit),
    }
    return (
        "coco",
        files,
        "{captions_val2017}: record 2 (image 600422): field 'coco_url': missing (also looked for 'url')",
    )


def bad_coco_caption_image(tmp):
    def edit(data):
        data["annotations"][3]["image_id"] = 600422

    files = {
        **coco_files(tmp),
        "captions_train2014": _edit_json(tmp, F / "coco" / "captions_train2014.json", edit),
    }
    return (
        "coco",
        files,
        (
            "{captions_train2014}: record 3 (annotation 9000001): field 'image_id': image 600422 is not in"
            " this file's images"
        ),
    )


def bad_coco_bbox(tmp):
    def edit(data):
        data["annotations"][1]["bbox"] = [199.88, 13.67, 17.86]

    files = {
        **coco_files(tmp),
        "instances_val2017": _edit_json(tmp, F / "coco" / "instances_val2017.json", edit),
    }
    return (
        "coco",
        files,
        (
            "{instances_val2017}: record 1 (annotation 1208618): field 'bbox': expected 4 numbers, got"
            " [199.88, 13.67, 17.86]"
        ),
    )


def bad_coco_karpathy_image_missing(tmp):
    files = {**coco_files(tmp), "karpathy": coco_karpathy(tmp, {**KARPATHY_SPLITS, 391895: "test"})}
    del files["captions_train2014"]
    return (
        "coco",
        files,
        (
            "{karpathy}: record 0 (image 57870): field 'cocoid': image 57870 is in none of the COCO files"
            " given"
            " (captions_val2017.json, instances_val2017.json)"
        ),
    )


def bad_coco_missing_role(tmp):
    files = coco_files(tmp)
    del files["karpathy"]
    return (
        "coco",
        files,
        (
            "dataset 'coco': missing required file role 'karpathy' (given: captions_train2014,"
            " captions_val2017,"
            " instances_val2017)"
        ),
    )


def bad_vg_misaligned(tmp):
    def edit(data):
        data[2], data[3] = data[3], data[2]

    files = {**VG_FILES, "objects": _edit_json(tmp, VG_FILES["objects"], edit)}
    return (
        "vg",
        files,
        (
            "{objects}: record 2 (image 2418001): field 'image_id': is image 2418001 but image_data.json"
            " record 2 is"
            " image 2412112 (the files are aligned by position)"
        ),
    )


def bad_vg_region_file_short(tmp):
    files = {**VG_FILES, "region_descriptions": _edit_json(tmp, VG_FILES["region_descriptions"], list.pop)}
    return (
        "vg",
        files,
        ("{region_descriptions}: has 3 images but image_data.json has 4 (the files are aligned by position)"),
    )


def bad_vg_flickr_id_type(tmp):
    def edit(data):
        data[3]["flickr_id"] = "1016887272"

    files = {**VG_FILES, "image_data": _edit_json(tmp, VG_FILES["image_data"], edit)}
    return (
        "vg",
        files,
        "{image_data}: record 3 (image 2418001): field 'flickr_id': expected an integer, got str"
        " '1016887272'",
    )


def bad_vg_region_phrase(tmp):
    def edit(data):
        del data[0]["regions"][1]["phrase"]

    files = {**VG_FILES, "region_descriptions": _edit_json(tmp, VG_FILES["region_descriptions"], edit)}
    return "vg", files, "{region_descriptions}: record 0 (image 1): field 'regions[1].phrase': missing"


def bad_cc_no_tab(tmp):
    path = tmp / "Train_GCC-training.tsv"
    lines = CC_FILES["train"].read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1].replace("\t", " "), lines[2]]) + "\n")
    return (
        "cc",
        {"train": path},
        (
            "{train}: record 1 (cc:train:1): field 'url': expected 'caption<TAB>url', got 1 tab-separated"
            " fields"
        ),
    )


def bad_sbu_unaligned(tmp):
    captions = _truncated(tmp, SBU_TXT["captions"], SBU_TXT["captions"].read_text().index("workers"))
    return (
        "sbu",
        {**SBU_TXT, "captions": captions},
        (
            "{captions}: has 2 lines but SBU_captioned_photo_dataset_urls.txt has 3 (the files are"
            " line-aligned)"
        ),
    )


def bad_sbu_json_lengths(tmp):
    def edit(data):
        data["captions"].pop()

    path = _edit_json(tmp, F / "sbu" / "sbu-captions-all.json", edit)
    return (
        "sbu",
        {"json": path},
        "{json}: the parallel lists differ in length (image_urls 3, captions 2, user_ids 3)",
    )


def bad_flickr30k_unclosed_phrase(tmp):
    folder = tmp / "entities"
    shutil.copytree(F / "flickr30k_entities", folder)
    sentences = folder / "Sentences" / "3416050480.txt"
    sentences.chmod(0o644)
    sentences.write_text(sentences.read_text().replace("[/EN#104/scene a field]", "[/EN#104/scene a field"))
    return (
        "flickr30k",
        flickr30k_files(tmp, entities=folder),
        (
            "{entities}/Sentences/3416050480.txt: record 1 (sentence 1): field 'phrase': phrase [/EN#104"
            " starting at"
            " word 6 is not closed"
        ),
    )


def bad_flickr30k_box_coordinate(tmp):
    path = tmp / "annotations.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted((F / "flickr30k_entities").rglob("*.*")):
            text = file.read_text().replace("<ymax>335</ymax>", "<ymax>33.5.0</ymax>")
            archive.writestr(file.relative_to(F / "flickr30k_entities").as_posix(), text)
    return (
        "flickr30k",
        flickr30k_files(tmp, entities=path),
        (
            "{entities}#Annotations/1000092795.xml: record 0 (object 1): field 'bndbox.ymax': expected a"
            " pixel"
            " coordinate, got '33.5.0'"
        ),
    )


def bad_flickr30k_missing_xml(tmp):
    path = entities_zip(tmp, drop="Annotations/3416050480.xml")
    return (
        "flickr30k",
        flickr30k_files(tmp, entities=path),
        (
            "{entities}#annotations/Sentences/3416050480.txt: has no matching Annotations/3416050480.xml"
            " in {entities}"
        ),
    )


def bad_nlvr2_label(tmp):
    def edit(records):
        records[1]["label"] = "yes"

    files = {**nlvr2_files(tmp), "dev": _edit_lines(tmp, F / "nlvr2" / "dev.json", edit)}
    return (
        "nlvr2",
        files,
        """{dev}: record 1 (dev-850-2-0): field 'label': expected "True" or "False", got str 'yes'""",
    )


def bad_nlvr2_swapped_files(tmp):
    files = nlvr2_files(tmp)
    files["train"], files["dev"] = files["dev"], files["train"]
    return (
        "nlvr2",
        files,
        "{train}: record 0 (dev-850-0-0): field 'identifier': split 'dev' is not this file's role 'train'",
    )


def bad_nlvr2_truncated_line(tmp):
    files = {**nlvr2_files(tmp), "dev": _truncated(tmp, F / "nlvr2" / "dev.json", 1000)}
    return "nlvr2", files, "{dev}: record 1 (?): invalid JSON: Unterminated string starting at (column 440)"


def bad_vqa_nine_answers(tmp):
    def edit(data):
        data["annotations"][2]["answers"].pop()

    files = {**VQA_FILES, "annotations_train2014": _edit_json(tmp, VQA_FILES["annotations_train2014"], edit)}
    return (
        "vqa",
        files,
        "{annotations_train2014}: record 2 (question 458752002): field 'answers': expected 10 answers, got 9",
    )


def bad_vqa_unannotated_question(tmp):
    def edit(data):
        data["annotations"].pop(1)

    files = {**VQA_FILES, "annotations_train2014": _edit_json(tmp, VQA_FILES["annotations_train2014"], edit)}
    return (
        "vqa",
        files,
        (
            "{questions_train2014}: record 1 (question 458752001): field 'question_id': no annotation for"
            " it in"
            " v2_mscoco_train2014_annotations.json"
        ),
    )


def bad_vqa_unknown_question(tmp):
    def edit(data):
        data["questions"].pop(3)

    files = {**VQA_FILES, "questions_train2014": _edit_json(tmp, VQA_FILES["questions_train2014"], edit)}
    return (
        "vqa",
        files,
        (
            "{annotations_train2014}: record 3 (question 458752003): field 'question_id': no such question in"
            " v2_OpenEnded_mscoco_train2014_questions.json"
        ),
    )


def bad_vqa_unpaired_role(tmp):
    files = {**VQA_FILES, "questions_val2014": VQA_FILES["questions_train2014"]}
    return (
        "vqa",
        files,
        "dataset 'vqa': missing required file role 'annotations_val2014' (it pairs with 'questions_val2014')",
    )


def bad_snli_ve_image_id(tmp):
    def edit(records):
        records[2]["Flikr30kID"] = "3416050480.png"

    files = {**snli_ve_files(tmp), "test": _edit_lines(tmp, F / "snli_ve" / "snli_ve_test.jsonl", edit)}
    return (
        "snli_ve",
        files,
        (
            "{test}: record 2 (pair 3416050480.jpg#4r1e): field 'Flikr30kID': expected a Flickr photo id"
            " ('<id>' or"
            " '<id>.jpg'), got '3416050480.png'"
        ),
    )


def bad_snli_ve_unknown_label(tmp):
    def edit(records):
        records[0]["gold_label"] = "contradictory"

    files = {**snli_ve_files(tmp), "train": _edit_lines(tmp, F / "snli_ve" / "snli_ve_train.jsonl", edit)}
    return (
        "snli_ve",
        files,
        (
            "{train}: record 0 (pair 4705552913.jpg#2r1n): field 'gold_label': expected one of entailment,"
            " neutral,"
            " contradiction, got 'contradictory'"
        ),
    )


def bad_refcoco_unknown_annotation(tmp):
    def edit(data):
        data["annotations"].pop()

    files = {**REFCOCO_FILES, "instances": _edit_json(tmp, REFCOCO_FILES["instances"], edit)}
    return (
        "refcoco",
        files,
        "{refs}: record 1 (ref 50001): field 'ann_id': annotation 9000001 is not in instances.json",
    )


def bad_refcoco_truncated_pickle(tmp):
    files = {**REFCOCO_FILES, "refs": _truncated(tmp, REFCOCO_FILES["refs"], 400)}
    return "refcoco", files, "{refs}: invalid pickle: truncated"


def bad_refcoco_pickle_with_code(tmp):
    path = tmp / "refs(unc).p"
    path.write_bytes(pickle.dumps([Path("refs")], protocol=2))
    return (
        "refcoco",
        {**REFCOCO_FILES, "refs": path},
        ("{refs}: invalid pickle: refusing to load pathlib.PosixPath: only plain data and"
         " collections.OrderedDict are allowed"),
    )


def bad_unknown_role(tmp):
    return (
        "vg",
        {**VG_FILES, "synsets": VG_FILES["objects"]},
        (
            "dataset 'vg': unknown file role 'synsets' (known: attributes, image_data, objects,"
            " region_descriptions)"
        ),
    )


def bad_unknown_dataset(tmp):
    return (
        "vizwiz",
        {},
        (
            "dataset 'vizwiz': no parser for this dataset (known: coco, vg, cc, sbu, flickr30k, nlvr2, vqa,"
            " snli_ve, refcoco, gqa)"
        ),
    )


def _gqa_edit(tmp, role, edit):
    return "gqa", {**GQA_FILES, role: _edit_json(tmp, GQA_FILES[role], edit)}


def bad_gqa_span_past_the_text(tmp):
    def edit(data):
        data["07333408"]["annotations"]["question"] = {"4:9": "722332"}

    name, files = _gqa_edit(tmp, "questions_val", edit)
    return name, files, ("{questions_val}: record 2 (question 07333408): field 'annotations.question.4:9': "
                         "points past the 6 words of question 'What is on the white wall?'")


def bad_gqa_pointer_key(tmp):
    def edit(data):
        data["00126851"]["annotations"]["fullAnswer"] = {"cart": "1039872"}

    name, files = _gqa_edit(tmp, "questions_val", edit)
    return name, files, ("{questions_val}: record 0 (question 00126851): field "
                         "'annotations.fullAnswer.cart': expected a word index '4' or span '4:6', got key "
                         "'cart'")


def bad_gqa_pointer_to_a_number(tmp):
    def edit(data):
        data["02930152"]["annotations"]["question"]["2"] = 2486325

    name, files = _gqa_edit(tmp, "questions_val", edit)
    return name, files, ("{questions_val}: record 1 (question 02930152): field 'annotations.question.2': "
                         "expected an object id string, got int 2486325")


def bad_gqa_integer_image_id(tmp):
    def edit(data):
        data["02930152"]["imageId"] = 2354786

    name, files = _gqa_edit(tmp, "questions_val", edit)
    return name, files, ("{questions_val}: record 1 (question 02930152): field 'imageId': expected a string, "
                         "got int 2354786")


def bad_gqa_image_id_spelling(tmp):
    def edit(data):
        data["20968379"]["imageId"] = "testdev/161313"

    name, files = _gqa_edit(tmp, "questions_testdev", edit)
    return name, files, ("{questions_testdev}: record 0 (question 20968379): field 'imageId': expected a "
                         "Visual Genome id or 'n<digits>', got 'testdev/161313'")


def bad_gqa_question_missing(tmp):
    def edit(data):
        del data["02968383"]["question"]

    name, files = _gqa_edit(tmp, "questions_testdev", edit)
    return name, files, "{questions_testdev}: record 2 (question 02968383): field 'question': missing"


def bad_gqa_relation_to_another_image(tmp):
    def edit(data):
        data["2375429"]["objects"]["722335"]["relations"][0]["object"] = "2486325"

    name, files = _gqa_edit(tmp, "scene_graphs_val", edit)
    return name, files, ("{scene_graphs_val}: record 2 (image 2375429): field 'objects.722335.relations[0]."
                         "object': '2486325' is no object of image 2375429")


def bad_gqa_questions_as_a_list(tmp):
    path = write_json(tmp / "edited" / "val_balanced_questions.json",
                      list(read_json(GQA_FILES["questions_val"]).values()))
    expected = "{questions_val}: expected an object at top level, got list of 3"
    return "gqa", {**GQA_FILES, "questions_val": path}, expected


def bad_gqa_unknown_role(tmp):
    return "gqa", {**GQA_FILES, "choices_val": GQA_FILES["questions_val"]}, (
        "dataset 'gqa': unknown file role 'choices_val' (known: questions_<split>, scene_graphs_<split>)")


BAD_INPUTS = [value for name, value in sorted(globals().items()) if name.startswith("bad_")]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda case: case.__name__.removeprefix("bad_"))
def test_bad_input_gives_one_exact_line(case, tmp_path):
    name, files, expected = case(tmp_path)
    with pytest.raises(FormatError) as caught:
        parse_dataset(name, files, F30K_SOURCE)
    assert str(caught.value) == expected.format(**{role: str(path) for role, path in files.items()})
    assert "\n" not in str(caught.value)


def test_flickr30k_without_image_base_url_is_refused(tmp_path):
    with pytest.raises(FormatError) as caught:
        parse_dataset("flickr30k", flickr30k_files(tmp_path), SOURCE)
    assert str(caught.value) == (
        "dataset 'flickr30k': image_base_url is required (the metadata names image files, not URLs)"
    )
