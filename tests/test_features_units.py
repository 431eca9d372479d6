"""The features stage's parts without Ray: decoding, box conversion, work planning and the probe."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stages.feature_extraction.actor import normalized_boxes, scaled_given_boxes
from stages.feature_extraction.config import ProbeConfig
from stages.feature_extraction.decode import (
    DECODED,
    UNDECODABLE,
    ZERO_SIZE,
    Failure,
    decode_batch,
    decode_image,
    target_size,
)
from stages.feature_extraction.pipeline import annotated_boxes, plan_work
from stages.feature_extraction.probe import box_iou, in_train_half, linear_probe_accuracy, probe_store
from vlp.data.img_db import ImgDb, ImgDbWriter


def jpeg(width: int, height: int, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, "JPEG")
    return buf.getvalue()


def test_target_size_only_downscales_to_both_limits():
    assert target_size(64, 80, 128, 256) == (64, 80)
    assert target_size(400, 200, 128, 256) == (256, 128)  # shorter side 128, longer side 256
    assert target_size(1000, 200, 128, 256) == (256, 51)  # the longer-side limit wins
    assert target_size(300, 600, None, None) == (300, 600)


def test_decode_image_downscales_and_reports_the_original_size():
    rgb, size = decode_image(jpeg(400, 200), 128, 256)
    assert size == (400, 200)
    assert rgb.shape == (128, 256, 3) and rgb.dtype == np.uint8


@pytest.mark.parametrize(
    "data, reason",
    [
        (None, ZERO_SIZE),
        (b"", ZERO_SIZE),
        (b"<html>not an image</html>", UNDECODABLE),
        (jpeg(50, 40)[:200], UNDECODABLE),  # truncated
    ],
)
def test_bad_images_become_failures_not_exceptions(data, reason):
    failure = decode_image(data, 128, 256)
    assert isinstance(failure, Failure) and failure.reason == reason
    assert "\n" not in failure.detail


def test_decode_batch_drops_excluded_keys_and_keeps_failures_as_rows():
    batch = pa.table({"key": ["a", "b", "c"], "corpus": ["cc", "cc", "cc"],
                      "image": [jpeg(30, 20), b"junk", jpeg(10, 10)]})
    out = decode_batch(batch, None, None, exclude=frozenset({"c"}))
    assert out.schema == DECODED
    rows = out.to_pylist()
    assert [(r["key"], r["status"]) for r in rows] == [("a", "ok"), ("b", UNDECODABLE)]
    assert (rows[0]["width"], rows[0]["height"], len(rows[0]["pixels"])) == (30, 20, 30 * 20 * 3)
    assert (rows[1]["width"], rows[1]["pixels"]) == (0, b"")


def test_boxes_are_normalized_to_the_image_and_given_boxes_follow_a_resize():
    norm = normalized_boxes(np.array([[10, 20, 50, 60], [-3, 0, 200, 100]], np.float32), 100, 80)
    np.testing.assert_allclose(norm, [[0.1, 0.25, 0.5, 0.75, 0.4, 0.5], [0, 0, 1, 1, 1, 1]], atol=1e-7)
    given = np.array([[100, 50, 300, 150], [390, 0, 450, 10], [10, 10, 10, 30]], np.float32)
    scaled = scaled_given_boxes(given, (400, 200), (200, 100))
    # halved; the second is clipped at the right edge; the third has no area and is dropped
    np.testing.assert_allclose(scaled, [[50, 25, 150, 75], [195, 0, 200, 5]])


def test_plan_reads_only_shards_with_work_and_drops_their_done_keys(tmp_path):
    # cc:1 failed to download: never read, not counted (download's stats count it)
    shard_rows = {"coco": [("coco:1", "ok"), ("coco:2", "ok")], "vg": [("vg:1", "ok"), ("vg:2", "ok")],
                  "cc": [("cc:0", "ok"), ("cc:1", "http_404")]}
    for corpus, rows in shard_rows.items():
        (tmp_path / corpus).mkdir()
        keys, statuses = zip(*rows, strict=True)
        pq.write_table(pa.table({"key": keys, "status": statuses}), tmp_path / corpus / "shard-00000.parquet")
    shards = sorted(tmp_path.glob("*/shard-*.parquet"))
    done = {"coco:1", "coco:2", "vg:1"}
    plan = plan_work(shards, done.__contains__, wanted=None)
    assert [p.split("/")[-2] for p in plan.files] == ["cc", "vg"]
    assert plan.exclude == {"vg:1", "cc:1"}
    assert (plan.total, plan.stored, plan.skipped) == (5, 3, 0)
    # given_boxes + skip: only annotated images are wanted
    plan = plan_work(shards, done.__contains__, wanted=frozenset({"vg:2"}))
    assert [p.split("/")[-2] for p in plan.files] == ["vg"]
    assert (plan.stored, plan.skipped) == (3, 1)


def test_annotated_boxes_group_objects_by_image_as_corner_boxes(tmp_path):
    (tmp_path / "tables").mkdir()
    pq.write_table(pa.table({"image_key": ["vg:2", "coco:1", "vg:2"], "x": [1.0, 5.0, 0.0],
                             "y": [2.0, 5.0, 0.0], "w": [3.0, 10.0, 4.0], "h": [4.0, 1.0, 4.0]}),
                   tmp_path / "tables" / "objects.parquet")
    boxes = annotated_boxes(tmp_path)
    assert sorted(boxes) == ["coco:1", "vg:2"]
    np.testing.assert_array_equal(boxes["coco:1"], [[5, 5, 15, 6]])
    np.testing.assert_array_equal(boxes["vg:2"], [[1, 2, 4, 6], [0, 0, 4, 4]])


def test_box_iou_exact_values():
    a = np.array([[0, 0, 2, 2], [0, 0, 1, 1]], float)
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]], float)
    np.testing.assert_allclose(box_iou(a, b), [[1 / 7, 1, 0], [0, 0.25, 0]])


def test_linear_probe_separates_separable_features_and_fails_unseen_labels():
    rng = np.random.default_rng(0)
    centres = {"red": np.array([3.0, 0, 0]), "blue": np.array([0, 3.0, 0])}
    ys = ["red", "blue"] * 20
    xs = np.stack([centres[y] + rng.normal(scale=0.3, size=3) for y in ys])
    assert linear_probe_accuracy(xs[:20], ys[:20], xs[20:], ys[20:], l2=1e-3, steps=100) == 1.0
    assert linear_probe_accuracy(xs[:20], ys[:20], xs[20:22], ["green", "blue"], 1e-3, 100) == 0.5


def test_probe_store_recall_and_probes_on_a_store_with_known_regions(tmp_path):
    """Every image: one 10x10-pixel object (shape = colour = a class); the store holds a region
    on it whose feature encodes the class, plus a decoy; half the images' regions miss the object."""
    classes = ["circle", "square", "star"]
    scenes, keys = {}, []
    with ImgDbWriter(tmp_path) as writer:
        for i in range(60):
            key, label = f"flickr30k:{i}", classes[i % 3]
            keys.append(key)
            scenes[key] = {"width": 100, "height": 50, "objects": [
                {"shape": label, "colour": label, "box": [10, 10, 10, 10]}]}
            hit = i % 4 != 0  # a quarter of the objects get no region at IoU >= 0.5
            region = [0.1, 0.2, 0.2, 0.4] if hit else [0.5, 0.5, 0.9, 0.9]
            decoy = [0.0, 0.0, 1.0, 1.0]
            bb = np.array([region + [region[2] - region[0], region[3] - region[1]],
                           decoy + [1.0, 1.0]], np.float32)
            feats = np.zeros((2, 3), np.float32)
            feats[0, i % 3] = 1.0
            writer.put(key, features=feats, norm_bb=bb, conf=np.array([0.9, 0.5], np.float32),
                       soft_labels=np.full((2, 4), 0.25, np.float32))
    store = ImgDb(tmp_path, 0.2, 100, 1)
    try:
        metrics = probe_store(store, scenes, ProbeConfig())
    finally:
        store.close()
    matched = [k for i, k in enumerate(keys) if i % 4 != 0]
    assert metrics["probe/images"] == 60 and metrics["probe/objects"] == 60
    assert metrics["probe/recall_iou50"] == 45 / 60
    assert metrics["probe/train_objects"] == sum(in_train_half(k) for k in matched)
    assert metrics["probe/train_objects"] + metrics["probe/test_objects"] == 45
    assert metrics["probe/shape_acc"] == 1.0 and metrics["probe/colour_acc"] == 1.0
