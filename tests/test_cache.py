import json

from pipeline.cache import StageStore, code_digest, stage_key


def test_key_depends_on_every_part():
    base = stage_key("s", "c", {"a": 1}, {"up": "k"})
    assert base == stage_key("s", "c", {"a": 1}, {"up": "k"})
    assert len({base, stage_key("t", "c", {"a": 1}, {"up": "k"}), stage_key("s", "d", {"a": 1}, {"up": "k"}),
                stage_key("s", "c", {"a": 2}, {"up": "k"}), stage_key("s", "c", {"a": 1}, {"up": "j"})}) == 5


def test_code_digest_covers_python_sources():
    assert code_digest(("pipeline",)) == code_digest(("pipeline",))
    assert code_digest(("pipeline",)) != code_digest(("stages/base.py",))


def test_commit_is_atomic_and_partial_is_never_done(tmp_path):
    store = StageStore(tmp_path)
    out = store.begin("s", "k1")
    (out / "data.txt").write_text("half")
    assert not store.is_done("s", "k1")
    # A killed stage leaves its partial dir; the next begin() resumes in it.
    assert (store.begin("s", "k1") / "data.txt").read_text() == "half"
    final = store.commit("s", "k1", {"metrics": {"n": 1}})
    assert store.is_done("s", "k1") and not store.partial_dir("s", "k1").exists()
    assert json.loads((final / "manifest.json").read_text())["metrics"] == {"n": 1}
    assert (final / "data.txt").read_text() == "half"


def test_forced_recompute_replaces_output_only_at_commit(tmp_path):
    store = StageStore(tmp_path)
    store.begin("s", "k")
    store.commit("s", "k", {"v": 1})
    out = store.begin("s", "k", fresh=True)
    assert store.manifest("s", "k") == {"v": 1}  # still the old output while recomputing
    (out / "new.txt").write_text("x")
    store.commit("s", "k", {"v": 2})
    assert store.manifest("s", "k") == {"v": 2}
    assert (store.final_dir("s", "k") / "new.txt").exists()
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["k"]


def _keys(cfg, tmp_path, target="all"):
    from pipeline.dag import plan

    return {p.name: p.key for p in plan(cfg, target, StageStore(tmp_path))}


def test_downstream_tasks_are_cached_per_task_and_configurable(tmp_path):
    from pipeline.config import load_config

    base = _keys(load_config(None, []), tmp_path)
    assert {f"{stage}_{task}" for stage in ("finetune", "eval")
            for task in ("retrieval", "vqa", "nlvr2", "snli_ve", "refcoco")} <= base.keys()
    # One task's setting reruns that task's finetune and eval (and the aggregates), nothing else.
    changed = _keys(load_config(None, ["finetune.vqa.lr=0.0002"]), tmp_path)
    assert {n for n in base if base[n] != changed[n]} == {"finetune_vqa", "eval_vqa", "finetune", "eval"}
    changed = _keys(load_config(None, ["eval.splits.nlvr2=[dev]"]), tmp_path)
    assert {n for n in base if base[n] != changed[n]} == {"eval_nlvr2", "eval"}
    # Which tasks run is config; the pretrained model's key does not depend on it.
    only = _keys(load_config(None, ["finetune.tasks=[snli_ve]"]), tmp_path)
    assert {n for n in only if n.startswith(("finetune_", "eval_"))} == {"finetune_snli_ve", "eval_snli_ve"}
    assert only["pretrain"] == base["pretrain"] and only["eval_snli_ve"] == base["eval_snli_ve"]
    # RefCOCO's evaluation pools ground-truth boxes with the detector, so it depends on the detector stage.
    assert "detector" in _keys(load_config(None, []), tmp_path, "eval_refcoco")


def test_per_task_stages_call_their_entry_with_the_task(monkeypatch):
    from pipeline.stages import STAGES
    from stages.finetune import stage as finetune_stage

    monkeypatch.setattr(finetune_stage, "run_task", lambda ctx, task: (ctx, task))
    assert STAGES["finetune_snli_ve"].load()("ctx") == ("ctx", "snli_ve")
