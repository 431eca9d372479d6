"""Text side of UNITER pretraining: tokenizer, txt_db writer/reader and the txtdb stage."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import random
from pathlib import Path
from types import SimpleNamespace

import lmdb
import lz4.frame
import msgpack
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer

from stages.base import StageContext, StageError
from stages.txt_db.config import TxtDbConfig
from stages.txt_db.stage import run
from vlp.data.tables import CAPTIONS, REGIONS
from vlp.data.tokenizer import (
    SPECIAL_TOKENS,
    TokenizerError,
    encode,
    load_tokenizer,
    save_tokenizer,
    tokenizer_meta,
    train_wordpiece,
    vocab_range,
)
from vlp.data.txt_db import TxtDb, TxtDbError, TxtDbWriter

CAPTION_ROWS = [
    ("coco", "coco:1", "11", "A red circle left of a blue square.", "train2014"),
    ("coco", "coco:1", "12", "Two shapes on a plain background", "train2014"),
    ("coco", "coco:2", "21", "A green triangle.", "train2014"),
    ("coco", "coco:3", "31", "A tiny star", "val2014"),
    ("flickr30k", "flickr30k:100", "0", "A striped hexagon above a circle", "test"),
    ("flickr30k", "flickr30k:100", "1", "Hexagon and circle", "test"),
    ("cc", "cc:train:0", "cc:train:0", "a yellow diamond", "train"),
    ("sbu", "sbu:0", "sbu:0", "the purple cross , finally", "train"),
]
REGION_ROWS = [
    ("vg", "vg:7", 70, "red circle"),
    ("vg", "vg:7", 71, "the square is blue"),
    ("vg", "vg:8", 80, "   "),  # tokenizes to nothing: left out, counted as empty
    ("vg", "vg:8", 81, "green triangle"),
]
DEMO_DEDUP = Path("/tmp/demo_work/dedup/8f849069a1e066bc")


def _meta(**extra):
    return {"CLS": 2, "SEP": 3, "MASK": 4, "UNK": 1, "PAD": 0, "v_range": [5, 100], **extra}


def write_tables(dedup: Path, captions=CAPTION_ROWS, regions=REGION_ROWS) -> Path:
    (dedup / "tables").mkdir(parents=True, exist_ok=True)
    cap_cols = list(zip(*captions, strict=True)) if captions else [[]] * 5
    cap = {f.name: list(c) for f, c in zip(CAPTIONS, cap_cols, strict=True)}
    pq.write_table(pa.table(cap, schema=CAPTIONS), dedup / "tables" / "captions.parquet")
    reg_cols = list(zip(*regions, strict=True)) if regions else [[]] * 4
    boxes = {name: [1.0] * len(regions) for name in ("x", "y", "w", "h")}
    reg = {f.name: list(c) for f, c in zip(REGIONS, reg_cols, strict=False)} | boxes
    pq.write_table(pa.table(reg, schema=REGIONS), dedup / "tables" / "regions.parquet")
    return dedup


def run_stage(tmp_path: Path, dedup: Path, **cfg):
    out = tmp_path / "txtdb_out"
    ctx = StageContext(cfg=SimpleNamespace(txt_db=TxtDbConfig(**cfg)), workdir=tmp_path, out_dir=out,
                       inputs={"dedup": dedup})
    return run(ctx), out


# --- txt_db writer / reader -------------------------------------------------------------------------------


def _build(path: Path, n: int = 5) -> dict[str, dict]:
    examples = {f"coco:{i}": {"input_ids": list(range(5, 5 + i + 1)), "img_fname": f"coco:{i // 2}",
                              "raw": f"caption {i}", "dataset": "coco"} for i in range(n)}
    with TxtDbWriter(path, _meta(corpus="coco")) as w:
        for txt_id, ex in examples.items():
            w.add(txt_id, ex)
    return examples


def _read_in_child(db: TxtDb, txt_id: str, queue) -> None:
    queue.put(db[txt_id])


def test_round_trip_sidecars_pickle_and_fork(tmp_path):
    path = tmp_path / "coco_train2014.db"
    examples = _build(path)
    assert sorted(os.listdir(tmp_path)) == ["coco_train2014.db"]  # no temp dir left behind
    db = TxtDb(path)
    assert len(db) == 5 and db.ids == list(examples)
    assert {i: db[i] for i in db.ids} == examples
    assert db.id2len == {i: len(ex["input_ids"]) for i, ex in examples.items()}
    assert db.txt2img == {i: ex["img_fname"] for i, ex in examples.items()}
    assert db.img2txts == {"coco:0": ["coco:0", "coco:1"], "coco:1": ["coco:2", "coco:3"],
                           "coco:2": ["coco:4"]}
    assert db.meta == _meta(corpus="coco")
    assert "coco:4" in db and "coco:5" not in db
    # A second reader of the same dir in this process shares the env (py-lmdb opens a dir once per process).
    other = TxtDb(path)
    assert other["coco:3"] == examples["coco:3"]
    clone = pickle.loads(pickle.dumps(db))
    assert clone["coco:2"] == examples["coco:2"]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(db, "coco:4", queue))
    child.start()
    assert queue.get(timeout=30) == examples["coco:4"]
    child.join(30)
    assert child.exitcode == 0
    for reader in (db, other, clone):
        reader.close()


def test_uniter_written_store_reads_unchanged_and_uniter_reads_ours(tmp_path):
    # Written the way UNITER's prepro.py / TxtLmdb do it: lmdb + msgpack(use_bin_type) + lz4.frame, sidecars
    # from json.dump; an NLVR2 example points at an image pair and the store has no img2txts.json.
    path = tmp_path / "nlvr2_dev.db"
    values = {
        "dev-850-0-0": {"identifier": "dev-850-0-0", "sentence": "Two dogs.", "input_ids": [1960, 3676, 119],
                        "img_fname": ("nlvr2_dev-850-0-img0.npz", "nlvr2_dev-850-0-img1.npz"), "target": 1},
        "dev-850-0-1": {"identifier": "dev-850-0-1", "sentence": "No cat.", "input_ids": [1302, 5855, 119],
                        "img_fname": ("nlvr2_dev-850-0-img0.npz", "nlvr2_dev-850-0-img1.npz"), "target": 0},
    }
    env = lmdb.open(str(path), readonly=False, create=True, map_size=1 << 24)
    txn = env.begin(write=True)
    for key, value in values.items():
        txn.put(key.encode("utf-8"), lz4.frame.compress(msgpack.dumps(value, use_bin_type=True)))
    txn.commit()
    env.close()
    meta = {"annotations": ["dev.json"], "missing_imgs": None, "output": str(path), "task": "nlvr",
            "toker": "bert-base-cased", "tokenizer": "bert-base-cased", "UNK": 100, "CLS": 101, "SEP": 102,
            "MASK": 103, "v_range": (999, 28996)}
    (path / "meta.json").write_text(json.dumps(meta, indent=4))
    (path / "id2len.json").write_text(json.dumps({k: len(v["input_ids"]) for k, v in values.items()}))
    (path / "txt2img.json").write_text(json.dumps({k: v["img_fname"] for k, v in values.items()}))

    db = TxtDb(path)
    pair = list(values["dev-850-0-1"]["img_fname"])  # msgpack gives tuples back as lists
    assert db["dev-850-0-1"] == {**values["dev-850-0-1"], "img_fname": pair}
    assert db.meta["v_range"] == [999, 28996] and db.meta["CLS"] == 101
    assert db.id2len == {"dev-850-0-0": 3, "dev-850-0-1": 3}
    assert db.img2txts == {"nlvr2_dev-850-0-img0.npz": ["dev-850-0-0", "dev-850-0-1"],
                           "nlvr2_dev-850-0-img1.npz": ["dev-850-0-0", "dev-850-0-1"]}
    db.close()

    # And UNITER's TxtLmdb reading pattern opens ours (readonly with its default lock, buffers=True).
    ours = tmp_path / "ours.db"
    examples = _build(ours, n=2)
    env = lmdb.open(str(ours), readonly=True, create=False)
    with env.begin(buffers=True) as txn:
        assert msgpack.loads(lz4.frame.decompress(txn.get(b"coco:1")), raw=False) == examples["coco:1"]
    env.close()


def test_corrupt_and_missing_entries_name_path_and_key(tmp_path):
    path = tmp_path / "x.db"
    _build(path, n=2)
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        txn.put(b"coco:1", b"\x04\x22\x4d\x18garbage")
        txn.put(b"coco:0", lz4.frame.compress(msgpack.dumps({"input_ids": "abc", "img_fname": "coco:0"})))
    env.close()
    db = TxtDb(path)
    with pytest.raises(TxtDbError, match=rf"^{path}: key 'coco:1': corrupt entry: not lz4-compressed msgp"):
        db["coco:1"]
    with pytest.raises(TxtDbError, match=rf"^{path}: key 'coco:0': corrupt entry: field input_ids is not"):
        db["coco:0"]
    with pytest.raises(TxtDbError, match=rf"^{path}: text id 'coco:9' not found$"):
        db["coco:9"]
    db.close()
    (path / "txt2img.json").write_text(json.dumps({"coco:0": "coco:0"}))
    with pytest.raises(TxtDbError, match=r"txt2img.json: text id 'coco:1' of id2len.json has no image$"):
        TxtDb(path)
    (path / "meta.json").write_text(json.dumps({"CLS": 2}))
    with pytest.raises(TxtDbError, match=r"meta.json: lacks key\(s\) \['SEP', 'MASK', 'v_range'\]$"):
        TxtDb(path)
    with pytest.raises(TxtDbError, match=r"nowhere.db: not a txt_db \(no data.mdb\)$"):
        TxtDb(tmp_path / "nowhere.db")


def test_writer_rejects_bad_examples_and_never_leaves_half_a_db(tmp_path):
    path = tmp_path / "coco_train2014.db"
    old = _build(path, n=1)
    with pytest.raises(TxtDbError, match=r"text id 'a2': field img_fname must be a non-empty string, got ''"):
        with TxtDbWriter(path, _meta()) as w:
            w.add("a", {"input_ids": [5], "img_fname": "coco:1"})
            w.add("a2", {"input_ids": [5], "img_fname": ""})
    # The failed build is discarded whole and the earlier DB stays as it was.
    assert sorted(os.listdir(tmp_path)) == ["coco_train2014.db"]
    assert TxtDb(path).id2len == {"coco:0": 1} and TxtDb(path)["coco:0"] == old["coco:0"]
    with pytest.raises(TxtDbError, match=r"text id 'b': added twice$"):
        with TxtDbWriter(tmp_path / "y.db", _meta()) as w:
            w.add("b", {"input_ids": [5], "img_fname": "coco:1"})
            w.add("b", {"input_ids": [6], "img_fname": "coco:1"})
    with pytest.raises(TxtDbError, match=r"field input_ids must be a list of non-negative ints$"):
        with TxtDbWriter(tmp_path / "y.db", _meta()) as w:
            w.add("c", {"input_ids": [5, -1], "img_fname": "coco:1"})
    with pytest.raises(TxtDbError, match=r"y.db: meta lacks \['v_range'\]$"):
        TxtDbWriter(tmp_path / "y.db", {"CLS": 2, "SEP": 3, "MASK": 4})
    assert sorted(os.listdir(tmp_path)) == ["coco_train2014.db"]


def _killed_build(path: Path) -> None:
    w = TxtDbWriter(path, _meta())
    for i in range(1500):  # past one commit of 1000
        w.add(f"t{i}", {"input_ids": [5], "img_fname": "coco:1"})
    os._exit(0)  # killed before close()


def test_killed_build_leaves_no_db_and_the_next_build_cleans_up(tmp_path):
    path = tmp_path / "k.db"
    child = multiprocessing.get_context("fork").Process(target=_killed_build, args=(path,))
    child.start()
    child.join(60)
    assert not path.exists() and (tmp_path / ".k.db.partial").is_dir()
    _build(path, n=3)
    assert sorted(os.listdir(tmp_path)) == ["k.db"] and len(TxtDb(path)) == 3


# --- tokenizer ----------------------------------------------------------------------------------------------


def test_trained_tokenizer_is_deterministic_and_reloads_through_transformers(tmp_path):
    texts = [row[3] for row in CAPTION_ROWS] + [row[3] for row in REGION_ROWS]
    tok = train_wordpiece(texts, vocab_size=500)
    vocab = tok.get_vocab()
    shuffled = texts[:]
    for seed in range(3):
        random.Random(seed).shuffle(shuffled)
        assert train_wordpiece(shuffled, vocab_size=500).get_vocab() == vocab
    # The input of huggingface/tokenizers#1794: the plain trainer gives two vocabs on it about half the time.
    issue = ["Wel come to the 🤗 Tok en izers libr ary."]
    assert len({json.dumps(sorted(train_wordpiece(issue, 500, lowercase=False).get_vocab().items()))
                for _ in range(12)}) == 1

    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert vocab["!"] == 5 and vocab_range(tok) == (5, len(vocab))
    assert tok.convert_ids_to_tokens(encode(tok, ["A red circle left of a blue square."])[0]) == [
        "a", "red", "circle", "left", "of", "a", "blue", "square", "."]
    # Unseen ASCII is spelt from characters, never [UNK]; uppercase is folded.
    assert tok.convert_ids_to_tokens(encode(tok, ["Zebra?"])[0]) == ["z", "##e", "##b", "##r", "##a", "?"]

    out = save_tokenizer(tok, tmp_path / "tokenizer")
    assert sorted(os.listdir(tmp_path)) == ["tokenizer"]
    assert sorted(os.listdir(out)) == ["tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    assert (out / "vocab.txt").read_text().splitlines() == sorted(vocab, key=vocab.get)
    probe = texts + ["Zebra? a QUICK brown fox"]
    auto = AutoTokenizer.from_pretrained(str(out))
    assert auto(probe, add_special_tokens=False)["input_ids"] == encode(tok, probe)
    assert auto("red circle")["input_ids"][0] == 2 and auto("red circle")["input_ids"][-1] == 3
    reloaded = load_tokenizer(out)
    assert encode(reloaded, probe) == encode(tok, probe)
    reloaded.backend_tokenizer.enable_truncation(2)  # as a tokenizer.json may ask; encode never truncates
    assert encode(reloaded, probe) == encode(tok, probe) and max(map(len, encode(tok, probe))) > 2
    meta = tokenizer_meta(tok, "wordpiece-trained")
    assert meta | {"vocab_digest": None} == {
        "toker": "wordpiece-trained", "tokenizer": "wordpiece-trained", "CLS": 2, "SEP": 3, "MASK": 4,
        "UNK": 1, "PAD": 0, "v_range": [5, len(vocab)], "vocab_size": len(vocab), "do_lower_case": True,
        "vocab_digest": None}

    # A bare vocab.txt (a Google BERT checkpoint dir) loads once casing is stated.
    (out / "tokenizer.json").unlink()
    (out / "tokenizer_config.json").unlink()
    with pytest.raises(TokenizerError, match=r"only vocab.txt, which does not say whether the vocab is"):
        load_tokenizer(out)
    assert encode(load_tokenizer(out, lowercase=True), probe) == encode(tok, probe)


def test_tokenizer_errors_are_one_line_and_never_reach_the_network(tmp_path):
    with pytest.raises(TokenizerError, match=r"^tokenizer path bert-base-uncased: no such directory"):
        load_tokenizer("bert-base-uncased")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match=r"empty: has neither tokenizer.json nor vocab.txt$"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "nosep").mkdir()
    (tmp_path / "nosep" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[MASK]\nred\n")
    with pytest.raises(TokenizerError, match=r"vocab lacks special token\(s\) \['\[SEP\]'\]$"):
        load_tokenizer(tmp_path / "nosep", lowercase=True)


# --- the stage ----------------------------------------------------------------------------------------------


def test_stage_builds_one_db_per_corpus_split_with_exact_counts(tmp_path):
    dedup = write_tables(tmp_path / "dedup")
    result, out = run_stage(tmp_path, dedup)
    dbs = ["cc_train", "coco_train2014", "coco_val2014", "flickr30k_test", "sbu_train", "vg_train"]
    assert sorted(os.listdir(out)) == sorted([f"{d}.db" for d in dbs] + ["stats.json", "tokenizer"])
    stats = json.loads((out / "stats.json").read_text())
    counts = {db: (s["examples"], s["images"], s["tokens"], s["max_len"], s["truncated"], s["empty"])
              for db, s in stats["dbs"].items()}
    assert counts == {
        "cc_train": (1, 1, 3, 3, 0, 0),
        "coco_train2014": (3, 2, 9 + 6 + 4, 9, 0, 0),
        "coco_val2014": (1, 1, 3, 3, 0, 0),
        "flickr30k_test": (2, 1, 6 + 3, 6, 0, 0),
        "sbu_train": (1, 1, 5, 5, 0, 0),
        "vg_train": (3, 2, 2 + 4 + 2, 4, 0, 1),
    }
    assert stats["total"] == {"examples": 11, "tokens": 47, "truncated": 0, "empty": 1}
    assert result.metrics["examples"] == 11 and result.metrics["examples/vg_train"] == 3
    assert result.metrics["vocab_size"] == stats["tokenizer"]["vocab_size"]
    assert result.artifacts == ["stats.json"]

    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    coco = TxtDb(out / "coco_train2014.db")
    assert coco.ids == ["coco:11", "coco:12", "coco:21"]
    assert coco["coco:21"] == {"input_ids": tok("A green triangle.", add_special_tokens=False)["input_ids"],
                               "img_fname": "coco:2", "raw": "A green triangle.", "dataset": "coco"}
    assert coco.txt2img == {"coco:11": "coco:1", "coco:12": "coco:1", "coco:21": "coco:2"}
    assert coco.img2txts == {"coco:1": ["coco:11", "coco:12"], "coco:2": ["coco:21"]}
    assert coco.meta["CLS"] == tok.cls_token_id and coco.meta["v_range"] == [5, len(tok.get_vocab())]
    assert coco.meta["tokenizer_dir"] == "../tokenizer" and coco.meta["max_txt_len"] == 60
    assert (coco.meta["output"], coco.meta["corpus"], coco.meta["split"]) == ("coco_train2014.db", "coco",
                                                                                 "train2014")
    vg = TxtDb(out / "vg_train.db")
    assert vg.ids == ["vg:region:70", "vg:region:71", "vg:region:81"]
    assert vg["vg:region:71"]["raw"] == "the square is blue" and vg.img2txts["vg:8"] == ["vg:region:81"]
    for path in sorted(out.glob("*.db")):
        db = TxtDb(path)
        assert list(db.id2len) == list(db.txt2img) == db.ids
        assert {t: len(db[t]["input_ids"]) for t in db.ids} == db.id2len
        assert {t for ts in db.img2txts.values() for t in ts} == set(db.ids)
        assert all(db.txt2img[t] == img for img, ts in db.img2txts.items() for t in ts)
        db.close()
    coco.close()
    vg.close()

    # Same input, same output; a rerun over the earlier output replaces it whole.
    first = {p.name: p.read_bytes() for p in (out / "tokenizer").iterdir()}
    run_stage(tmp_path, dedup)
    assert {p.name: p.read_bytes() for p in (out / "tokenizer").iterdir()} == first
    assert sorted(os.listdir(out)) == sorted([f"{d}.db" for d in dbs] + ["stats.json", "tokenizer"])


def test_stage_truncates_and_selects_corpora(tmp_path):
    dedup = write_tables(tmp_path / "dedup")
    _, out = run_stage(tmp_path, dedup, max_txt_len=3, corpora=["coco"], include_vg_regions=False)
    stats = json.loads((out / "stats.json").read_text())
    assert sorted(stats["dbs"]) == ["coco_train2014", "coco_val2014"]
    assert {db: (s["truncated"], s["max_len"], s["tokens"]) for db, s in stats["dbs"].items()} == {
        "coco_train2014": (3, 3, 9), "coco_val2014": (0, 3, 3)}
    db = TxtDb(out / "coco_train2014.db")
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert tok.convert_ids_to_tokens(db["coco:11"]["input_ids"]) == ["a", "red", "circle"]
    assert db.id2len == {"coco:11": 3, "coco:12": 3, "coco:21": 3}
    db.close()


def test_stage_uses_a_pretrained_tokenizer_dir(tmp_path):
    dedup = write_tables(tmp_path / "dedup")
    pre = save_tokenizer(train_wordpiece(["red blue green circle square"], 200, lowercase=False),
                         tmp_path / "bert-cased")
    result, out = run_stage(tmp_path, dedup, tokenizer=str(pre), corpora=["cc"], include_vg_regions=False)
    db = TxtDb(out / "cc_train.db")
    assert db.meta["tokenizer"] == str(pre) and db.meta["do_lower_case"] is False
    assert db["cc:cc:train:0"]["input_ids"] == encode(load_tokenizer(pre), ["a yellow diamond"])[0]
    assert (out / "tokenizer" / "vocab.txt").read_text() == (pre / "vocab.txt").read_text()
    db.close()
    with pytest.raises(StageError, match=r"^txt_db.tokenizer: tokenizer path .*nope: no such directory"):
        run_stage(tmp_path, dedup, tokenizer=str(tmp_path / "nope"))


@pytest.mark.parametrize(
    ("captions", "regions", "message"),
    [
        ([("coco", "", "11", "a red circle", "train2014")], REGION_ROWS,
         r"tables/captions.parquet: row 0: field image_key is empty$"),
        (CAPTION_ROWS + [("coco", None, "99", "a red circle", "train2014")], REGION_ROWS,
         r"tables/captions.parquet: row 8: field image_key is null$"),
        (CAPTION_ROWS + [("coco", "coco:9", "99", None, "train2014")], REGION_ROWS,
         r"tables/captions.parquet: row 8: field caption is null$"),
        (CAPTION_ROWS + [("coco", "coco:9", "12", "again", "train2014")], REGION_ROWS,
         r"tables/captions.parquet: row 8: text id 'coco:12' \(from corpus and id fields\) repeats "
         r"tables/captions.parquet row 1$"),
        (CAPTION_ROWS + [("coco", "coco:9", "98", "a circle", "train/2014")], REGION_ROWS,
         r"tables/captions.parquet: row 8: field split 'train/2014' cannot name a DB$"),
        (CAPTION_ROWS, REGION_ROWS + [("vg", "", 90, "a phrase")],
         r"tables/regions.parquet: row 4: field image_key is empty$"),
        (CAPTION_ROWS[:4], REGION_ROWS, r"tables/captions.parquet: no captions of corpus \['cc', 'sbu', "
         r"'flickr30k'\] \(configured in txt_db.corpora\)$"),
        (CAPTION_ROWS, [], r"tables/regions.parquet: no VG region descriptions"),
    ],
)
def test_stage_bad_input_is_a_one_line_error(tmp_path, captions, regions, message):
    dedup = write_tables(tmp_path / "dedup", captions, regions)
    with pytest.raises(StageError, match=message) as err:
        run_stage(tmp_path, dedup)
    assert "\n" not in str(err.value) and str(dedup) in str(err.value)


def test_stage_ignores_bad_rows_of_unselected_corpora_and_config_is_strict(tmp_path):
    dedup = write_tables(tmp_path / "dedup", CAPTION_ROWS + [("sbu", "", "sbu:1", "x", "train")], [])
    _, out = run_stage(tmp_path, dedup, corpora=["coco"], include_vg_regions=False)
    assert sorted(p.name for p in out.glob("*.db")) == ["coco_train2014.db", "coco_val2014.db"]
    with pytest.raises(ValidationError, match="extra"):
        TxtDbConfig(vocab=100)
    with pytest.raises(ValidationError, match="corpora"):
        TxtDbConfig(corpora=["vg"])
    with pytest.raises(ValidationError, match="no text source"):
        TxtDbConfig(corpora=[], include_vg_regions=False)
    with pytest.raises(StageError, match=r"dedup_without_tables/tables/captions.parquet: missing"):
        run_stage(tmp_path, tmp_path / "dedup_without_tables")
    pq.write_table(pa.table({"corpus": ["coco"], "caption": ["a"]}), dedup / "tables" / "captions.parquet")
    no_cols = r"tables/captions.parquet: no column\(s\) \['image_key', 'caption_id', 'split'\]$"
    with pytest.raises(StageError, match=no_cols):
        run_stage(tmp_path, dedup, corpora=["coco"], include_vg_regions=False)
    (dedup / "tables" / "captions.parquet").write_bytes(b"not parquet")
    with pytest.raises(StageError, match=r"tables/captions.parquet: not a readable Parquet file \(.*\)$"):
        run_stage(tmp_path, dedup, corpora=["coco"], include_vg_regions=False)


@pytest.mark.skipif(not (DEMO_DEDUP / "tables" / "captions.parquet").is_file(), reason="no demo dedup output")
def test_stage_on_the_demo_dedup_output(tmp_path):
    result, out = run_stage(tmp_path, DEMO_DEDUP)
    stats = json.loads((out / "stats.json").read_text())
    assert {db: s["examples"] for db, s in stats["dbs"].items()} == {
        "cc_train": 518, "cc_val": 58, "coco_train2014": 1210, "coco_val2014": 200, "flickr30k_test": 150,
        "flickr30k_train": 1200, "flickr30k_val": 150, "sbu_train": 289, "vg_train": 926}
    assert stats["total"] == {"examples": 4701, "tokens": 48273, "truncated": 0, "empty": 0}
    assert stats["tokenizer"]["vocab_size"] == 360
