import json
import os
from collections import defaultdict
from pathlib import Path

import pytest

# Two xdist workers each take a whole test file when they run dry (`--dist loadfile`). Left in xdist's own
# order (most tests first), the few long end-to-end files came last, and one of them ran on while the other
# worker idled (replayed on the measured file times: 947 s against 888 s heaviest first). Files go heaviest
# first by their last measured time (FILE_SECONDS; files not in it after them, in collection order), which
# `--record-file-seconds` rewrites from a full run.
FILE_SECONDS = Path(__file__).with_name("file_seconds.json")
_measured: defaultdict[str, float] = defaultdict(float)


def pytest_addoption(parser):
    parser.addoption("--record-file-seconds", action="store_true",
                     help=f"write each test file's time (setup + call + teardown) to {FILE_SECONDS.name}")


def pytest_collection_modifyitems(config, items):
    seconds = json.loads(FILE_SECONDS.read_text())
    items.sort(key=lambda item: -seconds.get(_file_of(item.nodeid), 0.0))  # stable: in-file order kept


def _file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_runtest_logreport(report):
    _measured[_file_of(report.nodeid)] += report.duration


@pytest.fixture(autouse=True)
def _no_external_cluster_or_tracking(monkeypatch):
    # Tests always start their own local Ray and use the sqlite store inside their own work dir.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.fixture(scope="session")
def write_world():
    """``write_world(out, world) -> WorldOutput``: the world stage's output for a worldgen config, written
    into ``out`` (created) with the dataset URLs of configs/demo.yaml. Tests build worlds only this way."""
    from pipeline.config import load_config
    from stages.base import StageContext
    from stages.outputs.world import WorldOutput
    from stages.world.stage import run

    demo = load_config()

    def write(out, world):
        out.mkdir(parents=True)
        cfg = demo.model_copy(update={"world": world})
        run(StageContext(cfg=cfg, workdir=out.parent, out_dir=out, inputs={}))
        return WorldOutput(out)

    return write


@pytest.fixture(scope="session")
def micro_world(write_world, tmp_path_factory):
    """The micro world (``worldgen.presets.micro``), built once per session; read it, never change it."""
    from worldgen.presets import micro

    return write_world(tmp_path_factory.mktemp("micro") / "world", micro())


_exit_status: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _exit_status.append(int(exitstatus))
    config = session.config
    # Under xdist the controller sees every worker's reports; a worker writes nothing.
    if config.getoption("record_file_seconds") and not hasattr(config, "workerinput"):
        ranked = sorted(_measured.items(), key=lambda kv: -kv[1])
        FILE_SECONDS.write_text(json.dumps({f: round(s, 1) for f, s in ranked}, indent=1) + "\n")


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    # CI once saw SIGSEGV *after* the summary line (all tests passed): a native extension's finalizer
    # (Ray's in-process driver, grpc, torch and lmdb all live in this process) crashing during interpreter
    # teardown. Everything is reported and flushed by now, so leave without that teardown.
    if _exit_status:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[0])
