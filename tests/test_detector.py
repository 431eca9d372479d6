"""Detector backends and the detector-training stage, on images rendered by the synthetic world.

The training data is a dedup-layout directory (images/vg shards + tables/objects.parquet, the real
schemas) written from world scenes, so the stage runs exactly as in the pipeline without building a
whole world first.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import pickle
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stages.base import StageContext, StageError
from stages.feature_extraction.detector.backend import load_backend
from stages.feature_extraction.detector.config import DetectorConfig, DetectorTrainConfig
from stages.feature_extraction.detector.model import RegionDetector
from stages.feature_extraction.detector.stage import run as run_detector_stage
from stages.feature_extraction.detector.torchvision_backend import TorchvisionBackend, save_checkpoint
from vlp.data.tables import IMAGES, OBJECTS
from worldgen.render import render
from worldgen.scenes import sample_scene

HAS_DETECTRON2 = importlib.util.find_spec("detectron2") is not None
CLASSES = ["circle", "square", "triangle"]
ATTRS = ["red", "blue", "small", "large"]


def _rendered(n: int, seed: int, min_side: int = 80, max_side: int = 112):
    rng = random.Random(seed)
    return [sample_scene(rng, min_side, max_side) for _ in range(n)]


def _pixels(scene) -> np.ndarray:
    return np.asarray(render(scene))


def _random_backend(**overrides) -> TorchvisionBackend:
    cfg = DetectorConfig(**overrides)
    torch.manual_seed(0)
    return TorchvisionBackend(cfg, RegionDetector(cfg, len(CLASSES), len(ATTRS)), CLASSES, ATTRS)


def _write_vg_dedup(root, scenes) -> None:
    """A dedup output holding ``scenes`` as Visual Genome images with their objects + attributes, plus
    an image without objects and one whose bytes do not decode."""
    (root / "images" / "vg").mkdir(parents=True)
    (root / "tables").mkdir()
    images, objects = [], []
    for i, scene in enumerate(scenes):
        buf = io.BytesIO()
        render(scene).save(buf, "JPEG", quality=90)
        data = buf.getvalue()
        key = f"vg:{i + 1}"
        images.append(
            {"corpus": "vg", "key": key, "url": f"http://vg.test/{i + 1}.jpg", "split": "train",
             "status": "ok", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
             "width": scene.width, "height": scene.height, "image": data, "vg_id": i + 1}
        )  # fmt: skip
        for j, obj in enumerate(scene.objects):
            x, y, w, h = obj.box()
            attributes = [obj.colour, obj.size] + ([obj.texture] if obj.texture != "plain" else [])
            objects.append(
                {"corpus": "vg", "image_key": key, "object_id": 100 * i + j, "names": [obj.shape],
                 "attributes": attributes, "x": x, "y": y, "w": w, "h": h}
            )  # fmt: skip
    blank = io.BytesIO()
    render(scenes[0]).crop((0, 0, 8, 8)).save(blank, "PNG")  # background only: no objects annotated
    for key, data in [("vg:9001", blank.getvalue()), ("vg:9002", b"\xff\xd8 not a jpeg")]:
        images.append(
            {"corpus": "vg", "key": key, "url": f"http://vg.test/{key}.jpg", "split": "train",
             "status": "ok", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
             "width": 8, "height": 8, "image": data}
        )  # fmt: skip
    half = len(images) // 2
    for shard, rows in enumerate((images[:half], images[half:])):
        pq.write_table(
            pa.Table.from_pylist(rows, schema=IMAGES), root / "images" / "vg" / f"shard-{shard:05d}.parquet"
        )
    pq.write_table(pa.Table.from_pylist(objects, schema=OBJECTS), root / "tables" / "objects.parquet")


class _Cfg:
    def __init__(self, detector: DetectorConfig):
        self.features = type("Features", (), {"detector": detector})()
        self.seed = 0  # the root seed


# --- detect mode -----------------------------------------------------------------------------------


def test_detect_keeps_10_to_100_boxes_sorted_with_soft_labels_over_classes_and_background():
    backend = _random_backend()
    images = [_pixels(s) for s in _rendered(3, seed=1)]
    for img, det in zip(images, backend.detect(images), strict=True):
        assert 10 <= len(det) <= 100
        assert det.features.shape == (len(det), 512) and det.features.dtype == np.float32
        assert det.soft_labels.shape == (len(det), len(CLASSES) + 1)
        np.testing.assert_allclose(det.soft_labels.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(det.conf, det.soft_labels[:, 1:].max(axis=1))
        assert np.all(np.diff(det.conf) <= 0), "rows sorted by descending confidence"
        assert det.attr_labels.shape == (len(det), len(ATTRS))
        h, w = img.shape[:2]
        assert det.boxes.min() >= 0 and det.boxes[:, [0, 2]].max() <= w and det.boxes[:, [1, 3]].max() <= h


def test_detect_box_count_follows_threshold_min_and_max():
    images = [_pixels(s) for s in _rendered(2, seed=2)]
    everything = _random_backend(conf_threshold=0.0, min_boxes=3, max_boxes=7)  # all pass: cut at max
    nothing = _random_backend(conf_threshold=1.0, min_boxes=4, max_boxes=7)  # none pass: top up to min
    assert [len(d) for d in everything.detect(images)] == [7, 7]
    assert [len(d) for d in nothing.detect(images)] == [4, 4]


def test_detect_features_are_those_pooled_at_the_returned_boxes():
    backend = _random_backend(precision="fp32")
    images = [_pixels(s) for s in _rendered(2, seed=3)]
    detected = backend.detect(images)
    pooled = backend.pool(images, [d.boxes for d in detected])
    for d, p in zip(detected, pooled, strict=True):
        np.testing.assert_allclose(p.features, d.features, atol=1e-4)
        np.testing.assert_allclose(p.soft_labels, d.soft_labels, atol=1e-5)


def test_an_images_regions_do_not_depend_on_the_other_images_of_its_batch():
    # Ray Data forms batches by arrival order: an image's features must be the same in any company.
    backend = _random_backend()
    scenes = [*_rendered(2, 5, min_side=64, max_side=72), *_rendered(1, 6, min_side=150, max_side=160)]
    small, other, large = (_pixels(s) for s in scenes)
    alone = backend.detect([small])[0]
    for company, at in (([small, large], 0), ([other, small, large], 1)):
        det = backend.detect(company)[at]
        for field in ("boxes", "features", "conf", "soft_labels", "attr_labels"):
            np.testing.assert_array_equal(getattr(det, field), getattr(alone, field), err_msg=field)
    boxes = np.array([[5, 5, 40, 40], [10, 20, 60, 50]], np.float32)
    pooled = backend.pool([small], [boxes])[0]
    in_company = backend.pool([other, small], [np.zeros((0, 4)), boxes])[1]
    np.testing.assert_array_equal(in_company.features, pooled.features)


# --- given-boxes mode ------------------------------------------------------------------------------


def test_pool_returns_exactly_the_given_boxes_in_their_order():
    backend = _random_backend()
    images = [_pixels(s) for s in _rendered(2, seed=4)]
    boxes = [
        np.array([[50, 40, 70, 60], [0, 0, 30, 30], [5.5, 6.5, 60.25, 70.75]], np.float32),
        np.zeros((0, 4)),
    ]
    first, empty = backend.pool(images, boxes)
    np.testing.assert_array_equal(first.boxes, boxes[0])
    assert first.features.shape == (3, 512) and first.soft_labels.shape == (3, len(CLASSES) + 1)
    assert len(empty) == 0 and empty.features.shape == (0, 512)
    ranked = first.sorted_by_conf()
    assert np.all(np.diff(ranked.conf) <= 0)
    assert {tuple(b) for b in ranked.boxes} == {tuple(b) for b in boxes[0]}


# --- weight files ----------------------------------------------------------------------------------


def test_weight_file_round_trip_and_mismatch_names_the_field(tmp_path):
    backend = _random_backend()
    path = tmp_path / "detector.pt"
    save_checkpoint(path, DetectorConfig(), backend.model, CLASSES, ATTRS)
    loaded = load_backend(DetectorConfig(), path)
    assert loaded.class_names == CLASSES and loaded.attr_names == ATTRS and loaded.feature_dim == 512
    image = [_pixels(_rendered(1, seed=5)[0])]
    np.testing.assert_array_equal(loaded.detect(image)[0].features, backend.detect(image)[0].features)

    with pytest.raises(StageError) as err:
        load_backend(DetectorConfig(feature_dim=256), path)
    assert str(err.value) == (
        f"{path}: weights do not match the config: features.detector.feature_dim is 256 but the weights "
        "were trained with 512"
    )
    with pytest.raises(StageError, match=r"features\.detector\.anchor_sizes is \[32, 64\]"):
        load_backend(DetectorConfig(anchor_sizes=(32, 64)), path)


def test_missing_or_foreign_weight_file_fails_in_one_line(tmp_path):
    with pytest.raises(StageError, match="detector weight file not found"):
        load_backend(DetectorConfig(), tmp_path / "absent.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(StageError) as err:
        load_backend(DetectorConfig(), junk)
    assert str(err.value).startswith(f"{junk}: not a readable torch checkpoint") and "\n" not in str(
        err.value
    )
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}}, foreign)
    with pytest.raises(StageError, match="field 'format'"):
        load_backend(DetectorConfig(), foreign)


# --- detectron2 ------------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_DETECTRON2, reason="detectron2 is installed")
def test_detectron2_backend_without_detectron2_says_how_to_install(tmp_path):
    weights = tmp_path / "faster_rcnn_from_caffe_attr.pkl"
    weights.write_bytes(b"x")
    with pytest.raises(StageError) as err:
        load_backend(DetectorConfig(backend="detectron2"), weights)
    message = str(err.value)
    assert "\n" not in message
    assert "pip install 'git+https://github.com/facebookresearch/detectron2.git'" in message


# --- training stage --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("detector")
    _write_vg_dedup(root / "dedup", _rendered(60, seed=10))
    cfg = DetectorConfig(
        image_size=96,
        max_image_size=128,
        train=DetectorTrainConfig(epochs=10, batch_size=4, warmup_steps=10, val_fraction=0.2),
    )  # fmt: skip
    out = root / "out"
    out.mkdir()
    ctx = StageContext(_Cfg(cfg), workdir=root, out_dir=out, inputs={"dedup": root / "dedup"})
    losses: list[dict[str, float]] = []
    ctx.log_metrics = lambda metrics, step: losses.append(metrics)  # what would go to MLflow
    result = run_detector_stage(ctx)
    return cfg, out, result, losses


def test_training_lowers_the_loss_and_finds_the_objects(trained):
    cfg, out, result, losses = trained
    # per-epoch curves as logged to MLflow
    assert len(losses) == cfg.train.epochs
    assert {
        "loss",
        "loss_objectness",
        "loss_rpn_box",
        "loss_classifier",
        "loss_box",
        "loss_attributes",
    } <= set(losses[0])
    assert losses[-1]["loss"] < 0.6 * losses[0]["loss"]
    m = result.metrics
    # 60 scenes + the object-less image; the undecodable one is skipped and counted
    assert m["skipped_undecodable_image"] == 1
    assert m["train_images"] + m["heldout_images"] == 61 and m["heldout_images"] == 12
    # an untrained detector covers 10-15% of these objects and names almost none of them
    assert m["heldout_recall"] >= 0.9
    assert m["heldout_class_accuracy"] >= 0.2  # chance: 1/8
    assert m["heldout_attr_accuracy"] >= 0.3
    assert m["heldout_boxes_per_image"] >= 10
    vocab = json.loads((out / "classes.json").read_text())
    assert sorted(vocab["classes"]) == ["circle", "cross", "diamond", "hexagon", "pentagon", "square", "star",
                                        "triangle"]  # fmt: skip
    assert len(vocab["heldout_keys"]) == 12 and vocab["train_images"] == 49
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(m)
    backend = load_backend(cfg, out / "detector.pt")
    assert backend.class_names == vocab["classes"] and backend.attr_names == vocab["attributes"]


# --- detectron2 (runs only where detectron2 is installed) -------------------------------------------

D2_CFG = dict(
    backend="detectron2",
    precision="fp32",
    detectron2=dict(num_classes=20, num_attributes=12, min_size=160, max_size=224, rpn_pre_nms_top_n=600),
)


def _caffe_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights as MILVLG's Caffe conversion stores them: background / "no attribute" first,
    a box for the background too, attribute layers under their names there."""
    p = "roi_heads.box_predictor."
    out = {k: v for k, v in state.items() if not k.startswith(p)}

    def last_first(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[-1:], t[:-1]])

    for ours, theirs in [("cls_score", "cls_score"), ("attr_score", "attr_linear2")]:
        out[f"{p}{theirs}.weight"] = last_first(state[f"{p}{ours}.weight"])
        out[f"{p}{theirs}.bias"] = last_first(state[f"{p}{ours}.bias"])
    out[f"{p}cls_embed.weight"] = last_first(state[f"{p}cls_embedding.weight"])
    out[f"{p}attr_linear1.weight"] = state[f"{p}fc_attr.weight"]
    out[f"{p}attr_linear1.bias"] = state[f"{p}fc_attr.bias"]
    out[f"{p}bbox_pred.weight"] = torch.cat([torch.zeros(4, 2048), state[f"{p}bbox_pred.weight"]])
    out[f"{p}bbox_pred.bias"] = torch.cat([torch.zeros(4), state[f"{p}bbox_pred.bias"]])
    return out


@pytest.fixture(scope="module")
def d2_weights(tmp_path_factory):
    from stages.feature_extraction.detector.detectron2_backend import build_butd_model

    root = tmp_path_factory.mktemp("d2")
    torch.manual_seed(0)
    model = build_butd_model(DetectorConfig(**D2_CFG), background_first=False, device="cpu")
    # Untrained, the 33 residual blocks (frozen batch norm = identity) blow activations up to inf; a
    # zero scale on each residual branch's last norm keeps the random model finite.
    for stage in [*model.backbone.stages, model.roi_heads.res5]:
        for block in stage:
            block.conv3.norm.weight.zero_()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with open(root / "faster_rcnn_from_caffe_attr.pkl", "wb") as f:  # airsplay's layout, numpy as in .pkl
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "test"}, f)
    torch.save({"model": _caffe_layout(state)}, root / "bua-caffe-frcn-r101_with_attributes.pth")
    return root


@pytest.mark.skipif(not HAS_DETECTRON2, reason="detectron2 is not installed")
def test_detectron2_backend_detects_and_pools_with_both_published_layouts(d2_weights):
    cfg = DetectorConfig(**D2_CFG)
    d2 = load_backend(cfg, d2_weights / "faster_rcnn_from_caffe_attr.pkl")
    caffe = load_backend(cfg, d2_weights / "bua-caffe-frcn-r101_with_attributes.pth")
    assert d2.feature_dim == 2048 and len(d2.class_names) == 20 and len(d2.attr_names) == 12
    images = [_pixels(s) for s in _rendered(2, seed=6)]
    for det in d2.detect(images):
        assert 10 <= len(det) <= 100 and np.all(np.diff(det.conf) <= 0)
        assert det.features.shape == (len(det), 2048) and det.soft_labels.shape == (len(det), 21)
        assert det.attr_labels.shape == (len(det), 12)
        np.testing.assert_allclose(det.soft_labels.sum(axis=1), 1.0, atol=1e-5)
    boxes = [np.array([[4, 4, 40, 40], [10, 20, 70, 60]], np.float32), np.array([[0, 0, 30, 50]], np.float32)]
    from_d2, from_caffe = d2.pool(images, boxes), caffe.pool(images, boxes)
    for a, b, given in zip(from_d2, from_caffe, boxes, strict=True):
        np.testing.assert_array_equal(a.boxes, given)
        np.testing.assert_allclose(a.features, b.features, atol=1e-4)
        np.testing.assert_allclose(a.soft_labels, b.soft_labels, atol=1e-5)  # background in column 0 for both
        np.testing.assert_allclose(a.attr_labels, b.attr_labels, atol=1e-5)


@pytest.mark.skipif(not HAS_DETECTRON2, reason="detectron2 is not installed")
def test_detectron2_weights_for_another_vocabulary_fail_fast(d2_weights):
    cfg = DetectorConfig(**{**D2_CFG, "detectron2": {**D2_CFG["detectron2"], "num_classes": 1600}})
    path = d2_weights / "faster_rcnn_from_caffe_attr.pkl"
    with pytest.raises(StageError) as err:
        load_backend(cfg, path)
    assert str(err.value) == (
        f"{path}: weights do not match the model: roi_heads.box_predictor.cls_score.weight has shape "
        "(21, 2048) in the file but (1601, 2048) in the model "
        "(check features.detector.detectron2.num_classes)"
    )


def test_training_twice_gives_the_same_weights(tmp_path):
    _write_vg_dedup(tmp_path / "dedup", _rendered(12, seed=11))
    cfg = DetectorConfig(image_size=64, max_image_size=96,
                         train=DetectorTrainConfig(epochs=2, batch_size=4, warmup_steps=2, val_fraction=0.2))
    weights = []
    for run in ("a", "b"):
        out = tmp_path / run
        out.mkdir()
        ctx = StageContext(_Cfg(cfg), workdir=tmp_path, out_dir=out, inputs={"dedup": tmp_path / "dedup"})
        run_detector_stage(ctx)
        weights.append(torch.load(out / "detector.pt", weights_only=True)["state_dict"])
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name
