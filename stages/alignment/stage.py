"""The ``alignment`` stage: object-word alignment annotations of pretraining images, with their soft targets
over each image's detected regions (output layout: ``stages/outputs/alignment.py``).

Inputs: ``dedup`` (region descriptions, GQA questions and scene graphs, and which images pretraining may see),
``features`` (the regions the targets are over, read with the store's declared box rule), ``txtdb`` (the
tokenizer and text length) and, when no detector weights are configured, ``detector`` (the class and attribute
names of its predictions; otherwise they come from the configured weight / vocabulary files).

Only images dedup kept in its Visual Genome shards are annotated (GQA's train images are VG images; its
evaluation images were removed there), and GQA only from ``alignment.gqa_splits`` (training splits): no
annotation comes from an evaluation image.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stages.alignment.config import GQA_EVALUATION_SPLITS, AlignmentConfig
from stages.base import StageContext, StageError, StageResult
from stages.outputs.alignment import AlignmentOutput
from stages.outputs.detector import DetectorOutput
from stages.outputs.download import DedupOutput
from stages.outputs.features import FeaturesOutput
from stages.outputs.txt_db import TxtDbOutput, max_txt_len
from vlp.data.alignment import (
    Annotation,
    annotation_targets,
    encode_annotation,
    gqa_sentences,
    predicted_names,
    vg_region_sentences,
)
from vlp.data.tokenizer import load_tokenizer
from vlp.data.txt_db import TxtDb, TxtDbWriter
from vlp.objectives.owa import ExactMatch, WordVectors, words_of

ANNOTATIONS = pa.schema([
    ("txt_id", pa.string()),
    ("image_key", pa.string()),
    ("source", pa.string()),
    ("text", pa.string()),
    ("pointers", pa.list_(pa.struct([("start", pa.int32()), ("end", pa.int32()), ("x1", pa.float32()),
                                     ("y1", pa.float32()), ("x2", pa.float32()), ("y2", pa.float32())]))),
])


def pretraining_images(dedup: DedupOutput) -> dict[str, tuple[int, int]]:
    """key -> (width, height) of every Visual Genome image dedup kept for pretraining."""
    removed = set()
    if dedup.removed_file.is_file():
        removed = set(pq.read_table(dedup.removed_file, columns=["key"]).column("key").to_pylist())
    kept = {}
    for shard in dedup.image_shards("vg"):
        table = pq.read_table(shard, columns=["key", "status", "width", "height"]).to_pylist()
        for row in table:
            if row["status"] == "ok" and row["key"] not in removed:
                kept[row["key"]] = (int(row["width"]), int(row["height"]))
    return kept


def _table(dedup: DedupOutput, name: str) -> list[dict[str, Any]] | None:
    path = dedup.table(name)
    return pq.read_table(path).to_pylist() if path.is_file() else None


def collect(cfg: AlignmentConfig, dedup: DedupOutput, images: dict[str, tuple[int, int]], log
            ) -> tuple[list[Annotation], Counter]:
    """The annotations of pretraining images (``images``) from the configured sources; counts of what was
    left out and why."""
    left_out: Counter = Counter()
    annotations: list[Annotation] = []
    if "vg_regions" in cfg.sources:
        regions = [r for r in _table(dedup, "regions") or [] if r["corpus"] == "vg"]
        annotations += vg_region_sentences(regions, cfg.seed, cfg.max_descriptions, cfg.sentences_per_image)
    if "gqa" in cfg.sources:
        questions, objects = _table(dedup, "task_gqa"), _table(dedup, "task_gqa_objects")
        if questions is None:
            log.info("alignment: no GQA in the download (configs/gqa.yaml adds it): VG region descriptions "
                     "only")
        else:
            allowed = set(cfg.gqa_splits) - set(GQA_EVALUATION_SPLITS)
            rows = [q for q in questions if q["split"] in allowed]
            graphs = [o for o in objects or [] if o["split"] in allowed]
            found, dropped = gqa_sentences(rows, graphs)
            annotations += found
            left_out["gqa pointer without a scene-graph object"] += dropped
    kept = []
    for ann in annotations:
        if ann.image_key in images:
            kept.append(ann)
        else:
            left_out[f"{ann.source}: image not kept for pretraining"] += 1
    return kept, left_out


def vocabularies(ctx: StageContext) -> tuple[list[str], list[str], str]:
    """(class names, attribute names, where from) of the detector behind the feature store."""
    if "detector" in ctx.inputs:
        path = DetectorOutput(ctx.inputs["detector"]).classes_path
        data = json.loads(path.read_text())
        return list(data["classes"]), list(data["attributes"]), str(path)
    detector = ctx.cfg.features.detector
    if detector.backend == "torchvision":
        ckpt = torch.load(detector.weights, map_location="cpu", weights_only=True)
        return list(ckpt["class_names"]), list(ckpt["attr_names"]), str(detector.weights)
    names = []
    for file, kind in ((detector.detectron2.classes_file, "classes"), (detector.detectron2.attributes_file,
                                                                      "attributes")):
        if not file:
            raise StageError(f"features.detector.detectron2.{kind}_file: required for the alignment targets "
                             "(the names of the detector's predictions)")
        lines = Path(file).read_text().splitlines()
        names.append([line.split(",")[0].strip() for line in lines if line.strip()])
    return names[0], names[1], "detectron2 vocabulary files"


def run(ctx: StageContext) -> StageResult:
    cfg: AlignmentConfig = ctx.cfg.alignment
    start = time.perf_counter()
    dedup = DedupOutput(ctx.inputs["dedup"])
    txtdb = TxtDbOutput(ctx.inputs["txtdb"])
    out = AlignmentOutput(ctx.out_dir)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    images = pretraining_images(dedup)
    annotations, left_out = collect(cfg, dedup, images, ctx.log)
    if not annotations:
        raise StageError(f"{dedup.root}: no alignment annotation on any pretraining image (sources "
                         f"{cfg.sources}): the download holds no VG region description nor GQA pointer")
    classes, attributes, vocab_from = vocabularies(ctx)
    if cfg.word_vectors is not None:
        needed = {w for a in annotations for w in words_of(a.text)} | {
            w for name in (*classes, *attributes) for w in words_of(name)}
        try:
            similarity = WordVectors.from_glove(cfg.word_vectors, needed)
        except (OSError, ValueError) as err:
            raise StageError(f"alignment.word_vectors: {' '.join(str(err).split())}") from None
        similarity_kind = f"GloVe-format vectors {cfg.word_vectors} ({len(similarity.vectors)} words used)"
    else:
        similarity, similarity_kind = ExactMatch(), "exact name match"
    dbs = txtdb.db_names()
    if not dbs:
        raise StageError(f"{txtdb.root}: no text db to take the tokenizer meta from")
    meta = dict(TxtDb(txtdb.db_path(dbs[0])).meta)
    length = max_txt_len(meta, txtdb.db_path(dbs[0]))
    tok = load_tokenizer(txtdb.tokenizer_dir)

    def encode_word(word: str) -> list[int]:
        return tok(word, add_special_tokens=False)["input_ids"]

    features = FeaturesOutput(ctx.inputs["features"])
    store = features.img_db()
    rows, sentences, pointers = [], Counter(), Counter()
    try:
        db_meta = {**meta, "tokenizer_dir": str(txtdb.tokenizer_dir.resolve())}
        with TxtDbWriter(out.db_path, db_meta) as writer:
            by_image: dict[str, list[Annotation]] = {}
            for ann in annotations:
                by_image.setdefault(ann.image_key, []).append(ann)
            for key in sorted(by_image):
                if key not in store.name2nbb:
                    left_out["image not in the feature store"] += len(by_image[key])
                    continue
                arrays = store.read_arrays(key)
                nbb = store.name2nbb[key]
                norm_bb = arrays["norm_bb"][:nbb]
                attr = arrays.get("attr_labels")
                names = predicted_names(arrays["soft_labels"][:nbb], None if attr is None else attr[:nbb],
                                        classes, attributes)
                width, height = images[key]
                for ann in by_image[key]:
                    ids, spans = encode_annotation(ann, encode_word, length)
                    if not spans:
                        left_out["every pointer beyond max_txt_len"] += 1
                        continue
                    targets = annotation_targets(ann, norm_bb, width, height, *names, similarity, cfg.norm)
                    txt_id = f"{ann.source}:{ann.sentence_id}"
                    rounded = [[round(float(v), 6) for v in row] for row in targets]
                    writer.add(txt_id, {"input_ids": ids, "img_fname": key, "raw": ann.text,
                                        "dataset": ann.source, "align_spans": spans,
                                        "align_targets": rounded})
                    rows.append({"txt_id": txt_id, "image_key": key, "source": ann.source, "text": ann.text,
                                 "pointers": [{"start": p.start, "end": p.end, "x1": p.box[0], "y1": p.box[1],
                                               "x2": p.box[2], "y2": p.box[3]} for p in ann.pointers]})
                    sentences[ann.source] += 1
                    pointers[ann.source] += len(spans)
    finally:
        store.close()
    if not rows:
        raise StageError(f"{features.root}: none of the {len(annotations)} annotated sentences has its image "
                         "in the feature store")
    pq.write_table(pa.Table.from_pylist(rows, schema=ANNOTATIONS), out.annotations_path)
    stats = {"sentences": dict(sentences), "pointers": dict(pointers),
             "images": len({r["image_key"] for r in rows}), "left_out": dict(left_out),
             "similarity": similarity_kind, "vocabulary": vocab_from, "classes": len(classes),
             "attributes": len(attributes), "box_rule": list(features.box_rule()), "norm": cfg.norm,
             "max_txt_len": length}
    out.write_stats(stats)
    ctx.log.info("alignment: %d sentences (%s) on %d images, %s; left out: %s (%.1fs)", len(rows),
                 dict(sentences), stats["images"], similarity_kind, dict(left_out) or "nothing",
                 time.perf_counter() - start)
    metrics = {f"sentences.{s}": float(n) for s, n in sentences.items()}
    metrics |= {f"pointers.{s}": float(n) for s, n in pointers.items()}
    metrics |= {"sentences.total": float(len(rows)), "images": float(stats["images"])}
    return StageResult(metrics=metrics, params={"similarity": similarity_kind, "sources": cfg.sources},
                       artifacts=[out.stats_path.name])
