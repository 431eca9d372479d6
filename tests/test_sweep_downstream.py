"""Rows of a study evaluated downstream: the study's downstream section, the plan that finetunes and
evaluates every trial's encoder (cached per trial, shared stages once), and the sweep_downstream stage's
Meta-Sum comparison."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pipeline.cache import StageStore
from pipeline.config import ConfigError, load_config
from pipeline.dag import plan, stage_config
from stages.base import StageContext, StageError
from stages.outputs.sweep import DownstreamOutput
from stages.pretrain import downstream
from stages.pretrain.sweep_config import Study

META = ["vqa/pretrained/val2014/vqa_score", "nlvr2/pretrained/test1/nlvr2_acc"]


def study_file(tmp_path: Path, **over) -> Path:
    data = {"name": "t", "seeds": [0, 1], "asha": {"enabled": False},
            "rows": [{"name": "a", "tasks": {"mlm": 1, "itm": 1}},
                     {"name": "b", "tasks": {"mlm": 1, "itm": 1, "itc": 1}, "paper": {"meta_sum": 3.2}}],
            "downstream": {"tasks": ["vqa", "nlvr2"], "meta_sum": META}} | over
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_downstream_study_is_a_final_comparison_over_known_tasks():
    base = {"name": "t", "rows": [{"name": "a", "tasks": {"itm": 1}}]}
    with pytest.raises(ValueError, match=r"downstream: rows are compared downstream in a final comparison"):
        Study.model_validate(base | {"downstream": {}})
    off = base | {"asha": {"enabled": False}}
    with pytest.raises(ValueError, match=r"tasks: \['vqa', 'ocr'\]: each once, from retrieval, vqa"):
        Study.model_validate(off | {"downstream": {"tasks": ["vqa", "ocr"]}})
    with pytest.raises(ValueError, match=r"meta_sum: 'nlvr2/pretrained/dev/nlvr2_acc' is not a metric of the "
                                         r"tasks \['vqa'\]"):
        Study.model_validate(off | {"downstream": {"tasks": ["vqa"], "meta_sum": ["nlvr2/pretrained/dev/"
                                                                                  "nlvr2_acc"]}})
    study = Study.model_validate(off | {"seeds": [0, 2], "downstream": {}})
    assert study.downstream_trials() == ["a-s0", "a-s2"]
    best = Study.model_validate(off | {"seeds": [0, 2], "downstream": {"trials": "best_seed"}})
    assert best.downstream_trials() == ["a"]


def test_a_zero_shot_comparison_evaluates_retrieval_without_finetuning():
    base = {"name": "t", "seeds": [0], "asha": {"enabled": False},
            "rows": [{"name": "a", "tasks": {"itm": 1}}]}
    with pytest.raises(ValueError, match=r"finetune: false evaluates zero-shot models, which only retrieval "
                                         r"has; tasks \['retrieval', 'vqa'\] must be \[retrieval\]"):
        Study.model_validate(base | {"downstream": {"finetune": False, "tasks": ["retrieval", "vqa"]}})
    study = Study.model_validate(base | {"downstream": {"finetune": False, "tasks": ["retrieval"]}})
    assert study.downstream.meta_sum == ["retrieval/flickr30k/zero_shot/test/full/ir_r1",
                                         "retrieval/flickr30k/zero_shot/test/full/tr_r1"]
    assert study.downstream_overrides() == {"a-s0": ("finetune.encoder=sweep:a-s0", "seeds=[]",
                                                     "eval.retrieval.finetuned=false")}
    finetuning = {"name": "f", "pretraining": False, "rows": [{"name": "none"}],
                  "downstream": {"finetune": False, "tasks": ["retrieval"]}}
    with pytest.raises(ValueError, match=r"a finetuning study\) finetunes: downstream.finetune must be true"):
        Study.model_validate(finetuning)
    with pytest.raises(ConfigError, match=r"eval.retrieval: .*finetuned: false and zero_shot: false leave no "
                                          r"model to evaluate"):
        load_config(None, ["eval.retrieval.finetuned=false", "eval.retrieval.zero_shot=false"])


def test_the_zero_shot_plan_evaluates_each_trial_and_reuses_the_studys_trials(tmp_path):
    store = StageStore(tmp_path / "work")
    zero_shot = {"finetune": False, "tasks": ["retrieval"],
                 "report": ["retrieval/coco/zero_shot/test/laviter/aimcos"]}
    (tmp_path / "z").mkdir()
    cfg = load_config(None, [f"sweep.study={study_file(tmp_path / 'z', downstream=zero_shot)}"])
    planned = {p.label: p for p in plan(cfg, "sweep_downstream", store)}
    trials = ["a-s0", "a-s1", "b-s0", "b-s1"]
    assert set(planned["sweep_downstream"].inputs) == {"sweep"} | {f"eval_retrieval@{t}" for t in trials}
    assert not [label for label in planned if label.startswith("finetune_")]
    for trial in trials:
        evaluated = planned[f"eval_retrieval@{trial}"]
        assert "finetune_retrieval" not in evaluated.inputs
        assert evaluated.inputs["sweep"] == planned["sweep"].key
        assert evaluated.config["eval.retrieval"]["finetuned"] is False
        assert evaluated.config["finetune.retrieval.datasets"]["coco"]["test"] == "coco_karpathy_test"
    # The downstream section is not the trials' business: the sweep's key is that of the study without one,
    # or with another, so a study run before its downstream section was written is reused.
    (tmp_path / "n").mkdir()
    plain = load_config(None, [f"sweep.study={study_file(tmp_path / 'n', downstream=None)}"])
    assert {p.name: p.key for p in plan(plain, "sweep", store)}["sweep"] == planned["sweep"].key
    finetuned = {p.label: p for p in plan(load_config(None, [f"sweep.study={study_file(tmp_path)}"]),
                                          "sweep_downstream", store)}
    assert finetuned["sweep"].key == planned["sweep"].key
    other_rows = study_file(tmp_path / "n", downstream=None, seeds=[0])
    assert plan(load_config(None, [f"sweep.study={other_rows}"]), "sweep", store)[-1].key != \
        planned["sweep"].key


def test_finetune_encoder_must_name_a_row_or_trial_of_the_study(tmp_path):
    study = f"sweep.study={study_file(tmp_path)}"
    assert load_config(None, [study, "finetune.encoder=sweep:b-s1"]).finetune.encoder == "sweep:b-s1"
    with pytest.raises(ConfigError, match=r"finetune.encoder: 'b-s2' is neither a row nor a trial "
                                          r"\(<row>-s<seed>\) of study 't'"):
        load_config(None, [study, "finetune.encoder=sweep:b-s2"])
    with pytest.raises(ConfigError, match=r"finetune.encoder: .*pretrain, sweep, sweep:<row> or "
                                          r"sweep:<row>-s<seed>"):
        load_config(None, [study, "finetune.encoder=pretrain:a"])


def test_the_plan_finetunes_and_evaluates_every_trial_once_and_shares_the_rest(tmp_path):
    store = StageStore(tmp_path / "work")
    cfg = load_config(None, [f"sweep.study={study_file(tmp_path)}"])
    planned = {p.label: p for p in plan(cfg, "all", store)}
    trials = ["a-s0", "a-s1", "b-s0", "b-s1"]
    comparison = planned["sweep_downstream"]
    assert set(comparison.inputs) == {"sweep"} | {f"eval_{t}@{trial}" for t in ("vqa", "nlvr2")
                                                  for trial in trials}
    assert comparison.inputs["sweep"] == planned["sweep"].key
    for trial in trials:
        finetune = planned[f"finetune_vqa@{trial}"]
        assert finetune.config["finetune.encoder"] == f"sweep:{trial}"
        assert finetune.inputs["sweep"] == planned["sweep"].key and "pretrain" not in finetune.inputs
        assert planned[f"eval_vqa@{trial}"].inputs["finetune_vqa"] == finetune.key
        assert f"eval_vqa@{trial}" in comparison.needs
        # The stage runs with the trial's encoder.
        assert stage_config(cfg.model_dump(mode="json"), finetune.seed,
                            finetune.overrides).finetune.encoder == f"sweep:{trial}"
    # Each trial's stages have the keys of finetuning that trial by hand: they share its cache.
    by_hand = {p.name: p.key for p in plan(load_config(None, [f"sweep.study={study_file(tmp_path)}",
                                                              "finetune.encoder=sweep:b-s1"]),
                                           "eval_nlvr2", store)}
    assert planned["finetune_nlvr2@b-s1"].key == by_hand["finetune_nlvr2"]
    assert planned["eval_nlvr2@b-s1"].key == by_hand["eval_nlvr2"]
    # Stages the trials share are planned once, under the seed's plan; the pipeline's own finetuning still
    # starts from the pretrain stage.
    assert [label for label in planned if label.startswith("features")] == ["features"]
    assert planned["finetune_vqa"].config["finetune.encoder"] == "pretrain"
    assert "pretrain" in planned["finetune_vqa"].inputs
    assert sum(label.startswith("finetune_vqa") for label in planned) == 5

    # best_seed: one finetuning per row, its best seed resolved when the study has run.
    best = load_config(None, [f"sweep.study={study_file(tmp_path, downstream={'trials': 'best_seed'})}"])
    rows = {p.label for p in plan(best, "sweep_downstream", store) if p.name == "finetune_refcoco"}
    assert rows == {"finetune_refcoco@a", "finetune_refcoco@b"}

    with pytest.raises(ValueError, match=r"sweep_downstream: sweep.study names no study with a downstream"):
        plan(load_config(None, []), "sweep_downstream", store)


def write_sweep(root: Path, trials: list[dict]) -> Path:
    root.mkdir(parents=True)
    (root / "study.json").write_text(json.dumps({"study": {"metric": "itm_acc", "mode": "max"},
                                                 "trials": trials}))
    return root


def write_eval(root: Path, task: str, value: float) -> Path:
    root.mkdir(parents=True)
    split = {"vqa": ("val2014", "vqa_score"), "nlvr2": ("test1", "nlvr2_acc")}[task]
    metrics = {"pretrained": {split[0]: {split[1]: value}}, "scratch": {split[0]: {split[1]: 0.01}}}
    (root / "metrics.json").write_text(json.dumps(metrics))
    return root


def test_the_comparison_sums_each_trials_metrics_and_compares_rows(tmp_path):
    study = Study.model_validate(yaml.safe_load(study_file(tmp_path).read_text()))
    trials = [{"trial": f"{r}-s{s}", "row": r, "seed": s, "status": "completed", "metrics": {"itm_acc": 0.9}}
              for r in ("a", "b") for s in (0, 1)]
    inputs = {"sweep": write_sweep(tmp_path / "sweep", trials)}
    scores = {"a-s0": (0.40, 0.60), "a-s1": (0.42, 0.58), "b-s0": (0.45, 0.61), "b-s1": (0.47, 0.65)}
    for trial, (vqa, nlvr2) in scores.items():
        inputs[f"eval_vqa@{trial}"] = write_eval(tmp_path / "vqa" / trial, "vqa", vqa)
        inputs[f"eval_nlvr2@{trial}"] = write_eval(tmp_path / "nlvr2" / trial, "nlvr2", nlvr2)
    cfg = SimpleNamespace(sweep=SimpleNamespace(study=study))
    out = DownstreamOutput(tmp_path / "out")
    result = downstream.run(StageContext(cfg=cfg, workdir=tmp_path, out_dir=out.root, inputs=inputs))

    ran = {t["trial"]: t for t in json.loads(out.trials_path.read_text())["trials"]}
    assert ran["b-s1"]["metrics"]["meta_sum"] == pytest.approx(100 * (0.47 + 0.65))
    assert ran["b-s1"]["metrics"][META[0]] == 0.47 and ran["b-s1"]["row"] == "b"
    table = {r["row"]: r for r in csv.DictReader(open(out.root / "comparison.csv"))}
    mean = {row: statistics.fmean(100 * sum(scores[f"{row}-s{s}"]) for s in (0, 1)) for row in ("a", "b")}
    assert float(table["b"]["meta_sum/mean"]) == pytest.approx(mean["b"], rel=1e-5)
    assert float(table["b"]["meta_sum/delta"]) == pytest.approx(mean["b"] - mean["a"], rel=1e-4)
    assert table["b"]["meta_sum/paper_delta"] == "3.2" and table["b"]["n"] == "2"
    assert result.metrics["a/meta_sum/sd"] == pytest.approx(statistics.stdev([100.0, 100.0]))
    assert "| `b` | 2 |" in (out.root / "comparison.md").read_text()
    assert out.missing() == []

    # A metric of the Meta-Sum the evaluation did not write: one line naming the file and the metric.
    write_eval(tmp_path / "bad", "nlvr2", 0.5)
    (tmp_path / "bad" / "metrics.json").write_text(json.dumps({"pretrained": {"dev": {"nlvr2_acc": 0.5}}}))
    inputs["eval_nlvr2@a-s1"] = tmp_path / "bad"
    with pytest.raises(StageError) as err:
        downstream.run(StageContext(cfg=cfg, workdir=tmp_path, out_dir=tmp_path / "out2", inputs=inputs))
    assert str(err.value) == (f"{tmp_path / 'bad' / 'metrics.json'}: no metric 'pretrained/test1/nlvr2_acc' "
                              f"for sweep.study.downstream.meta_sum entry '{META[1]}'")

    # A report metric only some trials have (a head of some rows) is left out of theirs; one that no
    # trial's evaluation wrote is a typo.
    inputs["eval_nlvr2@a-s1"] = write_eval(tmp_path / "nlvr2" / "a-s1b", "nlvr2", 0.58)
    extra = {"pretrained": {"test1": {"nlvr2_acc": 0.61, "captioning_bleu4": 0.2}}}
    (inputs["eval_nlvr2@b-s0"] / "metrics.json").write_text(json.dumps(extra))
    reported = study.model_copy(update={"downstream": study.downstream.model_copy(
        update={"report": ["nlvr2/pretrained/test1/captioning_bleu4"]})})
    cfg = SimpleNamespace(sweep=SimpleNamespace(study=reported))
    downstream.run(StageContext(cfg=cfg, workdir=tmp_path, out_dir=tmp_path / "out3", inputs=inputs))
    ran = {t["trial"]: t["metrics"] for t in json.loads((tmp_path / "out3" / "downstream.json").read_text())
           ["trials"]}
    assert ran["b-s0"]["nlvr2/pretrained/test1/captioning_bleu4"] == 0.2
    assert "nlvr2/pretrained/test1/captioning_bleu4" not in ran["a-s0"]
    typo = reported.model_copy(update={"downstream": study.downstream.model_copy(
        update={"report": ["nlvr2/pretrained/test1/captioning_blue4"]})})
    with pytest.raises(StageError, match=r"sweep.study.downstream.report: no trial's evaluation wrote "
                                         r"\['nlvr2/pretrained/test1/captioning_blue4'\]"):
        downstream.run(StageContext(cfg=SimpleNamespace(sweep=SimpleNamespace(study=typo)), workdir=tmp_path,
                                    out_dir=tmp_path / "out4", inputs=inputs))


def test_a_finetuning_study_has_rows_of_finetune_settings_and_a_downstream_comparison():
    rows = [{"name": "none", "finetune": {"retrieval": {"iais": {"enabled": False}}}}]
    base = {"name": "f", "pretraining": False, "rows": rows}
    with pytest.raises(ValueError, match=r"pretraining: false \(a finetuning study\) needs downstream"):
        Study.model_validate(base)
    trained = base | {"rows": [{"name": "a", "tasks": {"itm": 1}}], "downstream": {}}
    with pytest.raises(ValueError, match=r"rows of finetune settings only; rows \['a'\] set tasks"):
        Study.model_validate(trained)
    with pytest.raises(ValueError, match=r"rows \['none'\]: a pretraining study's row needs its loss set"):
        Study.model_validate(base | {"pretraining": True})
    study = Study.model_validate(base | {"seeds": [3, 4], "downstream": {"tasks": ["retrieval"]}})
    assert study.downstream.meta_sum == ["retrieval/flickr30k/pretrained/test/full/ir_r1",
                                         "retrieval/flickr30k/pretrained/test/full/tr_r1"]
    # A finetuning study's trials vary the finetuning seed, not the encoder, and carry the row's settings.
    assert study.downstream_overrides() == {
        "none-s3": ("finetune.common.seed=3", "seeds=[]", "finetune.retrieval.iais.enabled=false"),
        "none-s4": ("finetune.common.seed=4", "seeds=[]", "finetune.retrieval.iais.enabled=false")}


def test_a_rows_finetune_settings_are_checked_against_the_finetune_section(tmp_path):
    bad = [{"name": "x", "tasks": {"itm": 1}, "finetune": {"retrieval": {"iais": {"variant": "both"}}}}]
    with pytest.raises(ConfigError, match=r"sweep.study.rows\[0\] \(x\).finetune: retrieval.iais.variant: "):
        load_config(None, [f"sweep.study={study_file(tmp_path, rows=bad)}"])


def test_the_iais_study_plans_its_rows_and_seeds_from_the_pipelines_encoder(tmp_path):
    store = StageStore(tmp_path / "work")
    cfg = load_config(None, ["sweep.study=configs/sweeps/iais.yaml"])
    planned = {p.label: p for p in plan(cfg, "all", store)}
    assert "sweep" not in planned  # no pretraining trials
    rows = ("none", "singular", "distributed", "singular_text", "singular_image")
    trials = [f"{row}-s{seed}" for row in rows for seed in (0, 1, 2)]
    assert {label for label in planned if label.startswith("finetune_retrieval@")} == {
        f"finetune_retrieval@{t}" for t in trials}
    assert set(planned["sweep_downstream"].inputs) == {f"eval_retrieval@{t}" for t in trials}
    for trial in trials:
        row, seed = trial.rsplit("-s", 1)
        finetune = planned[f"finetune_retrieval@{trial}"]
        assert finetune.inputs["pretrain"] == planned["pretrain"].key  # the pipeline's encoder
        assert finetune.config["finetune.common"]["seed"] == int(seed)
        assert finetune.config["finetune.common"]["init"] == "pretrained"
        iais = finetune.config["finetune.retrieval"]["iais"]
        assert iais["enabled"] == (row != "none")
        anchors = {"singular_text": ["text"], "singular_image": ["image"]}.get(row, ["text", "image"])
        assert iais["anchors"] == anchors
        assert iais["variant"] == ("distributed" if row == "distributed" else "singular")


def test_the_sweep_stage_refuses_a_finetuning_study(tmp_path):
    from stages.pretrain import sweep

    cfg = load_config(None, ["sweep.study=configs/sweeps/iais.yaml"])
    with pytest.raises(StageError, match=r"sweep: study 'iais' is a finetuning study \(pretraining: false\), "
                                         r"without pretraining trials: run --stage sweep_downstream"):
        sweep.run(StageContext(cfg=cfg, workdir=tmp_path, out_dir=tmp_path / "out", inputs={}))
