"""The finetune and eval stages on a small generated setup: every stage input written in its real format (a
region store via ImgDbWriter, text dbs via TxtDbWriter, task tables, Entities and image shards with the
vlp.data.tables schemas, a pretrain output with an ITM head, a random detector's weight file), every task
finetuned for a few steps from both initialisations, then evaluated into metrics, a summary and figures."""

import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw

from stages.base import StageContext, StageError
from stages.eval import aggregate as eval_aggregate
from stages.eval import stage as eval_stage
from stages.eval.config import EvalConfig, eval_upstream
from stages.feature_extraction import gt_features
from stages.feature_extraction.config import FeatureConfig
from stages.feature_extraction.detector.config import DetectorConfig
from stages.feature_extraction.detector.model import RegionDetector
from stages.feature_extraction.detector.torchvision_backend import save_checkpoint
from stages.finetune import aggregate as finetune_aggregate
from stages.finetune import stage as finetune_stage
from stages.finetune.config import FinetuneConfig, finetune_upstream
from stages.outputs.features import EntityFeaturesOutput, FeaturesOutput
from stages.outputs.finetune import FinetuneOutput
from stages.outputs.pretrain import PretrainOutput
from stages.outputs.txt_db import TxtDbOutput
from stages.txt_db import karpathy as karpathy_txtdb
from vlp.data import tables
from vlp.data.img_db import ImgDbWriter
from vlp.data.tokenizer import encode, save_tokenizer, tokenizer_meta, train_wordpiece
from vlp.data.txt_db import TxtDb, TxtDbWriter
from vlp.model import UniterConfig, UniterModel
from vlp.tasks.registry import TASK_NAMES
from vlp.train.pretrain_model import build_model
from vlp.train.runtime import RuntimeConfig

SHAPES = ["circle", "square", "star", "heart"]
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 180, 30), "yellow": (230, 220, 30)}
DIM = 32  # region feature size: the detector's feature_dim, so its pooled ground-truth regions fit too
NBB = (0.2, 100, 2)
WIDTH, HEIGHT = 96, 72
DETECTOR = {"feature_dim": DIM, "image_size": 64, "max_image_size": 128, "anchor_sizes": (16, 32),
            "precision": "fp32"}


def scene(rng: np.random.Generator) -> list[tuple[str, str, tuple[float, float, float, float]]]:
    """Two or three (shape, colour, x1y1x2y2 pixel box) objects in distinct cells of a 3 x 2 grid."""
    cells = rng.permutation(6)[: int(rng.integers(2, 4))]
    objects = []
    for cell in cells.tolist():
        x0, y0 = (cell % 3) * 32, (cell // 3) * 36
        size = int(rng.integers(18, 28))
        box = (x0 + 2.0, y0 + 2.0, x0 + 2.0 + size, y0 + 2.0 + size)
        objects.append((SHAPES[int(rng.integers(len(SHAPES)))], list(COLOURS)[int(rng.integers(4))], box))
    return objects


def png(objects) -> bytes:
    image = Image.new("RGB", (WIDTH, HEIGHT), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    for _, colour, box in objects:
        draw.rectangle(box, fill=COLOURS[colour])
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def caption(objects, order) -> str:
    return " and ".join(f"a {objects[o][1]} {objects[o][0]}" for o in order)


def write_table(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def image_rows(corpus: str, scenes: dict, with_bytes: bool) -> list[dict]:
    return [{"corpus": corpus, "key": key, "url": f"http://example.com/{key}", "split": "x", "status": "ok",
             "width": WIDTH, "height": HEIGHT, "image": png(objects) if with_bytes else None}
            for key, objects in scenes.items()]


def build_world(root: Path) -> dict[str, Path]:
    """Every input of the finetune / eval stages; returns the stage-input dirs by stage name."""
    rng = np.random.default_rng(0)
    prototypes = {(s, c): rng.normal(size=DIM).astype(np.float32) for s in SHAPES for c in COLOURS}
    flickr = {f"flickr30k:{1000 + i}": scene(rng) for i in range(20)}
    vqa_images = {f"coco:{i}": scene(rng) for i in range(1, 13)}
    ref_images = {f"coco:{100 + i}": scene(rng) for i in range(8)}
    nlvr2 = {f"nlvr2:{split}-{i}-0-img{side}": scene(rng)
             for split, n in (("train", 8), ("dev", 3), ("test1", 3)) for i in range(n) for side in (0, 1)}
    # GQA: its own generator, after every other draw, so the other tasks' data is as it was before GQA.
    gqa_rng = np.random.default_rng(1)
    gqa_images = {f"vg:{500 + i}": scene(gqa_rng) for i in range(8)} | {f"gqa:n{7 + i}": scene(gqa_rng)
                                                                         for i in range(2)}
    all_scenes = flickr | vqa_images | ref_images | nlvr2 | gqa_images

    features = FeaturesOutput(root / "features")
    with ImgDbWriter(features.store_dir, nbb_configs=[NBB]) as writer:
        for key, objects in all_scenes.items():
            n = len(objects) + 1  # plus a clutter region over the whole image
            feats = rng.normal(scale=0.3, size=(n, DIM)).astype(np.float32)
            boxes = np.zeros((n, 6))
            for j, (shape, colour, box) in enumerate(objects):
                feats[j] += prototypes[shape, colour]
                x1, y1, x2, y2 = box
                boxes[j] = np.array([x1, y1, x2, y2, x2 - x1, y2 - y1]) / np.tile([WIDTH, HEIGHT], 3)
            boxes[-1] = [0, 0, 1, 1, 1, 1]
            labels = np.full((n, len(SHAPES) + 1), 1.0 / (len(SHAPES) + 1), np.float32)
            writer.put(key, features=feats, norm_bb=boxes, conf=np.linspace(0.9, 0.3, n), soft_labels=labels)
    features.write_stats({}, NBB, compress=False)  # the box rule pretrain, finetune and eval read with

    texts: list[str] = []
    captions = {key: [caption(obj, range(len(obj))), caption(obj, range(len(obj))[::-1])]
                for key, obj in flickr.items()}
    texts += [c for caps in captions.values() for c in caps]
    keys = list(flickr)
    flickr_split = {k: "train" if i < 12 else "val" if i < 16 else "test" for i, k in enumerate(keys)}

    # VQA's test-dev: questions without answers (first in the table; the missing-images test edits the last).
    vqa_rows = [{"question_id": 9000 + i, "image_key": key, "split": "test-dev2015", "question": "is it red?",
                 "answers": None, "multiple_choice_answer": None, "answer_type": None}
                for i, key in enumerate(["coco:11", "coco:12"])]
    for i, (key, objects) in enumerate(vqa_images.items()):
        for q, (shape, colour) in enumerate([(objects[0][0], objects[0][1]), (SHAPES[i % 4], "green")]):
            present = any(o[0] == shape and o[1] == colour for o in objects)
            answer = "yes" if present else "no"
            vqa_rows.append({"question_id": 100 * i + q, "image_key": key,
                             "split": "train2014" if i < 8 else "val2014",
                             "question": f"is there a {colour} {shape}?", "answers": [answer] * 9 + ["maybe"],
                             "multiple_choice_answer": answer, "answer_type": "yes/no"})
    nlvr2_rows = []
    for split, n in (("train", 8), ("dev", 3), ("test1", 3)):
        for i in range(n):
            left = nlvr2[f"nlvr2:{split}-{i}-0-img0"]
            shape, colour = left[0][0], left[0][1]
            nlvr2_rows.append({"identifier": f"{split}-{i}-0-0", "split": split,
                               "sentence": f"the left image contains a {colour} {shape}.",
                               "left_key": f"nlvr2:{split}-{i}-0-img0",
                               "right_key": f"nlvr2:{split}-{i}-0-img1", "label": bool(i % 2 == 0)})
            if i % 2:  # false statements name the right image's object as if it were on the left
                right = nlvr2[f"nlvr2:{split}-{i}-0-img1"]
                nlvr2_rows[-1]["sentence"] = f"the left image contains a {right[0][1]} {right[0][0]} only."
    snli_rows = []
    split_of = {"train": "train", "val": "dev", "test": "test"}
    for key, objects in flickr.items():
        shape, colour = objects[0][0], objects[0][1]
        for h, (hypothesis, label) in enumerate([(f"there is a {colour} {shape}.", "entailment"),
                                                 (f"someone drew a {colour} {shape}.", "neutral"),
                                                 ("the picture is empty.", "contradiction")]):
            snli_rows.append({"pair_id": f"{key.split(':')[1]}.jpg#0r{h}", "image_key": key,
                              "split": split_of[flickr_split[key]], "hypothesis": hypothesis, "label": label,
                              "premise": captions[key][0]})
    ref_rows, object_rows = [], []
    ref_split = ["train"] * 5 + ["val", "testA", "testB"]
    for i, (key, objects) in enumerate(ref_images.items()):
        for j, (shape, colour, (x1, y1, x2, y2)) in enumerate(objects):
            object_rows.append({"corpus": "coco", "image_key": key, "object_id": 1000 * i + j,
                                "names": [shape], "attributes": [], "x": x1, "y": y1, "w": x2 - x1,
                                "h": y2 - y1})
            ref_rows.append({"ref_id": 10 * i + j, "ann_id": 1000 * i + j, "image_key": key,
                             "split": ref_split[i], "sentences": [f"{colour} {shape}", f"the {shape}"],
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "category_id": SHAPES.index(shape),
                             "file_name": f"COCO_train2014_{i:012d}.jpg"})
    entity_rows = []
    for key, objects in flickr.items():
        for s, cap in enumerate(captions[key]):
            order = range(len(objects)) if s == 0 else range(len(objects))[::-1]
            for position, o in enumerate(order):
                shape, colour, box = objects[o]
                entity_rows.append({"image_key": key, "sentence_idx": s, "sentence": cap,
                                    "phrase": f"a {colour} {shape}", "phrase_id": str(o),
                                    "phrase_types": ["other"], "first_word_index": 4 * position,
                                    "boxes": [list(box)]})
    split_rows = [{"corpus": "flickr30k", "scheme": "entities", "split": s, "image_key": k}
                  for k, s in flickr_split.items()]
    # COCO-style retrieval: captions of the VQA images in Karpathy splits (karpathy_txtdb reads them), plus a
    # caption of an image in no Karpathy split and one of another corpus, which it must leave out.
    karpathy = {k: "train" if i < 6 else "restval" if i < 7 else "val" if i < 9 else "test"
                for i, k in enumerate(vqa_images)}
    coco_captions = [{"corpus": "coco", "image_key": key, "caption_id": f"{key}#{c}", "split": "train2014",
                      "caption": caption(obj, range(len(obj)) if c == 0 else range(len(obj))[::-1])}
                     for key, obj in vqa_images.items() for c in range(2)]
    coco_captions += [{"corpus": "coco", "image_key": "coco:100", "caption_id": "x", "caption": "a red star",
                       "split": "train2014"},
                      {"corpus": "cc", "image_key": "cc:train:0", "caption_id": "y", "caption": "a red star",
                       "split": "train"}]
    texts += [r["caption"] for r in coco_captions]
    texts += [r["question"] for r in vqa_rows] + [r["sentence"] for r in nlvr2_rows]
    texts += [r["hypothesis"] for r in snli_rows] + [s for r in ref_rows for s in r["sentences"]]

    gqa_rows, gqa_objects = gqa_tables(gqa_images)
    tok = train_wordpiece(texts, 300)
    txtdb = TxtDbOutput(root / "txtdb")
    save_tokenizer(tok, txtdb.tokenizer_dir)
    txtdb.write_stats({"tokenizer": {"name": "toy", "max_txt_len": 60}})
    for split in ("train", "val", "test"):
        meta = tokenizer_meta(tok, "toy") | {"max_txt_len": 60}
        with TxtDbWriter(txtdb.db_path(f"flickr30k_{split}"), meta) as writer:
            for key in keys:
                if flickr_split[key] == split:
                    for v, ids in enumerate(encode(tok, captions[key])):
                        writer.add(f"flickr30k:{key}:{v}", {"input_ids": ids, "img_fname": key})

    dedup, download = root / "dedup", root / "download"
    write_table(dedup / "tables" / "task_vqa.parquet", vqa_rows, tables.TASK_VQA)
    write_table(dedup / "tables" / "task_nlvr2.parquet", nlvr2_rows, tables.TASK_NLVR2)
    write_table(dedup / "tables" / "task_snli_ve.parquet", snli_rows, tables.TASK_SNLI_VE)
    write_table(dedup / "tables" / "entities.parquet", entity_rows, tables.ENTITIES)
    write_table(dedup / "tables" / "splits.parquet", split_rows, tables.SPLITS)
    write_table(dedup / "tables" / "task_gqa.parquet", gqa_rows, tables.TASK_GQA)
    write_table(dedup / "tables" / "task_gqa_objects.parquet", gqa_objects, tables.TASK_GQA_OBJECTS)
    flickr_shard = dedup / "images" / "flickr30k" / "shard-00000.parquet"
    write_table(flickr_shard, image_rows("flickr30k", flickr, False), tables.IMAGES)
    write_table(download / "tables" / "task_refcoco.parquet", ref_rows, tables.TASK_REFCOCO)
    write_table(download / "tables" / "objects.parquet", object_rows, tables.OBJECTS)
    write_table(download / "tables" / "captions.parquet", coco_captions, tables.CAPTIONS)
    karpathy_rows = [{"corpus": "coco", "scheme": "karpathy", "split": s, "image_key": k}
                     for k, s in karpathy.items()]
    write_table(download / "tables" / "splits.parquet", karpathy_rows + split_rows, tables.SPLITS)
    write_table(download / "tables" / "entities.parquet", entity_rows, tables.ENTITIES)
    write_table(download / "images" / "coco" / "shard-00000.parquet", image_rows("coco", ref_images, True),
                tables.IMAGES)
    write_table(download / "images" / "flickr30k" / "shard-00000.parquet",
                image_rows("flickr30k", flickr, True), tables.IMAGES)

    pretrain = PretrainOutput(root / "pretrain")
    torch.manual_seed(0)
    config = UniterConfig(vocab_size=len(tok.get_vocab()), hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=64, img_dim=DIM)
    options = {"itm": {"neg_prob": 0.5, "wra": True, "wra_beta": 0.5, "wra_iters": 50}}
    pretrain.write_model(build_model(config, options), options, txtdb.tokenizer_dir)

    detector_cfg = DetectorConfig(**DETECTOR)
    torch.manual_seed(0)
    save_checkpoint(root / "detector.pt", detector_cfg, RegionDetector(detector_cfg, len(SHAPES), 2), SHAPES,
                    ["plain", "striped"])
    return {"dedup": dedup, "download": download, "txtdb": txtdb.root, "features": features.root,
            "pretrain": pretrain.root}


def gqa_tables(images: dict) -> tuple[list[dict], list[dict]]:
    """Two questions per image, the second entailed by the first: "what color is the <shape>?" and "is the
    <shape> <colour>?"; train: 6 VG images, val: 2, testdev: GQA's 2 own images (no scene graphs)."""
    questions, objects = [], []
    for i, (key, objs) in enumerate(images.items()):
        image_id = key.split(":")[1]
        split = "train" if i < 6 else "val" if i < 8 else "testdev"
        shape, colour, (x1, y1, x2, y2) = objs[0]
        oid = f"{image_id}0"
        select = {"operation": "select", "dependencies": [], "argument": f"{shape} ({oid})"}
        q1, q2 = f"{image_id}01", f"0{image_id}02"  # string ids, one with a leading zero
        common = {"image_id": image_id, "image_key": key, "split": split, "is_balanced": True,
                  "semantic_type": "attr", "local_group": None, "equivalent": []}
        pointer = [{"field": "question", "start": 4, "end": 5, "object_id": oid}]
        questions.append({**common, "question_id": q1, "question": f"what color is the {shape}?",
                          "answer": colour, "full_answer": f"The {shape} is {colour}.", "structural": "query",
                          "detailed": "queryAttr", "global_group": "color", "entailed": [q2],
                          "semantic": json.dumps([select, {"operation": "query", "dependencies": [0],
                                                           "argument": "color"}]),
                          "pointers": pointer})
        asked = colour if i % 2 == 0 else "green" if colour != "green" else "red"
        questions.append({**common, "question_id": q2, "question": f"is the {shape} {asked}?",
                          "answer": "yes" if asked == colour else "no", "full_answer": None,
                          "structural": "verify", "detailed": "verifyAttr", "global_group": None,
                          "entailed": [], "pointers": [],
                          "semantic": json.dumps([select, {"operation": "verify color", "dependencies": [0],
                                                           "argument": asked}])})
        if split != "testdev":
            for j, (sh, col, (a1, b1, a2, b2)) in enumerate(objs):
                objects.append({"image_id": image_id, "image_key": key, "split": split, "width": WIDTH,
                                "height": HEIGHT, "object_id": f"{image_id}{j}", "name": sh,
                                "attributes": [col],
                                "relations": [], "x": a1, "y": b1, "w": a2 - a1, "h": b2 - b1})
    return questions, objects


def configs(root: Path, skip_missing_images: bool = False, **common) -> SimpleNamespace:
    train = {"max_steps": 3, "batch_units": 400, "lr": 1e-3}
    finetune = FinetuneConfig(
        tasks=list(TASK_NAMES),
        common={"log_every": 1, **common},
        retrieval={**train, "neg_samples": 3, "hard_negatives": 2, "batch_units": 120, "epochs": 10},
        vqa={**train, "options": {"min_count": 1}, "train_split": "train2014", "val_split": "val2014"},
        nlvr2={**train, "options": {"variant": "pair"}, "train_split": "train", "val_split": "dev"},
        snli_ve={**train, "train_split": "train", "val_split": "dev"},
        refcoco={**train, "train_split": "train", "val_split": "val"},
        gqa={**train, "train_split": "train", "val_split": "val"},
    )
    evaluation = EvalConfig(retrieval={"shortlist_k": 2, "chunk": (3, 5), "attention_pairs": 2},
                            splits={"vqa": ["val2014", "test-dev2015"]})
    features = FeatureConfig(detector={**DETECTOR, "weights": str(root / "detector.pt")}, nbb=(NBB,))
    runtime = RuntimeConfig(precision="fp32", skip_missing_images=skip_missing_images)
    return SimpleNamespace(finetune=finetune, eval=evaluation, features=features, runtime=runtime, seed=0)


def context(cfg, root: Path, stage: str, inputs: dict[str, Path]) -> StageContext:
    return StageContext(cfg=cfg, workdir=root, out_dir=root / "out" / stage, inputs=inputs)


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    # The stages set torch's thread count from their config (1 here: tiny matrices on a busy machine).
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return root, build_world(root)


@pytest.fixture(scope="module")
def finetuned(world):
    """Every finetune_<task> stage, then the finetune aggregate."""
    root, inputs = world
    cfg = configs(root)
    karpathy_txtdb.run(context(cfg, root, "karpathy_txtdb", {"download": inputs["download"],
                                                               "txtdb": inputs["txtdb"]}))
    inputs["karpathy_txtdb"] = root / "out" / "karpathy_txtdb"
    gt_features.run(context(cfg, root, "gt_features", {"download": inputs["download"]}))
    inputs["gt_features"] = root / "out" / "gt_features"
    results = {}
    for task in TASK_NAMES:
        needed = {name: inputs[name] for name in finetune_upstream(task)}
        results[task] = finetune_stage.run_task(context(cfg, root, f"finetune_{task}", needed), task)
    outputs = {f"finetune_{task}": root / "out" / f"finetune_{task}" for task in TASK_NAMES}
    aggregate = finetune_aggregate.run(context(cfg, root, "finetune", outputs))
    return root, inputs, cfg, results, aggregate


def test_finetune_stages_write_a_checkpoint_per_task_and_initialisation(finetuned):
    root, _, _, results, aggregate = finetuned
    for task in TASK_NAMES:
        out = root / "out" / f"finetune_{task}"
        variants = json.loads((out / "variants.json").read_text())
        expected = ([f"{d}/{kind}" for d in ("flickr30k", "coco") for kind in ("pretrained", "scratch",
                                                                              "pretrained_no_iais")]
                    if task == "retrieval" else ["pretrained", "scratch"])
        assert [v["name"] for v in variants] == expected
        for v in variants:
            directory = out / v["name"]
            assert v["steps"] == 3
            model = UniterModel.from_pretrained(directory / "encoder")
            assert model.config.img_dim == DIM
            head = torch.load(directory / "head.pt", weights_only=True)
            assert head, f"{task} {v['name']}: empty head state"
            record = json.loads((directory / "task.json").read_text())
            assert record["task"] == task and record["init"] == v["init"]
            assert v["metric"] in record["val"]
            curves = json.loads((directory / "curves.json").read_text())
            assert [c["step"] for c in curves if c["split"] == "train"] == [1, 2, 3]
            assert [c["step"] for c in curves if c["split"] == "val"][0] == 0
            assert results[task].metrics[f"{v['name']}/val/{v['metric']}"] == record["val"][v["metric"]]
            assert results[task].metric_steps[f"{v['name']}/val/{v['metric']}"] == 3  # the curve's last step
        assert FinetuneOutput(out).missing() == []
    vqa = json.loads((root / "out" / "finetune_vqa" / "pretrained" / "task.json").read_text())
    assert sorted(vqa["state_extra"]["ans2label"]) == ["no", "yes"]
    nlvr2 = UniterModel.from_pretrained(root / "out" / "finetune_nlvr2" / "scratch" / "encoder")
    assert nlvr2.config.type_vocab_size == 3
    # RefCOCO trains on the ground-truth regions (UNITER) and validates on the detected ones.
    curves = json.loads((root / "out" / "finetune_refcoco" / "pretrained" / "curves.json").read_text())
    assert all("refcoco_gt_acc" in c and "refcoco_acc" not in c for c in curves if c["split"] == "train")
    assert all("refcoco_acc" in c for c in curves if c["split"] == "val")
    retrieval = json.loads((root / "out" / "finetune_retrieval" / "variants.json").read_text())
    assert [v["iais"] for v in retrieval] == [True, True, False] * 2
    index = json.loads((root / "out" / "finetune" / "finetune.json").read_text())
    assert sorted(index) == sorted(TASK_NAMES)
    assert aggregate.artifacts == ["finetune.json"]


def test_refcoco_can_train_on_the_detected_regions(finetuned, tmp_path):
    root, inputs, cfg, _, _ = finetuned
    cfg = configs(root, init="scratch")
    cfg.finetune.refcoco.train_regions = "detected"
    needed = {name: inputs[name] for name in finetune_upstream("refcoco")}
    finetune_stage.run_task(context(cfg, tmp_path, "finetune_refcoco", needed), "refcoco")
    curves = json.loads((tmp_path / "out" / "finetune_refcoco" / "scratch" / "curves.json").read_text())
    assert all("refcoco_acc" in c and "refcoco_gt_acc" not in c for c in curves if c["split"] == "train")


def test_rank_head_starts_from_the_itm_head_and_scratch_does_not(finetuned):
    root, inputs, _, _, _ = finetuned
    itm = torch.load(inputs["pretrain"] / "model" / "heads.pt", weights_only=True)
    out = root / "out" / "finetune_retrieval" / "flickr30k"
    # After 3 steps at lr 1e-3 x 5 the rank head moved, but stays far closer to the ITM row than scratch's.
    pre = torch.load(out / "pretrained" / "head.pt", weights_only=True)["rank.weight"]
    scratch = torch.load(out / "scratch" / "head.pt", weights_only=True)["rank.weight"]
    target = itm["itm.head.weight"][1:]
    assert (pre - target).norm() < 0.5 * (scratch - target).norm()


@pytest.fixture(scope="module")
def evaluated(finetuned):
    root, inputs, cfg, _, _ = finetuned
    gt_features.run_entities(context(cfg, root, "entity_features", {"download": inputs["download"]}))
    inputs = inputs | {"entity_features": root / "out" / "entity_features"}
    results = {}
    for task in TASK_NAMES:
        needed = {}
        for name in eval_upstream(task):
            needed[name] = root / "out" / name if name.startswith("finetune_") else inputs[name]
        results[task] = eval_stage.run_task(context(cfg, root, f"eval_{task}", needed), task)
    outputs = {f"eval_{task}": root / "out" / f"eval_{task}" for task in TASK_NAMES}
    aggregate = eval_aggregate.run(context(cfg, root, "eval", outputs))
    return root, results, aggregate


def test_eval_writes_metrics_summary_and_figures(evaluated):
    root, results, aggregate = evaluated
    out = root / "out" / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics) == sorted(TASK_NAMES)
    assert sorted(metrics["nlvr2"]["pretrained"]) == ["dev", "test1"]
    assert set(metrics["refcoco"]["scratch"]["testA"]) >= {"refcoco_acc", "refcoco_gt_acc"}
    assert 0.0 <= metrics["vqa"]["pretrained"]["val2014"]["vqa_score"] <= 1.0
    retrieval = metrics["retrieval"]
    assert sorted(retrieval) == sorted(f"{d}/{kind}" for d in ("flickr30k", "coco") for kind in (
        "pretrained", "pretrained_no_iais", "scratch", "zero_shot"))
    for name, sections in retrieval.items():
        assert sorted(sections) == ["isda", "test/full", "test/shortlist"]
        full, short = sections["test/full"], sections["test/shortlist"]
        # Flickr30k: 4 test images x 8 captions; COCO Karpathy test: 3 images x 6 captions.
        assert full["pairs_scored"] == (4 * 8 if name.startswith("flickr30k") else 3 * 6)
        assert short["pairs_scored"] < full["pairs_scored"]
        assert sections["isda"]["isda_pairs"] == 8 and sections["isda"]["isda"] >= 0
    summary = json.loads((out / "summary.json").read_text())
    tasks = {(r["task"], r["split"], r["metric"]) for r in summary["tasks"]}
    assert {("vqa", "val2014", "vqa_score"), ("nlvr2", "test1", "nlvr2_acc"),
            ("snli_ve", "test", "snli_ve_acc"), ("refcoco", "testB", "refcoco_gt_acc"),
            ("retrieval (flickr30k)", "test/shortlist", "meta_sum")} <= tasks
    assert summary["isda"][0]["values"].keys() == {"zero_shot", "pretrained", "scratch", "pretrained_no_iais"}
    markdown = (out / "summary.md").read_text()
    assert "| vqa | val2014 | vqa_score |" in markdown and "IAIS lowers ISDa" in markdown
    pngs = sorted(p for p in aggregate.artifacts if p.endswith(".png"))
    assert pngs == sorted([f"figures/{kind}_{d}_test.png" for kind in ("attention", "recall")
                           for d in ("coco", "flickr30k")] + ["figures/attention_gqa_val.png"])
    for artifact in aggregate.artifacts:
        assert (out / artifact).is_file()
    assert Image.open(out / pngs[-1]).format == "PNG"
    vqa = metrics["vqa"]["pretrained"]["val2014"]["vqa_score"]
    assert aggregate.metrics["vqa/pretrained/val2014/vqa_score"] == vqa
    predictions = json.loads((root / "out" / "eval_vqa" / "pretrained" / "val2014_predictions.json")
                             .read_text())
    assert len(predictions) == 8 and {"question_id", "answer", "score"} <= predictions[0].keys()
    # test-dev has no answers: no metric, and the evaluation server's results file.
    assert metrics["vqa"]["pretrained"]["test-dev2015"] == {}
    results = json.loads((root / "out" / "eval_vqa" / "pretrained" /
                          "vqa_OpenEnded_mscoco_test-dev2015_pretrained_results.json").read_text())
    assert [r["question_id"] for r in results] == [9000, 9001]
    assert all(r.keys() == {"question_id", "answer"} and r["answer"] in ("yes", "no") for r in results)
    # GQA: the official metrics of val (validity / plausibility from its scene graphs, consistency over the
    # entailed questions), testdev scored and written in the evaluation server's format (no scene graphs).
    val, testdev = metrics["gqa"]["pretrained"]["val"], metrics["gqa"]["pretrained"]["testdev"]
    assert val["gqa_questions"] == 4 and val["gqa_choices_questions"] == 4
    assert {"gqa_accuracy", "gqa_binary", "gqa_open", "gqa_validity", "gqa_plausibility", "gqa_distribution",
            "gqa_acc", "gqa_loss"} <= val.keys()
    assert val["gqa_accuracy"] == val["gqa_acc"]
    assert "gqa_validity" not in testdev and testdev["gqa_questions"] == 4
    gqa_out = root / "out" / "eval_gqa" / "scratch"
    submission = json.loads((gqa_out / "gqa_testdev_submission.json").read_text())
    assert sorted(r["questionId"] for r in submission) == ["0n702", "0n802", "n701", "n801"]
    assert all(r.keys() == {"questionId", "prediction"} for r in submission)
    assert not (gqa_out / "gqa_val_submission.json").exists()
    assert ("gqa", "val", "gqa_consistency") in tasks or val.get("gqa_consistency_questions", 0) == 0
    assert ("gqa", "testdev", "gqa_accuracy") in tasks
    # The ground-truth regions of every RefCOCO image (5 train, 3 evaluated), in the features layout.
    gt = FeaturesOutput(root / "out" / "gt_features").img_db()
    assert len(gt) == 8 and all(gt.get(k).features.shape[1] == DIM for k in gt.keys())
    gt.close()
    # The Entities boxes of the 4 Entities-test images (ISDa's splits), one region per box, boxes.json in
    # the store's row order; ISDa scored every test sentence (4 images x 2) on those regions.
    entities = EntityFeaturesOutput(root / "out" / "entity_features")
    store, boxes = entities.img_db(), entities.boxes()
    tables_dir = root / "download" / "tables"
    test_keys = sorted(r["image_key"] for r in pq.read_table(tables_dir / "splits.parquet").to_pylist()
                       if r["scheme"] == "entities" and r["split"] == "test")
    assert sorted(store.keys()) == sorted(boxes) == test_keys and len(test_keys) == 4
    rows = pq.read_table(tables_dir / "entities.parquet").to_pylist()
    for key in test_keys:
        # Sentence 0 names every object once (sentence 1 the same ones reversed: no new box).
        first = [r["boxes"][0] for r in rows if r["image_key"] == key and r["sentence_idx"] == 0]
        assert boxes[key] == first and len(store.get(key).boxes) == len(first)
    store.close()
    assert EntityFeaturesOutput(root / "out" / "entity_features").missing() == []


def test_isda_on_detected_regions(evaluated, tmp_path):
    # eval.retrieval.isda_regions=detected: the features stage's regions at IoU >= 0.5 to an object's boxes
    # (the world's regions include each object's box exactly), for the zero-shot model only.
    root, _, _ = evaluated
    cfg = configs(root)
    cfg.eval = EvalConfig(retrieval={"isda_regions": "detected", "modes": ["shortlist"], "shortlist_k": 1,
                                     "attention_pairs": 0}, splits={"retrieval": ["test"]})
    out = root / "out"
    inputs = {"finetune_retrieval": out / "finetune_retrieval", "pretrain": root / "pretrain",
              "features": root / "features", "txtdb": root / "txtdb",
              "karpathy_txtdb": out / "karpathy_txtdb", "dedup": root / "dedup",
              "entity_features": out / "entity_features", "download": root / "download"}
    assert sorted(inputs) == sorted(eval_upstream("retrieval"))
    result = eval_stage.run_task(context(cfg, tmp_path, "eval_retrieval", inputs), "retrieval")
    annotated = json.loads((root / "out" / "eval_retrieval" / "metrics.json").read_text())
    for name in ("flickr30k/zero_shot", "flickr30k/pretrained"):
        assert result.metrics[f"{name}/isda/isda_pairs"] == 8
        assert result.metrics[f"{name}/isda/isda"] != annotated[name]["isda"]["isda"]  # other regions


def test_karpathy_txtdb_writes_the_coco_karpathy_splits_with_the_txtdb_tokenizer(finetuned):
    root, inputs, _, _, _ = finetuned
    out = inputs["karpathy_txtdb"]
    sizes = {name: len(TxtDb(out / f"coco_karpathy_{name}.db"))
             for name in ("train", "restval", "val", "test")}
    # 2 captions per image of 6 / 1 / 2 / 3 images; the caption outside any Karpathy split and CC's are
    # left out.
    assert sizes == {"train": 12, "restval": 2, "val": 4, "test": 6}
    test = TxtDb(out / "coco_karpathy_test.db")
    reference = TxtDb(inputs["txtdb"] / "flickr30k_train.db")
    assert test.meta["vocab_digest"] == reference.meta["vocab_digest"]
    assert sorted(set(test.txt2img.values())) == ["coco:10", "coco:11", "coco:12"]


def test_missing_images_stop_with_one_line_or_are_skipped(world, tmp_path, caplog):
    root, inputs = world
    task_dir = tmp_path / "dedup" / "tables"
    shutil.copytree(inputs["dedup"] / "tables", task_dir)
    rows = pq.read_table(task_dir / "task_vqa.parquet").to_pylist()
    rows[-1]["image_key"] = rows[-2]["image_key"] = "coco:777"
    rows[-3]["image_key"] = "coco:778"
    write_table(task_dir / "task_vqa.parquet", rows, tables.TASK_VQA)
    needed = {"dedup": tmp_path / "dedup", "features": inputs["features"], "pretrain": inputs["pretrain"]}
    cfg = configs(root)
    with pytest.raises(StageError) as err:
        finetune_stage.run_task(context(cfg, tmp_path, "finetune_vqa", needed), "vqa")
    store = inputs["features"] / "img_db"
    assert str(err.value) == (f"task vqa split val2014: 2 of 5 images missing from the feature store "
                              f"{store}: coco:777, coco:778 (set runtime.skip_missing_images to skip "
                              "their examples)")
    cfg = configs(root, skip_missing_images=True, init="scratch")
    result = finetune_stage.run_task(context(cfg, tmp_path, "finetune_vqa_skip", needed), "vqa")
    assert "scratch/val/vqa_score" in result.metrics
    assert "task vqa split val2014: 2 of 5 images missing" in caplog.text


def test_answer_vocabulary_mismatch_fails_clearly(finetuned, tmp_path):
    root, inputs, cfg, _, _ = finetuned
    task_dir = tmp_path / "dedup" / "tables"
    shutil.copytree(inputs["dedup"] / "tables", task_dir)
    rows = pq.read_table(task_dir / "task_vqa.parquet").to_pylist()
    for row in rows:
        if row["split"] == "train2014":
            row["multiple_choice_answer"] = "maybe"
    write_table(task_dir / "task_vqa.parquet", rows, tables.TASK_VQA)
    needed = {"finetune_vqa": root / "out" / "finetune_vqa", "pretrain": inputs["pretrain"],
              "features": inputs["features"], "dedup": tmp_path / "dedup"}
    with pytest.raises(StageError) as err:
        eval_stage.run_task(context(cfg, tmp_path, "eval_vqa", needed), "vqa")
    assert str(err.value) == (f"{root / 'out' / 'finetune_vqa' / 'pretrained'}: answer vocabulary mismatch: "
                              "checkpoint has 2 answers, data has 1 (first difference at label 0: checkpoint "
                              "'yes', data 'maybe')")


def test_finetuning_again_gives_the_same_model(finetuned, tmp_path):
    root, inputs, cfg, _, _ = finetuned
    needed = {name: inputs[name] for name in finetune_upstream("vqa")}
    again = StageContext(cfg=cfg, workdir=root, out_dir=tmp_path / "vqa", inputs=needed)
    finetune_stage.run_task(again, "vqa")
    first = root / "out" / "finetune_vqa"
    for variant in ("pretrained", "scratch"):
        for rel in ("encoder/model.pt", "head.pt"):
            a = torch.load(first / variant / rel, weights_only=True)
            b = torch.load(tmp_path / "vqa" / variant / rel, weights_only=True)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (variant, rel)


def test_finetune_encoder_sweep_starts_from_the_trial_it_names(finetuned, tmp_path):
    root, inputs, cfg, _, _ = finetuned
    # A study of three trials: the best (b-s0) holds the pretrain stage's model, a-s0 a perturbed copy, and
    # b-s1 (the other seed of row b) was stopped by ASHA.
    sweep = tmp_path / "sweep"
    for trial in ("a-s0", "b-s0"):
        shutil.copytree(inputs["pretrain"], sweep / "trials" / trial)
    perturbed = sweep / "trials" / "a-s0" / "model" / "model.pt"
    weights = torch.load(perturbed, weights_only=True)
    torch.save({k: v + 0.5 if v.is_floating_point() else v for k, v in weights.items()}, perturbed)
    (sweep / "best.json").write_text(json.dumps({"row": "b", "trial": "b-s0"}))
    trials = [{"trial": "a-s0", "row": "a", "status": "completed", "metrics": {"itm_acc": 0.9}},
              {"trial": "b-s0", "row": "b", "status": "completed", "metrics": {"itm_acc": 0.8}},
              {"trial": "b-s1", "row": "b", "status": "stopped_by_asha", "metrics": {"itm_acc": 0.95}}]
    (sweep / "study.json").write_text(json.dumps({"study": {"metric": "itm_acc", "mode": "max"},
                                                  "trials": trials}))
    needed = {name: inputs.get(name, sweep) for name in finetune_upstream("vqa", "sweep")}
    assert "sweep" in needed and "pretrain" not in needed

    def finetune(encoder: str) -> tuple[dict, dict[str, torch.Tensor]]:
        settings = cfg.finetune.model_copy(update={"encoder": encoder})
        out = tmp_path / encoder.replace(":", "_")
        ctx = StageContext(cfg=SimpleNamespace(**{**vars(cfg), "finetune": settings}), workdir=root,
                           out_dir=out, inputs=needed)
        result = finetune_stage.run_task(ctx, "vqa")
        return result.params, torch.load(out / "pretrained" / "encoder" / "model.pt", weights_only=True)

    from_pretrain = torch.load(root / "out" / "finetune_vqa" / "pretrained" / "encoder" / "model.pt",
                               weights_only=True)
    # The study's best and row b's best completed seed are b-s0, which holds the pretrain stage's model: the
    # same finetuned model as from the pretrain stage.
    for encoder in ("sweep", "sweep:b"):
        params, model = finetune(encoder)
        assert params["encoder"] == "sweep:b-s0"
        assert model.keys() == from_pretrain.keys()
        assert all(torch.equal(model[k], from_pretrain[k]) for k in model), encoder
    params, model = finetune("sweep:a-s0")
    assert params["encoder"] == "sweep:a-s0"
    assert not all(torch.equal(model[k], from_pretrain[k]) for k in model)
    with pytest.raises(StageError, match=r"study.json: trial 'b-s1' is stopped_by_asha "
                                         r"\(trials: a-s0, b-s0, b-s1\)"):
        finetune("sweep:b-s1")


def test_the_finetuning_seed_replaces_the_root_seed_for_finetuning_only(finetuned, tmp_path):
    root, inputs, cfg, _, _ = finetuned
    needed = {name: inputs[name] for name in finetune_upstream("vqa")}

    def encoder(root_seed: int, finetune_seed: int | None) -> dict[str, torch.Tensor]:
        common = cfg.finetune.common.model_copy(update={"seed": finetune_seed})
        run_cfg = SimpleNamespace(**{**vars(cfg), "seed": root_seed,
                                     "finetune": cfg.finetune.model_copy(update={"common": common})})
        out = tmp_path / f"{root_seed}-{finetune_seed}"
        finetune_stage.run_task(StageContext(cfg=run_cfg, workdir=root, out_dir=out, inputs=needed), "vqa")
        return torch.load(out / "scratch" / "encoder" / "model.pt", weights_only=True)

    root_seed_1, finetune_seed_1, seed_0 = encoder(1, None), encoder(0, 1), encoder(0, None)
    assert all(torch.equal(root_seed_1[k], finetune_seed_1[k]) for k in seed_0)
    assert not all(torch.equal(seed_0[k], finetune_seed_1[k]) for k in seed_0)
