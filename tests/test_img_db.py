import io
import itertools
import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import lmdb
import msgpack
import msgpack_numpy
import numpy as np
import pytest
import torch

from vlp.data.img_db import ImgDb, ImgDbError, ImgDbWriter, compute_num_bb

N_CLASSES = 11  # soft label columns (C + 1)


def make_image(seed: int, n: int | None = None, dim: int = 32, conf: np.ndarray | None = None) -> dict:
    """A detector output as a BUTD-style extractor produces it (float32, sorted by confidence)."""
    rng = np.random.default_rng(seed)
    n = n if n is not None else int(rng.integers(4, 12))
    xy1 = rng.uniform(0, 0.5, size=(n, 2))
    wh = rng.uniform(0.01, 0.5, size=(n, 2))
    norm_bb = np.concatenate([xy1, xy1 + wh, wh], axis=1).astype(np.float32)
    logits = rng.normal(size=(n, N_CLASSES))
    soft = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    if conf is None:
        conf = np.sort(rng.uniform(0, 1, size=n))[::-1]
    return {
        "features": np.maximum(rng.normal(size=(n, dim)), 0).astype(np.float32),
        "norm_bb": norm_bb,
        "conf": np.asarray(conf, dtype=np.float32),
        "soft_labels": soft.astype(np.float32),
    }


def raw_values(db_dir: Path) -> dict[bytes, bytes]:
    env = lmdb.open(str(db_dir), readonly=True, lock=False)
    with env.begin() as txn:
        out = dict(txn.cursor())
    env.close()
    return out


def test_uncompressed_layout_is_uniter_msgpack_with_fp16_arrays(tmp_path):
    img = make_image(0, n=5)
    attrs = np.full((5, 4), 0.25, dtype=np.float32)
    with ImgDbWriter(tmp_path) as w:
        w.put("coco:1", **img, attr_labels=attrs)
        w.put("vg:2", **make_image(1, n=3, conf=[0.9, 0.8, 0.1]))
    values = raw_values(tmp_path / "all")
    assert json.loads(values[b"__keys__"]) == ["coco:1", "vg:2"]
    # Decoded with UNITER's own decoder (msgpack_numpy), not ours.
    dump = msgpack.unpackb(values[b"coco:1"], raw=False, object_hook=msgpack_numpy.decode)
    assert sorted(dump) == ["attr_labels", "conf", "features", "norm_bb", "soft_labels"]
    assert {k: (v.dtype.str, v.shape) for k, v in dump.items()} == {
        "features": ("<f2", (5, 32)),
        "norm_bb": ("<f2", (5, 6)),
        "conf": ("<f4", (5,)),
        "soft_labels": ("<f2", (5, N_CLASSES)),
        "attr_labels": ("<f2", (5, 4)),
    }
    np.testing.assert_array_equal(dump["features"], img["features"].astype(np.float16))
    np.testing.assert_array_equal(dump["conf"], img["conf"])
    assert json.loads((tmp_path / "nbb_th0.2_max100_min10.json").read_text()) == {"coco:1": 5, "vg:2": 3}


def test_compressed_layout_is_an_npz_archive(tmp_path):
    img = make_image(0, n=5)
    with ImgDbWriter(tmp_path, compress=True) as w:
        w.put("coco:1", **img)
    assert not (tmp_path / "all").exists()
    with np.load(io.BytesIO(raw_values(tmp_path / "all_compressed")[b"coco:1"])) as npz:
        assert {k: npz[k].dtype.str for k in npz.files} == {
            "features": "<f2", "norm_bb": "<f2", "conf": "<f4", "soft_labels": "<f2"}
    got = ImgDb(tmp_path, compress=True).get("coco:1")
    np.testing.assert_array_equal(got.features, img["features"].astype(np.float16).astype(np.float32))
    with pytest.raises(ImgDbError, match=r"no img_db LMDB .*\(found all_compressed: pass compress=True\)"):
        ImgDb(tmp_path)


def test_rows_must_be_sorted_by_descending_conf(tmp_path):
    img = make_image(0, n=4, conf=[0.9, 0.5, 0.7, 0.1])
    with ImgDbWriter(tmp_path) as w:
        with pytest.raises(ImgDbError, match=r"key 'coco:7': field conf must be sorted descending, "
                                             r"row 2 \(0\.7\) > row 1 \(0\.5\)"):
            w.put("coco:7", **img)
        w.put("coco:8", **make_image(0, n=4, conf=[0.9, 0.5, 0.5, 0.1]))  # ties are fine
        assert "coco:8" in w and "coco:7" not in w
    assert ImgDb(tmp_path).keys() == ["coco:8"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("norm_bb", lambda bb: np.concatenate([bb[:, :4], bb[:, 4:] * 2], 1),
         r"field norm_bb row 0 .*: w/h differ"),
        ("norm_bb", lambda bb: bb[:, :4],
         r"field norm_bb must be a numeric N x 6 array, got float32 \(4, 4\)"),
        ("norm_bb", lambda bb: bb + 0.8, r"field norm_bb row \d+ .*: coordinates outside \[0, 1\]"),
        ("features", lambda f: f * 1e6, r"field features has non-finite values \(after casting to float16\)"),
        ("soft_labels", lambda s: s[:3], r"field soft_labels has 3 rows but features has 4"),
        ("conf", lambda c: c[None], r"field conf must be a numeric N or N x 1 array"),
    ],
)
def test_bad_fields_are_named(tmp_path, field, value, message):
    img = make_image(3, n=4)
    img[field] = value(img[field])
    with ImgDbWriter(tmp_path) as w, pytest.raises(ImgDbError, match=rf"key 'sbu:3': {message}"):
        w.put("sbu:3", **img)


def test_nbb_sidecars_apply_threshold_min_and_max(tmp_path):
    confs = {
        "many": [0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4],  # 8 above 0.2: cut by max_bb
        "few": [0.9, 0.1, 0.05, 0.01],  # 1 above 0.2: raised to min_bb
        "edge": [0.9, 0.5, 0.3, 0.2, 0.1, 0.05],  # 0.2 itself is not above 0.2 (strict >)
        "tiny": [0.9],  # fewer boxes than min_bb: clipped to what exists
    }
    with ImgDbWriter(tmp_path, nbb_configs=[(0.2, 100, 10), (0.2, 5, 2), (0.5, 3, 1)]) as w:
        for key, conf in confs.items():
            w.put(key, **make_image(len(conf), n=len(conf), conf=conf))
    sidecar = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("nbb_*.json")}
    assert sidecar == {
        "nbb_th0.2_max100_min10.json": {"edge": 6, "few": 4, "many": 8, "tiny": 1},
        "nbb_th0.2_max5_min2.json": {"edge": 3, "few": 2, "many": 5, "tiny": 1},
        "nbb_th0.5_max3_min1.json": {"edge": 1, "few": 1, "many": 3, "tiny": 1},
    }
    db = ImgDb(tmp_path, conf_th=0.2, max_bb=5, min_bb=2)
    assert db.name2nbb == sidecar["nbb_th0.2_max5_min2.json"]
    assert [len(db.get(k).features) for k in confs] == [5, 2, 3, 1]
    # No sidecar for this triple: counted from __keys__ and the stored confidences, as UNITER does.
    assert ImgDb(tmp_path, conf_th=0.35, max_bb=4, min_bb=0).name2nbb == {"edge": 2, "few": 1, "many": 4,
                                                                          "tiny": 1}
    assert compute_num_bb(np.array([[0.9], [0.3], [0.1]], np.float16), 0.2, 100, 1) == 2  # BUTD's N x 1 conf


def test_get_returns_float32_and_7d_boxes_with_area(tmp_path):
    img = make_image(5, n=12, dim=2048)
    with ImgDbWriter(tmp_path, nbb_configs=[(0.0, 7, 1)]) as w:
        w.put("flickr30k:1000092795", **img)
    feats, boxes, soft = ImgDb(tmp_path, conf_th=0.0, max_bb=7, min_bb=1).get("flickr30k:1000092795")
    bb = img["norm_bb"][:7].astype(np.float16).astype(np.float32)
    assert feats.dtype == boxes.dtype == soft.dtype == torch.float32
    assert feats.shape == (7, 2048) and boxes.shape == (7, 7) and soft.shape == (7, N_CLASSES)
    np.testing.assert_array_equal(boxes[:, :6], bb)
    np.testing.assert_array_equal(boxes[:, 6], bb[:, 4] * bb[:, 5])
    np.testing.assert_array_equal(feats, img["features"][:7].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(soft, img["soft_labels"][:7].astype(np.float16).astype(np.float32))


def butd_npz_arrays(seed: int, n: int) -> dict:
    """What BUTD's generate_npz.py saves: all float16, conf as an N x 1 column, 1601 soft-label columns."""
    img = make_image(seed, n=n, dim=2048)
    logits = np.random.default_rng(seed).normal(size=(n, 1601))
    return {
        "norm_bb": img["norm_bb"].astype(np.float16),
        "features": img["features"].astype(np.float16),
        "conf": img["conf"][:, None].astype(np.float16),
        "soft_labels": (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float16),
    }


def npz_bytes_as_old_numpy_wrote_them(arrays: dict) -> bytes:
    """np.savez_compressed(writer, **dump, allow_pickle=True) under numpy 1.x: one extra 0-d member."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    with zipfile.ZipFile(buf, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("allow_pickle.npy", "w") as f:
            np.lib.format.write_array(f, np.array(True))
    return buf.getvalue()


def write_uniter_img_db(split_dir: Path, compress: bool, keep_all: bool, images: dict) -> None:
    """Follows UNITER scripts/convert_imgdir.py, written with lmdb/msgpack/msgpack_numpy directly."""
    conf_th, max_bb, min_bb = 0.2, 100, 10
    db_name = "all" if keep_all else f"feat_th{conf_th}_max{max_bb}_min{min_bb}"
    db_name += "_compressed" if compress else ""
    env = lmdb.open(str(split_dir / db_name), map_size=1 << 28)
    txn = env.begin(write=True)
    name2nbb = {}
    for fname, arrays in images.items():
        nbb = None if keep_all else int(min(max_bb, max(min_bb, (arrays["conf"] > conf_th).sum())))
        dump = {k: a[:nbb] for k, a in arrays.items()}
        if compress:
            value = npz_bytes_as_old_numpy_wrote_them(dump)
        else:  # what msgpack_numpy.patch() + msgpack.dumps(dump, use_bin_type=True) produce
            value = msgpack.packb(dump, use_bin_type=True, default=msgpack_numpy.encode)
        txn.put(key=fname.encode("utf-8"), value=value)
        name2nbb[fname] = nbb
    txn.put(key=b"__keys__", value=json.dumps(list(name2nbb)).encode("utf-8"))
    txn.commit()
    env.close()
    if not keep_all:
        (split_dir / f"nbb_th{conf_th}_max{max_bb}_min{min_bb}.json").write_text(json.dumps(name2nbb))


@pytest.mark.parametrize("compress", [False, True], ids=["msgpack", "compressed"])
@pytest.mark.parametrize("keep_all", [False, True], ids=["feat_th", "all"])
def test_reads_a_store_written_the_uniter_way(tmp_path, compress, keep_all):
    images = {
        "nlvr2_dev-850-0-img0.npz": butd_npz_arrays(1, 36),  # conf from uniform(0,1): ~29 above 0.2
        "nlvr2_dev-850-0-img1.npz": butd_npz_arrays(2, 12),
    }
    # 7 confidences above 0.2: raised to min_bb = 10
    images["nlvr2_dev-850-0-img1.npz"]["conf"][:] = np.linspace(0.5, 0.0, 12)[:, None]
    write_uniter_img_db(tmp_path, compress, keep_all, images)
    db = ImgDb(tmp_path, compress=compress)
    expected_nbb = {k: int(min(100, max(10, (a["conf"] > 0.2).sum()))) for k, a in images.items()}
    assert expected_nbb["nlvr2_dev-850-0-img1.npz"] == 10
    assert db.name2nbb == expected_nbb
    for fname, arrays in images.items():
        nbb = expected_nbb[fname]
        feats, boxes, soft = db.get(fname)
        # UNITER: torch.tensor(norm_bb[:nbb]).float(), then _get_img_feat's area column
        bb = torch.tensor(arrays["norm_bb"][:nbb]).float()
        assert torch.equal(boxes, torch.cat([bb, bb[:, 4:5] * bb[:, 5:]], dim=-1))
        assert torch.equal(feats, torch.tensor(arrays["features"][:nbb]).float())
        assert torch.equal(soft, torch.tensor(arrays["soft_labels"][:nbb]).float())
        stored = db.read_arrays(fname)
        assert sorted(stored) == ["conf", "features", "norm_bb", "soft_labels"]
        np.testing.assert_array_equal(stored["conf"], arrays["conf"][: len(stored["conf"])])


@pytest.mark.parametrize("compress", [False, True], ids=["msgpack", "compressed"])
def test_missing_and_corrupt_entries_name_the_key(tmp_path, compress):
    with ImgDbWriter(tmp_path, compress=compress) as w:
        for i in range(3):
            w.put(f"cc:train:{i}", **make_image(i))
    good = raw_values(tmp_path / ("all_compressed" if compress else "all"))[b"cc:train:0"]
    env = lmdb.open(str(tmp_path / ("all_compressed" if compress else "all")))
    with env.begin(write=True) as txn:
        txn.put(b"cc:train:1", good[: len(good) // 2])
        txn.put(b"cc:train:2", msgpack.packb({"features": 1}) if not compress else b"PK\x03\x04junk")
    env.close()
    db = ImgDb(tmp_path, compress=compress)
    assert db.get("cc:train:0").features.shape[1] == 32
    corrupt = r"/all(_compressed)?: key 'cc:train:1': corrupt entry: not (a )?valid "
    with pytest.raises(ImgDbError, match=corrupt):
        db.get("cc:train:1")
    with pytest.raises(ImgDbError, match=r"key 'cc:train:2': corrupt entry: "):
        db.get("cc:train:2")
    with pytest.raises(ImgDbError, match=r"image key 'cc:train:9' not found"):
        db.get("cc:train:9")


def test_pickled_object_arrays_are_refused_not_unpickled(tmp_path):
    with ImgDbWriter(tmp_path) as w:
        w.put("coco:1", **make_image(1))
    evil = msgpack.packb({"features": np.array([print], dtype=object)}, use_bin_type=True,
                         default=msgpack_numpy.encode)
    env = lmdb.open(str(tmp_path / "all"))
    with env.begin(write=True) as txn:
        txn.put(b"coco:1", evil)
    env.close()
    with pytest.raises(ImgDbError, match=r"key 'coco:1': corrupt entry: only plain numeric arrays"):
        ImgDb(tmp_path).get("coco:1")


_FORKED_DB = None


def _read_in_forked_worker(key):
    return _FORKED_DB.get(key).boxes.sum().item()


def test_reader_survives_fork_and_pickle(tmp_path):
    global _FORKED_DB
    with ImgDbWriter(tmp_path) as w:
        for i in range(6):
            w.put(f"vg:{i}", **make_image(i))
    db = _FORKED_DB = ImgDb(tmp_path)
    expected = [db.get(f"vg:{i}").boxes.sum().item() for i in range(6)]  # env now open in the parent
    with multiprocessing.get_context("fork").Pool(2) as pool:  # workers inherit the open handle
        assert pool.map(_read_in_forked_worker, [f"vg:{i}" for i in range(6)]) == expected
    clone = pickle.loads(pickle.dumps(db))
    assert clone.get("vg:5").boxes.sum().item() == expected[5] and clone.name2nbb == db.name2nbb


def test_map_grows_and_a_failed_run_keeps_its_images_unfinished(tmp_path):
    with pytest.raises(RuntimeError, match="detector crashed"):
        with ImgDbWriter(tmp_path, map_size=64 << 10, batch_bytes=1 << 20) as w:
            for i in range(40):  # ~8 KB each, all in one batch: 5x the initial map
                w.put(f"sbu:{i}", **make_image(i, dim=512))
            raise RuntimeError("detector crashed")
    assert len(raw_values(tmp_path / "all")) == 40
    with pytest.raises(ImgDbError, match=r"no __keys__ entry and no nbb_th0\.2_max100_min10\.json"):
        ImgDb(tmp_path)
    ImgDbWriter(tmp_path).close()
    assert len(ImgDb(tmp_path)) == 40


def test_config_and_open_errors(tmp_path):
    with pytest.raises(ImgDbError, match=r"conf_th=-1\.0: UNITER's fixed-count layout .* is not supported"):
        ImgDbWriter(tmp_path, nbb_configs=[(-1, 36, 36)])
    with pytest.raises(ImgDbError, match=r"need 0 <= min_bb <= max_bb"):
        ImgDbWriter(tmp_path, nbb_configs=[(0.2, 10, 100)])
    with ImgDbWriter(tmp_path) as w:
        w.put("coco:1", **make_image(1))
    db = ImgDb(tmp_path)
    db.get("coco:1")  # the env opens on first read
    with pytest.raises(ImgDbError, match=r"/all: cannot open for writing .*close every ImgDb reading"):
        ImgDbWriter(tmp_path)
    db.close()
    ImgDbWriter(tmp_path).close()


# --- kill and resume -----------------------------------------------------------------------------

N_RESUME = 30
RESUME_CFG = dict(nbb_configs=[(0.2, 100, 10), (0.5, 6, 2)], batch_bytes=6_000)


def _child_writer(out: str, mode: str) -> None:
    """Writes the N_RESUME images until SIGKILLed: 'paused' stops with puts pending, 'busy' keeps
    re-putting every key forever, so the kill lands while it is writing."""
    w = ImgDbWriter(out, **RESUME_CFG)
    for i in itertools.count():
        w.put(f"coco:{i % N_RESUME}", **make_image(i % N_RESUME))
        print(i, flush=True)
        if mode == "paused" and i == 14:
            signal.pause()


def _finish(path: Path, skip_done: bool) -> None:
    with ImgDbWriter(path, **RESUME_CFG) as w:
        for i in range(N_RESUME):
            if not (skip_done and f"coco:{i}" in w):
                w.put(f"coco:{i}", **make_image(i))


def _store_files(path: Path) -> dict:
    return {"values": raw_values(path / "all"),
            **{p.name: p.read_bytes() for p in path.glob("*.json")}}


@pytest.mark.parametrize(("mode", "kill_after"), [("paused", 14), ("busy", 70)])
def test_sigkilled_writer_resumes_to_the_same_store(tmp_path, mode, kill_after):
    reference = tmp_path / "reference"
    _finish(reference, skip_done=False)

    killed = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, __file__, "--child", str(killed), mode],
                             stdout=subprocess.PIPE, text=True)
    for line in child.stdout:
        if int(line) >= kill_after:
            break
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    committed = raw_values(killed / "all")
    assert b"__keys__" not in committed and not list(killed.glob("*.json"))
    if mode == "paused":  # 15 puts of ~1.1 KB; 6 KB batches committed after puts 6 and 12, 3 lost
        assert len(committed) == 12
    _finish(killed, skip_done=(mode == "paused"))
    assert _store_files(killed) == _store_files(reference)
    keys = json.loads(_store_files(killed)["values"][b"__keys__"])
    assert keys == sorted(f"coco:{i}" for i in range(N_RESUME))

    # Reopening a finished store to add one more image un-finishes it until close.
    w = ImgDbWriter(killed, **RESUME_CFG)
    w.put("coco:extra", **make_image(99))
    assert not list(killed.glob("*.json"))
    w.close()
    assert len(ImgDb(killed)) == N_RESUME + 1


if __name__ == "__main__" and sys.argv[1] == "--child":
    _child_writer(sys.argv[2], sys.argv[3])
