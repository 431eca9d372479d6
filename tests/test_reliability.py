"""Defects a careful user or a hostile input found: each test reproduces one, then checks the promise."""

from __future__ import annotations

import io
import pickle
import time
import zipfile
from pathlib import Path

import pytest

from pipeline.config import REPO_ROOT, ConfigError, load_config
from pipeline.run import main
from stages.base import StageError
from stages.download.config import DatasetSource
from stages.download.formats.base import FormatError
from stages.download.formats.refcoco import parse_refcoco
from stages.download.metadata import Caps, MetadataFetcher
from stages.download.transport import HttpClient
from worldgen.mirror import Mirror

TINY = REPO_ROOT / "configs" / "tiny.yaml"


def test_stage_errors_survive_the_trip_back_from_a_ray_worker():
    # D1: FormatError's keyword-only __init__ made pickle (hence Ray) fail to rebuild it.
    err = FormatError("captions.json", "missing", record=3, record_id="57870", field="coco_url")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is FormatError and str(back) == str(err)
    assert (back.record, back.record_id, back.field) == (3, "57870", "coco_url")
    for other in (StageError("one line"), ConfigError("bad key")):
        again = pickle.loads(pickle.dumps(other))
        assert type(again) is type(other) and str(again) == str(other)


@pytest.mark.parametrize("override, field", [
    ("download.datasets.flickr30k.image_base_url=file:///etc/", "flickr30k.image_base_url"),
    ("download.datasets.nlvr2.files.dev=ftp://example.org/dev.json", "nlvr2.files"),
    ("download.datasets.vqa.files.questions_train2014=http:///no-host.zip#q.json", "vqa.files"),
])
def test_every_configured_url_is_checked_when_the_config_loads(override, field):
    # D4: a file:// base URL used to pass and leave every Flickr30k image silently missing.
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    message = str(err.value)
    assert "\n" not in message and field in message and "refusing" in message


def _zip(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def hostile_mirror(tmp_path_factory):
    www = tmp_path_factory.mktemp("www")
    files = {
        "bomb.example.org/ann.zip": _zip("ann.json", b" " * 60_000_000),  # ~60 KB packing 60 MB
        "big.example.org/list.txt": b"1\n" * 600_000,  # 1.2 MB
    }
    for rel, data in files.items():
        (www / rel).parent.mkdir(parents=True, exist_ok=True)
        (www / rel).write_bytes(data)
    with Mirror(www) as mirror:
        yield mirror


@pytest.mark.parametrize("spec, cap", [
    ("http://bomb.example.org/ann.zip#ann.json", "member_max_ratio"),
    ("http://big.example.org/list.txt", "metadata_max_bytes"),
])
def test_metadata_size_caps_refuse_bombs_and_oversized_files(hostile_mirror, tmp_path, spec, cap):
    # S2: a 61 KB zip became a 60 MB file; no cap on metadata downloads.
    client = HttpClient(timeout_s=5, max_redirects=2, mirror_url=hostile_mirror.base_url)
    fetcher = MetadataFetcher(tmp_path, client, retries=0, backoff_s=0.0,
                              caps=Caps(file_bytes=1_000_000, member_bytes=50_000_000, member_ratio=100.0))
    try:
        with pytest.raises(StageError) as err:
            fetcher.fetch_all({"coco": DatasetSource(files={"ann": spec})})
    finally:
        client.close()
    assert "\n" not in str(err.value) and "download.datasets.coco.files.ann" in str(err.value)
    assert cap in str(err.value)
    assert not [p for p in (tmp_path / "metadata").rglob("*") if p.is_file()]


def _shared_latin1_pickle(depth: int) -> bytes:
    """A Python-2-style pickle: one non-ASCII byte string, then ``depth`` levels of [x, x] sharing x."""
    ops = bytearray(b"\x80\x02U\x01\xe9q\x00")  # PROTO 2, SHORT_BINSTRING '\xe9', BINPUT 0
    for level in range(1, depth + 1):
        ops += b"(h" + bytes([level - 1]) + b"h" + bytes([level - 1]) + b"lq" + bytes([level])
    return bytes(ops + b".")


def test_latin1_pickle_fallback_does_not_expand_shared_references(tmp_path):
    # S3: 184 bytes of nested shared lists took 5.2 s and 417 MB through the Latin-1 fallback.
    refs = tmp_path / "refs(unc).p"
    refs.write_bytes(_shared_latin1_pickle(40))
    (tmp_path / "instances.json").write_text('{"annotations": []}')
    start = time.perf_counter()
    with pytest.raises(FormatError) as err:
        parse_refcoco({"refs": refs, "instances": tmp_path / "instances.json"},
                      DatasetSource(files={"refs": "http://x.org/r.p", "instances": "http://x.org/i.json"}))
    assert time.perf_counter() - start < 1.0
    assert str(err.value).startswith(str(refs))


def _cli(workdir: Path, *args: str) -> int:
    return main(["--config", str(TINY), "--workdir", str(workdir), *args])


def test_a_truncated_feature_store_is_named_in_one_line_instead_of_sigbus(tmp_path):
    # D5: reading a truncated data.mdb through LMDB's memory map killed the stage with SIGBUS.
    import os

    import numpy as np

    from vlp.data.img_db import ImgDb, ImgDbError, ImgDbWriter

    boxes = np.tile(np.array([[0.1, 0.1, 0.5, 0.5, 0.4, 0.4]], np.float32), (10, 1))
    with ImgDbWriter(tmp_path / "img_db") as writer:
        for i in range(200):
            writer.put(f"k{i}", features=np.full((10, 512), i, np.float32), norm_bb=boxes,
                       conf=np.linspace(1, 0.5, 10).astype(np.float32), soft_labels=np.full((10, 5), 0.2))
    reader = ImgDb(tmp_path / "img_db")
    assert float(reader.get("k150").features[0, 0]) == 150.0
    reader.close()
    (data,) = (tmp_path / "img_db").rglob("data.mdb")
    os.truncate(data, data.stat().st_size // 2)
    with pytest.raises(ImgDbError) as err:
        ImgDb(tmp_path / "img_db").get("k150")
    assert "\n" not in str(err.value) and f"{data} is truncated" in str(err.value)


@pytest.mark.slow
def test_concurrent_runs_on_one_work_dir_serialise_and_commit_complete_outputs(tmp_path):
    # D6: two downloads into one work dir both exited 0 with 4 of 22 shards and no tables/ committed;
    # D8: two runs on a new work dir raced in MLflow's database setup.
    import json
    import re
    import subprocess
    import sys

    command = [sys.executable, str(REPO_ROOT / "pipeline" / "run.py"), "--config", str(TINY), "--workdir",
               str(tmp_path), "--stage", "download"]
    runs = [subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for _ in range(2)]
    logs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], logs
    for stage in ("world", "download"):
        assert len([p for p in (tmp_path / stage).iterdir() if not p.name.startswith(".")]) == 1, stage
    (download,) = [p for p in (tmp_path / "download").iterdir() if not p.name.startswith(".")]
    summary = json.loads((download / "stats" / "summary.json").read_text())
    assert len(list((download / "images").rglob("shard-*.parquet"))) == summary["shards"] > 1
    assert (download / "tables" / "captions.parquet").is_file()
    # Each stage was computed once: the later run either waited and took the committed output, or (when
    # it reached its plan after the first had finished) planned it as cached. Read from each driver's own
    # closing table: the stage tasks' log lines reach the driver asynchronously and can be cut at its exit.
    endings = [re.search(r"^download\s+(ran in|cached, skipped)", log, re.M) for log in logs]
    assert all(endings) and sorted(m.group(1) for m in endings) == ["cached, skipped", "ran in"], logs


def test_paths_from_config_never_leave_the_work_dir(tmp_path, capsys):
    # S1: a dataset URL with ../ made the world stage write a file outside the work dir.
    escape = "https://raw.githubusercontent.com/lil-lab/../../../../escaped/dev.json"
    assert _cli(tmp_path / "work", "--stage", "world", f"download.datasets.nlvr2.files.dev={escape}") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: world: refusing") and "'..' segments" in err
    assert [p.name for p in tmp_path.iterdir()] == ["work"] and not list(tmp_path.rglob("escaped"))
    # Dataset and role names become directory and file names: only plain names are accepted.
    with pytest.raises(ConfigError, match="download.datasets"):
        load_config(TINY, ["download.datasets.coco.files.x/../../y=http://x.org/a.json"])


@pytest.mark.slow
def test_a_terminated_run_leaves_nothing_running_in_mlflow_or_on_the_machine(tmp_path):
    # D9: `ray job stop` (SIGTERM to the driver) left the invocation's run and its stage's run RUNNING in
    # MLflow forever.
    import os
    import signal
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    command = [sys.executable, str(REPO_ROOT / "pipeline" / "run.py"), "--config", str(TINY), "--workdir",
               str(tmp_path), "--stage", "download"]
    log = tmp_path / "run.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")

    def runs() -> dict[str, str]:
        exp = client.get_experiment_by_name("vlp-pipeline") if (tmp_path / "mlflow.db").exists() else None
        return {} if exp is None else {r.info.run_name: r.info.status for r in client.search_runs(
            [exp.experiment_id])}

    deadline = time.monotonic() + 180
    while runs().get("download") != "RUNNING":
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    assert runs() == {"tiny:download": "KILLED", "world": "FINISHED", "download": "KILLED"}, log.read_text()
    assert not (tmp_path / "download").exists() or not [
        p for p in (tmp_path / "download").iterdir() if not p.name.startswith(".")]  # nothing committed
    # The Ray it started went with it (its processes share the run's session).
    deadline = time.monotonic() + 60
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, subprocess.run(["ps", "-o", "pid,args", "-g", str(proc.pid)],
                                                           capture_output=True, text=True).stdout
        time.sleep(0.5)
