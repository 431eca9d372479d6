import os

import pytest


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
