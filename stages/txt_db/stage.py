"""The ``txtdb`` stage: tokenized text DBs of the deduplicated captions, in UNITER's txt_db layout.

Output (``stages/outputs/txt_db.py``): ``tokenizer/`` (vlp/data/tokenizer.py: tokenizer.json,
tokenizer_config.json, vocab.txt), one ``<corpus>_<split>.db`` per corpus split (vlp/data/txt_db.py; e.g.
coco_train2014.db, flickr30k_test.db, and vg_train.db from the VG region descriptions), ``stats.json`` (per
DB: examples, images, tokens, mean / max length, truncated and empty texts; the tokenizer).

Input: ``dedup`` (``tables/captions.parquet`` and ``tables/regions.parquet``). Text ids are
``<corpus>:<caption_id>`` for captions and ``vg:region:<region_id>`` for regions; ``img_fname`` is the
image's canonical key, the key of the features stage's img_db. A text that tokenizes to nothing is left out
and counted as empty. Every DB and the tokenizer dir are renamed into place whole, so a rerun after a kill
starts clean.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from transformers import BertTokenizerFast

from stages.base import StageContext, StageError, StageResult
from stages.outputs.txt_db import TxtDbOutput
from stages.txt_db.config import TxtDbConfig
from vlp.data.tokenizer import (
    TRAINED_NAME,
    TokenizerError,
    encode,
    load_tokenizer,
    save_tokenizer,
    tokenizer_meta,
    train_wordpiece,
)
from vlp.data.txt_db import TxtDbWriter

CAPTIONS_TABLE = "tables/captions.parquet"
REGIONS_TABLE = "tables/regions.parquet"
# VG has no official caption split; UNITER's pretraining reads its region descriptions as one training set.
VG_REGION_SPLIT = "train"
_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_ENCODE_CHUNK = 10_000


@dataclass
class TextSource:
    """The texts of one future DB, in table order."""

    corpus: str
    split: str
    table: str
    txt_ids: list[str] = field(default_factory=list)
    img_keys: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    @property
    def db_name(self) -> str:
        return f"{self.corpus}_{self.split}"


def _read(dedup: Path, table: str, columns: list[str], keep: list[str]) -> tuple[pa.Table, np.ndarray]:
    """The columns of the rows of the corpora in ``keep`` and their row numbers in the file."""
    path = dedup / table
    if not path.is_file():
        raise StageError(f"{path}: missing (dedup output has no {Path(table).name})")
    try:
        missing = [c for c in columns if c not in pq.read_schema(path).names]
        if missing:
            raise StageError(f"{path}: no column(s) {missing}")
        data = pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise StageError(f"{path}: not a readable Parquet file ({' '.join(str(e).split())})") from None
    mask = pc.is_in(data.column("corpus"), value_set=pa.array(keep)).to_numpy(zero_copy_only=False)
    return data.filter(pa.array(mask)), np.flatnonzero(mask)


def _check_fields(dedup: Path, table: str, data: pa.Table, rows: np.ndarray, non_empty: list[str],
                  non_null: list[str]) -> None:
    for name in non_empty + non_null:
        col = data.column(name)
        bad = pc.is_null(col)
        if name in non_empty:
            bad = pc.or_kleene(bad, pc.equal(pc.utf8_length(col), 0))
        hits = np.flatnonzero(bad.to_numpy(zero_copy_only=False))
        if hits.size:
            raise StageError(f"{dedup / table}: row {int(rows[hits[0]])}: field {name} is "
                             f"{'null' if col[int(hits[0])].as_py() is None else 'empty'}")


class _Sources:
    """Groups rows into TextSources and checks that text ids are unique across tables."""

    def __init__(self, dedup: Path):
        self.dedup = dedup
        self.by_db: dict[tuple[str, str], TextSource] = {}
        self.seen: dict[str, tuple[str, int]] = {}  # text id -> (table, row) it came from

    def add(self, table: str, rows: list[int], corpora: list[str], splits: list[str], txt_ids: list[str],
            img_keys: list[str], texts: list[str]) -> None:
        columns = (rows, corpora, splits, txt_ids, img_keys, texts)
        for row, corpus, split, txt_id, img, text in zip(*columns, strict=True):
            if txt_id in self.seen:
                first_table, first_row = self.seen[txt_id]
                raise StageError(f"{self.dedup / table}: row {row}: text id {txt_id!r} (from corpus and id "
                                 f"fields) repeats {first_table} row {first_row}")
            self.seen[txt_id] = (table, row)
            if not _SPLIT_NAME.fullmatch(split):
                raise StageError(f"{self.dedup / table}: row {row}: field split {split!r} cannot name a DB")
            src = self.by_db.get((corpus, split))
            if src is None:
                src = self.by_db[(corpus, split)] = TextSource(corpus, split, table)
            src.txt_ids.append(txt_id)
            src.img_keys.append(img)
            src.texts.append(text)


def read_sources(dedup: Path, cfg: TxtDbConfig) -> list[TextSource]:
    """One TextSource per (corpus, split) of the configured captions, plus ``vg_train`` from VG regions."""
    sources = _Sources(dedup)
    if cfg.corpora:
        cols = ["corpus", "image_key", "caption_id", "caption", "split"]
        data, rows = _read(dedup, CAPTIONS_TABLE, cols, keep=list(cfg.corpora))
        _check_fields(dedup, CAPTIONS_TABLE, data, rows, ["image_key", "caption_id", "split"], ["caption"])
        corpora = data.column("corpus").to_pylist()
        txt_ids = [f"{c}:{i}" for c, i in zip(corpora, data.column("caption_id").to_pylist(), strict=True)]
        sources.add(CAPTIONS_TABLE, rows.tolist(), corpora, data.column("split").to_pylist(), txt_ids,
                    data.column("image_key").to_pylist(), data.column("caption").to_pylist())
        absent = [c for c in cfg.corpora if not any(k[0] == c for k in sources.by_db)]
        if absent:
            raise StageError(f"{dedup / CAPTIONS_TABLE}: no captions of corpus {absent} "
                             "(configured in txt_db.corpora)")
    if cfg.include_vg_regions:
        cols = ["corpus", "image_key", "region_id", "phrase"]
        data, rows = _read(dedup, REGIONS_TABLE, cols, keep=["vg"])
        if data.num_rows == 0:
            raise StageError(f"{dedup / REGIONS_TABLE}: no VG region descriptions "
                             "(txt_db.include_vg_regions is true)")
        _check_fields(dedup, REGIONS_TABLE, data, rows, ["image_key"], ["region_id", "phrase"])
        txt_ids = [f"vg:region:{r}" for r in data.column("region_id").to_pylist()]
        n = data.num_rows
        sources.add(REGIONS_TABLE, rows.tolist(), ["vg"] * n, [VG_REGION_SPLIT] * n, txt_ids,
                    data.column("image_key").to_pylist(), data.column("phrase").to_pylist())
    return [sources.by_db[k] for k in sorted(sources.by_db)]


def _tokenizer(cfg: TxtDbConfig, sources: list[TextSource]) -> tuple[BertTokenizerFast, str]:
    try:
        if cfg.tokenizer is not None:
            return load_tokenizer(cfg.tokenizer, cfg.lowercase), cfg.tokenizer
        texts = [t for src in sources for t in src.texts]
        lowercase = True if cfg.lowercase is None else cfg.lowercase
        return train_wordpiece(texts, cfg.vocab_size, lowercase), TRAINED_NAME
    except TokenizerError as e:
        raise StageError(f"txt_db.tokenizer: {e}") from None


def write_db(src: TextSource, tok: BertTokenizerFast, out: TxtDbOutput, meta: dict,
             max_txt_len: int) -> dict[str, int | float]:
    """Tokenize, truncate to ``max_txt_len`` (recorded in the db's meta) and store one source; returns its
    stats."""
    lengths: list[int] = []
    truncated = empty = 0
    with TxtDbWriter(out.db_path(src.db_name), {**meta, "max_txt_len": max_txt_len}) as writer:
        for start in range(0, len(src.texts), _ENCODE_CHUNK):
            chunk = slice(start, start + _ENCODE_CHUNK)
            for txt_id, img, text, ids in zip(src.txt_ids[chunk], src.img_keys[chunk], src.texts[chunk],
                                              encode(tok, src.texts[chunk]), strict=True):
                if not ids:
                    empty += 1
                    continue
                truncated += len(ids) > max_txt_len
                ids = ids[:max_txt_len]
                writer.add(txt_id, {"input_ids": ids, "img_fname": img, "raw": text, "dataset": src.corpus})
                lengths.append(len(ids))
        images = len(set(writer.txt2img.values()))
    return {"examples": len(lengths), "images": images, "tokens": int(sum(lengths)),
            "mean_len": round(float(np.mean(lengths)), 4) if lengths else 0.0,
            "max_len": max(lengths, default=0), "truncated": int(truncated), "empty": empty}


def run(ctx: StageContext) -> StageResult:
    cfg: TxtDbConfig = ctx.cfg.txt_db
    dedup = ctx.inputs["dedup"]
    sources = read_sources(dedup, cfg)
    tok, name = _tokenizer(cfg, sources)
    out = TxtDbOutput(ctx.out_dir)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tok, out.tokenizer_dir)
    base_meta = {**tokenizer_meta(tok, name), "tokenizer_dir": f"../{out.tokenizer_dir.name}"}
    per_db: dict[str, dict] = {}
    for src in sources:
        meta = {**base_meta, "output": out.db_path(src.db_name).name, "annotations": [src.table],
                "corpus": src.corpus, "split": src.split}
        per_db[src.db_name] = write_db(src, tok, out, meta, cfg.max_txt_len)
        ctx.log.info("txtdb: %s.db: %s", src.db_name, per_db[src.db_name])
    totals = {k: sum(s[k] for s in per_db.values()) for k in ("examples", "tokens", "truncated", "empty")}
    stats = {"tokenizer": {"name": name, "vocab_size": base_meta["vocab_size"],
                           "do_lower_case": base_meta["do_lower_case"], "max_txt_len": cfg.max_txt_len},
             "dbs": per_db, "total": totals}
    out.write_stats(stats)
    metrics = {"vocab_size": float(base_meta["vocab_size"]), **{k: float(v) for k, v in totals.items()},
               **{f"examples/{db}": float(s["examples"]) for db, s in per_db.items()}}
    params = {"tokenizer": name, "dbs": ",".join(per_db)}
    return StageResult(metrics=metrics, params=params, artifacts=[out.stats_path.name])
