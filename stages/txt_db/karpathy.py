"""The ``karpathy_txtdb`` stage: COCO retrieval text dbs of the Karpathy splits, for COCO-style retrieval.

The txtdb stage writes the texts pretraining may see (dedup's captions, by each corpus's own split), so
it has no COCO Karpathy val / test captions: those images are evaluation images that dedup removes from
pretraining. This stage reads the download stage's unfiltered captions and the Karpathy split table and
writes ``coco_karpathy_{train,restval,val,test}.db`` with the txtdb stage's tokenizer, meta and
max_txt_len (so the dbs mix with the others), plus ``stats.json``, in the layout of
``stages/outputs/txt_db.py``. Flickr30k needs no such stage: dedup keeps the Flickr30k corpus whole (it is
the evaluation set) and txtdb splits it by Karpathy split already.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from stages.base import StageContext, StageError, StageResult
from stages.outputs.txt_db import TxtDbOutput
from stages.txt_db.stage import TextSource, write_db
from vlp.data.tokenizer import TokenizerError, load_tokenizer, tokenizer_meta

CORPUS = "coco"
SCHEME = "karpathy"


def karpathy_sources(tables: Path) -> list[TextSource]:
    """One source per Karpathy split of COCO: the captions of its images, in caption-table order."""
    try:
        splits = pq.read_table(tables / "splits.parquet", columns=["corpus", "scheme", "split", "image_key"])
        captions = pq.read_table(tables / "captions.parquet",
                                 columns=["corpus", "image_key", "caption_id", "caption"])
    except (OSError, ValueError) as err:
        raise StageError(f"{tables}: cannot read the captions / splits tables ({' '.join(str(err).split())})"
                         ) from None
    split_of: dict[str, str] = {}
    for row in splits.to_pylist():
        if row["corpus"] == CORPUS and row["scheme"] == SCHEME:
            split_of[row["image_key"]] = row["split"]
    if not split_of:
        raise StageError(f"{tables / 'splits.parquet'}: no {CORPUS} {SCHEME} split rows")
    sources: dict[str, TextSource] = {}
    for i, row in enumerate(captions.to_pylist()):
        split = split_of.get(row["image_key"]) if row["corpus"] == CORPUS else None
        if split is None:
            continue
        if not row["caption_id"] or row["caption"] is None:
            raise StageError(f"{tables / 'captions.parquet'}: row {i}: field caption_id/caption is empty")
        if split not in sources:
            sources[split] = TextSource(f"{CORPUS}_{SCHEME}", split, "tables/captions.parquet")
        src = sources[split]
        src.txt_ids.append(row["caption_id"])
        src.img_keys.append(row["image_key"])
        src.texts.append(row["caption"])
    return [sources[k] for k in sorted(sources)]


def run(ctx: StageContext) -> StageResult:
    txtdb, out = TxtDbOutput(ctx.inputs["txtdb"]), TxtDbOutput(ctx.out_dir)
    stats = txtdb.tokenizer_stats()
    try:
        tok = load_tokenizer(txtdb.tokenizer_dir)
    except (OSError, TokenizerError) as err:
        raise StageError(f"{txtdb.root}: cannot read the txtdb stage's tokenizer ({err})") from None
    base_meta = tokenizer_meta(tok, stats["name"])
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    per_db = {}
    for src in karpathy_sources(ctx.inputs["download"] / "tables"):
        meta = {**base_meta, "output": out.db_path(src.db_name).name, "annotations": [src.table],
                "corpus": CORPUS, "split": src.split}
        per_db[src.db_name] = write_db(src, tok, out, meta, stats["max_txt_len"])
        ctx.log.info("karpathy_txtdb: %s.db: %s", src.db_name, per_db[src.db_name])
    out.write_stats({"dbs": per_db})
    metrics = {f"examples/{db}": float(s["examples"]) for db, s in per_db.items()}
    return StageResult(metrics=metrics, params={"dbs": ",".join(per_db)}, artifacts=[out.stats_path.name])
