"""Padding of dynamic (length-bucketed) vs fixed-size batching under the same input-unit budget.

Lengths are those of the demo pretraining corpus: the dedup stage's captions of the pretraining corpora
(coco, cc, sbu) plus the VG region phrases, WordPiece-tokenized with a vocab trained on them (as the txtdb
stage does for the demo), + [CLS]/[SEP]; region counts come from an img_db's box counts when one is
given, else 10-100 per image (the demo detector's range, one draw per image so its captions agree).

Policies, one epoch each, all judged by the padded size B * (max text + max regions) of each batch:
* dynamic, bucketed: ``UnitBatchSampler`` (shuffle, buckets of 100 typical batches, sort, pack);
* dynamic, unbucketed: random order packed greedily to the same budget;
* fixed, safe: B = budget // (longest text + most regions), the largest B that can never exceed it;
* fixed, mean-matched: the B whose random batches average the budget (some batches go over it).

    python benchmarks/padding_fraction.py [--max-units 4096] [--captions PATH] [--img-db DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from vlp.data.batching import UnitBatchSampler, pack_by_units
from vlp.data.collate import padded_units, padding_fraction_of_lengths
from vlp.data.img_db import ImgDb
from vlp.data.tokenizer import encode, train_wordpiece

DEMO_TABLES = Path("/tmp/demo_work/dedup/8f849069a1e066bc/tables")
PRETRAIN_CORPORA = ("coco", "cc", "sbu")


def corpus_lengths(tables: Path, img_db: Path | None, vocab_size: int, seed: int) -> tuple[np.ndarray, ...]:
    captions = pq.read_table(tables / "captions.parquet", columns=["corpus", "image_key", "caption"])
    texts = [(r["image_key"], r["caption"]) for r in captions.to_pylist() if r["corpus"] in PRETRAIN_CORPORA]
    regions = tables / "regions.parquet"
    if regions.is_file():
        phrases = pq.read_table(regions, columns=["image_key", "phrase"]).to_pylist()
        texts += [(r["image_key"], r["phrase"]) for r in phrases]
    strings = [t for _, t in texts]
    tok = train_wordpiece(strings, vocab_size)
    txt_lens = np.array([len(ids) + 2 for ids in encode(tok, strings)])
    keys = [k for k, _ in texts]
    if img_db is not None:
        name2nbb = ImgDb(img_db).name2nbb
        kept = [i for i, k in enumerate(keys) if k in name2nbb]
        return txt_lens[kept], np.array([name2nbb[keys[i]] for i in kept])
    rng = np.random.default_rng(seed)
    per_image = {k: int(rng.integers(10, 101)) for k in sorted(set(keys))}
    return txt_lens, np.array([per_image[k] for k in keys])


def fixed_batches(order: np.ndarray, size: int) -> list[np.ndarray]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def mean_matched_size(txt: np.ndarray, img: np.ndarray, max_units: int, seed: int) -> int:
    """Largest fixed B whose random batches' mean padded size stays within the budget."""
    order = np.random.default_rng(seed).permutation(len(txt))
    best = 1
    for size in range(1, max_units + 1):
        batches = fixed_batches(order, size)
        if np.mean([padded_units(txt[b], img[b]) for b in batches]) > max_units:
            break
        best = size
    return best


def row(name: str, batches: list[np.ndarray], txt: np.ndarray, img: np.ndarray, max_units: int) -> dict:
    padded = np.array([padded_units(txt[b], img[b]) for b in batches])
    return {"policy": name, "padding": padding_fraction_of_lengths(batches, txt, img),
            "batches": len(batches), "mean_B": np.mean([len(b) for b in batches]),
            "mean_padded": padded.mean(), "max_padded": padded.max(),
            "over_budget": float((padded > max_units).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-units", type=int, default=4096)
    ap.add_argument("--tables", type=Path, default=DEMO_TABLES, help="a dedup output's tables/ dir")
    ap.add_argument("--img-db", type=Path, default=None, help="take region counts from this img_db")
    ap.add_argument("--vocab-size", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    txt, img = corpus_lengths(args.tables, args.img_db, args.vocab_size, args.seed)
    print(f"{len(txt)} examples; text tokens incl. CLS/SEP mean {txt.mean():.1f} (sd {txt.std():.1f}, "
          f"max {txt.max()}); regions mean {img.mean():.1f} ({img.min()}-{img.max()}, "
          f"{'img_db' if args.img_db else 'drawn 10-100 per image'}); budget {args.max_units} units")
    # The longest text and the most regions may sit in different examples of one batch.
    safe_size = args.max_units // int(txt.max() + img.max())
    matched_size = mean_matched_size(txt, img, args.max_units, args.seed)
    sampler = UnitBatchSampler(txt, img, args.max_units, seed=args.seed)
    rows: dict[str, list[dict]] = {}
    for epoch in range(args.epochs):
        order = np.random.default_rng([args.seed, epoch]).permutation(len(txt))
        policies = {
            f"dynamic, bucketed (bucket {sampler.bucket_size})":
                [np.asarray(b) for b in sampler.epoch_batches(epoch)],
            "dynamic, unbucketed": pack_by_units(order, txt, img, args.max_units),
            f"fixed B={safe_size} (never over budget)": fixed_batches(order, safe_size),
            f"fixed B={matched_size} (mean = budget)": fixed_batches(order, matched_size),
        }
        for name, batches in policies.items():
            rows.setdefault(name, []).append(row(name, batches, txt, img, args.max_units))

    header = (f"{'policy':<40} {'padding':>8} {'batches':>8} {'mean B':>7} {'mean padded':>12} "
              f"{'max padded':>11} {'over budget':>12}")
    print(f"\nmean over {args.epochs} epochs\n{header}\n{'-' * len(header)}")
    summary = {}
    for name, per_epoch in rows.items():
        m = {k: np.mean([r[k] for r in per_epoch]) for k in per_epoch[0] if k != "policy"}
        m["max_padded"] = max(r["max_padded"] for r in per_epoch)
        summary[name] = m
        print(f"{name:<40} {m['padding']:>8.1%} {m['batches']:>8.1f} {m['mean_B']:>7.1f} "
              f"{m['mean_padded']:>12.0f} {m['max_padded']:>11.0f} {m['over_budget']:>12.1%}")
    dyn, *others = summary.values()
    print()
    for name, m in zip(list(summary)[1:], others, strict=True):
        print(f"{name}: {m['padding'] / dyn['padding']:.1f}x the padding of dynamic bucketed, "
              f"{m['batches'] / dyn['batches']:.2f}x the steps per epoch")


if __name__ == "__main__":
    main()
