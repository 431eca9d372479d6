"""The whole stage graph through the real CLI (``--stage all`` on configs/micro.yaml): every stage commits
through the layouts its consumers read, the MLflow store holds one run per stage, the eval summary covers
every configured task, and a second invocation is served entirely from cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.cache import StageStore
from pipeline.config import REPO_ROOT, load_config
from pipeline.dag import plan
from pipeline.run import main
from stages.outputs.eval import SummaryOutput

pytestmark = pytest.mark.slow

MICRO = REPO_ROOT / "configs" / "micro.yaml"


def invoke(workdir: Path, *args: str) -> int:
    return main(["--config", str(MICRO), "--workdir", str(workdir), "--stage", "all", *args])


def runs_by_parent(workdir: Path) -> list[tuple[object, list]]:
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    exp = client.get_experiment_by_name("vlp-pipeline")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return [(p, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]) for p in parents]


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("graph")
    assert invoke(workdir) == 0
    return workdir, plan(load_config(MICRO), "all", StageStore(workdir))


def test_every_stage_of_the_graph_committed(graph):
    workdir, stages = graph
    assert {s.name for s in stages} >= {"world", "download", "dedup", "detector", "features", "txtdb",
                                         "pretrain", "finetune", "eval"}
    for stage in stages:
        assert stage.cached, f"{stage.name} was not committed under the planned key"
        manifest = json.loads((workdir / stage.name / stage.key / "manifest.json").read_text())
        assert manifest["inputs"] == stage.inputs


def test_mlflow_holds_one_run_per_stage(graph):
    workdir, stages = graph
    ((parent, children),) = runs_by_parent(workdir)
    assert sorted(r.info.run_name for r in children) == sorted(s.name for s in stages)
    assert {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.tags["cached"] for r in children} == {"false"}


def test_eval_summary_covers_every_configured_task(graph):
    workdir, stages = graph
    (evaluation,) = [s for s in stages if s.name == "eval"]
    summary = SummaryOutput(workdir / "eval" / evaluation.key).summary()
    covered = {row["task"].split(" ")[0] for row in summary["tasks"]}
    assert covered == set(load_config(MICRO).finetune.tasks)
    for row in summary["tasks"]:
        assert {"pretrained", "scratch"} <= row["values"].keys(), row


def test_a_second_invocation_is_served_from_cache(graph, capsys):
    workdir, stages = graph
    assert invoke(workdir) == 0
    parent, children = runs_by_parent(workdir)[-1]
    assert len(children) == len(stages)
    assert {r.data.tags["cached"] for r in children} == {"true"}
    # Where to browse it: MLflow's UI on the experiment's model-training view.
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.endswith(f"then open http://127.0.0.1:5000/#/experiments/{parent.info.experiment_id}/runs"
                         "?workflowType=machine_learning"), last


def test_the_readme_table_is_the_eval_summary_of_the_run(graph, tmp_path):
    import sys

    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from readme_results import main as readme_results

    workdir, stages = graph
    (evaluation,) = [s for s in stages if s.name == "eval"]
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- demo-results:start -->\nold\n<!-- demo-results:end -->\noutro\n")
    assert readme_results(["--config", str(MICRO), "--workdir", str(workdir), "--readme", str(readme)]) == 0
    text = readme.read_text()
    summary = SummaryOutput(workdir / "eval" / evaluation.key).summary_markdown.read_text()
    table = [line for line in summary.splitlines() if line.startswith("| ")]
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert all(line in text for line in table) and evaluation.key in text
    with pytest.raises(SystemExit, match="no finished eval output"):  # another config: that run never ran
        readme_results(["--config", str(MICRO), "--workdir", str(workdir), "--readme", str(readme), "seed=5"])
    # A named block (another world's run) is filled and the demo block left as it was.
    readme.write_text(text + "<!-- w1:start -->\nold\n<!-- w1:end -->\n")
    assert readme_results(["--config", str(MICRO), "--workdir", str(workdir), "--readme", str(readme),
                           "--block", "w1"]) == 0
    second = readme.read_text()
    assert second.startswith(text) and "old" not in second and second.count(evaluation.key) == 2


def test_a_damaged_feature_store_is_named_in_one_line_and_not_retried(graph, tmp_path, capfd):
    import os
    import shutil

    workdir, stages = graph
    copy = tmp_path / "work"
    shutil.copytree(workdir, copy, copy_function=os.link, ignore=shutil.ignore_patterns("mlflow.db"))
    (features,) = [s for s in stages if s.name == "features"]
    (data,) = (copy / "features" / features.key / "img_db").rglob("data.mdb")
    damaged = data.read_bytes()[: data.stat().st_size // 2]
    data.unlink()  # a new file: the hard link still serves the original to the other tests
    data.write_bytes(damaged)
    capfd.readouterr()
    assert main(["--config", str(MICRO), "--workdir", str(copy), "--stage", "pretrain", "--force"]) == 1
    out, err = capfd.readouterr()
    assert err.strip().splitlines()[-1].startswith("error: ") and f"{data} is truncated" in err
    assert (out + err).count("pretrain: running") == 1  # a stage that failed is not started again


def test_a_studys_trials_are_finetuned_evaluated_and_compared_downstream(graph, tmp_path):
    workdir, _ = graph
    meta = "nlvr2/pretrained/test1/nlvr2_acc"
    study = tmp_path / "study.yaml"
    trials = {"name": "micro_downstream", "seeds": [0, 1], "steps": 4, "report_every": 2,
              "asha": {"enabled": False}, "rows": [{"name": "a", "tasks": {"mlm": 1, "itm": 1}}]}
    study.write_text(json.dumps(trials | {"downstream": {"tasks": ["nlvr2"], "meta_sum": [meta]}}))
    args = ["--stage", "sweep_downstream", f"sweep.study={study}"]
    assert main(["--config", str(MICRO), "--workdir", str(workdir), *args]) == 0
    store = StageStore(workdir)
    planned = {p.label: p for p in plan(load_config(MICRO, args[2:]), "sweep_downstream", store)}
    assert all(p.cached for p in planned.values())
    compared = json.loads((store.final_dir("sweep_downstream", planned["sweep_downstream"].key)
                           / "downstream.json").read_text())
    for trial in compared["trials"]:
        name = trial["trial"]
        # Each trial's encoder was finetuned and evaluated under its own key, and the comparison sums what
        # its evaluation wrote.
        finetuned = store.manifest("finetune_nlvr2", planned[f"finetune_nlvr2@{name}"].key)
        assert finetuned["params"]["encoder"] == f"sweep:{name}"
        evaluated = store.manifest("eval_nlvr2", planned[f"eval_nlvr2@{name}"].key)
        acc = evaluated["metrics"][meta.partition("/")[2]]
        assert trial["metrics"]["meta_sum"] == pytest.approx(100 * acc)
    assert sorted(t["trial"] for t in compared["trials"]) == ["a-s0", "a-s1"]
    assert planned["finetune_nlvr2@a-s0"].key != planned["finetune_nlvr2@a-s1"].key
    # The MLflow runs are labelled by trial.
    (_, children), *_ = [(p, c) for p, c in runs_by_parent(workdir)
                         if any(r.info.run_name == "sweep_downstream" for r in c)]
    assert {"finetune_nlvr2@a-s0", "eval_nlvr2@a-s1", "sweep"} <= {r.info.run_name for r in children}

    # The same trials compared zero-shot: the study's trials are reused (its downstream section is not in
    # their key), and each trial's model is evaluated by eval_retrieval alone.
    zero_shot_meta = "retrieval/flickr30k/zero_shot/test/full/ir_r1"
    zero_shot = tmp_path / "zero_shot.yaml"
    zero_shot.write_text(json.dumps(trials | {"downstream": {"finetune": False, "tasks": ["retrieval"],
                                                             "meta_sum": [zero_shot_meta]}}))
    args = ["--stage", "sweep_downstream", f"sweep.study={zero_shot}"]
    again = {p.label: p for p in plan(load_config(MICRO, args[2:]), "sweep_downstream", store)}
    assert again["sweep"].cached and again["sweep"].key == planned["sweep"].key
    assert not [label for label in again if label.startswith("finetune_retrieval@")]
    assert main(["--config", str(MICRO), "--workdir", str(workdir), *args]) == 0
    compared = json.loads((store.final_dir("sweep_downstream", again["sweep_downstream"].key)
                           / "downstream.json").read_text())
    for trial in compared["trials"]:
        evaluated = store.manifest("eval_retrieval", again[f"eval_retrieval@{trial['trial']}"].key)
        assert evaluated["params"]["encoder"] == f"sweep:{trial['trial']}"
        assert {m.partition("/")[0] for m in evaluated["metrics"]} == {"flickr30k", "coco"}
        assert {m.split("/")[1] for m in evaluated["metrics"]} == {"zero_shot"}
        r1 = evaluated["metrics"][zero_shot_meta.partition("/")[2]]
        assert trial["metrics"]["meta_sum"] == pytest.approx(100 * r1)
