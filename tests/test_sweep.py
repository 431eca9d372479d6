"""The sweep stage: studies as config (rows, baseline, per-row settings), the comparison table's numbers,
and a 2-row x 2-seed study on real Ray Tune trials that each fit a Ray Train run: nested MLflow runs, ASHA,
a trial killed mid-run retried from its checkpoint, the table, the chart and the registered encoder."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import mlflow
import mlflow.pytorch
import pytest
import ray
import torch
import yaml
from mlflow.tracking import MlflowClient
from ray import cloudpickle, tune
from test_pretrain import build_store

from pipeline.config import ConfigError, RayConfig, load_config
from stages.base import StageContext, StageError
from stages.outputs.sweep import SweepOutput
from stages.pretrain.config import PretrainConfig
from stages.pretrain.sweep import (
    COMPLETED,
    FAILED,
    STOPPED,
    TRIAL_RESOURCES,
    best_trial,
    comparison,
    run_study,
    table_markdown,
)
from stages.pretrain.sweep_config import Study, SweepConfig, metric_source, row_config
from vlp.train.runtime import RuntimeConfig

cloudpickle.register_pickle_by_value(sys.modules[__name__])

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def study(**over) -> Study:
    rows = [{"name": "mlm_itm", "tasks": {"mlm": 1, "itm": 1}},
            {"name": "+mrc_kl", "tasks": {"mlm": 1, "itm": 1, "mrc_kl": 1}, "paper": {"itm_acc": 0.5}}]
    base = {"name": "t", "seeds": [0, 1], "rows": rows}
    return Study.model_validate(base | over)


def test_a_row_is_the_pretrain_section_with_its_tasks_settings_and_the_study_budget():
    s = study(steps=40, report_every=10,
              rows=[{"name": "no_cond", "tasks": {"mlm": 1, "itm": 1},
                     "pretrain": {"masking": "joint", "optim": {"lr": 1e-3}}}])
    base = PretrainConfig(tasks={"mlm": 2, "mrfr": 1, "itm": 2}, optim={"lr": 5e-5, "warmup": 0.2})
    cfg = row_config(base, s, s.rows[0])
    assert cfg.tasks == {"mlm": 1, "itm": 1}  # replaced, not merged
    assert cfg.masking == "joint" and cfg.optim.lr == 1e-3 and cfg.optim.warmup == 0.2  # merged
    assert cfg.steps == 40 and cfg.validation.every == 10 and cfg.checkpoint_every == 10
    assert base.steps == 1500 and base.tasks == {"mlm": 2, "mrfr": 1, "itm": 2}  # the base is untouched


def test_a_bad_study_stops_the_config_with_one_line_naming_the_row(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nasha: {enabled: false}\nrows:\n  - {name: a, tasks: {mlm: 1, itm: 1}}\n"
                    "  - {name: b, tasks: {mlm: 1}}\n")
    with pytest.raises(ConfigError, match=r"sweep\.study\.rows\[1\] \(b\): the study metric itm_acc needs "
                                          r"the itm task"):
        load_config(TINY, [f"sweep.study={path}"])
    path.write_text("name: s\nasha: {enabled: false}\n"
                    "rows:\n  - {name: a, tasks: {mlm: 1, itm: 1}, pretrain: {masking: sideways}}\n")
    with pytest.raises(ConfigError, match=r"sweep\.study\.rows\[0\] \(a\): .*masking"):
        load_config(TINY, [f"sweep.study={path}"])
    path.write_text("name: s\nsteps: 40\nasha: {grace_steps: 40}\n"
                    "rows:\n  - {name: a, tasks: {mlm: 1, itm: 1}}\n")
    with pytest.raises(ConfigError, match=r"sweep\.study\.asha\.grace_steps \(40\) must be below the step "
                                          r"budget \(40\)"):
        load_config(TINY, [f"sweep.study={path}"])
    # tiny: 30 steps, a report every 10, the retrieval validation every 750 steps (and at the end)
    path.write_text("name: s\nmetric: r_precision\nasha: {enabled: false}\n"
                    "rows:\n  - {name: a, tasks: {mlm: 1, itm: 1, vta: 1}}\n")
    with pytest.raises(ConfigError, match=r"sweep\.study\.rows\[0\] \(a\): the study metric r_precision "
                                          r"comes from the zero-shot retrieval validation \(every "
                                          r"validation\.retrieval_every = 750 steps\), which not every "
                                          r"report \(report_every = 10\) runs") as err:
        load_config(TINY, [f"sweep.study={path}"])
    assert "(got" not in str(err.value)  # a check across sections does not print the whole config
    for fix in ("report_every: 30\n", "report_every: 20\n"):  # the last step only / every retrieval run
        path.write_text(f"name: s\nmetric: zs_ir_r1\n{fix}asha: {{enabled: false}}\n"
                        "rows:\n  - {name: a, tasks: {mlm: 1, itm: 1}}\n")
        over = ["pretrain.validation.retrieval_every=10"] if "20" in fix else []
        assert load_config(TINY, [f"sweep.study={path}", *over]).sweep.study.metric == "zs_ir_r1"
    with pytest.raises(ConfigError, match=r"sweep\.study: .*study file .*nowhere\.yaml not found"):
        load_config(TINY, ["sweep.study=nowhere.yaml"])
    with pytest.raises(ValueError, match="baseline 'c' is not a row"):
        study(baseline="c")
    with pytest.raises(ValueError, match="a name appears twice"):
        study(rows=[{"name": "a", "tasks": {"itm": 1}}] * 2)
    with pytest.raises(ValueError, match="letters, digits"):
        study(rows=[{"name": "a/b", "tasks": {"itm": 1}}])


@pytest.mark.parametrize("metric, source", [
    ("itm_acc", ("itm", False)), ("mrc_kl_acc", ("mrc_kl", False)), ("owa_topk_acc", (None, False)),
    ("itm_loss", (None, False)), ("zs_ir_r1", ("itm", True)), ("zs_itc_rerank_tr_r5", ("itc", True)),
    ("zs_damsm_ir_r1", (None, True)), ("r_precision", (None, True)), ("cider", (None, True))])
def test_a_study_metric_names_the_task_it_needs_and_whether_only_retrieval_validation_writes_it(metric,
                                                                                             source):
    assert metric_source(metric) == source


def test_a_damsm_recall_metric_does_not_ask_rows_for_itm(tmp_path):
    path = tmp_path / "s.yaml"  # vta alone scores zs_damsm_*; tiny reports its 30 steps only at the end
    path.write_text("name: s\nmetric: zs_damsm_ir_r1\nreport_every: 30\nasha: {enabled: false}\n"
                    "rows:\n  - {name: a, tasks: {mlm: 1, vta: 1}}\n")
    assert load_config(TINY, [f"sweep.study={path}"]).sweep.study.rows[0].tasks == {"mlm": 1, "vta": 1}


def test_the_ready_studies_load_with_the_config_they_name_and_no_other():
    studies = sorted((TINY.parent / "sweeps").glob("*.yaml"))
    assert {p.stem for p in studies} >= {"demo", "uniter_table2", "codis", "laviter", "object_word"}
    for path in studies:
        config = Study.model_validate(yaml.safe_load(path.read_text())).config or "demo"
        cfg = load_config(TINY.parent / f"{config}.yaml", [f"sweep.study={path}"])
        assert cfg.sweep.study.rows and cfg.sweep.study.name == path.stem, path
    with pytest.raises(ConfigError, match=r"sweep\.study: study 'codis' is written for config 'codis' "
                                          r"\(--config configs/codis\.yaml\), not 'tiny'"):
        load_config(TINY, [f"sweep.study={TINY.parent / 'sweeps' / 'codis.yaml'}"])


def trial(row, seed, status, **metrics):
    return {"trial": f"{row}-s{seed}", "row": row, "seed": seed, "status": status, "step": 8,
            "metrics": metrics}


def test_the_table_averages_completed_trials_and_takes_deltas_to_the_baseline():
    s = study(table_metrics=["zs_ir_r1"])
    trials = [trial("mlm_itm", 0, COMPLETED, itm_acc=0.6, zs_ir_r1=0.1),
              trial("mlm_itm", 1, COMPLETED, itm_acc=0.8, zs_ir_r1=0.3),
              trial("+mrc_kl", 0, COMPLETED, itm_acc=0.9, zs_ir_r1=0.4),
              trial("+mrc_kl", 1, STOPPED, itm_acc=0.1),
              trial("+mrc_kl", 2, FAILED)]
    base, other = comparison(s, trials)
    assert base["n"] == 2 and base["itm_acc/mean"] == pytest.approx(0.7)
    assert base["itm_acc/sd"] == pytest.approx(statistics.stdev([0.6, 0.8]))
    assert (base["itm_acc/min"], base["itm_acc/max"]) == (0.6, 0.8)
    assert base["itm_acc/delta"] == pytest.approx(0.0)
    assert (other["n"], other["n_stopped"], other["n_failed"]) == (1, 1, 1)
    assert other["itm_acc/mean"] == 0.9 and other["itm_acc/sd"] == 0.0
    assert other["itm_acc/delta"] == pytest.approx(0.2) and other["zs_ir_r1/delta"] == pytest.approx(0.2)
    assert other["itm_acc/paper_delta"] == 0.5
    md = table_markdown(s, [base, other], 1.5)
    row = "| `+mrc_kl` | 1 (+1 stopped) (+1 failed) | 0.9000 ± 0.0000 (0.9000–0.9000) | +0.2000 | +0.5 |"
    assert row in md
    assert best_trial(s, [base, other], trials)["trial"] == "+mrc_kl-s0"
    assert best_trial(study(mode="min"), [base, other], trials)["trial"] == "mlm_itm-s0"
    with pytest.raises(StageError, match="no trial of study 't' completed with itm_acc"):
        best_trial(s, comparison(s, trials[3:]), trials[3:])


@dataclass
class TrialSteps:
    """Rank 0 of every trial appends its steps to ``<dir>/<trial>.txt``; the first trial to reach ``kill_at``
    exits hard there, once, after Ray Train registered its checkpoint of ``after`` (it names itself in
    ``<dir>/killed``)."""

    dir: str
    kill_at: int
    after: int

    def __call__(self, event) -> None:
        storage = ray.train.get_context().get_storage().experiment_fs_path
        name = Path(storage).parents[1].name  # trials/<name>/ray_train/<run>
        if event.rank != 0:
            return
        with open(os.path.join(self.dir, f"{name}.txt"), "a") as f:
            f.write(f"{event.step}\n")
        marker = Path(self.dir) / "killed"
        if event.step != self.kill_at or marker.exists():
            return
        marker.write_text(name)
        snapshot = Path(storage) / "checkpoint_manager_snapshot.json"
        deadline = time.time() + 60
        while time.time() < deadline:  # the controller registers reports when it polls the workers
            if snapshot.exists():
                latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
                if latest.get("metrics", {}).get("step", 0) >= self.after:
                    break
            time.sleep(0.1)
        os._exit(1)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def local_ray():
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"
    # With the dashboard (on a free port): Train's placement group cleaner asks the State API whether a
    # trial's controller is gone, and Tune ends a trial's process (and its controller) as soon as it returns.
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_port=free_port(),
             logging_level="WARNING")
    yield
    ray.shutdown()
    os.environ.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")


def test_a_trial_holds_no_cpu_so_its_train_workers_can_take_every_cpu(local_ray, tmp_path):
    @ray.remote(num_cpus=2)  # what a demo trial's two Train workers hold on this 2-CPU cluster
    def every_cpu():
        return True

    def trial(config):
        # Train places its workers in a placement group of its own, outside the trial's.
        tune.report({"ran": ray.get(every_cpu.options(scheduling_strategy="DEFAULT").remote(), timeout=30)})

    grid = tune.Tuner(tune.with_resources(trial, TRIAL_RESOURCES),
                      run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0)).fit()
    assert [r.metrics.get("ran") for r in grid] == [True], [r.error for r in grid]


@pytest.mark.slow
def test_a_study_runs_trials_on_tune_and_train_and_registers_the_best_encoder(local_ray, tmp_path,
                                                                              monkeypatch):
    store = build_store(tmp_path / "store", n_images=40)
    base = PretrainConfig(
        train_dbs=["toy_train"], batch_units=300, num_workers=1, log_every=2,
        optim={"warmup": 0.1, "lr": 1e-3}, max_failures=0,  # a dead worker fails the trial: Tune retries it
        validation={"dbs": ["toy_val"], "holdout_images": 0, "retrieval_db": "toy_test",
                    "retrieval_chunk": (3, 16)})
    # ASHA on, two trials at a time: the first to report at the rung is never stopped, later ones may be.
    s = study(steps=8, report_every=4, asha={"grace_steps": 4, "reduction_factor": 2},
              table_metrics=["itm_acc", "zs_ir_r1"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    parent = client.create_run(client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri()))
    steps_dir = tmp_path / "steps"
    steps_dir.mkdir()
    out = SweepOutput(tmp_path / "out")
    cfg = SimpleNamespace(pretrain=base, sweep=SweepConfig(study=s, registered_model="enc"), seed=0,
                          runtime=RuntimeConfig(precision="fp32"), ray=RayConfig())
    ctx = StageContext(cfg=cfg, workdir=tmp_path, out_dir=out.root,
                       inputs={"txtdb": store.txtdb.root, "features": store.features.root},
                       mlflow_run_id=parent.info.run_id, mlflow_tracking_uri=uri)
    # As the graph runs a stage: in a Ray task whose runtime env names the cluster, which Train's placement
    # group cleaner needs when another Ray runs on the machine (else a stopped trial's workers leak).
    task = ray.remote(num_cpus=0)(run_study).options(
        runtime_env={"env_vars": {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}})
    result = ray.get(task.remote(ctx, hooks=[TrialSteps(str(steps_dir), kill_at=6, after=4)]))

    record = json.loads(out.study_path.read_text())
    trials = {t["trial"]: t for t in record["trials"]}
    assert sorted(trials) == ["+mrc_kl-s0", "+mrc_kl-s1", "mlm_itm-s0", "mlm_itm-s1"]
    # The killed trial was retried by Tune and resumed from its step-4 checkpoint to the end.
    killed = (steps_dir / "killed").read_text()
    steps = [int(x) for x in (steps_dir / f"{killed}.txt").read_text().split()]
    assert steps == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]
    assert trials[killed]["status"] == COMPLETED and trials[killed]["step"] == 8
    for name, t in trials.items():
        assert t["status"] in (COMPLETED, STOPPED), (name, t)
        if t["status"] == STOPPED:  # stopped at the first rung (the stop may reach it a few steps later)
            assert t["step"] >= 4 and not out.trial(name).metrics_path.exists()
        else:
            final = json.loads(out.trial(name).metrics_path.read_text())["final"]
            assert t["metrics"] == final and {"itm_acc", "zs_ir_r1", "mlm_acc"} <= final.keys()

    # The table: mean and spread over each row's completed trials, deltas to the baseline row.
    rows = {r["row"]: r for r in __import__("csv").DictReader(open(out.root / "comparison.csv"))}
    for row in ("mlm_itm", "+mrc_kl"):
        done = [t for t in trials.values() if t["row"] == row and t["status"] == COMPLETED]
        assert int(rows[row]["n"]) == len(done)
        assert int(rows[row]["n_stopped"]) == 2 - len(done)
        if done:
            mean = statistics.fmean(t["metrics"]["itm_acc"] for t in done)
            assert float(rows[row]["itm_acc/mean"]) == pytest.approx(mean, rel=1e-5)
            assert result.metrics[f"{row}/itm_acc/mean"] == pytest.approx(mean)
    assert rows["+mrc_kl"]["itm_acc/paper_delta"] == "0.5"
    assert "| `mlm_itm` |" in (out.root / "comparison.md").read_text()
    assert out.figure_path.stat().st_size > 5000 and out.missing() == []

    # MLflow: one nested run per trial under the study's run, reused by the retried trial; stopped trials
    # say so.
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_trial = {r.data.tags["sweep.trial"]: r for r in children}
    assert sorted(by_trial) == sorted(trials) and len(children) == 4
    for name, run in by_trial.items():
        expected = "FINISHED" if trials[name]["status"] == COMPLETED else "KILLED"
        assert run.info.status == expected, name
        params = run.data.params
        assert params["row"] == trials[name]["row"] and params["seed"] == str(trials[name]["seed"])
        history = [m.step for m in client.get_metric_history(run.info.run_id, "val/itm_acc")]
        assert history[0] == 0, (name, history)
        if trials[name]["status"] == COMPLETED:
            assert history[-1] == trials[name]["step"], (name, history)
        else:  # ASHA's stop may reach the trial steps after its decision (its validations go on meanwhile)
            assert history[-1] >= trials[name]["step"], (name, history)
    assert by_trial[killed].data.params["tasks.itm"] == "1.0"

    # The best trial's encoder is in the registry as enc@champion and loads with its trained weights.
    best = out.best()
    done = [t for t in trials.values() if t["status"] == COMPLETED]
    means = {r: statistics.fmean(t["metrics"]["itm_acc"] for t in done if t["row"] == r)
             for r in {t["row"] for t in done}}
    assert best["row"] == max(means, key=means.get)
    assert best["registered"]["uri"] == "models:/enc@champion"
    # Through the environment, which monkeypatch restores: mlflow.set_tracking_uri sets MLFLOW_TRACKING_URI
    # for the rest of the process, and a later test module's pipeline runs in this worker logged there.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    loaded = mlflow.pytorch.load_model("models:/enc@champion")
    trained = out.best_trial().model().encoder.state_dict()
    assert loaded.state_dict().keys() == trained.keys()
    for key, value in trained.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    version = client.get_model_version_by_alias("enc", "champion")
    assert version.run_id == by_trial[best["trial"]].info.run_id


@pytest.mark.slow
def test_a_study_run_again_reports_its_completed_trials_without_training_them(local_ray, tmp_path):
    store = build_store(tmp_path / "store", n_images=40)
    base = PretrainConfig(
        train_dbs=["toy_train"], batch_units=300, num_workers=1, log_every=2,
        optim={"warmup": 0.1, "lr": 1e-3},
        validation={"dbs": ["toy_val"], "holdout_images": 0, "retrieval_db": "toy_test",
                    "retrieval_chunk": (3, 16)})
    # One trial: what is checked (no step trained twice, the same record) is per trial.
    s = study(seeds=[0], steps=4, report_every=2, asha={"enabled": False}, table_metrics=["itm_acc"],
              rows=[{"name": "mlm_itm", "tasks": {"mlm": 1, "itm": 1}}])
    out = SweepOutput(tmp_path / "out")
    cfg = SimpleNamespace(pretrain=base, sweep=SweepConfig(study=s), seed=0,
                          runtime=RuntimeConfig(precision="fp32"), ray=RayConfig())
    ctx = StageContext(cfg=cfg, workdir=tmp_path, out_dir=out.root,
                       inputs={"txtdb": store.txtdb.root, "features": store.features.root})
    task = ray.remote(num_cpus=0)(run_study).options(
        runtime_env={"env_vars": {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}})
    steps_dir = tmp_path / "steps"
    steps_dir.mkdir()
    hooks = [TrialSteps(str(steps_dir), kill_at=-1, after=0)]  # records every trial's steps, kills none
    first = ray.get(task.remote(ctx, hooks=hooks))
    first_trials = json.loads(out.study_path.read_text())["trials"]
    # The stage stopped after its trials completed (a killed driver, a machine out of memory) runs again in
    # the same dir: every trial is reported from its last checkpoint, none trains again.
    second = ray.get(task.remote(ctx, hooks=hooks))
    assert json.loads(out.study_path.read_text())["trials"] == first_trials
    assert {t["status"] for t in first_trials} == {COMPLETED}
    timing = "study_minutes"
    assert {k: v for k, v in second.metrics.items() if k != timing} == \
        {k: v for k, v in first.metrics.items() if k != timing}
    assert [t["trial"] for t in first_trials] == ["mlm_itm-s0"]
    assert (steps_dir / "mlm_itm-s0.txt").read_text().split() == ["1", "2", "3", "4"]


def test_a_final_checkpoint_cut_mid_copy_does_not_count(tmp_path):
    from stages.outputs.pretrain import PretrainOutput
    from stages.pretrain.checkpointing import save
    from stages.pretrain.stage import RUN_NAME
    from stages.pretrain.sweep import final_checkpoint

    trial = PretrainOutput(tmp_path / "trial")
    directory = trial.train_dir / RUN_NAME / "checkpoint_2026-12-04_00-00-00"
    directory.mkdir(parents=True)
    save(directory, {"step": 8, "weights": torch.zeros(1000)}, {"step": 8})
    assert final_checkpoint(trial, 8) == directory and final_checkpoint(trial, 9) is None
    state = directory / "state.pt"
    state.write_bytes(state.read_bytes()[:-200])  # the copy into storage cut short
    assert final_checkpoint(trial, 8) is None
