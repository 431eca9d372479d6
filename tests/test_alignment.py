"""The alignment annotations (vlp.data.alignment, the alignment stage): VG region descriptions joined with
"and", GQA's question / full-answer pointers, their word pieces and soft targets, the pretraining dataset that
serves them, and the guarantee that no annotation comes from an evaluation image."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError

from stages.alignment import stage as alignment_stage
from stages.alignment.config import AlignmentConfig
from stages.base import StageContext
from stages.feature_extraction.config import FeatureConfig
from stages.outputs.alignment import AlignmentOutput
from stages.outputs.download import DedupOutput
from stages.outputs.features import FeaturesOutput
from stages.outputs.txt_db import TxtDbOutput
from vlp.data import tables
from vlp.data.alignment import (
    AlignmentDataset,
    Annotation,
    Pointer,
    annotation_targets,
    encode_annotation,
    gqa_sentences,
    vg_region_sentences,
)
from vlp.data.collate import collate
from vlp.data.img_db import ImgDbWriter
from vlp.data.tokenizer import encode, load_tokenizer, save_tokenizer, tokenizer_meta, train_wordpiece
from vlp.data.txt_db import TxtDb, TxtDbWriter
from vlp.objectives.owa import ExactMatch

NBB = (0.2, 100, 2)


def region(key, rid, phrase, x=0.0, y=0.0, w=10.0, h=10.0):
    return {"corpus": "vg", "image_key": key, "region_id": rid, "phrase": phrase, "x": x, "y": y, "w": w,
            "h": h}


def test_vg_descriptions_are_joined_with_and_and_point_at_their_boxes():
    rows = [region("vg:1", i, p, x=10.0 * i) for i, p in enumerate(
        ["red circle ", "the square is blue", "a large star", "dotted hexagon on the left", "green cross"])]
    sentences = vg_region_sentences(rows, seed=0)
    assert all(1 <= len(s.pointers) <= 3 for s in sentences)
    # every description used once, each pointer's words are its description and its box is the region's
    used = []
    for s in sentences:
        words = s.text.split()
        for k, p in enumerate(s.pointers):
            phrase = " ".join(words[p.start:p.end])
            row = next(r for r in rows if r["phrase"].strip() == phrase)
            assert p.box == (row["x"], row["y"], row["x"] + row["w"], row["y"] + row["h"])
            if k:  # "and" between two descriptions
                assert words[s.pointers[k - 1].end] == "and" and p.start == s.pointers[k - 1].end + 1
            used.append(phrase)
    assert sorted(used) == sorted(r["phrase"].strip() for r in rows)
    assert [s.text for s in vg_region_sentences(rows, seed=0)] == [s.text for s in sentences]
    assert len(vg_region_sentences(rows, seed=0, per_image=1)) == 1
    assert all(len(s.pointers) == 1 for s in vg_region_sentences(rows, seed=0, max_descriptions=1))


def test_gqa_pointers_become_sentences_with_scene_graph_boxes():
    question = {"question_id": "00126851", "image_id": "1159529", "image_key": "vg:1159529",
                "question": "Are there carts near the pond?",
                "full_answer": "Yes, there is a cart near the pond.",
                "pointers": [{"field": "question", "start": 2, "end": 3, "object_id": "1039872"},
                             {"field": "question", "start": 5, "end": 6, "object_id": "1039893"},
                             {"field": "fullAnswer", "start": 4, "end": 5, "object_id": "1039872"},
                             {"field": "fullAnswer", "start": 7, "end": 8, "object_id": "404"}]}
    objects = [{"image_id": "1159529", "object_id": "1039872", "x": 20.0, "y": 180.0, "w": 80.0, "h": 70.0},
               {"image_id": "1159529", "object_id": "1039893", "x": 120.0, "y": 200.0, "w": 240.0, "h": 90.0}]
    sentences, dropped = gqa_sentences([question], objects)
    assert dropped == 1  # object 404 is in no scene graph
    q, full = sentences
    assert (q.source, q.sentence_id, full.source) == ("gqa_question", "00126851#question", "gqa_full_answer")
    assert q.pointers == [Pointer(2, 3, (20.0, 180.0, 100.0, 250.0)),
                          Pointer(5, 6, (120.0, 200.0, 360.0, 290.0))]
    assert q.group(1) == ["pond"] and full.group(0) == ["cart"]


def test_word_pieces_keep_each_pointer_on_its_words():
    ann = Annotation("vg:1", "gqa_question", "1#question", "Is the polka-dotted circle red?",
                     [Pointer(2, 4, (0, 0, 1, 1)), Pointer(4, 5, (0, 0, 2, 2))])
    pieces = {"Is": [1], "the": [2], "polka-dotted": [3, 4, 5], "circle": [6], "red": [7, 8], "?": [9]}
    ids, spans = encode_annotation(ann, pieces.__getitem__, max_txt_len=20)
    # the pointer on "red?" covers "red" only: its punctuation is encoded apart
    assert ids == [1, 2, 3, 4, 5, 6, 7, 8, 9] and spans == [[2, 6, 0], [6, 8, 1]]
    ids, spans = encode_annotation(ann, pieces.__getitem__, max_txt_len=4)
    # cut mid-pointer: kept up to the cut; the next pointer dropped
    assert ids == [1, 2, 3, 4] and spans == [[2, 4, 0]]


def test_targets_of_an_annotation_over_normalised_regions():
    ann = Annotation("vg:1", "vg_regions", "x", "red circle", [Pointer(0, 2, (0.0, 0.0, 40.0, 20.0))])
    norm_bb = np.array([[0.0, 0.0, 0.4, 0.4, 0.4, 0.4], [0.5, 0.5, 1.0, 1.0, 0.5, 0.5]])
    a_star = annotation_targets(ann, norm_bb, 100.0, 50.0, ["circle", "square"], ["red", "blue"],
                                ExactMatch())
    # the pointer's box is [0, 0, 0.4, 0.4] normalised: IoU 1 with region 0, 0 with region 1; S = 1 and 0
    np.testing.assert_allclose(a_star, [[1.0, 0.0]])


# ---------------------------------------------------------------------------------------- the stage


def write(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def image_row(key, corpus="vg", status="ok"):
    return {"corpus": corpus, "key": key, "url": f"http://x/{key}", "split": "train", "status": status,
            "sha256": "ab", "width": 100, "height": 50, "image": b"x"}


def build(root: Path) -> dict[str, Path]:
    """dedup (VG shards of the kept images, regions, GQA tables), features, txtdb, detector classes."""
    dedup = DedupOutput(root / "dedup")
    # vg:1 and vg:3 kept; vg:2 is a GQA val image dedup removed (its rows stay in the tables on purpose)
    write(dedup.shard("vg", 0), [image_row("vg:1"), image_row("vg:3")], tables.IMAGES)
    write(dedup.removed_file, [{"corpus": "vg", "key": "vg:2", "url": "http://x/vg:2", "reason": "vg_id",
                                "matched": "2"}], pa.schema([(n, pa.string()) for n in
                                                            ("corpus", "key", "url", "reason", "matched")]))
    regions = [region("vg:1", 1, "red circle", 0, 0, 40, 20),
               region("vg:1", 2, "blue square", 50, 25, 50, 25),
               region("vg:2", 3, "green star", 0, 0, 10, 10), region("vg:3", 4, "a red circle", 0, 0, 40, 20)]
    write(dedup.table("regions"), regions, tables.REGIONS)
    gqa = []
    for qid, image_id, split in (("01", "1", "train"), ("02", "2", "val"), ("03", "3", "testdev")):
        gqa.append({"question_id": qid, "image_id": image_id, "image_key": f"vg:{image_id}", "split": split,
                    "question": "What color is the circle?", "answer": "red",
                    "full_answer": "The circle is red.",
                    "is_balanced": True, "entailed": [], "equivalent": [], "semantic": "[]",
                    "pointers": [{"field": "question", "start": 4, "end": 5, "object_id": f"{image_id}0"},
                                 {"field": "fullAnswer", "start": 1, "end": 2, "object_id": f"{image_id}0"}]})
    objects = [{"image_id": i, "image_key": f"vg:{i}", "split": s, "width": 100, "height": 50,
                "object_id": f"{i}0", "name": "circle", "attributes": ["red"], "relations": [], "x": 0.0,
                "y": 0.0, "w": 40.0, "h": 20.0} for i, s in (("1", "train"), ("2", "val"))]
    write(dedup.task_table("gqa"), gqa, tables.TASK_GQA)
    write(dedup.task_table("gqa_objects"), objects, tables.TASK_GQA_OBJECTS)

    features = FeaturesOutput(root / "features")
    with ImgDbWriter(features.store_dir, nbb_configs=[NBB]) as writer:
        for key in ("vg:1", "vg:2", "vg:3"):
            # region 0 the circle's box (class circle, attribute red), region 1 elsewhere (square, blue)
            soft = np.array([[0.1, 0.8, 0.1], [0.1, 0.1, 0.8]], np.float32)
            writer.put(key, features=np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32),
                       norm_bb=np.array([[0, 0, 0.4, 0.4, 0.4, 0.4], [0.5, 0.5, 1, 1, 0.5, 0.5]]),
                       conf=np.array([0.9, 0.8]), soft_labels=soft,
                       attr_labels=np.array([[0.9, 0.1], [0.1, 0.9]], np.float32))
    features.write_stats({}, NBB, compress=False)

    texts = ["red circle", "blue square", "what color is the circle?", "the circle is red.", "a caption"]
    tok = train_wordpiece(texts, 80)
    txtdb = TxtDbOutput(root / "txtdb")
    save_tokenizer(tok, txtdb.tokenizer_dir)
    with TxtDbWriter(txtdb.db_path("vg_train"), tokenizer_meta(tok, "toy") | {"max_txt_len": 60}) as w:
        w.add("c0", {"input_ids": encode(tok, ["a caption"])[0], "img_fname": "vg:1"})
    detector = root / "detector"
    detector.mkdir()
    (detector / "classes.json").write_text(json.dumps({"classes": ["circle", "square"],
                                                       "attributes": ["red", "blue"]}))
    return {"dedup": dedup.root, "features": features.root, "txtdb": txtdb.root, "detector": detector}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("alignment")
    inputs = build(root)
    cfg = SimpleNamespace(alignment=AlignmentConfig(), features=FeatureConfig())
    ctx = StageContext(cfg=cfg, workdir=root, out_dir=root / "out", inputs=inputs,
                       log=logging.getLogger("test.alignment"))
    return root, inputs, alignment_stage.run(ctx)


def test_annotations_never_come_from_an_evaluation_image(built):
    root, _, result = built
    out = AlignmentOutput(root / "out")
    assert out.missing() == []
    rows = pq.read_table(out.annotations_path).to_pylist()
    # vg:2 (GQA val, removed by dedup) has regions and GQA pointers in the tables: none is used; vg:3's GQA
    # question is testdev's: not used either, its VG description is
    assert {r["image_key"] for r in rows} == {"vg:1", "vg:3"}
    assert {(r["image_key"], r["source"]) for r in rows if r["source"] != "vg_regions"} == {
        ("vg:1", "gqa_question"), ("vg:1", "gqa_full_answer")}
    stats = out.stats()
    assert stats["left_out"]["vg_regions: image not kept for pretraining"] == 1
    assert stats["similarity"] == "exact name match" and stats["box_rule"] == list(NBB)
    assert result.metrics["sentences.gqa_question"] == 1
    with pytest.raises(ValidationError, match="evaluation splits"):
        AlignmentConfig(gqa_splits=["train", "val"])


def test_the_db_serves_each_pointer_target_on_its_word_pieces(built):
    root, inputs, _ = built
    db = TxtDb(AlignmentOutput(root / "out").db_path)
    question = db["gqa_question:01#question"]
    # "what color is the circle?": the pointer is on the pieces of "circle" (not on "?")
    ((start, end, pointer),) = question["align_spans"]
    tok = load_tokenizer(TxtDbOutput(inputs["txtdb"]).tokenizer_dir)
    assert tok.decode(question["input_ids"][start:end]).replace(" ", "").replace("#", "") == "circle"
    assert pointer == 0 and question["img_fname"] == "vg:1"
    # circle's box = region 0 (IoU 1, class circle); region 1: IoU 0, class square -> A* = [1, 0]
    np.testing.assert_allclose(question["align_targets"], [[1.0, 0.0]])
    store = FeaturesOutput(inputs["features"]).img_db()
    data = AlignmentDataset([db], store)
    i = data.txt_ids.index("gqa_question:01#question")
    example = data[i]
    targets = example["align_targets"]
    assert targets.shape == (len(example["input_ids"]), 2)
    # [CLS] shifts the pieces by one; every piece of the pointer carries its row
    assert (targets[1 + start:1 + end] == torch.tensor([1.0, 0.0])).all() and targets.sum() == end - start
    assert type(data.select([i])) is AlignmentDataset and torch.equal(data.select([i])[0]["align_targets"],
                                                                       targets)
    batch = collate([example, data[(i + 1) % len(data)]])
    assert batch["align_targets"].shape == (2, batch["input_ids"].size(1), 2)
    assert torch.equal(batch["align_targets"][0, : targets.size(0)], targets)
    store.close()
