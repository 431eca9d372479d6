"""Feature-extraction pipeline throughput vs. the detector's forward-only throughput, same images, same run.

(a) forward-only: every image decoded and downscaled in memory first, then ``backend.detect`` over
    batches of ``features.batch_size`` in a loop, with the torch threads one detector actor gets;
(b) pipeline: the features stage's Ray Data pipeline end to end (Parquet read -> decode tasks ->
    detector actor pool -> LMDB writer), startup included, on the same images and batch size.

Images come from a dedup output (``--dedup``, or the one ``--config`` produces in ``--workdir``, built
if needed), cycled to ``--images`` rows with distinct keys. ``--weights`` defaults to a randomly
initialised detector of the configured architecture (speed does not depend on the weights' values).

    python benchmarks/feature_pipeline.py [--images 480] [--config configs/tiny.yaml] [key.sub=value ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.run import main as run_pipeline  # noqa: E402
from stages.feature_extraction.decode import decode_image  # noqa: E402
from stages.feature_extraction.detector.backend import load_backend  # noqa: E402
from stages.feature_extraction.detector.model import RegionDetector  # noqa: E402
from stages.feature_extraction.detector.torchvision_backend import save_checkpoint  # noqa: E402
from stages.feature_extraction.pipeline import detector_input_size, extract, image_shards  # noqa: E402
from worldgen.scenes import COLOURS, SHAPES, SIZES, TEXTURES  # noqa: E402

SHARD_ROWS = 64


def dedup_output(args) -> Path:
    if args.dedup:
        return args.dedup
    workdir = args.workdir.resolve()
    if run_pipeline(["--config", str(args.config), "--workdir", str(workdir), "--stage", "dedup"]) != 0:
        sys.exit("building the dedup output failed")
    (out,) = [p for p in (workdir / "dedup").iterdir() if not p.name.startswith(".")]
    return out


def benchmark_images(dedup: Path, n: int, root: Path) -> tuple[Path, list[bytes]]:
    """A dedup-layout dir holding ``n`` images cycled from ``dedup`` under distinct keys."""
    columns = ["key", "corpus", "image"]
    rows = [r for shard in image_shards(dedup) for r in pq.read_table(shard, columns=columns).to_pylist()]
    picked = []
    for i in range(n):
        row = rows[i % len(rows)]
        picked.append({**row, "key": f"{row['key']}#{i // len(rows)}"})
    shard_dir = root / "dedup" / "images" / "bench"
    shard_dir.mkdir(parents=True)
    for i in range(0, n, SHARD_ROWS):
        table = pa.Table.from_pylist(picked[i:i + SHARD_ROWS])
        pq.write_table(table, shard_dir / f"shard-{i // SHARD_ROWS:05d}.parquet")
    return root / "dedup", [r["image"] for r in picked]


def random_weights(cfg, path: Path) -> Path:
    torch.manual_seed(0)
    attrs = [*COLOURS, *SIZES, *TEXTURES]
    save_checkpoint(path, cfg, RegionDetector(cfg, len(SHAPES), len(attrs)), list(SHAPES), attrs)
    return path


def forward_only(cfg, weights: Path, images: list[bytes]) -> float:
    decoded = [decode_image(data, *detector_input_size(cfg))[0] for data in images]
    torch.set_num_threads(max(1, int(cfg.actor_cpus)))
    backend = load_backend(cfg.detector, weights, "cuda" if torch.cuda.is_available() else "cpu")
    backend.detect(decoded[: cfg.batch_size])  # warm-up: first-call allocations and kernel selection
    start = time.perf_counter()
    for i in range(0, len(decoded), cfg.batch_size):
        backend.detect(decoded[i:i + cfg.batch_size])
    return len(decoded) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=480)
    ap.add_argument("--config", type=Path, default=_REPO / "configs" / "tiny.yaml")
    ap.add_argument("--workdir", type=Path, default=_REPO / "work" / "bench-features")
    ap.add_argument("--dedup", type=Path, help="an existing dedup stage output to take images from")
    ap.add_argument("--weights", type=Path, help="detector weights (default: randomly initialised)")
    ap.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (features.*)")
    args = ap.parse_args()

    cfg = load_config(args.config, args.overrides).features
    dedup = dedup_output(args)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        subset, images = benchmark_images(dedup, args.images, root)
        weights = args.weights or random_weights(cfg.detector, root / "detector.pt")
        device = "GPU" if torch.cuda.is_available() else f"CPU, {max(1, int(cfg.actor_cpus))} thread(s)"
        print(f"{args.images} images, batch size {cfg.batch_size}, detector on {device}")
        fwd = forward_only(cfg, weights, images)
        print(f"(a) detector forward-only : {fwd:8.1f} images/s")
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING")
        try:
            result = extract(subset, subset, root / "img_db", cfg, weights)
        finally:
            ray.shutdown()
        assert result.new_ok == args.images, f"{result.new_ok} of {args.images} images stored"
        full = result.processed / result.seconds
        # the first output batch holds at most batch_size images
        steady = (result.processed - cfg.batch_size) / (result.seconds - result.first_batch_s)
        print(f"(b) full Ray Data pipeline: {full:8.1f} images/s  ({result.seconds:.1f} s, of which "
              f"{result.first_batch_s:.1f} s until the first output; {steady:.1f} images/s after it)")
        print(f"ratio (b)/(a)             : {full / fwd:8.2f}   (target >= 0.85)")


if __name__ == "__main__":
    main()
