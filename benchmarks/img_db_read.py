"""Read speed of the LMDB img_db (training reader) vs. per-image .npz files, same arrays, same order.

Writes ``--images`` synthetic detector outputs (36-100 boxes, 2048-d fp16 features, 1601 soft-label
columns, as BUTD produces) once into an img_db via ``ImgDbWriter`` and once as one ``.npz`` per image
the way BUTD's extractor saves them (``np.savez_compressed``, fp16, conf N x 1); ``--npz-uncompressed``
adds ``np.savez`` files. Then reads every image in one shuffled order through ``ImgDb.get`` and through
``np.load`` + the same cut to the box count, float32 casts and area column, checks both give equal
arrays, and prints examples/s and the ratio. Files are read warm (just written, in the page cache).

    python benchmarks/img_db_read.py [--images 2000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vlp.data.img_db import ImgDb, ImgDbWriter, RegionFeatures


def synth_image(rng: np.random.Generator, dim: int, n_classes: int) -> dict[str, np.ndarray]:
    n = int(rng.integers(36, 101))
    xy1 = rng.uniform(0, 0.5, size=(n, 2))
    wh = rng.uniform(0.01, 0.5, size=(n, 2))
    logits = rng.standard_normal((n, n_classes), dtype=np.float32) * 2
    soft = np.exp(logits)
    soft /= soft.sum(1, keepdims=True)
    return {
        "norm_bb": np.concatenate([xy1, xy1 + wh, wh], axis=1).astype(np.float16),
        # pool5 features are post-ReLU: about half zeros here
        "features": np.maximum(rng.standard_normal((n, dim), dtype=np.float32), 0).astype(np.float16),
        "conf": np.sort(rng.uniform(0, 1, size=n))[::-1, None].astype(np.float16),
        "soft_labels": soft.astype(np.float16),
    }


def npz_get(path: Path, nbb: int) -> RegionFeatures:
    """What a dataset reading BUTD npz files does to produce the training reader's output."""
    with np.load(path) as npz:
        feats, bb, soft = (torch.from_numpy(npz[name][:nbb]).float() for name in ("features", "norm_bb",
                                                                                  "soft_labels"))
    return RegionFeatures(feats, torch.cat([bb, bb[:, 4:5] * bb[:, 5:6]], dim=1), soft)


def timed(read, keys: list[str]) -> float:
    start = time.perf_counter()
    for key in keys:
        read(key)
    return len(keys) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--classes", type=int, default=1601)
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per reader; the best is reported")
    ap.add_argument("--npz-uncompressed", action="store_true", help="also time np.savez (uncompressed) files")
    ap.add_argument("--workdir", type=Path, help="keep the files here instead of a temp dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker: measure one reader, not intra-op threading

    work = args.workdir or Path(tempfile.mkdtemp(prefix="img_db_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    npz_dirs = {"npz (savez_compressed, as BUTD)": work / "npz_compressed"}
    if args.npz_uncompressed:
        npz_dirs["npz (savez)"] = work / "npz"
    for d in npz_dirs.values():
        d.mkdir(exist_ok=True)
    rng = np.random.default_rng(args.seed)
    keys = [f"coco:{i}" for i in range(args.images)]
    t0 = time.perf_counter()
    with ImgDbWriter(work / "img_db") as writer:
        for key in keys:
            img = synth_image(rng, args.dim, args.classes)
            writer.put(key, **img)
            for label, d in npz_dirs.items():
                save = np.savez_compressed if "compressed" in label else np.savez
                save(d / f"{key}.npz", **img)
    lmdb_mb = sum(f.stat().st_size for f in (work / "img_db" / "all").iterdir()) / 2**20
    print(f"wrote {args.images} images in {time.perf_counter() - t0:.0f}s to {work}: LMDB {lmdb_mb:.0f} MiB, "
          + ", ".join(f"{label} {sum(f.stat().st_size for f in d.iterdir()) / 2**20:.0f} MiB"
                      for label, d in npz_dirs.items()))

    db = ImgDb(work / "img_db")
    order = list(rng.permutation(keys))
    readers = {"img_db LMDB (ImgDb.get)": db.get}
    for label, d in npz_dirs.items():
        readers[label] = lambda key, d=d: npz_get(d / f"{key}.npz", db.name2nbb[key])
    for key in order[:20]:
        ref = db.get(key)
        for read in readers.values():
            assert all(torch.equal(a, b) for a, b in zip(ref, read(key), strict=True)), key
    rates = {label: 0.0 for label in readers}
    for _ in range(args.repeats):
        for label, read in readers.items():
            rates[label] = max(rates[label], timed(read, order))
    mean_boxes = np.mean([db.name2nbb[k] for k in keys])
    print(f"read {args.images} images in shuffled order, mean {mean_boxes:.1f} boxes after the conf>0.2 cut, "
          f"best of {args.repeats}:")
    lmdb_rate = rates["img_db LMDB (ImgDb.get)"]
    for label, rate in rates.items():
        print(f"  {label:34s} {rate:9.1f} examples/s   LMDB / this = {lmdb_rate / rate:5.2f}x")
    db.close()
    if args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
