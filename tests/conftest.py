import os

import pytest


@pytest.fixture(autouse=True)
def _no_external_cluster_or_tracking(monkeypatch):
    # Tests always start their own local Ray and use the sqlite store inside their own work dir.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


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
