"""The ``sweep`` stage: a study of pretraining loss sets (``sweep.study``, see ``sweep_config.py``) run
as Ray Tune trials, one per row and seed, each a Ray Train pretraining run built by ``build_trainer``;
output layout in ``stages/outputs/sweep.py``.

Ray 2.60 (Train V2) cannot take a trainer as a Tune trainable: each trial is a function that builds and fits
its own TorchTrainer, with Tune's ``TuneReportCallback`` forwarding every ``ray.train.report`` (rank 0's
validation metrics at ``report_every`` steps) to the trial, so ASHA sees them. The trial's storage is
``trials/<row>-s<seed>/ray_train`` (named by row and seed, never by time): a trial Tune retries after a
failure resumes from its last checkpoint. A trial asks Tune for no CPU (``TRIAL_RESOURCES``: its Train workers
hold the CPUs, and may take all of them) and at most ``cluster CPUs // (workers x threads)`` run at once, so
trials never wait on each other's workers.

MLflow: the stage's run is the study's parent; each trial gets a nested run (params: row, seed, the row's
tasks and settings; metrics: the training and validation curves, logged live by rank 0), reused when the
trial is retried. The comparison table and chart are the stage's artifacts; the best trial's encoder is
registered in the model registry (``sweep.registered_model``, alias ``champion``).

Inputs: ``txtdb`` and ``features`` (and ``alignment`` when a row trains ``owa``), of the run's root seed; the
study's seeds are pretraining seeds. With ASHA on and several trials at once, which trials ASHA stops depends
on the order reports arrive in: exploration, not a result; a final comparison turns ASHA off.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from stages.base import MetricLogger, StageContext, StageError, StageResult
from stages.outputs.alignment import AlignmentOutput
from stages.outputs.features import FeaturesOutput
from stages.outputs.pretrain import PretrainOutput
from stages.outputs.sweep import COMPLETED, SweepOutput
from stages.outputs.txt_db import TxtDbOutput
from stages.pretrain import checkpointing
from stages.pretrain.config import PretrainConfig
from stages.pretrain.data import PretrainInputs
from stages.pretrain.loop import StepEvent
from stages.pretrain.stage import RUN_NAME, build_trainer, export, fit, preflight
from stages.pretrain.sweep_config import Study, StudyRow, row_config, trial_name
from vlp.train.runtime import RuntimeConfig

STOPPED, FAILED = "stopped_by_asha", "failed"
# A trial's own request: Tune needs a non-empty one, and any CPU in it (a token 0.01 included) is missing
# when the trial's Train workers ask for every CPU of the cluster (2 workers x 1 CPU on 2 cores never start).
# Memory is a resource every node has; 1 MiB of it never binds.
TRIAL_RESOURCES = {"memory": 1 << 20}
CHAMPION = "champion"


@dataclass(frozen=True)
class TrialSpec:
    """What every trial gets besides its row and seed (plain values: Tune ships it to the trial actors)."""

    base: dict[str, Any]  # the pipeline's pretrain section, dumped
    study: dict[str, Any]
    runtime: dict[str, Any]
    txtdb_dir: str
    features_dir: str
    alignment_dir: str | None
    out_dir: str
    tracking_uri: str | None
    parent_run_id: str | None
    placement: str
    controller_failure_limit: int
    hooks: Sequence[Callable[[StepEvent], None]] = field(default_factory=tuple)  # fault injection in tests

    def inputs(self) -> PretrainInputs:
        alignment = AlignmentOutput(Path(self.alignment_dir)) if self.alignment_dir else None
        return PretrainInputs(TxtDbOutput(Path(self.txtdb_dir)), FeaturesOutput(Path(self.features_dir)),
                              alignment)


def _row(study: Study, name: str) -> StudyRow:
    return next(r for r in study.rows if r.name == name)


def _find_trial_run(tracking_uri: str | None, parent_run_id: str, name: str) -> tuple[str, str | None]:
    """(experiment id, the run id of trial ``name`` under the study's run, or None)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_run(parent_run_id).info.experiment_id
    found = client.search_runs([experiment], filter_string=(
        f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`sweep.trial` = '{name}'"))
    return experiment, (found[0].info.run_id if found else None)


def trial_run(spec: TrialSpec, row: StudyRow, seed: int, cfg: PretrainConfig) -> MetricLogger:
    """The trial's nested MLflow run under the study's (the one a retried trial already opened, if any)."""
    if spec.parent_run_id is None:
        return MetricLogger()
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(spec.tracking_uri)
    name = trial_name(row.name, seed)
    experiment, run_id = _find_trial_run(spec.tracking_uri, spec.parent_run_id, name)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        return MetricLogger(spec.tracking_uri, run_id)
    run_id = client.create_run(experiment, run_name=name, tags={
        "mlflow.parentRunId": spec.parent_run_id, "sweep.trial": name, "sweep.row": row.name,
        "sweep.seed": str(seed)}).info.run_id
    params = {"row": row.name, "seed": seed, "steps": cfg.steps, "report_every": cfg.validation.every}
    params |= {f"tasks.{task}": ratio for task, ratio in sorted(cfg.tasks.items())}
    params |= {f"pretrain.{k}": json.dumps(v) for k, v in sorted(row.pretrain.items())}
    client.log_batch(run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()],
                     tags=[RunTag("sweep.paper_note", row.paper_note)] if row.paper_note else [])
    return MetricLogger(spec.tracking_uri, run_id)


def run_trial(config: dict[str, Any], spec: TrialSpec) -> None:
    """One Tune trial: pretrain ``config["row"]`` with seed ``config["seed"]``; the stage exports the model
    afterwards."""
    study = Study.model_validate(spec.study)
    row, seed = _row(study, config["row"]), int(config["seed"])
    cfg = row_config(PretrainConfig.model_validate(spec.base), study, row)
    out = SweepOutput(Path(spec.out_dir)).trial(trial_name(row.name, seed))
    done = final_checkpoint(out, cfg.steps)
    if done is not None:
        # Completed before the study was interrupted (the stage runs again): a run resumed at its last
        # step trains and reports nothing, and Tune refuses a trial without the study metric: report again.
        tune.report({"step": cfg.steps, **checkpointing.load_progress(done)["validation"]})
        return
    inputs = spec.inputs()
    preflight(cfg, seed, inputs)
    trainer = build_trainer(cfg, inputs, out.train_dir, seed=seed, runtime=RuntimeConfig(**spec.runtime),
                            metrics=trial_run(spec, row, seed, cfg), hooks=spec.hooks,
                            placement=spec.placement, controller_failure_limit=spec.controller_failure_limit)
    # The trainer reads its RunConfig's callbacks when it fits: Tune's bridge joins them here, in the trial
    # (it refuses to be built outside a Tune session).
    trainer.run_config.callbacks = [*(trainer.run_config.callbacks or []), TuneReportCallback()]
    fit(trainer, out.train_dir)


def final_checkpoint(trial: PretrainOutput, steps: int) -> Path | None:
    """The trial's checkpoint of its last step, if it got there and the checkpoint is whole. ASHA's stop can
    reach a trial after it trained on and while Train copies its last checkpoint into storage: the copy then
    holds progress.json and a cut state.pt (seen in CI), and the trial counts as stopped."""
    for directory in sorted((trial.train_dir / RUN_NAME).glob("checkpoint_*")):
        progress = directory / checkpointing.PROGRESS_FILE
        if progress.is_file() and checkpointing.load_progress(directory)["step"] == steps \
                and _whole(directory / checkpointing.STATE_FILE):
            return directory
    return None


def _whole(state: Path) -> bool:
    """Whether a torch.save file is complete: a zip whose central directory (written last) is there."""
    try:
        with zipfile.ZipFile(state):
            return True
    except (OSError, zipfile.BadZipFile):
        return False


def export_trial(study: Study, base: PretrainConfig, inputs: PretrainInputs, trial: dict[str, Any],
                 checkpoint: Path, out: SweepOutput) -> dict[str, float]:
    """Write the trial's model/, tokenizer/ and metrics.json from its last checkpoint; returns its final
    validation."""
    cfg = row_config(base, study, _row(study, trial["row"]))
    corpus = preflight(cfg, trial["seed"], inputs)
    return export(cfg, corpus, checkpoint, inputs.txtdb.tokenizer_dir, out.trial(trial["trial"]))["final"]


def _end(metrics: MetricLogger, status: str, tags: dict[str, str] | None = None) -> None:
    if metrics.run_id is None:
        return
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(metrics.tracking_uri)
    if tags:
        client.log_batch(metrics.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    client.set_terminated(metrics.run_id, status=status)


def concurrent_trials(study: Study, cfg: PretrainConfig, runtime: RuntimeConfig) -> int:
    """Trials whose Train workers the cluster holds at once (at least one)."""
    if study.max_concurrent_trials is not None:
        return study.max_concurrent_trials
    cpus = ray.cluster_resources().get("CPU", 0)
    return max(1, int(cpus // (cfg.num_workers * runtime.threads)))


def build_tuner(study: Study, base: PretrainConfig, spec: TrialSpec, runtime: RuntimeConfig,
                storage: Path) -> tune.Tuner:
    steps = study.steps or base.steps
    # No decision at the last step: ASHA stops a trial whose report reaches max_t (or a rung there), and Tune
    # then kills the trial's process while Train may still be finishing its final checkpoint. With max_t one
    # step short every rung lies before the last report, and stop_last_trials off lets the trial end itself.
    scheduler = (ASHAScheduler(time_attr="step", max_t=steps - 1, grace_period=study.asha.grace_steps,
                               reduction_factor=study.asha.reduction_factor, stop_last_trials=False)
                 if study.asha.enabled else FIFOScheduler())
    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec), TRIAL_RESOURCES)
    return tune.Tuner(
        trainable,
        param_space={"row": tune.grid_search([r.name for r in study.rows]),
                     "seed": tune.grid_search(list(study.seeds))},
        tune_config=tune.TuneConfig(metric=study.metric, mode=study.mode, scheduler=scheduler,
                                    max_concurrent_trials=concurrent_trials(study, base, runtime)),
        run_config=tune.RunConfig(name="study", storage_path=str(storage.resolve()), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=study.max_failures)),
    )


def collect(grid: tune.ResultGrid, study: Study, base: PretrainConfig, inputs: PretrainInputs,
            out: SweepOutput, steps: int) -> list[dict[str, Any]]:
    """Every trial's row, seed, status, step reached and metrics. A trial that checkpointed its last step is
    completed, whatever Tune recorded of earlier attempts, and exported here (metrics: its final validation);
    the others were stopped by ASHA or failed (metrics: their last report)."""
    trials = []
    for result in grid:
        row, seed = result.config["row"], int(result.config["seed"])
        reported = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
        trial = {"trial": trial_name(row, seed), "row": row, "seed": seed,
                 "step": int(reported.get("step", 0)), "error": None}
        checkpoint = final_checkpoint(out.trial(trial["trial"]), steps)
        if checkpoint is not None:
            trial |= {"status": COMPLETED, "step": steps,
                      "metrics": export_trial(study, base, inputs, trial, checkpoint, out)}
        else:
            last = {k: v for k, v in reported.items() if k != "step" and not k.startswith("time")}
            trial |= {"status": FAILED if result.error is not None else STOPPED, "metrics": last}
            if result.error is not None:
                trial["error"] = " ".join(str(result.error).split())[:500]
        trials.append(trial)
    order = {r.name: i for i, r in enumerate(study.rows)}
    return sorted(trials, key=lambda t: (order[t["row"]], t["seed"]))


def comparison(study: Study, trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per row: completed trials, and per table metric mean / sd / min / max over them, the delta
    of the mean to the baseline row's, and the paper's delta."""
    metrics = list(dict.fromkeys([study.metric, *study.table_metrics]))
    means: dict[str, dict[str, float]] = {}
    table = []
    for row in study.rows:
        done = [t for t in trials if t["row"] == row.name and t["status"] == COMPLETED]
        record: dict[str, Any] = {"row": row.name, "n": len(done),
                                  "n_stopped": sum(t["row"] == row.name and t["status"] == STOPPED
                                                   for t in trials),
                                  "n_failed": sum(t["row"] == row.name and t["status"] == FAILED
                                                  for t in trials)}
        for m in metrics:
            values = [t["metrics"][m] for t in done if m in t["metrics"]]
            if values:
                record |= {f"{m}/mean": statistics.fmean(values), f"{m}/min": min(values),
                           f"{m}/max": max(values),
                           f"{m}/sd": statistics.stdev(values) if len(values) > 1 else 0.0}
                means.setdefault(row.name, {})[m] = record[f"{m}/mean"]
            if m in row.paper:
                record[f"{m}/paper_delta"] = row.paper[m]
        table.append(record)
    base = means.get(study.baseline_row, {})
    for record in table:
        for m in metrics:
            if f"{m}/mean" in record and m in base:
                record[f"{m}/delta"] = record[f"{m}/mean"] - base[m]
    return table


def table_csv(study: Study, table: list[dict[str, Any]]) -> str:
    metrics = list(dict.fromkeys([study.metric, *study.table_metrics]))
    columns = ["row", "n", "n_stopped", "n_failed"] + [f"{m}/{s}" for m in metrics
                                                       for s in ("mean", "sd", "min", "max", "delta",
                                                                 "paper_delta")]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    for record in table:
        writer.writerow({c: (f"{v:.6g}" if isinstance(v, float) else v) for c, v in record.items()})
    return buffer.getvalue()


VALIDATION = "Validation metrics after the step budget"


def table_markdown(study: Study, table: list[dict[str, Any]], minutes: float | None,
                   what: str = VALIDATION) -> str:
    """The comparison as Markdown: ``what`` says which numbers it compares; ``minutes``, the study's time."""
    metrics = list(dict.fromkeys([study.metric, *study.table_metrics]))
    lines = [f"#### Study `{study.name}`: {len(study.rows)} rows x seeds {list(study.seeds)}"
             + ("" if minutes is None else f", {minutes:.1f} min"),
             "",
             f"{what}, mean ± sample sd (min–max) over the completed "
             f"trials; Δ: the mean minus baseline row `{study.baseline_row}`'s; paper Δ: the paper's delta "
             "for the row (its own metric and data, for direction only).",
             "",
             "| row | n | " + " | ".join(f"{m} | Δ | paper Δ" for m in metrics) + " |",
             "|---|---|" + "---|---|---|" * len(metrics)]
    for record in table:
        n = f"{record['n']}" + (f" (+{record['n_stopped']} stopped)" if record["n_stopped"] else "") + \
            (f" (+{record['n_failed']} failed)" if record["n_failed"] else "")
        cells = [f"`{record['row']}`", n]
        for m in metrics:
            if f"{m}/mean" in record:
                cells.append(f"{record[f'{m}/mean']:.4f} ± {record[f'{m}/sd']:.4f} "
                             f"({record[f'{m}/min']:.4f}–{record[f'{m}/max']:.4f})")
            else:
                cells.append("–")
            delta = record.get(f"{m}/delta")
            cells.append("–" if delta is None or record["row"] == study.baseline_row else f"{delta:+.4f}")
            paper = record.get(f"{m}/paper_delta")
            cells.append("–" if paper is None else f"{paper:+g}")
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- `{r.name}`: {r.paper_note}" for r in study.rows if r.paper_note]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def comparison_figure(study: Study, trials: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in study.rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names) + 1.5), 3.6))
    for i, name in enumerate(names):
        values = [t["metrics"][study.metric] for t in trials
                  if t["row"] == name and t["status"] == COMPLETED and study.metric in t["metrics"]]
        if not values:
            continue
        mean = statistics.fmean(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        ax.bar(i, mean, yerr=sd, capsize=4, color="#8fb3d9" if name != study.baseline_row else "#d9a38f")
        ax.scatter([i] * len(values), values, color="black", s=10, zorder=3)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(study.metric)
    # Two lines: a two-row study's chart is 4 inches wide, which clipped the one-line title.
    ax.set_title(f"{study.name}: {study.metric} per row\n(mean ± sd, dots: seeds)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def best_trial(study: Study, table: list[dict[str, Any]], trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The row with the best mean study metric, and its completed trial with the best value."""
    key = f"{study.metric}/mean"
    ranked = [r for r in table if key in r]
    if not ranked:
        raise StageError(f"sweep: no trial of study {study.name!r} completed with {study.metric}; "
                         "see study.json for each trial's status")
    pick = max if study.mode == "max" else min
    row = pick(ranked, key=lambda r: r[key])["row"]
    done = [t for t in trials
            if t["row"] == row and t["status"] == COMPLETED and study.metric in t["metrics"]]
    return pick(done, key=lambda t: t["metrics"][study.metric])


def register_encoder(trial_out, name: str, run_id: str, tracking_uri: str) -> dict[str, Any]:
    """Log the trial's encoder as an MLflow model in its run, register it as ``name`` and point the
    ``champion`` alias at it: loadable as ``mlflow.pytorch.load_model("models:/<name>@champion")``."""
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    encoder = trial_out.model().encoder.eval()
    mlflow.set_tracking_uri(tracking_uri)
    tokenizer = sorted(str(p) for p in trial_out.tokenizer_dir.iterdir() if p.is_file())
    with mlflow.start_run(run_id=run_id):
        # pickle, not MLflow 3's default torch.export ("pt2"): the encoder takes a dict of ragged inputs.
        info = mlflow.pytorch.log_model(encoder, name="encoder", serialization_format="pickle",
                                        registered_model_name=name, extra_files=tokenizer)
    client = MlflowClient(tracking_uri)
    version = info.registered_model_version
    client.set_registered_model_alias(name, CHAMPION, str(version))
    return {"name": name, "version": int(version), "alias": CHAMPION, "uri": f"models:/{name}@{CHAMPION}"}


def run(ctx: StageContext) -> StageResult:
    return run_study(ctx)


def run_study(ctx: StageContext, hooks: Sequence[Callable[[StepEvent], None]] = ()) -> StageResult:
    """The stage; ``hooks`` reach every trial's training loop (fault injection in tests)."""
    study: Study | None = ctx.cfg.sweep.study
    if study is None:
        raise StageError("sweep: no study configured; name one with sweep.study=configs/sweeps/<name>.yaml")
    if not study.pretraining:
        raise StageError(f"sweep: study {study.name!r} is a finetuning study (pretraining: false), without "
                         "pretraining trials: run --stage sweep_downstream")
    base: PretrainConfig = ctx.cfg.pretrain
    runtime: RuntimeConfig = ctx.cfg.runtime
    out = SweepOutput(ctx.out_dir)
    spec = TrialSpec(
        base=base.model_dump(mode="json"), study=study.model_dump(mode="json"),
        runtime=runtime.model_dump(mode="json"), txtdb_dir=str(ctx.inputs["txtdb"]),
        features_dir=str(ctx.inputs["features"]),
        alignment_dir=str(ctx.inputs["alignment"]) if "alignment" in ctx.inputs else None,
        out_dir=str(out.root.resolve()), tracking_uri=ctx.mlflow_tracking_uri,
        parent_run_id=ctx.mlflow_run_id, placement=ctx.cfg.ray.placement.pretrain,
        controller_failure_limit=ctx.cfg.ray.controller_failure_limit, hooks=tuple(hooks))
    for row in study.rows:  # every row's data and budgets, before any trial starts
        preflight(row_config(base, study, row), study.seeds[0], spec.inputs())
    steps = study.steps or base.steps
    start = time.time()
    grid = build_tuner(study, base, spec, runtime, out.tune_dir).fit()
    minutes = (time.time() - start) / 60
    trials = collect(grid, study, base, spec.inputs(), out, steps)
    for t in trials:
        ctx.log.info("sweep: %s %s at step %d %s", t["trial"], t["status"], t["step"],
                     ", ".join(f"{k}={v:.4f}" for k, v in sorted(t["metrics"].items())
                               if k in (study.metric, *study.table_metrics)))
    close_trial_runs(spec, trials)
    table = comparison(study, trials)
    (out.root / "comparison.csv").write_text(table_csv(study, table))
    (out.root / "comparison.md").write_text(table_markdown(study, table, minutes))
    comparison_figure(study, trials, out.figure_path)
    best = best_trial(study, table, trials)
    registered = None
    if ctx.mlflow_run_id is not None:
        run_id = _find_trial_run(spec.tracking_uri, spec.parent_run_id, best["trial"])[1]
        registered = register_encoder(out.trial(best["trial"]), ctx.cfg.sweep.registered_model, run_id,
                                      ctx.mlflow_tracking_uri)
    out.best_path.write_text(json.dumps({"row": best["row"], "trial": best["trial"], "seed": best["seed"],
                                         "metric": study.metric, "value": best["metrics"][study.metric],
                                         "registered": registered}, indent=1) + "\n")
    out.study_path.write_text(json.dumps({"study": study.model_dump(mode="json"), "steps": steps,
                                          "minutes": round(minutes, 2), "trials": trials}, indent=1) + "\n")
    metrics = {f"{r['row']}/{k}": float(v) for r in table for k, v in r.items()
               if "/" in k and isinstance(v, float)}
    metrics |= {"trials/completed": float(sum(t["status"] == COMPLETED for t in trials)),
                "trials/stopped": float(sum(t["status"] == STOPPED for t in trials)),
                "trials/failed": float(sum(t["status"] == FAILED for t in trials)),
                "study_minutes": minutes}
    return StageResult(metrics=metrics, params={"study": study.name, "rows": [r.name for r in study.rows],
                                                "seeds": list(study.seeds), "steps": steps,
                                                "asha": study.asha.enabled},
                       artifacts=["comparison.md", "comparison.csv", "figures/comparison.png", "best.json",
                                  "study.json"],
                       tags={"best_row": best["row"], "best_trial": best["trial"]})


def close_trial_runs(spec: TrialSpec, trials: list[dict[str, Any]]) -> None:
    """Each trial's nested run ends with its status (Tune ends a trial's process without warning: at its
    last report, or when ASHA stops it); a completed trial's final validation is logged as ``final/*``."""
    if spec.parent_run_id is None:
        return
    status = {COMPLETED: "FINISHED", STOPPED: "KILLED", FAILED: "FAILED"}
    for t in trials:
        run_id = _find_trial_run(spec.tracking_uri, spec.parent_run_id, t["trial"])[1]
        if run_id is None:
            continue
        logger = MetricLogger(spec.tracking_uri, run_id)
        if t["status"] == COMPLETED:
            logger.log({f"final/{k}": v for k, v in t["metrics"].items()}, t["step"])
        _end(logger, status[t["status"]], {"sweep.status": t["status"], "sweep.step": str(t["step"])})
