"""Image-text pairs for UNITER pretraining: text dbs (txt_db layout) joined with one region-feature store.

Everything the batch sampler needs (which examples exist, their text and region counts) is known at
construction from ``id2len`` / ``txt2img`` and the store's ``name2nbb``, without reading either LMDB.
Captions whose image is not in the store (it failed to download or to featurize) are dropped here and
counted, so the stage can report them instead of failing mid-epoch.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from vlp.data.img_db import ImgDb

MISSING_IMAGE = "image not in the feature store"
# meta.json fields that must agree between text dbs read together (same tokenizer).
_TOKENIZER_KEYS = ("CLS", "SEP", "MASK", "UNK", "PAD", "v_range", "vocab_digest")


class TxtDbLike(Protocol):
    """What the dataset reads from a text db (``vlp.data.txt_db.TxtDb`` has it)."""

    ids: Sequence[str]
    id2len: Mapping[str, int]
    txt2img: Mapping[str, str]
    meta: Mapping[str, Any]

    def __getitem__(self, txt_id: str) -> Mapping[str, Any]: ...


class PretrainDataError(ValueError):
    """Inconsistent or corrupt text / image data; the message names the db and the record."""


def _db_name(db: TxtDbLike, k: int) -> str:
    path = getattr(db, "path", None)
    return str(path) if path is not None else f"text db #{k}"


class PretrainDataset(Dataset):
    """Example ``i`` = caption ``txt_ids[i]`` with its image ``img_keys[i]``.

    ``max_txt_len`` caps the caption tokens (without [CLS]/[SEP]); longer captions are truncated, not
    dropped, so that every image-caption pair is used (``truncated`` counts them).
    """

    def __init__(
        self, txt_dbs: TxtDbLike | Sequence[TxtDbLike], img_db: ImgDb, max_txt_len: int | None = None
    ):
        dbs = list(txt_dbs) if isinstance(txt_dbs, list | tuple) else [txt_dbs]
        if not dbs:
            raise PretrainDataError("PretrainDataset needs at least one text db")
        if max_txt_len is not None and max_txt_len < 0:
            raise PretrainDataError(f"max_txt_len must be >= 0, got {max_txt_len}")
        self.txt_dbs = dbs
        self.img_db = img_db
        self.max_txt_len = max_txt_len
        self.meta = _common_meta(dbs)
        self.cls_id, self.sep_id = int(self.meta["CLS"]), int(self.meta["SEP"])

        db_index, txt_ids, img_keys, txt_lens, img_lens = [], [], [], [], []
        missing: Counter[str] = Counter()
        truncated = 0
        name2nbb = img_db.name2nbb
        for k, db in enumerate(dbs):
            id2len, txt2img = db.id2len, db.txt2img
            for txt_id in db.ids:
                try:
                    n_tok, img_key = int(id2len[txt_id]), txt2img[txt_id]
                except KeyError as e:
                    raise PretrainDataError(f"{_db_name(db, k)}: text {txt_id!r} is missing from "
                                            f"{'id2len' if txt_id not in id2len else 'txt2img'}.json") from e
                if not isinstance(img_key, str):
                    raise PretrainDataError(f"{_db_name(db, k)}: text {txt_id!r}: txt2img.json gives "
                                            f"{img_key!r}, not one image key")
                nbb = name2nbb.get(img_key)
                if nbb is None:
                    missing[img_key] += 1
                    continue
                if max_txt_len is not None and n_tok > max_txt_len:
                    truncated += 1
                    n_tok = max_txt_len
                db_index.append(k)
                txt_ids.append(txt_id)
                img_keys.append(img_key)
                txt_lens.append(n_tok + 2)  # + [CLS] and [SEP]
                img_lens.append(nbb)
        self._db_index = np.asarray(db_index, dtype=np.int32)
        self.txt_ids: list[str] = txt_ids
        self.img_keys: list[str] = img_keys
        self.txt_lens = np.asarray(txt_lens, dtype=np.int64)
        self.img_lens = np.asarray(img_lens, dtype=np.int64)
        self.truncated = truncated
        # Image key -> number of captions dropped because the store lacks that image.
        self.missing_images: dict[str, int] = dict(sorted(missing.items()))
        self.dropped: dict[str, int] = {MISSING_IMAGE: sum(missing.values())} if missing else {}

    @property
    def lengths(self) -> np.ndarray:
        """Input units per example: text tokens incl. [CLS]/[SEP] plus regions."""
        return self.txt_lens + self.img_lens

    @property
    def db_index(self) -> np.ndarray:
        """Int[E]: which of ``txt_dbs`` each example's text comes from."""
        return self._db_index

    def drop_summary(self) -> list[str]:
        """One line per reason, e.g. ``412 captions dropped (97 images): image not in the feature store``."""
        if not self.dropped:
            return []
        return [f"{self.dropped[MISSING_IMAGE]} captions dropped ({len(self.missing_images)} images): "
                f"{MISSING_IMAGE}"]

    def __len__(self) -> int:
        return len(self.txt_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.pair(i, self.img_keys[i])

    def pair(self, i: int, img_key: str) -> dict[str, Any]:
        """Caption ``i`` with any image of the store (retrieval scoring, hand-made negatives)."""
        k = int(self._db_index[i])
        db, txt_id = self.txt_dbs[k], self.txt_ids[i]
        record = db[txt_id]
        where = f"{_db_name(db, k)}: text {txt_id!r}"
        tokens = record.get("input_ids")
        if not isinstance(tokens, list | tuple):
            raise PretrainDataError(f"{where}: field input_ids is missing or not a list")
        if self.max_txt_len is not None:
            tokens = tokens[: self.max_txt_len]
        if len(tokens) + 2 != self.txt_lens[i]:
            # The sampler packed batches by id2len; a mismatch would break the unit budget.
            raise PretrainDataError(f"{where}: field input_ids has {len(tokens)} tokens but id2len.json "
                                    f"says {int(self.txt_lens[i]) - 2}")
        if img_key == self.img_keys[i] and record.get("img_fname", img_key) != img_key:
            raise PretrainDataError(f"{where}: field img_fname {record.get('img_fname')!r} differs from "
                                    f"txt2img.json ({img_key!r})")
        region = self.img_db.get(img_key)
        example = {
            "input_ids": torch.tensor([self.cls_id, *tokens, self.sep_id], dtype=torch.long),
            "img_feat": region.features,
            "img_pos_feat": region.boxes,
            "soft_labels": region.soft_labels,
            "img_key": img_key,
            "txt_id": txt_id,
        }
        return self.extend(example, record, i, img_key)

    def extend(self, example: dict[str, Any], record: Mapping[str, Any], i: int, img_key: str
               ) -> dict[str, Any]:
        """What a subclass adds to an example from its record (vlp.data.alignment: the alignment targets)."""
        return example

    def select(self, indices: Sequence[int] | np.ndarray) -> PretrainDataset:
        """A dataset of the given examples (same dbs, no LMDB reads); drop counts stay with the parent."""
        idx = np.asarray(indices, dtype=np.int64)
        sub = object.__new__(type(self))  # a subclass stays itself (its examples)
        sub.__dict__.update(self.__dict__)
        sub._db_index = self._db_index[idx]
        sub.txt_ids = [self.txt_ids[j] for j in idx]
        sub.img_keys = [self.img_keys[j] for j in idx]
        sub.txt_lens, sub.img_lens = self.txt_lens[idx], self.img_lens[idx]
        return sub

    def split_by_image(self, held_out: float | int, seed: int = 0) -> tuple[PretrainDataset, PretrainDataset]:
        """(train, held-out) with no image in both, so validation ITM/retrieval never sees a training image.

        ``held_out`` is a fraction of the images (0 < x < 1) or an image count. The choice depends only on
        the image keys and ``seed`` (a keyed hash), not on the order of the dbs, so it is stable across runs.
        """
        images = sorted(set(self.img_keys))
        n_held = round(held_out * len(images)) if isinstance(held_out, float) else int(held_out)
        if not (0 < held_out < 1 if isinstance(held_out, float) else 0 <= n_held <= len(images)):
            raise PretrainDataError(f"held_out={held_out!r}: need a fraction in (0, 1) or a count in "
                                    f"[0, {len(images)}]")

        def rank(key: str) -> bytes:
            return hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()

        held = set(sorted(images, key=rank)[:n_held])
        in_held = np.fromiter((k in held for k in self.img_keys), dtype=bool, count=len(self))
        return self.select(np.flatnonzero(~in_held)), self.select(np.flatnonzero(in_held))


def _common_meta(dbs: Sequence[TxtDbLike]) -> dict[str, Any]:
    """The first db's meta.json, after checking that every db shares its tokenizer (special ids, vocab)."""
    first = None
    for k, db in enumerate(dbs):
        meta = {key: db.meta.get(key) for key in _TOKENIZER_KEYS}
        for key in ("CLS", "SEP"):
            if not isinstance(meta[key], int):
                raise PretrainDataError(f"{_db_name(db, k)}: meta.json field {key} is missing or not an int")
        if first is None:
            first = meta
        elif meta != first:
            diff = sorted(key for key in _TOKENIZER_KEYS if meta[key] != first[key])
            raise PretrainDataError(f"{_db_name(db, k)}: meta.json tokenizer fields {diff} differ from "
                                    f"{_db_name(dbs[0], 0)} (text dbs built with different tokenizers)")
    return dict(dbs[0].meta)


@dataclass(frozen=True)
class ImageTextIndex:
    """The unique images and texts of one split with the text -> image ground truth (zero-shot retrieval).

    Text ``j`` is example ``j`` of the dataset it was built from, so ``dataset.pair(j, img_keys[m])``
    gives the input for scoring text ``j`` against image ``m``.
    """

    img_keys: tuple[str, ...]
    txt_ids: tuple[str, ...]
    txt2img: torch.Tensor  # Long[T]: index into img_keys of each text's image

    @classmethod
    def from_dataset(cls, dataset: PretrainDataset) -> ImageTextIndex:
        dup = [t for t, c in Counter(dataset.txt_ids).items() if c > 1]
        if dup:
            raise PretrainDataError(f"text id {dup[0]!r} occurs {dataset.txt_ids.count(dup[0])} times in the "
                                    f"split; retrieval needs unique text ids")
        img_keys = tuple(dict.fromkeys(dataset.img_keys))
        pos = {k: m for m, k in enumerate(img_keys)}
        txt2img = torch.tensor([pos[k] for k in dataset.img_keys], dtype=torch.long)
        return cls(img_keys, tuple(dataset.txt_ids), txt2img)

    def positives(self) -> torch.Tensor:
        """Bool[T, I]: True where text t describes image i."""
        out = torch.zeros(len(self.txt_ids), len(self.img_keys), dtype=torch.bool)
        out[torch.arange(len(self.txt_ids)), self.txt2img] = True
        return out

    def img2txts(self) -> list[list[int]]:
        """For each image, the indices of its texts (image -> text retrieval ground truth)."""
        out: list[list[int]] = [[] for _ in self.img_keys]
        for t, m in enumerate(self.txt2img.tolist()):
            out[m].append(t)
        return out
