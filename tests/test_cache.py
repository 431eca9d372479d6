import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cache import StageStore, code_digest, stage_key
from pipeline.config import REPO_ROOT
from pipeline.imports import closure
from pipeline.stages import STAGES


def test_key_depends_on_every_part():
    base = stage_key("s", "c", {"a": 1}, {"up": "k"})
    assert base == stage_key("s", "c", {"a": 1}, {"up": "k"})
    assert len({base, stage_key("t", "c", {"a": 1}, {"up": "k"}), stage_key("s", "d", {"a": 1}, {"up": "k"}),
                stage_key("s", "c", {"a": 2}, {"up": "k"}), stage_key("s", "c", {"a": 1}, {"up": "j"})}) == 5


# Repository code a copy of the tree needs; tests, benchmarks and outputs are not stage code.
_NOT_CODE = shutil.ignore_patterns(".git", ".venv", "work", "tests", "benchmarks", "__pycache__",
                                   "*.egg-info", ".pytest_cache", ".ruff_cache")


@pytest.fixture
def tree(tmp_path) -> Path:
    """A copy of the repository whose modules a test may edit."""
    root = tmp_path / "repo"
    shutil.copytree(REPO_ROOT, root, ignore=_NOT_CODE)
    return root


def digests(root: Path) -> dict[str, str]:
    by_module = {module: code_digest(module, root) for module in {spec.module for spec in STAGES.values()}}
    return {name: by_module[spec.module] for name, spec in STAGES.items()}


def members(root: Path) -> dict[str, set[Path]]:
    """Every stage's closure: source and declared data files."""
    out = {}
    for name, spec in STAGES.items():
        sources, data = closure(root, spec.module)
        out[name] = {p.relative_to(root.resolve()) for p in [*sources, *data]}
    return out


def rekeyed(root: Path, before: dict[str, str]) -> set[str]:
    return {name for name, digest in digests(root).items() if digest != before[name]}


def entry_file(root: Path, stage: str) -> Path:
    return Path(*STAGES[stage].module.split(".")).with_suffix(".py")


def test_editing_a_module_rekeys_exactly_the_stages_whose_closure_holds_it(tree):
    before, closures = digests(tree), members(tree)
    detectron2 = Path("stages/feature_extraction/detector/detectron2_backend.py")
    probes = {
        # What each edit must and must not rekey, independently of how the closure is computed.
        Path("stages/base.py"): (set(STAGES), set()),
        # The synthetic world is its own package: editing it reruns the world stage, never the download
        # code that fetches it (as for a real mirror) nor the feature probe that reads its scene truth.
        entry_file(tree, "world"): ({"world"}, {"download", "dedup", "features"}),
        Path("worldgen/render.py"): ({"world"}, {"download", "dedup", "features"}),
        Path("stages/download/fetch.py"): ({"download"}, {"world", "dedup"}),
        Path("vlp/objectives/mlm.py"): ({"pretrain"}, {"world", "download", "dedup", "txtdb", "features"}),
        Path("vlp/tasks/vqa.py"): ({"finetune_vqa", "eval_vqa"}, {"pretrain", "txtdb"}),
        # The text-db writer reads the feature store's keys: a drifted hand-written list once missed it.
        Path("vlp/data/img_db.py"): ({"txtdb", "karpathy_txtdb", "features", "pretrain"}, {"world", "dedup"}),
        # Imported inside a function (the optional backend is loaded lazily): still code the stage runs.
        detectron2: ({"features"}, {"pretrain"}),
    }
    for rel, (must, must_not) in probes.items():
        path = tree / rel
        original = path.read_text()
        path.write_text(original + "\n# edited\n")
        changed = rekeyed(tree, before)
        path.write_text(original)
        assert changed == {name for name, files in closures.items() if rel in files}, rel
        assert must <= changed and not (must_not & changed), (rel, changed)
    assert digests(tree) == before


def test_modules_no_stage_imports_change_no_key(tree):
    before = digests(tree)
    (tree / "vlp" / "unused_probe.py").write_text("import torch\n")
    (tree / "pipeline" / "dag.py").write_text((tree / "pipeline" / "dag.py").read_text() + "\n# edited\n")
    assert rekeyed(tree, before) == set()


def test_a_declared_data_file_is_in_the_key_and_an_undeclared_one_is_not(tree):
    before = digests(tree)
    _, data = closure(tree, STAGES["world"].module)
    assert data, "the world stage declares the Flickr30k Entities id lists it reads"
    (data[0].parent / "unrelated.txt").write_text("x\n")
    assert rekeyed(tree, before) == set()
    data[0].write_text(data[0].read_text() + "1000092795\n")
    assert rekeyed(tree, before) == {"world"}


_LOADED = """
import importlib, json, sys
roots = tuple(sys.argv[1].split(","))  # the repository's top-level package dirs
def ours():
    return {n: m.__file__ for n, m in list(sys.modules.items())
            if (getattr(m, "__file__", None) or "").startswith(roots)}
loaded = {}
for module in sys.argv[2:]:
    for name in ours():
        del sys.modules[name]
    importlib.import_module(module)
    loaded[module] = sorted(set(ours().values()))
print(json.dumps(loaded))
"""


def test_the_computed_closure_holds_every_module_an_entry_really_loads():
    modules = sorted({spec.module for spec in STAGES.values()})
    root = str(REPO_ROOT.resolve()) + os.sep
    packages = ",".join(str(p.parent) + os.sep for p in REPO_ROOT.resolve().glob("*/__init__.py"))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", _LOADED, packages, *modules], capture_output=True, text=True,
                         env=env, cwd=REPO_ROOT, timeout=300, check=True)
    loaded = json.loads(out.stdout.splitlines()[-1])
    for module in modules:
        computed = {str(p) for p in closure(REPO_ROOT, module)[0]}
        assert set(loaded[module]) <= computed, (module, set(loaded[module]) - computed)
        # Stages never import the pipeline: changing how the graph runs rekeys nothing.
        assert not any(f.startswith(root + "pipeline" + os.sep) for f in loaded[module]), module


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


def test_seeds_plan_each_seed_dependent_stage_once_per_seed_and_reuse_the_rest(tmp_path):
    from pipeline.config import load_config
    from pipeline.dag import plan

    # The demo's loss study runs once whatever the seeds (it has seeds of its own), on the first seed's
    # inputs, after every seed's pretraining.
    with_study = {p.label: p for p in plan(load_config(None, ["seeds=[0,1]"]), "all", StageStore(tmp_path))}
    assert [label for label in with_study if "sweep" in label] == ["sweep"]
    assert with_study["sweep"].inputs["features"] == with_study["features@0"].key
    assert "pretrain@1" in with_study["sweep"].needs

    # finetune.encoder: sweep: every seed's finetuning and evaluation start from the study's best trial, and
    # the plain pretraining runs nowhere (several seeds share the study's regions only with given weights).
    weights = tmp_path / "detector.pt"
    weights.write_bytes(b"weights")
    given = ["seeds=[0,1]", "finetune.encoder=sweep", f"features.detector.weights={weights}"]
    from_study = {p.label: p for p in plan(load_config(None, given), "all", StageStore(tmp_path))}
    study_key = from_study["sweep"].key
    assert not any(label.startswith("pretrain") for label in from_study)
    for seed in (0, 1):
        for stage in (f"finetune_vqa@{seed}", f"eval_retrieval@{seed}"):
            assert from_study[stage].inputs["sweep"] == study_key
            assert "sweep" in from_study[stage].needs and "pretrain" not in from_study[stage].inputs

    no_study = ["sweep.study=null"]
    one = {p.name: p for p in plan(load_config(None, ["seed=1", *no_study]), "all", StageStore(tmp_path))}
    two = {p.label: p for p in plan(load_config(None, ["seeds=[0,1]", *no_study]), "all",
                                    StageStore(tmp_path))}
    shared = {"world", "download", "dedup", "txtdb", "karpathy_txtdb"}
    per_seed = {name for name in one if name not in shared | {"finetune", "eval"}}
    # Stages that read the root seed, and everything downstream of them, run once per seed.
    assert {"detector", "features", "gt_features", "pretrain", "finetune_vqa", "eval_vqa"} <= per_seed
    assert set(two) == shared | {"finetune", "eval"} | {f"{n}@{s}" for n in per_seed for s in (0, 1)}
    # A seed's stages have the key of a one-seed run with that seed: `seeds=[0,1]` reuses `seed=1`'s cache.
    assert all(two[f"{n}@1"].key == one[n].key for n in per_seed)
    assert all(two[n].key == one[n].key for n in shared)
    assert two["pretrain@1"].inputs == one["pretrain"].inputs and two["pretrain@1"].seed == 1
    # Pretraining runs alone (its Ray Train workers would race other stages' tasks for the CPUs): after
    # everything upstream of any seed's, one seed after another, and before everything else.
    labels = [p.label for p in plan(load_config(None, ["seeds=[0,1]", *no_study]), "all",
                                    StageStore(tmp_path))]
    first, second = labels.index("pretrain@0"), labels.index("pretrain@1")
    assert {"detector@1", "features@1"} <= set(two["pretrain@0"].needs)
    assert "pretrain@0" in two["pretrain@1"].needs
    assert set(labels[:first]) == {"world", "download", "dedup", "txtdb", "detector@0", "detector@1",
                                   "features@0", "features@1"} and second == first + 1
    assert "pretrain@1" in two["gt_features@0"].needs and "pretrain@1" in two["finetune_vqa@0"].needs
    assert two["detector@1"].needs == ["dedup"]  # the rest run side by side, each reserving what it uses
    # Ray Data stages run one at a time: at once, their actor pools split the CPUs and waited forever.
    assert "features@0" in two["features@1"].needs and labels.index("features@0") < labels.index("features@1")
    # The aggregates gather every seed's outputs.
    assert set(two["eval"].inputs) == {f"eval_{t}@{s}" for t in ("retrieval", "vqa", "nlvr2", "snli_ve",
                                                                  "refcoco") for s in (0, 1)}
    assert set(two["eval"].needs) == {f"eval_{t}@{s}" for t in ("retrieval", "vqa", "nlvr2", "snli_ve",
                                                                 "refcoco") for s in (0, 1)}
