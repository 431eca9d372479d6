"""Region-feature store in UNITER's img_db layout: one LMDB of per-image detector outputs.

What UNITER does, confirmed from github.com/ChenRocks/UNITER (HEAD 1dbfa62):

* ``scripts/convert_imgdir.py`` turns a directory of BUTD ``.npz`` files into
  ``<out>/<split>/<db_name>/`` (an LMDB dir) with ``db_name`` = ``feat_th{conf_th}_max{max_bb}_min{min_bb}``
  (arrays already cut to the per-image box count), ``all`` (``--keep_all``: every box kept, no sidecar)
  or ``feat_numbb{num_bb}`` (``conf_th == -1``), plus ``_compressed`` when ``--compress``.
  Keys are the npz basenames, ``fname.encode('utf-8')`` (e.g. ``nlvr2_dev-850-0-img0.npz``).
  Values: ``msgpack.dumps(dump, use_bin_type=True)`` under ``msgpack_numpy.patch()``, or, compressed,
  the bytes of ``np.savez_compressed`` (an npz archive, not gzip'd msgpack). float32 arrays are cast to
  float16; every array must be 1-d or 2-d. Puts are committed every 1000 images; a last put stores
  ``b'__keys__'`` = JSON list of all image keys. The sidecar ``<out>/<split>/nbb_th{conf_th}_max{max_bb}
  _min{min_bb}.json`` maps key -> box count (written next to the LMDB dir, not inside it).
* The count is ``_compute_nbb`` = ``min(max_bb, max(min_bb, (conf > conf_th).sum()))``: a strict ``>``,
  and not clipped to the number of boxes actually present.
* ``data/data.py`` ``DetectFeatLmdb(img_dir, conf_th=0.2, max_bb=100, min_bb=10, num_bb=36, compress=True)``
  loads the sidecar and opens ``feat_th…`` (``all`` when there is no sidecar, then counts boxes from
  ``__keys__``; that branch reads ``self.conf_th`` which ``__init__`` never sets, so it would raise
  AttributeError); it opens readonly with one long-lived ``begin(buffers=True)`` transaction.
  ``__getitem__`` returns ``features[:nbb]`` and ``norm_bb[:nbb]`` as float32 tensors; ``get_dump``
  (used for MRC, which also needs ``soft_labels``) casts every fp16 array to fp32 and cuts it to ``nbb``.
  ``_get_img_feat`` appends the area: ``cat([bb, bb[:, 4:5] * bb[:, 5:]])`` -> 7-d
  ``[x1, y1, x2, y2, w, h, w*h]`` computed in float32. ``utils/const.py``: IMG_DIM 2048, IMG_LABEL_DIM 1601
  (1600 Visual Genome classes + background).
* The BUTD extractor (generate_npz.py in UNITER's ``chenrocks/butd-caffe`` image, seen via a public copy)
  stores ``norm_bb`` (x1/W, y1/H, x2/W, y2/H, w/W, h/H), ``features``, ``conf`` (shape N x 1!) and
  ``soft_labels`` (class scores incl. background), all float16, boxes sorted by descending confidence.

Our store, at ``path`` (the ``<split>`` dir of UNITER), is UNITER's keep-all variant: LMDB ``all``
(``all_compressed`` when compressed) holding every box, ``__keys__``, and one sidecar per configured
(conf_th, max_bb, min_bb); the box count is applied when reading. ``ImgDb.get`` returns float32
tensors like ``DetectFeatLmdb`` + ``_get_img_feat`` (and the soft labels ``get_dump`` gives MRC).
Differences, on purpose:
``conf`` is float32 and 1-d (fp16 moves values across the threshold: 0.2 becomes 0.19995), the count
is also clipped to the boxes present, and rows must already be sorted by descending confidence.

Resumability: one env, put-by-key. Re-putting a key overwrites it with identical bytes, a batch is
committed atomically, so a writer killed at any point leaves only whole committed images; reopening
the same path and writing everything again (or skipping ``key in writer``) ends in the same store.
``__keys__`` and the sidecars are rebuilt from the LMDB contents on close.
"""

from __future__ import annotations

import io
import json
import os
import threading
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import lmdb
import numpy as np
import torch

from vlp.data.msgpack_codec import CodecError, pack_arrays, unpack_arrays

KEYS_ENTRY = b"__keys__"
DEFAULT_NBB = ((0.2, 100, 10),)
# How far a normalized coordinate may stray outside [0, 1] and w/h from x2-x1 / y2-y1 (input rounding).
_BOX_TOL = 1e-3


class ImgDbError(ValueError):
    """Bad input to the writer or a missing / corrupt entry in a store; the message names path and key."""


class RegionFeatures(NamedTuple):
    features: torch.Tensor  # nbb x D float32
    boxes: torch.Tensor  # nbb x 7 float32: x1, y1, x2, y2, w, h, w*h (normalized)
    soft_labels: torch.Tensor  # nbb x (C+1) float32, detector class distribution incl. background


def compute_num_bb(conf: np.ndarray, conf_th: float, max_bb: int, min_bb: int) -> int:
    """UNITER's dynamic box count, additionally clipped to the boxes present."""
    n_above = int((np.asarray(conf).reshape(-1) > conf_th).sum())
    return min(max_bb, max(min_bb, n_above), int(np.asarray(conf).size))


def nbb_sidecar_name(conf_th: float, max_bb: int, min_bb: int) -> str:
    # float() so that 0 and 0.0 give UNITER's argparse spelling "0.0".
    return f"nbb_th{float(conf_th)}_max{int(max_bb)}_min{int(min_bb)}.json"


def _keep_all_dir_name(compress: bool) -> str:
    return "all_compressed" if compress else "all"


def _lmdb_dir_names(conf_th: float, max_bb: int, min_bb: int, compress: bool) -> tuple[str, str]:
    """The dirs UNITER's reader may open for this config: the cut-down one first, then keep-all."""
    suffix = "_compressed" if compress else ""
    return f"feat_th{float(conf_th)}_max{int(max_bb)}_min{int(min_bb)}{suffix}", _keep_all_dir_name(compress)


def _check_nbb_config(conf_th: float, max_bb: int, min_bb: int) -> None:
    if conf_th < 0:
        raise ImgDbError(f"conf_th={conf_th}: UNITER's fixed-count layout (conf_th=-1, feat_numbb*) "
                         "is not supported")
    if not (0 <= min_bb <= max_bb and max_bb >= 1):
        raise ImgDbError(f"bad box-count config (conf_th={conf_th}, max_bb={max_bb}, min_bb={min_bb}): "
                         "need 0 <= min_bb <= max_bb and max_bb >= 1")


def _encode_npz(arrays: Mapping[str, np.ndarray]) -> bytes:
    with io.BytesIO() as buf:
        np.savez_compressed(buf, **arrays)
        return buf.getvalue()


def _decode_value(raw, compress: bool, db_dir: Path, key: str) -> dict[str, np.ndarray]:
    try:
        arrays = _decode_npz(raw) if compress else unpack_arrays(raw)
    except CodecError as e:
        raise ImgDbError(f"{db_dir}: key {key!r}: corrupt entry: {e}") from None
    missing = {"features", "norm_bb", "conf"} - arrays.keys()
    if missing:
        raise ImgDbError(f"{db_dir}: key {key!r}: corrupt entry: missing field(s) {sorted(missing)}")
    return arrays


def _decode_npz(buf) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(buf), allow_pickle=False) as npz:
            # Old numpy's savez took UNITER's ``allow_pickle=True`` as one more (0-d) array; skip such extras.
            return {name: arr for name in npz.files if (arr := npz[name]).ndim > 0}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise CodecError(f"not a valid npz archive ({type(e).__name__}: {e})") from None


class ImgDbWriter:
    """Writes images into ``<path>/all`` (``all_compressed``); finalize with ``close()`` or a ``with`` block.

    ``nbb_configs`` lists the (conf_th, max_bb, min_bb) triples whose sidecars are written on close.
    Puts are buffered and committed in one transaction per ``batch_bytes`` of encoded values; the map
    doubles whenever a batch does not fit. One writer per store at a time (close rebuilds the key list).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        compress: bool = False,
        nbb_configs: Iterable[tuple[float, int, int]] = DEFAULT_NBB,
        batch_bytes: int = 64 << 20,
        map_size: int = 1 << 30,
    ):
        self.path = Path(path)
        self.compress = compress
        self.nbb_configs = tuple(dict.fromkeys((float(t), int(mx), int(mn)) for t, mx, mn in nbb_configs))
        for cfg in self.nbb_configs:
            _check_nbb_config(*cfg)
        self.batch_bytes = batch_bytes
        self.db_dir = self.path / _keep_all_dir_name(compress)
        self.db_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._env = lmdb.open(str(self.db_dir), map_size=map_size, readahead=False, meminit=False)
        except lmdb.Error as e:
            raise ImgDbError(f"{self.db_dir}: cannot open for writing ({e}); close every ImgDb reading this "
                             "store in this process first") from None
        # Reopening a finished store to add images un-finishes it until close(), so that a run killed
        # now cannot leave a key list or sidecar that looks complete but misses the new images.
        for stale in self.path.glob("nbb_th*_max*_min*.json"):
            stale.unlink()
        with self._env.begin(write=True) as txn:
            txn.delete(KEYS_ENTRY)
        self._pending: dict[bytes, bytes] = {}
        self._pending_bytes = 0
        # Box counts of images put by this process; images committed by an earlier, killed run are
        # re-read on close instead.
        self._nbb: dict[str, tuple[int, ...]] = {}
        self._closed = False

    def __enter__(self) -> ImgDbWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            # Keep the validated images written so far (a rerun resumes), but do not finalize.
            self._flush()
            self._env.close()
            self._closed = True

    def __contains__(self, key: str) -> bool:
        kb = key.encode("utf-8")
        if kb in self._pending:
            return True
        with self._env.begin() as txn:
            return txn.get(kb) is not None

    def put(
        self,
        key: str,
        *,
        features: np.ndarray,
        norm_bb: np.ndarray,
        conf: np.ndarray,
        soft_labels: np.ndarray,
        attr_labels: np.ndarray | None = None,
    ) -> None:
        if self._closed:
            raise ImgDbError(f"{self.db_dir}: writer is closed")
        kb = key.encode("utf-8") if isinstance(key, str) else b""
        if not kb or kb == KEYS_ENTRY or len(kb) > self._env.max_key_size():
            raise ImgDbError(f"{self.db_dir}: bad image key {key!r} (empty, reserved or over "
                             f"{self._env.max_key_size()} bytes)")
        where = f"{self.db_dir}: key {key!r}"
        dump = _validated_dump(where, features, norm_bb, conf, soft_labels, attr_labels)
        value = _encode_npz(dump) if self.compress else pack_arrays(dump)
        self._nbb[key] = tuple(compute_num_bb(dump["conf"], *cfg) for cfg in self.nbb_configs)
        self._pending_bytes += len(value) - len(self._pending.get(kb, b""))
        self._pending[kb] = value
        if self._pending_bytes >= self.batch_bytes:
            self._flush()

    def close(self) -> None:
        """Commit, then write ``__keys__`` and the nbb sidecars (atomic renames)."""
        if self._closed:
            return
        self._flush()
        with self._env.begin() as txn:
            stored = txn.cursor().iternext(keys=True, values=False)
            keys = [k.decode("utf-8") for k in stored if k != KEYS_ENTRY]
        self._put_batch({KEYS_ENTRY: json.dumps(keys).encode("utf-8")})
        with self._env.begin(buffers=True) as txn:
            for k in keys:
                if k not in self._nbb:
                    conf = _decode_value(txn.get(k.encode("utf-8")), self.compress, self.db_dir, k)["conf"]
                    self._nbb[k] = tuple(compute_num_bb(conf, *cfg) for cfg in self.nbb_configs)
        for i, cfg in enumerate(self.nbb_configs):
            sidecar = self.path / nbb_sidecar_name(*cfg)
            tmp = sidecar.with_suffix(".json.tmp")
            tmp.write_text(json.dumps({k: self._nbb[k][i] for k in keys}))
            os.replace(tmp, sidecar)
        self._env.close()
        self._closed = True

    def _flush(self) -> None:
        if self._pending:
            self._put_batch(self._pending)
            self._pending = {}
            self._pending_bytes = 0

    def _put_batch(self, items: Mapping[bytes, bytes]) -> None:
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    for k, v in items.items():
                        txn.put(k, v)
                return
            except lmdb.MapFullError:
                # The failed transaction was aborted by the context manager; grow and redo the batch.
                self._env.set_mapsize(self._env.info()["map_size"] * 2)


def _validated_dump(where, features, norm_bb, conf, soft_labels, attr_labels) -> dict[str, np.ndarray]:
    def matrix(name, arr, dtype, width=None):
        a = np.asarray(arr)
        if a.ndim != 2 or a.dtype.kind not in "biuf" or (width is not None and a.shape[1] != width):
            shape = f"N x {width}" if width else "2-d"
            raise ImgDbError(f"{where}: field {name} must be a numeric {shape} array, "
                             f"got {a.dtype} {a.shape}")
        with np.errstate(over="ignore"):  # overflow to inf is reported just below, naming the field
            out = a.astype(dtype)
        if not np.isfinite(out).all():
            raise ImgDbError(f"{where}: field {name} has non-finite values "
                             f"(after casting to {np.dtype(dtype)})")
        return out

    feats = matrix("features", features, np.float16)
    n = feats.shape[0]
    if n == 0:
        raise ImgDbError(f"{where}: field features has no regions")
    bb_in = matrix("norm_bb", norm_bb, np.float64, width=6)
    labels = matrix("soft_labels", soft_labels, np.float16)
    conf_in = np.asarray(conf)
    if conf_in.ndim == 2 and conf_in.shape[1] == 1:  # BUTD stores conf as N x 1
        conf_in = conf_in[:, 0]
    if conf_in.ndim != 1 or conf_in.dtype.kind not in "biuf":
        raise ImgDbError(f"{where}: field conf must be a numeric N or N x 1 array, "
                         f"got {conf_in.dtype} {conf_in.shape}")
    confs = conf_in.astype(np.float32)
    dump = {"features": feats, "norm_bb": bb_in.astype(np.float16), "conf": confs, "soft_labels": labels}
    if attr_labels is not None:
        dump["attr_labels"] = matrix("attr_labels", attr_labels, np.float16)
    for name, arr in dump.items():
        if arr.shape[0] != n:
            raise ImgDbError(f"{where}: field {name} has {arr.shape[0]} rows but features has {n}")
    if not np.isfinite(confs).all():
        raise ImgDbError(f"{where}: field conf has non-finite values")
    if (bad := np.flatnonzero(confs[1:] > confs[:-1])).size:
        i = int(bad[0])
        raise ImgDbError(f"{where}: field conf must be sorted descending, row {i + 1} ({confs[i + 1]:.6g}) "
                         f"> row {i} ({confs[i]:.6g})")
    if ((labels < 0) | (labels > 1 + _BOX_TOL)).any():
        raise ImgDbError(f"{where}: field soft_labels must be probabilities in [0, 1]")
    _check_boxes(where, bb_in)
    return dump


def _check_boxes(where: str, bb: np.ndarray) -> None:
    x1, y1, x2, y2, w, h = bb.T
    checks = (
        (((bb < -_BOX_TOL) | (bb > 1 + _BOX_TOL)).any(axis=1), "coordinates outside [0, 1]"),
        ((x2 < x1) | (y2 < y1), "x2 < x1 or y2 < y1"),
        ((np.abs(w - (x2 - x1)) > _BOX_TOL) | (np.abs(h - (y2 - y1)) > _BOX_TOL),
         "w/h differ from x2-x1 / y2-y1"),
    )
    for bad, why in checks:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ImgDbError(f"{where}: field norm_bb row {i} {bb[i].round(4).tolist()}: {why}")


_shared_envs: dict[str, list] = {}  # realpath of an LMDB dir -> [readonly env, number of ImgDb users]
_shared_envs_lock = threading.Lock()


def _drop_inherited_envs() -> None:
    # Handles inherited through fork() must not be used, and while they exist py-lmdb counts their
    # files as open; closing them is safe for readonly, lock-free envs and leaves the parent's alone.
    global _shared_envs_lock
    _shared_envs_lock = threading.Lock()
    for env, _ in _shared_envs.values():
        env.close()
    _shared_envs.clear()


os.register_at_fork(after_in_child=_drop_inherited_envs)


def _acquire_env(db_dir: Path) -> lmdb.Environment:
    """This process's readonly env for ``db_dir``, shared by every ImgDb on it.

    py-lmdb refuses to open the same files twice in one process, and UNITER-style code opens one
    img_db from many datasets; hence one env per process and dir.
    """
    with _shared_envs_lock:
        key = os.path.realpath(db_dir)
        entry = _shared_envs.get(key)
        if entry is None:
            env = lmdb.open(key, readonly=True, lock=False, readahead=False, create=False)
            try:
                _check_complete(env, Path(key))
            except lmdb.Error:
                env.close()
                raise
            entry = _shared_envs[key] = [env, 0]
        entry[1] += 1
        return entry[0]


def _check_complete(env: lmdb.Environment, db_dir: Path) -> None:
    """A data file shorter than its pages is a truncated copy: reading it through the memory map would
    kill the process with SIGBUS at the first missing page, so it is refused when opened."""
    data = db_dir / "data.mdb"
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = data.stat().st_size
    if size < needed:
        raise lmdb.CorruptedError(f"{data} is truncated: {size:,} bytes, its pages need {needed:,}")


def _release_env(db_dir: Path) -> None:
    with _shared_envs_lock:
        key = os.path.realpath(db_dir)
        entry = _shared_envs.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                entry[0].close()
                del _shared_envs[key]


class ProcessLocalReader:
    """A readonly LMDB env at ``self._env_dir``, opened lazily in each process that reads.

    The object pickles without its env, so it can go to DataLoader workers (fork) or other processes;
    ``_open_error`` turns an lmdb failure into the reader's own one-line error.
    """

    _env_dir: Path
    _env: lmdb.Environment | None = None
    _pid: int | None = None

    def _open_error(self, err: lmdb.Error) -> Exception:
        return ImgDbError(f"{self._env_dir}: cannot open LMDB ({err})")

    def _env_here(self) -> lmdb.Environment:
        if self._pid != os.getpid():
            try:
                self._env = _acquire_env(self._env_dir)
            except lmdb.Error as e:
                raise self._open_error(e) from None
            self._pid = os.getpid()
        return self._env

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_env", "_pid")}

    def __setstate__(self, state):
        self.__dict__.update(state, _env=None, _pid=None)

    def close(self) -> None:
        """Let go of the env (closed with its last user in this process), e.g. before writing to it."""
        if self._env is not None and self._pid == os.getpid():
            _release_env(self._env_dir)
        self._env = self._pid = None


class ImgDb(ProcessLocalReader):
    """Reader with the semantics of UNITER's ``DetectFeatLmdb``; opens stores written by either side.

    ``path`` is the img_db dir holding the LMDB dir(s) and sidecars. The env is opened readonly without
    locks, lazily in each process that reads, so the object can go to DataLoader workers (fork) or be
    pickled. A short read transaction per lookup keeps it usable from several threads.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        conf_th: float = 0.2,
        max_bb: int = 100,
        min_bb: int = 10,
        compress: bool = False,
    ):
        self.path = Path(path)
        self.conf_th, self.max_bb, self.min_bb = float(conf_th), int(max_bb), int(min_bb)
        self.compress = compress
        _check_nbb_config(self.conf_th, self.max_bb, self.min_bb)
        names = _lmdb_dir_names(self.conf_th, self.max_bb, self.min_bb, compress)
        found = [self.path / n for n in names if (self.path / n / "data.mdb").is_file()]
        if not found:
            other = _lmdb_dir_names(self.conf_th, self.max_bb, self.min_bb, not compress)
            hint = [n for n in other if (self.path / n / "data.mdb").is_file()]
            raise ImgDbError(f"{self.path}: no img_db LMDB {' or '.join(names)}"
                             + (f" (found {hint[0]}: pass compress={not compress})" if hint else ""))
        self.db_dir = self._env_dir = found[0]
        try:
            self.name2nbb: dict[str, int] = self._load_name2nbb()
        except BaseException:
            self.close()
            raise

    def _load_name2nbb(self) -> dict[str, int]:
        sidecar = self.path / nbb_sidecar_name(self.conf_th, self.max_bb, self.min_bb)
        if sidecar.is_file():
            try:
                table = json.loads(sidecar.read_text())
            except json.JSONDecodeError as e:
                raise ImgDbError(f"{sidecar}: not valid JSON ({e})") from None
            if not isinstance(table, dict) or not all(isinstance(v, int) for v in table.values()):
                raise ImgDbError(f"{sidecar}: expected an object mapping image key -> box count")
            return table
        with self._env_here().begin() as txn:
            raw = txn.get(KEYS_ENTRY)
        if raw is None:
            raise ImgDbError(f"{self.db_dir}: no {KEYS_ENTRY.decode()} entry and no {sidecar.name} "
                             "(writer never closed?)")
        return {k: compute_num_bb(self.read_arrays(k)["conf"], self.conf_th, self.max_bb, self.min_bb)
                for k in json.loads(raw.decode("utf-8"))}

    def __len__(self) -> int:
        return len(self.name2nbb)

    def __contains__(self, key: str) -> bool:
        return key in self.name2nbb

    def keys(self) -> list[str]:
        return list(self.name2nbb)

    def read_arrays(self, key: str) -> dict[str, np.ndarray]:
        """All stored arrays of one image as stored: every box, stored dtypes, read-only."""
        with self._env_here().begin(buffers=True) as txn:
            raw = txn.get(key.encode("utf-8"))
            if raw is None:
                raise ImgDbError(f"{self.db_dir}: image key {key!r} not found")
            return _decode_value(raw, self.compress, self.db_dir, key)

    def _num_bb(self, key: str) -> int:
        try:
            return self.name2nbb[key]
        except KeyError:
            raise ImgDbError(f"{self.path}: image key {key!r} has no box count in "
                             f"{nbb_sidecar_name(self.conf_th, self.max_bb, self.min_bb)}") from None

    def get(self, key: str) -> RegionFeatures:
        """Features, 7-d boxes (area appended) and soft labels of the first ``name2nbb[key]`` regions."""
        arrays = self.read_arrays(key)
        nbb = self._num_bb(key)
        feats, bb = arrays["features"], arrays["norm_bb"]
        labels = arrays.get("soft_labels")
        where = f"{self.db_dir}: key {key!r}: corrupt entry"
        if labels is None:
            raise ImgDbError(f"{where}: missing field(s) ['soft_labels']")
        if feats.ndim != 2 or bb.ndim != 2 or bb.shape[1] != 6 or labels.ndim != 2:
            raise ImgDbError(f"{where}: shapes features {feats.shape}, norm_bb {bb.shape}, "
                             f"soft_labels {labels.shape} (want N x D, N x 6, N x C)")
        if not feats.shape[0] == bb.shape[0] == labels.shape[0]:
            raise ImgDbError(f"{where}: row counts differ: features {feats.shape[0]}, norm_bb {bb.shape[0]}, "
                             f"soft_labels {labels.shape[0]}")
        bb = _float32_tensor(bb[:nbb])
        boxes = torch.cat([bb, bb[:, 4:5] * bb[:, 5:6]], dim=1)
        return RegionFeatures(_float32_tensor(feats[:nbb]), boxes, _float32_tensor(labels[:nbb]))


def _float32_tensor(arr: np.ndarray) -> torch.Tensor:
    # Decoded arrays are read-only views of the LMDB value; the copy makes a tensor that owns its
    # memory. torch casts fp16 -> fp32 with F16C, several times faster than numpy's astype.
    return torch.from_numpy(arr.copy()).float()
