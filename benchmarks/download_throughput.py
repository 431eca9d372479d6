"""Image download throughput: our shard fetcher vs. a plain thread-pool + urllib downloader (warm) and
vs. img2dataset and that downloader as whole fresh processes (``--cold``).

Generates ``--images`` small JPEGs into a www root and serves them with the world's Mirror (its own
process). Then, in the same run, fetches every image twice:

(a) baseline: ThreadPoolExecutor(--threads) + ``urllib.request.urlopen`` per URL (a new connection
    each) + PIL ``verify()`` + sha256, every row appended to one pyarrow ParquetWriter in the main process;
(b) ours: the download stage's shard loop (``run_shards``): shards of ``--shard-size`` images as Ray
    tasks (whatever the list's size), ``--tasks`` in flight, each with ``--threads`` threads on keep-alive
    connections, a decode per image (``fetch.decode``: a JPEG's whole stream, at 1/8 scale), one parquet
    + stats file per shard.

Both must return the same sha256 for every image. The two alternate ``--repeats`` times (the machine
may be shared); printed are the median images/s of each, the ratio, and CPU seconds per wall second,
read from /proc, of the client (the baseline: its own process; ours: also Ray's raylet, GCS and workers)
and of the mirror server. Ray's workers are started and both sides have made one untimed pass over a
few images before anything is timed, so that no run is charged for imports and first-use setup.

    python benchmarks/download_throughput.py [--images 2000] [--threads 16] [--tasks N] [--repeats 3]

``--cold`` instead times whole processes, each started fresh on the same list of ``--images`` mirror URLs
(one per line, served by the same Mirror), alternating ``--repeats`` times; printed are the median
seconds and images/s of each and the ratios:

(1) img2dataset, from its own venv (created under ``--img2dataset-venv`` with ``python -m venv`` and
    ``pip install img2dataset==--img2dataset-version`` on first use; never one of our dependencies):
    parquet output, its own defaults for processes (1; ``--img2dataset-processes``), threads (256) and
    shard size (10,000: with 2 processes, 16 threads, 250 per shard it took twice as long at 3,210 URLs
    on 2 busy cores), original bytes kept (``--resize_mode no --disable_all_reencoding True``), no
    retries, wandb off;
    ``NO_ALBUMENTATIONS_UPDATE=1`` spares it a version check over the network at import;
(2) ours: the stage's shard loop (``run_shards``) as above; it fetches in its own process when the list
    has at most ``--in-process-max-images`` images (default: the stage's ``download.in_process_max_images``)
    and otherwise starts a local Ray with ``--tasks`` CPUs first, as a fresh driver must;
(3) naive: the baseline of (a), in its own process.

Each output is read back and must hold every URL once with the sha256 of the served file, so that no
tool is timed on less work or on other bytes.

    python benchmarks/download_throughput.py --cold --images 3210 [--repeats 3]
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
import statistics
import subprocess
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

from stages.download.config import DownloadConfig  # noqa: E402
from stages.download.fetch import FetchSettings  # noqa: E402
from stages.download.formats.base import ImageRef  # noqa: E402
from stages.download.shards import plan_shards  # noqa: E402
from stages.download.stage import fetches_in_process, run_shards  # noqa: E402
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
    refs: list[ImageRef], settings: FetchSettings, shard_size: int, tasks: int, out: Path,
    in_process_max_images: int = 0,
) -> dict[str, str]:
    """The stage's own shard loop (by default Ray tasks, writing images/bench/shard-*.parquet under
    ``out``); returns sha256 per image that came back ok, read from the shards."""
    run_shards(out, plan_shards(refs, shard_size), settings, tasks, in_process_max_images,
               logging.getLogger("bench"))
    table = pq.read_table(out / "images" / "bench", columns=["key", "status", "sha256"])
    columns = (table.column(name).to_pylist() for name in ("key", "status", "sha256"))
    return {key: sha for key, status, sha in zip(*columns, strict=True) if status == "ok"}


@ray.remote(num_cpus=1)
def _warm() -> None:
    import stages.download.stage  # noqa: F401 - what a shard task imports


def read_urls(path: Path) -> list[ImageRef]:
    return [ImageRef(corpus="bench", key=f"bench:{i:08d}", url=url, split="train")
            for i, url in enumerate(path.read_text().split())]


def run_child(args: argparse.Namespace) -> None:
    """One cold run: fetch every URL of ``--urls`` into ``--out``, as ours or as the naive client."""
    refs = read_urls(args.urls)
    if args.child == "naive":
        baseline(refs, None, args.threads, args.out / "naive.parquet")
        return
    if not fetches_in_process(len(refs), args.in_process_max_images):
        ray.init(address="local", num_cpus=args.tasks, include_dashboard=False, log_to_driver=False)
    settings = FetchSettings(timeout_s=30, retries=0, backoff_s=0, max_bytes=16_000_000,
                             max_pixels=40_000_000, max_redirects=5, threads=args.threads)
    run_shards(args.out, plan_shards(refs, args.shard_size), settings, args.tasks, args.in_process_max_images,
               logging.getLogger("bench"))


def img2dataset_bin(venv: Path, version: str) -> Path:
    """img2dataset's console script in its own venv, installed there on first use."""
    exe = venv / "bin" / "img2dataset"
    if not exe.is_file():
        print(f"installing img2dataset=={version} into {venv} ...", flush=True)
        subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"img2dataset=={version}"]
        subprocess.run(pip, check=True)
    return exe


def served_bytes(table: pa.Table, url: str, body: str, ok: Callable[[str], bool]) -> dict[str, str]:
    """url -> sha256 of the stored bytes, for the rows whose status passes ``ok``."""
    rows = zip(*(table.column(name).to_pylist() for name in (url, body, "status")), strict=True)
    return {u: hashlib.sha256(b).hexdigest() for u, b, status in rows if ok(status)}


def read_output(tool: str, out: Path) -> tuple[dict[str, str], int]:
    """url -> sha256 of every image a tool stored, and how many rows it wrote."""
    if tool == "img2dataset":
        table = pq.read_table(sorted(out.glob("*.parquet")), columns=["url", "jpg", "status"])
        return served_bytes(table, "url", "jpg", lambda st: st == "success"), table.num_rows
    if tool == "ours":
        table = pq.read_table(out / "images" / "bench", columns=["url", "image", "status"])
        return served_bytes(table, "url", "image", lambda st: st == "ok"), table.num_rows
    table = pq.read_table(out / "naive.parquet", columns=["url", "image"])
    table = table.append_column("status", pa.array(["ok"] * table.num_rows))
    return served_bytes(table, "url", "image", lambda st: True), table.num_rows


def cold_command(tool: str, args: argparse.Namespace, urls: Path, out: Path, img2dataset: Path) -> list[str]:
    if tool == "img2dataset":
        return [str(img2dataset), "--url_list", str(urls), "--input_format", "txt",
                "--output_folder", str(out), "--output_format", "parquet",
                "--processes_count", str(args.img2dataset_processes),
                "--resize_mode", "no", "--disable_all_reencoding", "True", "--timeout", "30",
                "--retries", "0", "--enable_wandb", "False", "--distributor", "multiprocessing"]
    return [sys.executable, str(Path(__file__).resolve()), "--child", tool, "--urls", str(urls),
            "--out", str(out), "--threads", str(args.threads), "--tasks", str(args.tasks),
            "--shard-size", str(args.shard_size), "--in-process-max-images", str(args.in_process_max_images)]


def cold(args: argparse.Namespace) -> None:
    venv = args.img2dataset_venv or (
        Path.home() / ".cache" / "vlp-benchmarks" / f"img2dataset-{args.img2dataset_version}")
    img2dataset = img2dataset_bin(venv, args.img2dataset_version)
    work = Path(tempfile.mkdtemp(prefix="dlbench-cold-", dir=args.workdir))
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("RAY_ADDRESS", None)  # ours starts its own local Ray, never joins another
    try:
        refs = make_images(work / "www", args.images)
        tools = ("img2dataset", "ours", "naive")
        seconds: dict[str, list[float]] = {tool: [] for tool in tools}
        with Mirror(work / "www") as mirror:
            urls = work / "urls.txt"
            urls.write_text("".join(to_mirror(ref.url, mirror.base_url) + "\n" for ref in refs))
            want = {to_mirror(ref.url, mirror.base_url): hashlib.sha256(
                (work / "www" / ref.url.removeprefix("http://")).read_bytes()).hexdigest() for ref in refs}
            in_process = fetches_in_process(args.images, args.in_process_max_images)
            runner = "in-process" if in_process else "Ray tasks"
            print(f"{args.images} URLs on one loopback mirror; {os.cpu_count()} CPUs, load average "
                  f"{os.getloadavg()[0]:.2f}; whole fresh processes, {args.repeats} alternating runs; "
                  f"ours and naive {args.threads} threads (ours: {args.tasks} shards of {args.shard_size} "
                  f"at once), img2dataset {args.img2dataset_processes} process(es); ours runs {runner} "
                  f"(in_process_max_images {args.in_process_max_images})", flush=True)
            for r in range(args.repeats):
                for tool in tools:
                    out = work / f"{tool}-{r}"
                    out.mkdir()
                    start = time.perf_counter()
                    done = subprocess.run(cold_command(tool, args, urls, out, img2dataset), env=env, cwd=work,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                    seconds[tool].append(time.perf_counter() - start)
                    if done.returncode != 0:
                        sys.exit(f"{tool} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
                    got, rows = read_output(tool, out)
                    if got != want or rows != args.images:
                        sys.exit(f"{tool}: {len(got)} of {args.images} images with the served bytes, "
                                 f"{rows} rows")
                    shutil.rmtree(out)
        median = {tool: statistics.median(runs) for tool, runs in seconds.items()}
        for tool in tools:
            runs = ", ".join(f"{s:.2f}" for s in seconds[tool])
            print(f"{tool:11s} {median[tool]:6.2f} s  {args.images / median[tool]:7.1f} images/s  "
                  f"(runs: {runs} s)")
        print(f"ours / img2dataset: {median['img2dataset'] / median['ours']:.2f}x, naive / img2dataset: "
              f"{median['img2dataset'] / median['naive']:.2f}x, ours / naive: "
              f"{median['naive'] / median['ours']:.2f}x images/s (load average now {os.getloadavg()[0]:.2f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def warm(args: argparse.Namespace) -> None:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=16, help="threads of the baseline and of each shard task")
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--tasks", type=int, default=os.cpu_count(), help="shard tasks in flight (= Ray CPUs)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each; the median is reported")
    ap.add_argument("--workdir", type=Path, help="where images and outputs go (default: a temp dir)")
    ap.add_argument("--cold", action="store_true", help="whole fresh processes, img2dataset included")
    ap.add_argument("--in-process-max-images", type=int,
                    default=DownloadConfig.model_fields["in_process_max_images"].default)
    ap.add_argument("--img2dataset-version", default="1.47.0")
    ap.add_argument("--img2dataset-processes", type=int, default=1, help="img2dataset's own default: 1")
    ap.add_argument("--img2dataset-venv", type=Path,
                    help="default: ~/.cache/vlp-benchmarks/img2dataset-<version>")
    ap.add_argument("--child", choices=("ours", "naive"), help=argparse.SUPPRESS)  # one cold run
    ap.add_argument("--urls", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_child(args)
    elif args.cold:
        cold(args)
    else:
        warm(args)


if __name__ == "__main__":
    main()
