"""Image download throughput: our Ray shard fetcher vs. a plain thread-pool + urllib downloader.

Generates ``--images`` small JPEGs into a www root and serves them with the world's Mirror (its own
process). Then, in the same run, fetches every image twice:

(a) baseline: ThreadPoolExecutor(--threads) + ``urllib.request.urlopen`` per URL (a new connection
    each) + PIL ``verify()`` + sha256, every row appended to one pyarrow ParquetWriter in the main process;
(b) ours: the download stage's shard loop (``run_shards``): shards of ``--shard-size`` images as Ray
    tasks, ``--tasks`` in flight, each with ``--threads`` threads on keep-alive connections, a decode
    per image (``fetch.decode``: a JPEG's whole stream, at 1/8 scale), one parquet + stats file per shard.

Both must return the same sha256 for every image. The two alternate ``--repeats`` times (the machine
may be shared); printed are the median images/s of each, the ratio, and CPU seconds per wall second,
read from /proc, of the client (the baseline: its own process; ours: also Ray's raylet, GCS and workers)
and of the mirror server. Ray's workers are started and both sides have made one untimed pass over a
few images before anything is timed, so that no run is charged for imports and first-use setup.

    python benchmarks/download_throughput.py [--images 2000] [--threads 16] [--tasks N] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import logging
import os
import random
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(_REPO))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
from PIL import Image  # noqa: E402

from stages.download.fetch import FetchSettings  # noqa: E402
from stages.download.formats.base import ImageRef  # noqa: E402
from stages.download.shards import plan_shards  # noqa: E402
from stages.download.stage import run_shards  # noqa: E402
from stages.download.urls import to_mirror  # noqa: E402
from worldgen.mirror import Mirror  # noqa: E402

HOST = "bench.example.com"
BASELINE_SCHEMA = pa.schema([("key", pa.string()), ("url", pa.string()), ("sha256", pa.string()),
                             ("size", pa.int64()), ("width", pa.int32()), ("height", pa.int32()),
                             ("image", pa.binary())])
_TICKS = os.sysconf("SC_CLK_TCK")


def make_images(www: Path, n: int, seed: int = 0) -> list[ImageRef]:
    """``n`` noisy JPEGs with 96-160 px sides: a few kB each, like the world's images."""
    rng = random.Random(seed)
    refs = []
    for i in range(n):
        w, h = rng.randint(96, 160), rng.randint(96, 160)
        im = Image.frombytes("RGB", (w, h), rng.randbytes(w * h * 3))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
        path = www / HOST / "img" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
        url = f"http://{HOST}/img/{i}.jpg"
        refs.append(ImageRef(corpus="bench", key=f"bench:{i}", url=url, split="train"))
    return refs


def cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of this process ("self"), its other descendants but the mirror ("ray": raylet,
    GCS, workers) and the mirror server ("mirror")."""
    table: dict[int, tuple[int, float, bytes]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:  # exited meanwhile
            continue
        table[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS, cmdline)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    me = os.getpid()
    cpu = {"self": table[me][1], "ray": 0.0, "mirror": 0.0}
    todo = list(children.get(me, []))
    while todo:
        pid = todo.pop()
        _, seconds, cmdline = table[pid]
        cpu["mirror" if b"worldgen.mirror" in cmdline else "ray"] += seconds
        todo += children.get(pid, [])
    return cpu


@dataclass
class Run:
    hashes: dict[str, str]
    wall: float
    client_cpu: float
    mirror_cpu: float


def timed(run: Callable[[], dict[str, str]], client: tuple[str, ...]) -> Run:
    """``run()`` timed; its client CPU is the sum over the ``client`` parts of cpu_seconds()."""
    before = cpu_seconds()
    start = time.perf_counter()
    hashes = run()
    wall = time.perf_counter() - start
    after = cpu_seconds()
    used = {part: after[part] - before[part] for part in after}
    return Run(hashes, wall, sum(used[part] for part in client), used["mirror"])


def baseline(refs: list[ImageRef], mirror_url: str, threads: int, out: Path) -> dict[str, str]:
    def fetch(ref: ImageRef) -> dict:
        with urllib.request.urlopen(to_mirror(ref.url, mirror_url), timeout=30) as resp:
            body = resp.read()
        im = Image.open(io.BytesIO(body))
        im.verify()
        return {"key": ref.key, "url": ref.url, "sha256": hashlib.sha256(body).hexdigest(), "size": len(body),
                "width": im.width, "height": im.height, "image": body}

    hashes = {}
    with pq.ParquetWriter(out, BASELINE_SCHEMA) as writer, ThreadPoolExecutor(threads) as pool:
        batch = []
        for row in pool.map(fetch, refs):
            hashes[row["key"]] = row["sha256"]
            batch.append(row)
            if len(batch) == 256:
                writer.write_table(pa.Table.from_pylist(batch, schema=BASELINE_SCHEMA))
                batch = []
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=BASELINE_SCHEMA))
    return hashes


def ours(
    refs: list[ImageRef], settings: FetchSettings, shard_size: int, tasks: int, out: Path
) -> dict[str, str]:
    """The stage's own shard loop (Ray tasks writing images/bench/shard-*.parquet under ``out``);
    returns sha256 per image that came back ok, read from the shards."""
    run_shards(out, plan_shards(refs, shard_size), settings, tasks, logging.getLogger("bench"))
    table = pq.read_table(out / "images" / "bench", columns=["key", "status", "sha256"])
    columns = (table.column(name).to_pylist() for name in ("key", "status", "sha256"))
    return {key: sha for key, status, sha in zip(*columns, strict=True) if status == "ok"}


@ray.remote(num_cpus=1)
def _warm() -> None:
    import stages.download.stage  # noqa: F401 - what a shard task imports


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=16, help="threads of the baseline and of each shard task")
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--tasks", type=int, default=os.cpu_count(), help="shard tasks in flight (= Ray CPUs)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each; the median is reported")
    ap.add_argument("--workdir", type=Path, help="where images and outputs go (default: a temp dir)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dlbench-", dir=args.workdir))
    try:
        start = time.perf_counter()
        refs = make_images(work / "www", args.images)
        size = sum(p.stat().st_size for p in (work / "www").rglob("*.jpg")) / args.images
        print(f"{args.images} JPEGs of {size / 1000:.1f} kB on average (generated in "
              f"{time.perf_counter() - start:.1f}s); {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.2f}; {args.threads} threads; {args.tasks} Ray tasks in flight, "
              f"{args.shard_size} images per shard; median of {args.repeats} alternating runs")
        runs: dict[str, list[Run]] = {"baseline": [], "ours": []}
        ray.init(num_cpus=args.tasks, include_dashboard=False, log_to_driver=False)
        try:
            ray.get([_warm.remote() for _ in range(args.tasks)])
            with Mirror(work / "www") as mirror:
                settings = FetchSettings(timeout_s=30, retries=0, backoff_s=0, max_bytes=16_000_000,
                                         max_pixels=40_000_000, max_redirects=5, threads=args.threads,
                                         mirror_url=mirror.base_url)
                # One untimed pass of each over a few images, so that lazy first-use work (pyarrow
                # imports pandas on its first array, PIL its format plugins) is charged to neither
                # side's first timed run. Small shards, so that every Ray worker runs some.
                warm = work / "warm"
                warm.mkdir()
                few = refs[: 4 * args.tasks * 8]
                baseline(few, mirror.base_url, args.threads, warm / "a.parquet")
                ours(few, settings, 8, args.tasks, warm)
                for r in range(args.repeats):
                    out = work / f"run{r}"
                    out.mkdir()
                    # The baseline is charged its own process only; ours also Ray's raylet, GCS, workers.
                    base = functools.partial(baseline, refs, mirror.base_url, args.threads, out / "a.parquet")
                    runs["baseline"].append(timed(base, ("self",)))
                    shards = functools.partial(ours, refs, settings, args.shard_size, args.tasks, out)
                    runs["ours"].append(timed(shards, ("self", "ray")))
        finally:
            ray.shutdown()

        for name, method_runs in runs.items():
            for run in method_runs:
                if len(run.hashes) != args.images or run.hashes != runs["baseline"][0].hashes:
                    sys.exit(f"{name}: {len(run.hashes)} of {args.images} images, or bytes that differ")
        medians = {}
        for name, method_runs in runs.items():
            run = sorted(method_runs, key=lambda r: r.wall)[len(method_runs) // 2]
            medians[name] = args.images / run.wall
            all_rates = ", ".join(f"{args.images / r.wall:.0f}" for r in method_runs)
            print(f"{name:9s} {medians[name]:7.1f} images/s (runs: {all_rates})  median run: "
                  f"client CPU {run.client_cpu:5.2f}s = {run.client_cpu / run.wall:4.2f} cores, "
                  f"mirror CPU {run.mirror_cpu:5.2f}s = {run.mirror_cpu / run.wall:4.2f} cores")
        print(f"ours / baseline: {medians['ours'] / medians['baseline']:.2f}x images/s "
              f"(load average now {os.getloadavg()[0]:.2f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
