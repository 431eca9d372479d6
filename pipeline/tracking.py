"""MLflow glue: one parent run per invocation, one child run per stage (cached or not).

Child runs are created through ``MlflowClient`` with an explicit parent id so that a stage running in
any Ray worker process can open its own run and log live (training curves later) without relying on
``mlflow``'s per-process active-run stack.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from mlflow.entities import Param, RunTag
from mlflow.tracking import MlflowClient

MAX_PARAM_LEN = 500  # MLflow's limit on a param value


def tracking_uri(configured: str | None, workdir: Path) -> str:
    return (
        os.environ.get("MLFLOW_TRACKING_URI")
        or configured
        or f"sqlite:///{Path(workdir).resolve()}/mlflow.db"
    )


# MLflow's alphabet for param and metric names; anything else (a study row named "+wra") becomes "_".
_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9_\-. :/]")


def mlflow_name(name: str) -> str:
    return _NOT_IN_NAME.sub("_", name)


def mlflow_metric_names(metrics: dict[str, float], steps: dict[str, int] | None = None,
                        ) -> tuple[dict[str, float], dict[str, int]]:
    """``metrics`` (and their ``steps``) under names MLflow accepts; the manifest keeps the stage's own.
    Two names that become one stop with a one-line error instead of one overwriting the other."""
    owner: dict[str, str] = {}  # MLflow name -> the stage's name
    for name in metrics:
        safe = mlflow_name(name)
        if owner.setdefault(safe, name) != name:
            raise ValueError(f"metrics {owner[safe]!r} and {name!r} are both {safe!r} in MLflow; rename one")
    renamed = {name: safe for safe, name in owner.items()}
    return ({renamed[k]: v for k, v in metrics.items()},
            {renamed[k]: v for k, v in (steps or {}).items() if k in renamed})


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for k, v in data.items():
            # A seed's stage label ("pretrain@1") becomes "pretrain.seed1", not "pretrain_1".
            out.update(flatten(v, f"{prefix}{mlflow_name(str(k).replace('@', '.seed'))}."))
        return out
    return {prefix.rstrip("."): str(data)[:MAX_PARAM_LEN]}


# MLflow 3's UI opens an experiment on the view its kind names; ours train models (runs, metrics, the model
# registry), not GenAI traces, which the UI may otherwise infer for an experiment it has not classified.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"


class Tracker:
    def __init__(self, uri: str, experiment: str, workdir: Path):
        self.uri = uri
        self.client = MlflowClient(uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            # An explicit artifact root: the default would land in the current directory.
            root = (Path(workdir).resolve() / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=root,
                                                               tags={KIND_TAG: KIND})
        else:
            self.experiment_id = exp.experiment_id
            if exp.tags.get(KIND_TAG) != KIND:  # an experiment made before the tag, or by hand
                self.client.set_experiment_tag(self.experiment_id, KIND_TAG, KIND)

    def start_run(self, name: str, parent_id: str | None = None, tags: dict[str, Any] | None = None) -> str:
        # A REST tracking server (multi-node runs) accepts only string tag values; sqlite coerces.
        all_tags = {k: str(v) for k, v in (tags or {}).items() if v is not None}
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        return self.client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id

    def log(self, run_id: str, params: dict[str, Any] | None = None,
            tags: dict[str, str] | None = None) -> None:
        """Params and tags; metrics go through ``stages.base.MetricLogger``."""
        self.client.log_batch(
            run_id,
            params=[Param(k, v) for k, v in flatten(params or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )

    def log_artifacts(self, run_id: str, paths: list[Path], base: Path) -> None:
        for p in paths:
            rel_parent = str(p.relative_to(base).parent)
            artifact_path = None if rel_parent == "." else rel_parent
            if p.is_dir():
                self.client.log_artifacts(run_id, str(p), artifact_path=str(p.relative_to(base)))
            else:
                self.client.log_artifact(run_id, str(p), artifact_path=artifact_path)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def end_interrupted(self, parent_id: str) -> None:
        """An interrupted invocation: its run and every run under it still RUNNING (stage runs, a sweep's
        trial runs) end KILLED, so that the UI never shows them running forever."""
        running = self.client.search_runs([self.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                          max_results=10_000)
        parent_of = {r.info.run_id: r.data.tags.get("mlflow.parentRunId") for r in running}

        def under(run_id: str | None) -> bool:
            while run_id is not None and run_id != parent_id:
                if run_id not in parent_of:  # an ancestor that already ended
                    parent_of[run_id] = self.client.get_run(run_id).data.tags.get("mlflow.parentRunId")
                run_id = parent_of[run_id]
            return run_id == parent_id

        for run in running:
            if run.info.run_id != parent_id and under(run.info.run_id):
                self.end(run.info.run_id, "KILLED")
        self.end(parent_id, "KILLED")
