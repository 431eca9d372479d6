import pytest


@pytest.fixture(autouse=True)
def _no_external_cluster_or_tracking(monkeypatch):
    # Tests always start their own local Ray and use the sqlite store inside their own work dir.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
