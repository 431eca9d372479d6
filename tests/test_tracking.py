"""The stage runs' params in a real sqlite MLflow store."""

from mlflow.tracking import MlflowClient

from pipeline.tracking import Tracker


def test_an_aggregate_over_seeds_logs_its_inputs_under_names_mlflow_accepts(tmp_path):
    # The eval aggregate of `seeds=[0,1]` has inputs named by seed labels, which MLflow refused ("@").
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "vlp-test", tmp_path)
    run = tracker.start_run("eval")
    tracker.log(run, params={"inputs": {"eval_vqa@0": "k0", "eval_vqa@1": "k1"}, "config": {"seed": 0}})
    params = MlflowClient(uri).get_run(run).data.params
    assert params == {"inputs.eval_vqa.seed0": "k0", "inputs.eval_vqa.seed1": "k1", "config.seed": "0"}
