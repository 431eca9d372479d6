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
