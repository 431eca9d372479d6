"""Dedup stage: remove from the pretraining corpora every image that is also an evaluation image.

Reads the download output and writes the same layout, filtered (see vlp/data/tables.py):
- pretraining corpora (coco, vg, cc, sbu) keep only downloaded images that match no blocklist entry;
- downstream corpora (flickr30k, nlvr2) keep all downloaded images;
- captions / regions / objects of dropped pretraining images are dropped; all other tables, stats and
  metadata are carried over unchanged;
plus ``removed.parquet`` (one row per removed image), ``report.json`` and ``report.md``.
Shards are processed one row group at a time, so memory stays bounded whatever the corpus size.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.base import StageContext, StageError, StageResult
from stages.dedup.blocklist import Blocklist, build_blocklist
from stages.dedup.config import DedupConfig
from stages.dedup.keys import REASONS, image_keys
from stages.dedup.shards import META_COLUMNS, image_corpora, image_shards, open_parquet, require_sha256
from stages.outputs.download import DedupOutput, DownloadOutput
from vlp.data.tables import DOWNSTREAM_CORPORA, PRETRAIN_CORPORA

REMOVED = pa.schema(
    [
        ("corpus", pa.string()),
        ("key", pa.string()),
        ("url", pa.string()),
        ("reason", pa.string()),
        ("matched", pa.string()),  # the blocklist entry hit (id, normalized URL or sha256)
    ]
)
# Tables whose rows belong to an image (corpus, image_key) and follow it when it is dropped.
PER_IMAGE_TABLES = ("captions.parquet", "regions.parquet", "objects.parquet")


class _ImageFilter:
    """Decides, row by row, which images survive, and counts why the others did not."""

    def __init__(self, blocklist: Blocklist, reasons: list[str]):
        self.blocklist = blocklist
        self.reasons = reasons
        self.kept: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.removed: dict[str, Counter[str]] = defaultdict(Counter)
        self.removed_rows: list[dict] = []
        self.dropped_keys: dict[str, set[str]] = defaultdict(set)  # pretraining images no longer present

    def keep(self, path: Path, row: dict) -> bool:
        corpus = row["corpus"]
        pretraining = corpus in PRETRAIN_CORPORA
        if row["status"] != "ok":
            self.failed[corpus] += 1
            if pretraining:
                self.dropped_keys[corpus].add(row["key"])
            return False
        require_sha256(path, row)
        if pretraining:
            try:
                keys = image_keys(row)
            except ValueError as err:
                raise StageError(f"{path}: record {row['key']!r}: field 'key': {err}") from err
            hit = self.blocklist.first_match(keys, self.reasons)
            if hit is not None:
                reason, matched = hit
                self.removed[corpus][reason] += 1
                self.removed_rows.append({"corpus": corpus, "key": row["key"], "url": row["url"],
                                          "reason": reason, "matched": matched})
                self.dropped_keys[corpus].add(row["key"])
                return False
        self.kept[corpus] += 1
        return True


def _filter_shard(src: Path, dst: Path, corpus: str, image_filter: _ImageFilter) -> None:
    parquet = open_parquet(src, META_COLUMNS)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(dst, parquet.schema_arrow) as writer:
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group)
            rows = table.select(list(META_COLUMNS)).to_pylist()
            for row in rows:
                if row["corpus"] != corpus:
                    raise StageError(f"{src}: record {row['key']!r}: field 'corpus' is {row['corpus']!r}, "
                                     f"expected {corpus!r}")
            mask = pa.array([image_filter.keep(src, row) for row in rows], pa.bool_())
            writer.write_table(table.filter(mask))


def _filter_per_image_table(src: Path, dst: Path, dropped_keys: dict[str, set[str]]) -> None:
    parquet = open_parquet(src, ("corpus", "image_key"))
    drop_sets = {corpus: pa.array(sorted(keys), pa.string()) for corpus, keys in dropped_keys.items() if keys}
    with pq.ParquetWriter(dst, parquet.schema_arrow) as writer:
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group)
            drop = pa.array([False] * table.num_rows, pa.bool_())
            for corpus, keys in drop_sets.items():
                hit = pc.and_(pc.equal(table["corpus"], corpus), pc.is_in(table["image_key"], value_set=keys))
                drop = pc.or_(drop, pc.fill_null(hit, False))
            writer.write_table(table.filter(pc.invert(drop)))


def _link_or_copy(src: Path, dst: Path) -> None:
    """Inputs in the stage cache are immutable, so a hard link is a free, safe copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(root: Path, out: Path, dropped_keys: dict[str, set[str]]) -> None:
    for folder in ("stats", "metadata", "tables"):
        for src in sorted((root / folder).rglob("*")):
            if not src.is_file():
                continue
            dst = out / src.relative_to(root)
            if folder == "tables" and src.name in PER_IMAGE_TABLES:
                dst.parent.mkdir(parents=True, exist_ok=True)
                _filter_per_image_table(src, dst, dropped_keys)
            else:
                _link_or_copy(src, dst)


def _ordered(corpora: list[str]) -> list[str]:
    known = PRETRAIN_CORPORA + DOWNSTREAM_CORPORA
    return [c for c in known if c in corpora] + sorted(c for c in corpora if c not in known)


def reasons_in_play(blocklist: Blocklist) -> list[str]:
    """The match reasons a report lists: vg_id only when GQA's evaluation images put VG ids in the blocklist
    (a run without GQA reports exactly as before GQA existed)."""
    return [r for r in REASONS if r != "vg_id" or blocklist.vg_ids]


def _report(corpora: list[str], image_filter: _ImageFilter, blocklist: Blocklist) -> dict:
    filtered = [c for c in corpora if c in PRETRAIN_CORPORA]
    return {
        "removed": {c: {r: image_filter.removed[c][r] for r in reasons_in_play(blocklist)} for c in filtered},
        "kept": {c: image_filter.kept[c] for c in corpora},
        "failed_dropped": {c: image_filter.failed[c] for c in corpora},
        "blocklist": blocklist.counts(),
    }


def _report_markdown(report: dict) -> str:
    sizes = report["blocklist"]
    reasons = [r for r in REASONS if r != "vg_id" or "vg_ids" in sizes]
    header = ["dataset", "kept", "failed dropped", *reasons, "removed"]
    lines = ["# Dedup report", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for corpus, kept in report["kept"].items():
        removed = report["removed"].get(corpus)
        # Downstream sets are not filtered: "-" rather than a misleading 0.
        counts = ([str(removed[r]) for r in reasons] + [str(sum(removed.values()))] if removed
                  else ["-"] * (len(reasons) + 1))
        row = [corpus, str(kept), str(report["failed_dropped"][corpus]), *counts]
        lines.append("| " + " | ".join(row) + " |")
    vg = f"{sizes['vg_ids']} Visual Genome ids (GQA), " if "vg_ids" in sizes else ""
    lines += ["", f"Blocklist: {vg}{sizes['coco_ids']} COCO ids, {sizes['flickr_ids']} Flickr photo ids, "
                  f"{sizes['urls']} URLs, {sizes['hashes']} content hashes."]
    return "\n".join(lines) + "\n"


def _metrics(report: dict) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for corpus, by_reason in report["removed"].items():
        for reason, n in by_reason.items():
            metrics[f"removed.{corpus}.{reason}"] = n
    for section in ("kept", "failed_dropped"):
        for corpus, n in report[section].items():
            metrics[f"{section}.{corpus}"] = n
    metrics["removed.total"] = sum(sum(r.values()) for r in report["removed"].values())
    metrics["kept.total"] = sum(report["kept"].values())
    metrics["failed_dropped.total"] = sum(report["failed_dropped"].values())
    for kind, n in report["blocklist"].items():
        metrics[f"blocklist.{kind}"] = n
    return metrics


SPLIT_FIELDS = ("flickr30k_entities_splits", "coco_karpathy_splits", "refcoco_splits", "nlvr2_splits")


def run(ctx: StageContext) -> StageResult:
    cfg: DedupConfig = ctx.cfg.dedup
    root = ctx.inputs.get("download")
    if root is None:
        raise StageError("dedup: missing input 'download'")
    root = Path(root)
    if not DownloadOutput(root).images.is_dir():
        raise StageError(f"{root}: not a download output (no images/ folder)")
    out = ctx.out_dir
    out.mkdir(parents=True, exist_ok=True)

    blocklist = build_blocklist(root, cfg, ctx.log)
    reasons = [r for r in reasons_in_play(blocklist) if getattr(cfg.reasons, r)]
    # GQA's split setting counts (and is a parameter) only when the download holds GQA.
    split_fields = SPLIT_FIELDS + (("gqa_splits",) if DownloadOutput(root).task_table("gqa").exists() else ())
    image_filter = _ImageFilter(blocklist, reasons)
    corpora = _ordered(image_corpora(root))
    for corpus in corpora:
        for src in image_shards(root, corpus):
            _filter_shard(src, out / src.relative_to(root), corpus, image_filter)
    _carry_over(root, out, image_filter.dropped_keys)
    configured = [f"dedup.{name}" for name in split_fields if getattr(cfg, name)]
    if configured and not any(blocklist.counts().values()):
        # Evaluation images would enter pretraining unnoticed: an incomplete download output looks so.
        raise StageError(f"{root}: empty blocklist although {', '.join(configured)} name evaluation splits: "
                         "the download output holds no evaluation table or image")

    layout = DedupOutput(out)
    pq.write_table(pa.Table.from_pylist(image_filter.removed_rows, schema=REMOVED), layout.removed_file)
    report = _report(corpora, image_filter, blocklist)
    layout.report_file.write_text(json.dumps(report, indent=2) + "\n")
    layout.report_markdown.write_text(_report_markdown(report))
    metrics = _metrics(report)
    ctx.log.info("dedup: removed %d pretraining images, kept %d images (%s)", metrics["removed.total"],
                 metrics["kept.total"], ", ".join(f"{k}={v}" for k, v in blocklist.counts().items()))
    params = {"reasons": ",".join(reasons)}
    params.update({field: ",".join(getattr(cfg, field)) for field in split_fields})
    reports = (layout.report_file, layout.report_markdown, layout.removed_file)
    artifacts = [str(p.relative_to(out)) for p in reports]
    return StageResult(metrics=metrics, params=params, artifacts=artifacts)
