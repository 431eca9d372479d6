"""The features stage on a real dedup output of the tiny world, with a real (randomly initialised)
torchvision detector: store layout, box rule, failures, kill-and-resume, given boxes, cache reuse."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image

from pipeline.config import REPO_ROOT, load_config
from pipeline.run import main
from stages.base import StageContext, StageError
from stages.feature_extraction.detector.config import DetectorConfig
from stages.feature_extraction.detector.model import RegionDetector
from stages.feature_extraction.detector.torchvision_backend import save_checkpoint
from stages.feature_extraction.stage import run as run_features
from stages.outputs.features import FeaturesOutput
from vlp.data.img_db import ImgDb, compute_num_bb
from vlp.data.tables import IMAGES
from worldgen.scenes import COLOURS, SHAPES, SIZES, TEXTURES

TINY = REPO_ROOT / "configs" / "tiny.yaml"
# A small detector input and few proposals (fast), and a box rule whose bounds the test detector's NMS
# survivor counts (19-25 on the tiny world's images) straddle: topping up, cutting and counts in between.
# Not below 96 px: torchvision's MultiScaleRoIAlign infers the feature stride from the first batch it
# sees, and for inputs under about 70 px, padded to a multiple of 32, it infers 1/4 instead of 1/8.
DETECTOR = {"image_size": 96, "max_image_size": 192, "rpn_pre_nms_top_n": 200, "rpn_post_nms_top_n": 100,
            "conf_threshold": 0.1, "min_boxes": 20, "max_boxes": 24}
NBB = [[0.2, 100, 10], [0.1, 22, 5]]
# Bad rows planted in the download output (features reads every downloaded image): key -> expected
# failure reason.
BAD = {"cc:train:900": "zero_size", "cc:train:901": "zero_size", "cc:train:902": "undecodable",
       "cc:train:903": "undecodable"}

pytestmark = pytest.mark.slow


def overrides(weights: Path, **extra: str) -> list[str]:
    out = [f"features.detector.weights={weights}", "features.batch_size=1", "features.commit_bytes=1",
           f"features.nbb={json.dumps(NBB)}"]
    out += [f"features.detector.{k}={v}" for k, v in DETECTOR.items()]
    return out + [f"features.{k}={v}" for k, v in extra.items()]


def only_dir(parent: Path) -> Path:
    (child,) = [p for p in parent.iterdir() if not p.name.startswith(".")]
    return child


def plant_bad_images(download: Path) -> None:
    good = jpeg_bytes()
    rows = [{"corpus": "cc", "key": key, "url": f"http://example.com/{key}", "split": "train", "status": "ok",
             "sha256": "0" * 64, "size": 0, "width": 40, "height": 30, "image": data}
            for key, data in zip(BAD, [None, b"", b"GIF89a garbage", good[: len(good) // 3]], strict=True)]
    shard = download / "images" / "cc" / "shard-09999.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=IMAGES), shard)


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 10)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """World -> download -> dedup through the CLI, bad rows planted, a random detector's weight file."""
    workdir = tmp_path_factory.mktemp("work")
    assert main(["--config", str(TINY), "--workdir", str(workdir), "--stage", "dedup"]) == 0
    plant_bad_images(only_dir(workdir / "download"))
    weights = workdir / "random-detector.pt"
    save_checkpoint(weights, DetectorConfig(**DETECTOR), *random_detector())
    return workdir, weights


def random_detector() -> tuple[RegionDetector, list[str], list[str]]:
    """A randomly initialised detector whose box choice is exact: with zero weights in the RPN and box
    predictor layers every score and box offset is a bias, bit-identical in any process, so runs pick the
    same boxes (a random detector's near-tied scores would let float noise pick others). Region
    features still come from the random trunk and box head, so they differ between images."""
    torch.manual_seed(0)
    attrs = [*COLOURS, *SIZES, *TEXTURES]
    model = RegionDetector(DetectorConfig(**DETECTOR), len(SHAPES), len(attrs))
    predictor = model.roi_heads.box_predictor
    with torch.no_grad():
        for layer in (model.rpn.head.cls_logits, model.rpn.head.bbox_pred, predictor.cls_score,
                      predictor.bbox_pred):
            layer.weight.zero_()
    return model, list(SHAPES), attrs


@pytest.fixture(scope="module")
def local_ray(setup):
    # One Ray for the module: the CLI runs below keep a connection their caller made (a Ray per run costs
    # seconds each); a run that starts its own is tested in test_pipeline / test_graph.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def extracted(setup, local_ray):
    """`--stage features` through the CLI (the reference run), then the same command again."""
    workdir, weights = setup
    argv = ["--config", str(TINY), "--workdir", str(workdir), "--stage", "features", *overrides(weights)]
    assert main(argv) == 0
    out = only_dir(workdir / "features")
    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert main(argv) == 0
    return out, mtime


def stage_context(workdir: Path, out: Path, weights: Path, **extra: str) -> StageContext:
    cfg = load_config(TINY, overrides(weights, **extra))
    inputs = {name: only_dir(workdir / name) for name in ("download", "dedup", "world")}
    return StageContext(cfg=cfg, workdir=workdir, out_dir=out, inputs=inputs)


def downloaded_keys(workdir: Path) -> set[str]:
    """Keys of every image the download stage got (dedup's removals included)."""
    shards = (only_dir(workdir / "download") / "images").glob("*/shard-*.parquet")
    tables = [pq.read_table(s, columns=["key", "status"]).to_pylist() for s in shards]
    return {row["key"] for rows in tables for row in rows if row["status"] == "ok"}


def store_arrays(store_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    db = ImgDb(store_dir)
    try:
        return {k: {name: a.copy() for name, a in db.read_arrays(k).items()} for k in db.keys()}
    finally:
        db.close()


def test_every_good_image_is_stored_exactly_once_with_fp16_features(setup, extracted):
    workdir, _ = setup
    out, _ = extracted
    expected = downloaded_keys(workdir) - set(BAD)
    env = lmdb.open(str(out / "img_db" / "all"), readonly=True, lock=False)
    with env.begin() as txn:
        key_list = json.loads(txn.get(b"__keys__"))
        assert txn.stat()["entries"] == len(expected) + 1  # the images and __keys__
    env.close()
    assert len(key_list) == len(set(key_list)) and set(key_list) == expected
    # images dedup kept out of pretraining are stored too: VQA and RefCOCO evaluate on them
    removed = set(pq.read_table(only_dir(workdir / "dedup") / "removed.parquet").column("key").to_pylist())
    assert removed and removed <= expected
    arrays = store_arrays(out / "img_db")
    assert set(arrays) == expected
    for a in arrays.values():
        n = len(a["conf"])
        assert a["features"].dtype == np.float16 and a["features"].shape == (n, 512)
        assert a["norm_bb"].dtype == np.float16 and a["norm_bb"].shape == (n, 6)
        assert a["soft_labels"].shape == (n, len(SHAPES) + 1)
        assert a["attr_labels"].shape == (n, len(COLOURS) + len(SIZES) + len(TEXTURES))
        bb = a["norm_bb"].astype(np.float32)
        assert ((bb >= 0) & (bb <= 1)).all()
        np.testing.assert_allclose(bb[:, 4:], bb[:, 2:4] - bb[:, :2], atol=2e-3)


def test_box_rule_keeps_min_to_max_boxes_sorted_by_confidence(extracted):
    out, _ = extracted
    counts = []
    for a in store_arrays(out / "img_db").values():
        assert (np.diff(a["conf"]) <= 0).all()
        counts.append(len(a["conf"]))
    # every kept box passes the threshold; the bounds are exercised at both ends and in between
    assert min(counts) == DETECTOR["min_boxes"] and max(counts) == DETECTOR["max_boxes"]
    assert any(DETECTOR["min_boxes"] < c < DETECTOR["max_boxes"] for c in counts)


def test_nbb_sidecars_follow_uniter_rule(extracted):
    out, _ = extracted
    arrays = store_arrays(out / "img_db")
    for conf_th, max_bb, min_bb in NBB:
        sidecar = json.loads((out / "img_db" / f"nbb_th{conf_th}_max{max_bb}_min{min_bb}.json").read_text())
        assert sidecar == {k: compute_num_bb(a["conf"], conf_th, max_bb, min_bb) for k, a in arrays.items()}
    # the test detector's confidence (0.115 everywhere) is below 0.2: a UNITER reader gets min_bb boxes
    assert set(json.loads((out / "img_db" / "nbb_th0.2_max100_min10.json").read_text()).values()) == {10}


def test_failures_are_recorded_with_key_and_reason(extracted):
    out, _ = extracted
    failures = pq.read_table(out / "failures.parquet").to_pylist()
    assert {f["key"]: f["reason"] for f in failures} == BAD
    assert all(f["corpus"] == "cc" and f["detail"] and "\n" not in f["detail"] for f in failures)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["failed_by_reason"] == {"undecodable": 2, "zero_size": 2}
    # The box rule consumers read the store with: the first features.nbb entry.
    assert FeaturesOutput(out).box_rule() == tuple(NBB[0])


def test_metrics_artifacts_and_cache_reuse(setup, extracted):
    workdir, _ = setup
    out, first_mtime = extracted
    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / "manifest.json").stat().st_mtime_ns == first_mtime  # the second run was a cache hit
    m = manifest["metrics"]
    n_ok = len(downloaded_keys(workdir)) - len(BAD)
    assert m["images_ok"] == n_ok and m["images_processed"] == n_ok + len(BAD)
    assert (m["images_failed"], m["images_failed/zero_size"], m["images_failed/undecodable"]) == (4, 2, 2)
    assert m["images_per_s"] > 0 and m["store_bytes"] > 0
    assert (m["boxes_per_image_min"], m["boxes_per_image_max"], m["boxes_per_image_mean"]) == (10, 10, 10)
    assert 0 <= m["probe/recall_iou50"] <= 1 and 0 < m["probe/images"] <= m["probe/objects"]
    assert sorted(manifest["artifacts"]) == ["boxes_per_image.png", "failures.parquet", "stats.json"]
    assert (out / "boxes_per_image.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# The stage in a process of its own, a driver of the test's Ray cluster (the writer lives in the driver,
# so SIGKILL stops it mid-write).
KILLABLE_RUN = """
import sys
from pathlib import Path
import ray
from pipeline.config import load_config
from stages.base import StageContext
from stages.feature_extraction.stage import run
address, config, download, dedup, out, *overrides = sys.argv[1:]
ray.init(address=address, logging_level="WARNING")
run(StageContext(cfg=load_config(config, overrides), workdir=Path(out).parent, out_dir=Path(out),
                 inputs={"download": Path(download), "dedup": Path(dedup)}))
"""


def stored_entries(db_dir: Path) -> int:
    if not (db_dir / "data.mdb").is_file():
        return 0
    env = lmdb.open(str(db_dir), readonly=True, lock=False)
    try:
        return env.stat()["entries"]
    finally:
        env.close()


def raw_values(db_dir: Path) -> dict[bytes, bytes]:
    env = lmdb.open(str(db_dir), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return dict(txn.cursor())
    finally:
        env.close()


def test_killed_run_resumes_to_the_same_store_whatever_the_batches(setup, extracted, local_ray, tmp_path):
    workdir, weights = setup
    reference, _ = extracted
    out = tmp_path / "features"
    download, dedup = only_dir(workdir / "download"), only_dir(workdir / "dedup")
    address = ray.get_runtime_context().gcs_address
    argv = [sys.executable, "-c", KILLABLE_RUN, address, str(TINY), str(download), str(dedup), str(out),
            *overrides(weights)]
    log = tmp_path / "killed-run.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, start_new_session=True, stdout=sink, stderr=sink)
    deadline = time.time() + 90
    try:
        while stored_entries(out / "img_db" / "all") < 20:
            assert proc.poll() is None, f"ended before it could be killed: {log.read_text()[-2000:]}"
            assert time.time() < deadline, "no images stored within 90 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = raw_values(out / "img_db" / "all")
    total = len(downloaded_keys(workdir)) - len(BAD)
    assert 20 <= len(before) < total
    assert not list((out / "img_db").glob("nbb_*.json"))  # an unfinished store has no sidecar

    # The resumed run batches four images per detector call where the reference ran one: an image's
    # regions must not depend on which images share its batch.
    result = run_features(stage_context(workdir, out, weights, batch_size="4"))
    assert result.metrics["images_resumed"] == len(before)
    assert result.metrics["images_processed"] == total - len(before) + len(BAD)
    after = raw_values(out / "img_db" / "all")
    assert {k: after[k] for k in before} == before  # what the killed run stored was kept, not redone
    resumed, uninterrupted = store_arrays(out / "img_db"), store_arrays(reference / "img_db")
    assert resumed.keys() == uninterrupted.keys()
    for key, arrays in uninterrupted.items():
        assert resumed[key].keys() == arrays.keys()
        for name, a in arrays.items():
            np.testing.assert_array_equal(resumed[key][name], a, err_msg=f"{key} {name}")
    for conf_th, max_bb, min_bb in NBB:
        name = f"nbb_th{conf_th}_max{max_bb}_min{min_bb}.json"
        assert (out / "img_db" / name).read_text() == (reference / "img_db" / name).read_text()
    assert pq.read_table(out / "failures.parquet").equals(pq.read_table(reference / "failures.parquet"))


def test_given_boxes_mode_stores_exactly_the_annotated_boxes(setup, local_ray, tmp_path):
    workdir, weights = setup
    dedup = only_dir(workdir / "dedup")
    result = run_features(stage_context(workdir, tmp_path, weights, mode="given_boxes", unannotated="skip"))
    objects = pq.read_table(dedup / "tables" / "objects.parquet").to_pylist()
    sizes = {}
    for shard in (only_dir(workdir / "download") / "images").glob("*/shard-*.parquet"):
        for row in pq.read_table(shard, columns=["key", "status", "width", "height"]).to_pylist():
            if row["status"] == "ok":
                sizes[row["key"]] = (row["width"], row["height"])
    truth: dict[str, list] = {}
    for o in objects:
        w, h = sizes[o["image_key"]]
        x1, y1, x2, y2 = o["x"] / w, o["y"] / h, (o["x"] + o["w"]) / w, (o["y"] + o["h"]) / h
        truth.setdefault(o["image_key"], []).append([x1, y1, x2, y2, x2 - x1, y2 - y1])
    arrays = store_arrays(tmp_path / "img_db")
    assert set(arrays) == set(truth)
    assert result.metrics["images_skipped"] == len(sizes) - len(truth)
    assert result.metrics["images_failed"] == 0  # the bad rows have no annotations: skipped, not decoded
    for key, boxes in truth.items():
        stored = arrays[key]["norm_bb"].astype(np.float64)
        assert (np.diff(arrays[key]["conf"]) <= 0).all()
        order = np.lexsort(np.array(boxes).T[::-1])
        np.testing.assert_allclose(stored[np.lexsort(stored.T[::-1])], np.array(boxes)[order], atol=1e-3)


def test_mismatching_weights_fail_fast_with_one_line(setup, tmp_path):
    workdir, weights = setup
    ctx = stage_context(workdir, tmp_path, weights)
    ctx.cfg.features.detector.image_size = 128  # the weights were built for 96
    with pytest.raises(StageError) as err:
        run_features(ctx)
    assert str(weights) in str(err.value) and "image_size" in str(err.value) and "\n" not in str(err.value)


def test_actors_taking_every_cpu_are_refused_before_anything_runs(setup, local_ray, tmp_path):
    workdir, weights = setup
    with pytest.raises(StageError, match=r"features.actors=2 x features.actor_cpus=1.0 takes all 2 CPUs"):
        run_features(stage_context(workdir, tmp_path, weights, actors="2"))
