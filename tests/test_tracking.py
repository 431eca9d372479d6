"""The stage runs' params and the experiment's tags in a real sqlite MLflow store."""

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.tracking import Tracker, mlflow_metric_names
from stages.base import MetricLogger


def test_an_aggregate_over_seeds_logs_its_inputs_under_names_mlflow_accepts(tmp_path):
    # The eval aggregate of `seeds=[0,1]` has inputs named by seed labels, which MLflow refused ("@").
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "vlp-test", tmp_path)
    run = tracker.start_run("eval")
    tracker.log(run, params={"inputs": {"eval_vqa@0": "k0", "eval_vqa@1": "k1"}, "config": {"seed": 0}})
    params = MlflowClient(uri).get_run(run).data.params
    assert params == {"inputs.eval_vqa.seed0": "k0", "inputs.eval_vqa.seed1": "k1", "config.seed": "0"}


def test_the_experiment_opens_on_the_model_training_view_new_or_made_before(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    Tracker(uri, "new", tmp_path)
    old = client.create_experiment("old")  # made before the tag existed
    Tracker(uri, "old", tmp_path)
    for exp_id in (client.get_experiment_by_name("new").experiment_id, old):
        assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_studys_row_names_reach_mlflow_as_metric_names_it_accepts(tmp_path):
    # UNITER Table 2's row "+wra": MLflow refused "+wra/itm_acc/mean" when the sweep stage was recorded.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = Tracker(uri, "vlp-test", tmp_path).start_run("sweep")
    final = {"+wra/itm_acc/mean": 0.82, "mlm_itm/itm_acc/mean": 0.93, "study_minutes": 131.5}
    with pytest.raises(MlflowException, match="Invalid value"):
        MetricLogger(uri, run).log(final)
    metrics, steps = mlflow_metric_names(final, {"+wra/itm_acc/mean": 1500})
    MetricLogger(uri, run).log(metrics, steps=steps)
    client = MlflowClient(uri)
    assert client.get_run(run).data.metrics == {"_wra/itm_acc/mean": 0.82, "mlm_itm/itm_acc/mean": 0.93,
                                                "study_minutes": 131.5}
    assert [m.step for m in client.get_metric_history(run, "_wra/itm_acc/mean")] == [1500]
    with pytest.raises(ValueError, match=r"'a\+b/x' and 'a_b/x' are both 'a_b/x'"):
        mlflow_metric_names({"a+b/x": 1.0, "a_b/x": 2.0})
