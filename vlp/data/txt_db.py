"""Text store in UNITER's txt_db layout: one LMDB dir of tokenized examples plus JSON sidecars.

What UNITER does, confirmed from github.com/ChenRocks/UNITER (``data/data.py``, ``prepro.py``):

* ``TxtLmdb`` keys are the text ids, ``key.encode('utf-8')``; values are
  ``lz4.frame.compress(msgpack.dumps(example, use_bin_type=True))`` (msgpack_numpy is patched in but the
  examples hold only plain values), read back with ``msgpack.loads(decompress(value), raw=False)``. Puts are
  committed every 1000 examples. The LMDB files live directly in the ``<name>.db/`` dir, next to the sidecars.
* An example holds at least ``input_ids`` (WordPiece ids WITHOUT [CLS]/[SEP]; ``combine_inputs`` adds them)
  and ``img_fname`` (the image's key in the img_db), plus task fields.
* ``meta.json`` is ``vars(opts)`` of ``prepro.py`` plus ``toker``/``tokenizer`` (the BERT name), ``UNK``,
  ``CLS``, ``SEP``, ``MASK`` and ``v_range`` = [id of '!', vocab size]; ``TxtTokLmdb`` reads CLS, SEP, MASK
  and v_range. ``id2len.json``: text id -> number of input ids. ``txt2img.json``: text id -> img_fname.
  ``img2txts.json`` (pretraining and retrieval DBs): img_fname -> list of text ids.
* ``TxtTokLmdb(db_dir, max_txt_len=60)`` drops (does not truncate) examples longer than ``max_txt_len``.

Our writer stores ``input_ids`` (truncated by the caller), ``img_fname`` (the canonical image key, e.g.
``coco:57870``), ``raw`` (the caption) and ``dataset`` (the corpus), writes all four sidecars, and adds to
meta.json ``PAD``, ``vocab_size``, ``do_lower_case``, ``max_txt_len`` and where the tokenizer dir is. The
whole DB is built in a hidden sibling dir and renamed into place on close, so a killed build never leaves a
half-written ``<name>.db``. ``TxtDb`` reads stores written by either side.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lmdb
import lz4.frame
import msgpack

from vlp.data.img_db import ProcessLocalReader

META_FILE = "meta.json"
ID2LEN_FILE = "id2len.json"
TXT2IMG_FILE = "txt2img.json"
IMG2TXTS_FILE = "img2txts.json"
# meta.json keys a reader needs (what UNITER's TxtTokLmdb reads).
REQUIRED_META = ("CLS", "SEP", "MASK", "v_range")
_COMMIT_EVERY = 1000
_INITIAL_MAP_SIZE = 64 << 20


class TxtDbError(ValueError):
    """Bad input to the writer or a missing / corrupt entry in a store; the message names the path and key."""


def encode_example(example: Mapping[str, Any]) -> bytes:
    return lz4.frame.compress(msgpack.packb(dict(example), use_bin_type=True))


def decode_example(raw) -> dict:
    """Inverse of :func:`encode_example`; raises ValueError with the reason on a corrupt value."""
    try:
        example = msgpack.unpackb(lz4.frame.decompress(raw), raw=False)
    except Exception as e:  # lz4 raises RuntimeError, msgpack a zoo of types
        raise ValueError(f"not lz4-compressed msgpack ({type(e).__name__}: {e})") from None
    if not isinstance(example, dict):
        raise ValueError(f"expected a map, got {type(example).__name__}")
    ids = example.get("input_ids")
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):
        raise ValueError("field input_ids is not a list of ints")
    if "img_fname" not in example:
        raise ValueError("field img_fname is missing")
    return example


class TxtDbWriter:
    """Builds ``path`` (a ``<name>.db`` dir): ``add`` examples, then ``close`` writes sidecars and renames.

    As a context manager, an exception discards the partial build and leaves an earlier ``path`` as it was.
    """

    def __init__(self, path: str | os.PathLike, meta: Mapping[str, Any]):
        self.path = Path(path)
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing:
            raise TxtDbError(f"{self.path}: meta lacks {missing}")
        self.meta = dict(meta)
        self._tmp = self.path.with_name(f".{self.path.name}.partial")
        shutil.rmtree(self._tmp, ignore_errors=True)  # left by a killed build
        self._tmp.parent.mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(str(self._tmp), map_size=_INITIAL_MAP_SIZE)
        self.id2len: dict[str, int] = {}
        self.txt2img: dict[str, str] = {}
        self._pending: dict[bytes, bytes] = {}

    def __enter__(self) -> TxtDbWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def add(self, txt_id: str, example: Mapping[str, Any]) -> None:
        """Store one example; it needs ``input_ids`` (list of int, no [CLS]/[SEP]) and ``img_fname`` (str)."""
        where = f"{self.path}: text id {txt_id!r}"
        if not isinstance(txt_id, str) or not txt_id:
            raise TxtDbError(f"{self.path}: text id {txt_id!r} must be a non-empty string")
        if txt_id in self.id2len:
            raise TxtDbError(f"{where}: added twice")
        ids = example.get("input_ids")
        if not isinstance(ids, list) or not all(type(i) is int and i >= 0 for i in ids):
            raise TxtDbError(f"{where}: field input_ids must be a list of non-negative ints")
        img = example.get("img_fname")
        if not isinstance(img, str) or not img:
            raise TxtDbError(f"{where}: field img_fname must be a non-empty string, got {img!r}")
        self._pending[txt_id.encode("utf-8")] = encode_example(example)
        self.id2len[txt_id] = len(ids)
        self.txt2img[txt_id] = img
        if len(self._pending) >= _COMMIT_EVERY:
            self._flush()

    def close(self) -> Path:
        """Commit, write meta.json and the id2len / txt2img / img2txts sidecars, rename into ``path``."""
        self._flush()
        self._env.close()
        img2txts: dict[str, list[str]] = {}
        for txt_id, img in self.txt2img.items():
            img2txts.setdefault(img, []).append(txt_id)
        sidecars = {META_FILE: self.meta, ID2LEN_FILE: self.id2len, TXT2IMG_FILE: self.txt2img,
                    IMG2TXTS_FILE: img2txts}
        for name, content in sidecars.items():
            (self._tmp / name).write_text(json.dumps(content, indent=2 if name == META_FILE else None))
        replace_dir(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._env.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _flush(self) -> None:
        while self._pending:
            try:
                with self._env.begin(write=True) as txn:
                    for k, v in self._pending.items():
                        txn.put(k, v)
                self._pending = {}
            except lmdb.MapFullError:
                # The failed transaction was aborted by the context manager; grow and redo the batch.
                self._env.set_mapsize(self._env.info()["map_size"] * 2)


def replace_dir(src: Path, dst: Path) -> None:
    """Rename the finished dir ``src`` to ``dst``, replacing an earlier ``dst``."""
    # rename() cannot replace a non-empty dir: move the old one aside first, so dst is always whole or absent.
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old)
    else:
        os.rename(src, dst)


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TxtDbError(f"{path}: missing ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TxtDbError(f"{path}: not valid JSON ({e})") from None


class TxtDb(ProcessLocalReader):
    """Reader of a ``<name>.db`` txt_db, ours or UNITER's.

    ``ids`` (in id2len.json order), ``id2len``, ``txt2img``, ``img2txts`` (derived from txt2img when the
    store has no img2txts.json, as UNITER's NLVR2 / RE DBs) and ``meta`` are loaded at construction;
    ``db[txt_id]`` decodes one example. The LMDB env is opened readonly without locks, lazily in each process
    that reads, so the object pickles and survives fork (DataLoader workers, Ray actors).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "data.mdb").is_file():
            raise TxtDbError(f"{self.path}: not a txt_db (no data.mdb)")
        self.meta: dict = _read_json(self.path / META_FILE, "txt_db meta")
        if not isinstance(self.meta, dict):
            raise TxtDbError(f"{self.path / META_FILE}: expected a JSON object")
        missing = [k for k in REQUIRED_META if k not in self.meta]
        if missing:
            raise TxtDbError(f"{self.path / META_FILE}: lacks key(s) {missing}")
        self.id2len: dict[str, int] = _read_json(self.path / ID2LEN_FILE, "text id -> length")
        if not isinstance(self.id2len, dict) or not all(type(n) is int for n in self.id2len.values()):
            raise TxtDbError(f"{self.path / ID2LEN_FILE}: expected an object mapping text id -> length")
        self.txt2img: dict = _read_json(self.path / TXT2IMG_FILE, "text id -> image")
        if not isinstance(self.txt2img, dict):
            raise TxtDbError(f"{self.path / TXT2IMG_FILE}: expected an object mapping text id -> image")
        lost = next((i for i in self.id2len if i not in self.txt2img), None)
        if lost is not None:
            raise TxtDbError(f"{self.path / TXT2IMG_FILE}: text id {lost!r} of {ID2LEN_FILE} has no image")
        img2txts_file = self.path / IMG2TXTS_FILE
        if img2txts_file.is_file():
            self.img2txts: dict[str, list[str]] = _read_json(img2txts_file, "image -> text ids")
        else:
            self.img2txts = _derive_img2txts(self.txt2img)
        self.ids: list[str] = list(self.id2len)
        self._env_dir = self.path

    def _open_error(self, err: lmdb.Error) -> Exception:
        return TxtDbError(f"{self.path}: cannot open LMDB ({err})")

    def __len__(self) -> int:
        return len(self.id2len)

    def __contains__(self, txt_id: str) -> bool:
        return txt_id in self.id2len

    def __getitem__(self, txt_id: str) -> dict:
        with self._env_here().begin(buffers=True) as txn:
            raw = txn.get(txt_id.encode("utf-8"))
            if raw is None:
                raise TxtDbError(f"{self.path}: text id {txt_id!r} not found")
            try:
                return decode_example(raw)
            except ValueError as e:
                raise TxtDbError(f"{self.path}: key {txt_id!r}: corrupt entry: {e}") from None


def _derive_img2txts(txt2img: Mapping[str, Any]) -> dict[str, list[str]]:
    # NLVR2 examples point at an image pair (a list); each image lists the text.
    out: dict[str, list[str]] = {}
    for txt_id, img in txt2img.items():
        for name in img if isinstance(img, list) else [img]:
            out.setdefault(name, []).append(txt_id)
    return out
