"""GQA in the miniature internet: published only when configured, in GQA's real layout, with true answers,
pointers and entailments; the rest of the world unchanged by it; its evaluation images in the truth."""

from __future__ import annotations

import io
import json
import zipfile

import pytest

from pipeline.config import REPO_ROOT, load_config
from stages.download.config import DatasetSource
from stages.download.formats import parse_dataset
from vlp.eval.gqa import GqaQuestion, SceneIndex, derive_choices, gqa_metrics
from worldgen.build import build_world
from worldgen.errors import WorldError
from worldgen.mirror import mirror_path
from worldgen.presets import micro
from worldgen.site import publish
from worldgen.truth import compute_truth

GQA_CFG = load_config(REPO_ROOT / "configs" / "gqa.yaml")
SOURCES = GQA_CFG.download.datasets
URLS = {name: source.files for name, source in SOURCES.items()}
F30K = SOURCES["flickr30k"].image_base_url
GQA_IMAGES = SOURCES["gqa"].image_base_url


def gqa_micro(**sizes):
    """The micro world with enough clean VG images for GQA (micro's own VG images all carry a fault)."""
    cfg = micro()
    return cfg.model_copy(update={"sizes": cfg.sizes.model_copy(
        update={"vg": 12, "gqa_train": 3, "gqa_val": 2, "gqa_testdev": 2, **sizes})})


@pytest.fixture(scope="module")
def site():
    return publish(gqa_micro(), URLS, F30K, GQA_IMAGES)


def member(site, role: str) -> bytes:
    url, _, name = SOURCES["gqa"].files[role].partition("#")
    return zipfile.ZipFile(io.BytesIO(site.files[mirror_path(url).lstrip("/")])).read(name)


@pytest.fixture(scope="module")
def parsed(site, tmp_path_factory):
    root = tmp_path_factory.mktemp("gqa")
    files = {}
    for role in SOURCES["gqa"].files:
        files[role] = root / f"{role}.json"
        files[role].write_bytes(member(site, role))
    return parse_dataset("gqa", files, DatasetSource(files={}, image_base_url=GQA_IMAGES))


def test_the_world_without_gqa_is_unchanged_by_it():
    cfg = gqa_micro()
    plain, with_gqa = build_world(cfg, F30K), build_world(cfg, F30K, GQA_IMAGES)
    for dataset, images in plain.images.items():
        assert [(i.key, i.url, i.data, i.fault) for i in images] == [
            (i.key, i.url, i.data, i.fault) for i in with_gqa.images[dataset]], dataset
    assert {k: v for k, v in with_gqa.metadata.items() if k[0] != "gqa"} == plain.metadata
    assert set(with_gqa.images) - set(plain.images) == {"gqa"}
    assert not any(k[0] == "gqa" for k in plain.metadata)
    with pytest.raises(WorldError, match="gqa_train"):
        build_world(gqa_micro(gqa_train=50), F30K, GQA_IMAGES)
    with pytest.raises(WorldError, match="image_base_url"):
        publish(cfg, URLS, F30K, None)


def test_real_layout_string_keys_and_testdev_images(site, parsed):
    val = json.loads(member(site, "questions_val"))
    assert all(isinstance(k, str) and len(k) == 8 and k.isdigit() for k in val)
    record = next(iter(val.values()))
    assert list(record) == ["semantic", "entailed", "equivalent", "question", "imageId", "isBalanced",
                            "groups", "answer", "semanticStr", "annotations", "types", "fullAnswer"]
    testdev = json.loads(member(site, "questions_testdev"))
    assert all(r["imageId"].startswith("n") and r["imageId"][1:].isdigit() for r in testdev.values())
    graphs = json.loads(member(site, "scene_graphs_train"))
    assert all(k.isdigit() for k in graphs)
    assert {ref.key for ref in parsed.images} == {f"gqa:{r['imageId']}" for r in testdev.values()}
    for ref in parsed.images:
        assert site.files[mirror_path(ref.url).lstrip("/")][:2] == b"\xff\xd8"  # served, a JPEG
    vg_keys = {s["key"] for s in site.scenes if s["dataset"] == "vg"}
    assert {r["image_key"] for r in parsed.tasks["gqa"] if r["split"] != "testdev"} <= vg_keys


def _objects(parsed):
    return {(r["image_id"], r["object_id"]): r for r in parsed.tasks["gqa_objects"]}


def test_answers_and_pointers_are_true_of_the_scene_graphs(parsed):
    objects = _objects(parsed)
    checked = 0
    for row in parsed.tasks["gqa"]:
        if row["split"] == "testdev":
            continue
        texts = {"question": row["question"], "answer": row["answer"], "fullAnswer": row["full_answer"]}
        pointed = {}
        for p in row["pointers"]:
            obj = objects[row["image_id"], p["object_id"]]
            last_word = texts[p["field"]].split()[p["end"] - 1].strip("?.,")
            assert last_word in (obj["name"], *_plurals(obj["name"])), (row["question"], p)
            pointed.setdefault(p["field"], []).append(obj)
        detailed, answer = row["detailed"], row["answer"]
        if detailed in ("queryAttr", "chooseAttr"):
            assert answer in pointed["question"][0]["attributes"]
        elif detailed == "verifyAttr":
            asked = row["question"].split()[-1].strip("?")
            assert (answer == "yes") == (asked in pointed["question"][0]["attributes"])
        elif detailed == "relS":
            subject = pointed["answer"][0]
            assert answer == subject["name"]
            relation = " ".join(row["question"].split()[2:-2])
            anchor = pointed["question"][0]["object_id"]
            assert {"name": relation, "object": anchor} in subject["relations"]
        elif detailed == "relVerify":
            a, b = pointed["question"]
            relation = " ".join(row["question"].split()[3:-2])
            assert (answer == "yes") == ({"name": relation, "object": b["object_id"]} in a["relations"])
        elif detailed == "existAttr":
            words = row["question"].split()
            colour, name = words[3], words[4].strip("?")
            found = any(o["name"] == name and colour in o["attributes"] for (img, _), o in objects.items()
                        if img == row["image_id"])
            assert (answer == "yes") == found
        checked += 1
    assert checked > 10


def _plurals(name: str) -> tuple[str, ...]:
    return (name + "s", name + "es")


def test_entailed_questions_share_the_image_and_are_determined(parsed):
    rows = {r["question_id"]: r for r in parsed.tasks["gqa"]}
    entailing = [r for r in rows.values() if r["entailed"]]
    assert entailing, "the world should publish entailed questions"
    for row in entailing:
        for eid in row["entailed"]:
            assert rows[eid]["image_id"] == row["image_id"] and eid != row["question_id"]
    # The gold answers are perfectly consistent; flipping the answer of an entailed question is not.
    questions = {qid: GqaQuestion.from_row(r) for qid, r in rows.items() if r["split"] == "val"}
    gold = {qid: q.answer for qid, q in questions.items()}
    perfect = gqa_metrics(questions, gold)
    assert perfect["gqa_accuracy"] == 1.0
    if perfect.get("gqa_consistency_questions"):
        assert perfect["gqa_consistency"] == 1.0


def test_gold_answers_are_valid_and_plausible(parsed):
    rows = parsed.tasks["gqa"]
    scenes = SceneIndex.from_rows(parsed.tasks["gqa_objects"])
    questions = {r["question_id"]: GqaQuestion.from_row(r) for r in rows if r["split"] == "val"}
    choices = derive_choices(questions, scenes, (GqaQuestion.from_row(r) for r in rows))
    assert len(choices) == len(questions)  # every program the world writes defines its choices
    m = gqa_metrics(questions, {qid: q.answer for qid, q in questions.items()}, choices)
    assert m["gqa_validity"] == 1.0 and m["gqa_plausibility"] == 1.0


def test_truth_removes_gqa_evaluation_images_from_pretraining(site):
    world = build_world(gqa_micro(), F30K, GQA_IMAGES)
    truth = compute_truth(world)
    val_ids = {r["imageId"] for split in ("val", "testdev")
               for r in json.loads(world.metadata[("gqa", f"questions_{split}")]).values()}
    vg_val = {f"vg:{i}" for i in val_ids if i.isdigit()}
    assert {o["key"] for o in truth["overlaps"] if o["reason"] == "vg_id"} == vg_val
    assert truth["removed"]["vg"]["vg_id"] == len(vg_val) == 2
    assert truth["images"]["gqa"] == 2
    train = json.loads(world.metadata[("gqa", "questions_train")]).values()
    train_ids = {f"vg:{r['imageId']}" for r in train}
    assert not train_ids & {o["key"] for o in truth["overlaps"]}  # GQA train images stay pretraining data
    plain = compute_truth(build_world(gqa_micro(), F30K))
    assert "gqa" not in plain["images"] and "vg_id" not in plain["removed"]["vg"]


@pytest.mark.slow
def test_cli_downloads_gqa_and_dedup_removes_exactly_the_truth(tmp_path):
    """configs/gqa_tiny.yaml through the real CLI to dedup: GQA's testdev images downloaded, and dedup's
    removals (GQA's evaluation images among them) exactly the world's truth."""
    import pyarrow.parquet as pq

    from pipeline.run import main
    from stages.outputs.download import DedupOutput, DownloadOutput
    from stages.outputs.world import WorldOutput

    def only(stage):
        (path,) = [p for p in (tmp_path / stage).iterdir() if not p.name.startswith(".")]
        return path

    assert main(["--config", str(REPO_ROOT / "configs" / "gqa_tiny.yaml"), "--workdir", str(tmp_path),
                 "--stage", "dedup"]) == 0
    truth = WorldOutput(only("world")).truth()
    summary = DownloadOutput(only("download")).summary()
    assert summary["datasets"]["gqa"]["ok"] == truth["images"]["gqa"] == 3
    assert summary["tables"]["task_gqa"] > 0 and summary["tables"]["task_gqa_objects"] > 0
    dedup = DedupOutput(only("dedup"))
    report = json.loads(dedup.report_file.read_text())
    removed = {ds: {r: n for r, n in reasons.items() if n} for ds, reasons in report["removed"].items()}
    assert removed == truth["removed"] and removed["vg"]["vg_id"] == 4
    keys = {(r["corpus"], r["key"]) for r in pq.read_table(dedup.removed_file).to_pylist()}
    assert keys == {(o["dataset"], o["key"]) for o in truth["overlaps"]}
