"""The stage runs' params and the experiment's tags in a real sqlite MLflow store."""

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


def test_the_experiment_opens_on_the_model_training_view_new_or_made_before(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    Tracker(uri, "new", tmp_path)
    old = client.create_experiment("old")  # made before the tag existed
    Tracker(uri, "old", tmp_path)
    for exp_id in (client.get_experiment_by_name("new").experiment_id, old):
        assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
