"""The contract every stage implements: ``run(ctx) -> StageResult``.

The stage graph (``pipeline/dag.py``) owns caching, atomic commit and MLflow runs; a stage only
reads ``ctx.inputs`` and the config sections it declared, and writes into ``ctx.out_dir``.
``ctx.out_dir`` is deterministic for a cache key, so a stage killed half-way finds its earlier
work there and may resume from it (download does, at shard granularity).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class StageError(RuntimeError):
    """A failure the user can act on; the CLI prints ``str(err)`` as one line and exits non-zero."""


@dataclass
class StageContext:
    cfg: Any  # pipeline.config.PipelineConfig (kept untyped here so stages/ does not import pipeline/)
    workdir: Path
    out_dir: Path
    inputs: dict[str, Path]
    mlflow_run_id: str | None = None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("vlp.stage"))


@dataclass
class StageResult:
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    # Paths relative to out_dir that are logged to MLflow as artifacts (stats, reports, figures).
    artifacts: list[str] = field(default_factory=list)
