"""A download within ``download.in_process_max_images`` fetches in the stage's own process: it works, and
counts, with no Ray started at all."""

from __future__ import annotations

import pyarrow.parquet as pq
import ray
from test_download_stage import HOST, N_TRAIN, TRAIN_URL, config, image_rows, make_site, run_stage

from worldgen.mirror import Mirror


def test_small_download_needs_no_ray(monkeypatch, tmp_path):
    assert not ray.is_initialized(), "an earlier test left Ray running"
    # A shard sent to Ray now fails the run instead of auto-starting Ray (or joining another on this host).
    monkeypatch.setattr("ray._private.auto_init_hook.enable_auto_connect", False)
    www, _ = make_site(tmp_path / "site", slow_every=None)
    train_only = {"cc": {"files": {"train": TRAIN_URL}}}
    with Mirror(www) as mirror:
        result = run_stage(config(mirror.base_url, in_process_max_images=N_TRAIN, datasets=train_only),
                           tmp_path / "out")
    assert not ray.is_initialized()
    assert result.params["download.runner"] == "process"
    assert result.metrics["images.cc.ok"] == N_TRAIN and result.metrics["shards.total"] == N_TRAIN // 4
    rows = image_rows(tmp_path / "out")
    assert [r["key"] for r in rows] == sorted(f"cc:train:{i}" for i in range(N_TRAIN))
    for row in rows:
        assert row["image"] == (www / HOST / "train" / f"{row['key'].rsplit(':', 1)[1]}.jpg").read_bytes()
    assert pq.read_table(tmp_path / "out" / "tables" / "captions.parquet").num_rows == N_TRAIN
