"""The contract every stage implements: ``run(ctx) -> StageResult``.

The stage graph (``pipeline/dag.py``) owns caching, atomic commit and MLflow runs; a stage only
reads ``ctx.inputs`` and the config sections it declared, and writes into ``ctx.out_dir``.
``ctx.out_dir`` is deterministic for a cache key, so a stage killed half-way finds its earlier
work there and may resume from it (download does, at shard granularity).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class StageError(RuntimeError):
    """A failure the user can act on; the CLI prints ``str(err)`` as one line and exits non-zero.

    Stages run in Ray workers, so the error travels back to the driver pickled. Subclasses with their own
    ``__init__`` signature (FormatError) cannot be rebuilt from ``args`` by the default reduction, and Ray
    then raises its own unserialisable-exception error instead of this one line: every StageError is
    rebuilt from its class, message and attributes instead.
    """

    def __reduce__(self):
        return _rebuild_stage_error, (type(self), str(self), dict(self.__dict__))


def _rebuild_stage_error(cls: type[StageError], message: str, state: dict[str, Any]) -> StageError:
    err = cls.__new__(cls)
    RuntimeError.__init__(err, message)
    err.__dict__.update(state)
    return err


@dataclass(frozen=True)
class MetricLogger:
    """The one way metrics reach MLflow: into one run, from any process (a stage in a Ray worker, rank 0 of
    a Ray Train run, the graph runner logging a stage's final metrics); a no-op without a run.

    Names are ``/``-separated (``val/itm_acc``, ``<variant>/train/lr``), the same for a curve and for its last
    value in the stage's final metrics.
    """

    tracking_uri: str | None = None
    run_id: str | None = None

    def log(self, metrics: Mapping[str, float], step: int = 0,
            steps: Mapping[str, int] | None = None) -> None:
        """``metrics`` at ``step``; ``steps`` gives some of them their own step."""
        if self.run_id is None or not metrics:
            return
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        now = int(time.time() * 1000)
        steps = steps or {}
        batch = [Metric(k, float(v), now, steps.get(k, step)) for k, v in metrics.items()]
        MlflowClient(self.tracking_uri).log_batch(self.run_id, metrics=batch)


@dataclass
class StageContext:
    cfg: Any  # pipeline.config.PipelineConfig (kept untyped here so stages/ does not import pipeline/)
    workdir: Path
    out_dir: Path
    inputs: dict[str, Path]
    mlflow_run_id: str | None = None
    mlflow_tracking_uri: str | None = None
    # Base URL of the loopback mirror the graph serves the world on, for a stage whose spec asks for it
    # (``serves_world``). A random port: never part of a cache key or of a compared output.
    mirror_url: str | None = None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("vlp.stage"))

    @property
    def metrics(self) -> MetricLogger:
        """The logger of this stage's MLflow run (to hand to processes the stage starts)."""
        return MetricLogger(self.mlflow_tracking_uri, self.mlflow_run_id)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log live metrics (curves) to this stage's MLflow run; a no-op outside the pipeline."""
        self.metrics.log(metrics, step)

    def inputs_by_seed(self, stage: str) -> dict[int, Path]:
        """``stage``'s output per seed: a stage run over several seeds (``seeds``) sees each seed's as
        ``<stage>@<seed>``; in a one-seed run it is ``stage``, of the root seed."""
        if stage in self.inputs:
            return {int(self.cfg.seed): self.inputs[stage]}
        found = {int(label.partition("@")[2]): path for label, path in self.inputs.items()
                 if label.partition("@")[0] == stage and label.partition("@")[2]}
        return dict(sorted(found.items()))


@dataclass
class StageResult:
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    # Paths relative to out_dir that are logged to MLflow as artifacts (stats, reports, figures).
    artifacts: list[str] = field(default_factory=list)
    # The step of each final metric that is the last point of a curve (``val/itm_acc`` of the last
    # validation); the others are logged at step 0.
    metric_steps: dict[str, int] = field(default_factory=dict)
    # MLflow tags of the stage's run (a verdict a user should see in the run list, e.g. ``alignment``).
    tags: dict[str, str] = field(default_factory=dict)
