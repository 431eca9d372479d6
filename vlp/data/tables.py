"""Arrow schemas of the tables that download writes and dedup / features / training read.

One place for the column names so that every stage agrees on them. Layout of a download output
(dedup writes the same layout, filtered, plus ``removed.parquet`` and ``report.json``)::

    images/<corpus>/shard-<NNNNN>.parquet   IMAGES (one row per image URL attempted)
    stats/<corpus>/shard-<NNNNN>.json       per-shard stats: {"ok": n, "failed": {error_type: n}}
    tables/captions.parquet                 CAPTIONS
    tables/regions.parquet                  REGIONS (Visual Genome region descriptions)
    tables/objects.parquet                  OBJECTS (VG objects + attributes, COCO instances)
    tables/entities.parquet                 ENTITIES (Flickr30k Entities phrase -> boxes)
    tables/splits.parquet                   SPLITS (image-level split lists: Karpathy, Entities ids)
    tables/task_<name>.parquet              one table per downstream task set (vqa, nlvr2, snli_ve, refcoco,
                                            gqa, gqa_objects: GQA's scene graphs)
    metadata/<corpus>/<file>                the raw metadata files as downloaded
"""

from __future__ import annotations

import pyarrow as pa

# Corpora whose images are pretraining data (filtered by dedup) vs. downstream image sets.
PRETRAIN_CORPORA = ("coco", "vg", "cc", "sbu")
DOWNSTREAM_CORPORA = ("flickr30k", "nlvr2", "gqa")

IMAGES = pa.schema(
    [
        ("corpus", pa.string()),
        ("key", pa.string()),  # canonical image key, unique per corpus: "coco:57870", "vg:1", "cc:0", ...
        ("url", pa.string()),  # the URL as published in the metadata (before any mirror rewrite)
        ("split", pa.string()),  # corpus split the image came from ("train2014", "train", ...)
        ("status", pa.string()),  # "ok" or the error type (see stages/download/errors.py)
        ("error", pa.string()),  # one-line detail for failures, null when ok
        ("sha256", pa.string()),
        ("size", pa.int64()),  # bytes
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image", pa.binary()),  # encoded image bytes, null when failed
        # identity fields from the metadata, used by dedup's canonical keys (null when absent)
        ("coco_id", pa.int64()),
        ("vg_id", pa.int64()),
        ("flickr_id", pa.int64()),
        ("flickr_url", pa.string()),
    ]
)

CAPTIONS = pa.schema(
    [
        ("corpus", pa.string()),
        ("image_key", pa.string()),
        ("caption_id", pa.string()),
        ("caption", pa.string()),
        ("split", pa.string()),
    ]
)

# Boxes are x, y, w, h in pixels of the original image.
REGIONS = pa.schema(
    [
        ("corpus", pa.string()),
        ("image_key", pa.string()),
        ("region_id", pa.int64()),
        ("phrase", pa.string()),
        ("x", pa.float32()),
        ("y", pa.float32()),
        ("w", pa.float32()),
        ("h", pa.float32()),
    ]
)

OBJECTS = pa.schema(
    [
        ("corpus", pa.string()),
        ("image_key", pa.string()),
        ("object_id", pa.int64()),
        ("names", pa.list_(pa.string())),  # VG names / COCO category name
        ("attributes", pa.list_(pa.string())),  # VG attributes (empty when absent)
        ("x", pa.float32()),
        ("y", pa.float32()),
        ("w", pa.float32()),
        ("h", pa.float32()),
    ]
)

# Flickr30k Entities: one row per phrase; boxes are 0-based [x1, y1, x2, y2] lists.
ENTITIES = pa.schema(
    [
        ("image_key", pa.string()),
        ("sentence_idx", pa.int32()),
        ("sentence", pa.string()),
        ("phrase", pa.string()),
        ("phrase_id", pa.string()),  # chain id; "0" (notvisual) rows get a unique "0#<n>" id
        ("phrase_types", pa.list_(pa.string())),
        ("first_word_index", pa.int32()),
        ("boxes", pa.list_(pa.list_(pa.float32()))),
    ]
)

# Image-level split membership, e.g. ("flickr30k", "entities", "test", "flickr:1016887272").
SPLITS = pa.schema(
    [
        ("corpus", pa.string()),
        ("scheme", pa.string()),  # "karpathy", "entities", ...
        ("split", pa.string()),
        ("image_key", pa.string()),
    ]
)

# Downstream task sets (tables/task_<name>.parquet). Their images are keyed like the IMAGES rows of
# the corpus that holds them: VQA and RefCOCO on COCO ("coco:<id>"), SNLI-VE on Flickr30k.
TASK_VQA = pa.schema(
    [
        ("question_id", pa.int64()),
        ("image_key", pa.string()),
        ("split", pa.string()),  # "train2014", "val2014", "test-dev2015"
        ("question", pa.string()),
        # the 10 human answers, in file order; null (with the next two) for the test splits' questions
        ("answers", pa.list_(pa.string())),
        ("multiple_choice_answer", pa.string()),
        ("answer_type", pa.string()),  # "yes/no", "number", "other"
    ]
)

TASK_NLVR2 = pa.schema(
    [
        ("identifier", pa.string()),  # "dev-850-0-0"
        ("split", pa.string()),  # "train", "dev", "test1"
        ("sentence", pa.string()),
        ("left_key", pa.string()),  # "nlvr2:dev-850-0-img0"
        ("right_key", pa.string()),  # "nlvr2:dev-850-0-img1"
        ("label", pa.bool_()),
    ]
)

TASK_SNLI_VE = pa.schema(
    [
        ("pair_id", pa.string()),  # SNLI pairID, "3416050480.jpg#4r1n"
        ("image_key", pa.string()),  # "flickr30k:3416050480"
        ("split", pa.string()),  # "train", "dev", "test"
        ("hypothesis", pa.string()),  # SNLI sentence2
        ("label", pa.string()),  # "entailment", "neutral", "contradiction"
        ("premise", pa.string()),  # SNLI sentence1 (a Flickr30k caption; not an input of VE)
    ]
)

TASK_REFCOCO = pa.schema(
    [
        ("ref_id", pa.int64()),
        ("ann_id", pa.int64()),
        ("image_key", pa.string()),  # "coco:581857" (all RefCOCO images are COCO train2014)
        ("split", pa.string()),  # "train", "val", "testA", "testB" (UNC)
        ("sentences", pa.list_(pa.string())),  # the referring expressions as typed
        ("bbox", pa.list_(pa.float64(), 4)),  # x, y, w, h of the referred COCO annotation
        ("category_id", pa.int64()),
        ("file_name", pa.string()),  # the COCO image file (the refs' "_<n>" suffix dropped)
    ]
)

# GQA balanced questions (one row per question). Ids stay strings as published ("00126851"; testdev images
# "n161313"); a numeric imageId is a Visual Genome image ("vg:<id>"), "n<digits>" one of GQA's ("gqa:<id>").
GQA_POINTER = pa.struct(
    [
        ("field", pa.string()),  # "question", "answer" or "fullAnswer"
        ("start", pa.int32()),  # whitespace-token span [start, end) of that text ("4:6" -> 4, 6; "2" -> 2, 3)
        ("end", pa.int32()),
        ("object_id", pa.string()),  # the scene-graph object it points at
    ]
)
TASK_GQA = pa.schema(
    [
        ("question_id", pa.string()),
        ("image_id", pa.string()),  # as published: "2354786", "n161313"
        ("image_key", pa.string()),  # "vg:2354786", "gqa:n161313"
        ("split", pa.string()),  # "train", "val", "testdev", ...
        ("question", pa.string()),
        ("answer", pa.string()),  # null where the file has none (test / challenge)
        ("full_answer", pa.string()),
        ("is_balanced", pa.bool_()),
        ("structural", pa.string()),  # types: verify, query, choose, logical, compare
        ("semantic_type", pa.string()),  # types.semantic: obj, attr, rel, cat, global
        ("detailed", pa.string()),
        ("global_group", pa.string()),  # groups.global (null and "" are different groups)
        ("local_group", pa.string()),
        ("entailed", pa.list_(pa.string())),
        ("equivalent", pa.list_(pa.string())),
        ("semantic", pa.string()),  # the program, [{operation, dependencies, argument}], as JSON
        ("pointers", pa.list_(GQA_POINTER)),
    ]
)

# GQA scene graphs: one row per object ({train,val}_sceneGraphs.json); boxes x, y, w, h in pixels.
TASK_GQA_OBJECTS = pa.schema(
    [
        ("image_id", pa.string()),
        ("image_key", pa.string()),
        ("split", pa.string()),
        ("width", pa.int32()),  # of the image the graph describes
        ("height", pa.int32()),
        ("object_id", pa.string()),
        ("name", pa.string()),
        ("attributes", pa.list_(pa.string())),
        ("relations", pa.list_(pa.struct([("name", pa.string()), ("object", pa.string())]))),
        ("x", pa.float32()),
        ("y", pa.float32()),
        ("w", pa.float32()),
        ("h", pa.float32()),
    ]
)

TASK_TABLES = {"vqa": TASK_VQA, "nlvr2": TASK_NLVR2, "snli_ve": TASK_SNLI_VE, "refcoco": TASK_REFCOCO,
               "gqa": TASK_GQA, "gqa_objects": TASK_GQA_OBJECTS}
