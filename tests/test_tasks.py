"""Downstream task heads and datasets (VQA, NLVR2, SNLI-VE, RefCOCO) on hand-built tables, a real img_db
and a tokenizer trained here; losses and metrics are checked against values computed by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vlp.data.collate import padded_units
from vlp.data.img_db import ImgDb, ImgDbWriter
from vlp.data.tables import IMAGES, OBJECTS, TASK_NLVR2, TASK_REFCOCO, TASK_SNLI_VE, TASK_VQA
from vlp.data.tokenizer import load_tokenizer, save_tokenizer, train_wordpiece
from vlp.model import UniterConfig, UniterModel
from vlp.tasks.common import TaskDataError, read_image_sizes
from vlp.tasks.gqa import GQA
from vlp.tasks.nlvr2 import NLVR2, AttentionPool, expand_type_embeddings
from vlp.tasks.refexp import NO_TARGET, RefExp, box_iou, match_region, refexp_hits
from vlp.tasks.registry import DEFAULT_TASKS, TASKS
from vlp.tasks.snli_ve import SNLIVE
from vlp.tasks.vqa import VQA, vqa_loss
from vlp.train.metrics import metrics_from_sums

IMG_DIM = 8
LOG2, LOG3 = math.log(2), math.log(3)

VQA_ROWS = [
    # question_id, image, split, question, answers, multiple_choice_answer, answer_type
    (1, "coco:1", "train2014", "What color is the circle?", ["red"] * 7 + ["blue"] * 2 + ["green"], "red",
     "other"),
    (2, "coco:1", "train2014", "How many shapes are there?", ["2"] * 9 + ["3"], "two", "number"),
    (3, "coco:2", "train2014", "What color is the square?", ["blue"] * 3 + ["red"] * 7, "Blue", "other"),
    (4, "coco:2", "train2014", "What is on the left?", ["red"] * 8 + ["2", "two"], "red", "other"),
    (5, "coco:2", "val2014", "Is there a square?", ["yes"] * 10, "yes", "yes/no"),
    (6, "coco:3", "val2014", "What color is it?", ["red"] * 10, "red", "other"),
    (7, "coco:404", "val2014", "Where is the star?", ["left"] * 10, "left", "other"),
    # A test split: published without answers (predictions go to the evaluation server).
    (8, "coco:3", "test-dev2015", "What shape is it?", None, None, None),
    (9, "coco:2", "test-dev2015", "Is the square blue?", None, None, None),
]
# Soft targets over the train vocabulary {red: 0, 2: 1, blue: 2} (min_count 1), by hand. Humans per answer:
# q1 red 7, blue 2; q2 "2" 9; q3 blue 3, red 7; q4 red 8, "2"/"two" 2. Default (UNITER / MCAN):
# 0 / .3 / .6 / .9 / 1 for 0 / 1 / 2 / 3 / >= 4 humans; soft_score=linear: min(#humans / 3, 1).
VQA_TARGETS = {1: [1.0, 0.0, 0.6], 2: [0.0, 1.0, 0.0], 3: [1.0, 0.0, 0.9], 4: [1.0, 0.6, 0.0]}
VQA_TARGETS_LINEAR = {1: [1.0, 0.0, 2 / 3], 2: [0.0, 1.0, 0.0], 3: [1.0, 0.0, 1.0], 4: [1.0, 2 / 3, 0.0]}

NLVR2_ROWS = [
    (f"{split}-{pair}", split, sentence, f"nlvr2:{left}", f"nlvr2:{right}", label)
    for pair, split, sentence, left, right, label in [
        ("1-0-0", "train", "The left image has a red circle.", "train-1-0-img0", "train-1-0-img1", True),
        ("1-0-1", "train", "Both images show squares.", "train-1-0-img0", "train-1-0-img1", False),
        ("2-0-0", "train", "There are two shapes in total.", "train-2-0-img0", "train-2-0-img1", True),
        ("2-1-0", "train", "The right image is empty.", "train-2-1-img0", "train-1-0-img1", True),
        ("1-0-0", "dev", "One image shows a star.", "dev-1-0-img0", "dev-1-0-img1", False),
        ("2-0-0", "dev", "A circle is red.", "dev-1-0-img0", "train-1-0-img1", True),
    ]
]

SNLI_ROWS = [
    ("1.jpg#0r1e", "flickr30k:1", "train", "A circle is red.", "entailment"),
    ("1.jpg#0r1n", "flickr30k:1", "train", "Someone drew the circle.", "neutral"),
    ("2.jpg#0r1c", "flickr30k:2", "train", "There is no shape.", "contradiction"),
    ("2.jpg#0r2n", "flickr30k:2", "train", "The square is new.", "neutral"),
]

# coco:1 is 200 x 100 pixels. Detected regions, normalized x1y1x2y2: left half, right half, middle half.
DETECTED_COCO1 = [[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0], [0.25, 0.0, 0.75, 1.0]]
# COCO instances of coco:1 (object id -> pixel xywh); the ground-truth store keeps them in another order.
COCO1_OBJECTS = {11: [100, 0, 100, 100], 12: [0, 0, 60, 100], 13: [70, 20, 20, 20], 14: [0, 0, 100, 100]}
GT_ORDER = [13, 11, 12, 14]
REFCOCO_ROWS = [
    # ref_id, ann_id, split, sentences
    (1, 11, "train", ["right half", "the right one"]),  # detected: region 1 (IoU 1); gt: row 1
    (2, 12, "train", ["left thin box"]),  # detected: region 0 (IoU 0.6); gt: row 2
    (3, 13, "train", ["tiny square"]),  # detected: best IoU 0.04, no target; gt: row 0
    (4, 13, "val", ["small thing"]),  # as ref 3, kept (a miss) outside the training split
    (5, 14, "val", ["left half"]),  # detected: region 0 (IoU 1); gt: row 3
]
IMAGE_SIZES = {"coco:1": (200, 100)}


def _write_table(path: Path, schema: pa.Schema, rows: list[tuple]) -> None:
    records = [dict(zip(schema.names, r, strict=True)) for r in rows]
    pq.write_table(pa.Table.from_pylist(records, schema=schema), path)


def _put(writer: ImgDbWriter, key: str, boxes: list[list[float]], rng: np.random.Generator) -> None:
    xyxy = np.asarray(boxes, dtype=np.float64)
    n = len(xyxy)
    writer.put(key, features=rng.normal(size=(n, IMG_DIM)), conf=np.linspace(0.9, 0.5, n),
               norm_bb=np.concatenate([xyxy, xyxy[:, 2:] - xyxy[:, :2]], axis=1),
               soft_labels=np.full((n, 4), 0.25))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tasks")
    tables = root / "tables"
    tables.mkdir()
    _write_table(tables / "task_vqa.parquet", TASK_VQA, VQA_ROWS)
    _write_table(tables / "task_nlvr2.parquet", TASK_NLVR2, NLVR2_ROWS)
    _write_table(tables / "task_snli_ve.parquet", TASK_SNLI_VE, [(*r, "A premise.") for r in SNLI_ROWS])
    refcoco = [(ref, ann, "coco:1", split, sents, COCO1_OBJECTS[ann], 1, "COCO_train2014_000000000001.jpg")
               for ref, ann, split, sents in REFCOCO_ROWS]
    _write_table(tables / "task_refcoco.parquet", TASK_REFCOCO, refcoco)
    objects = [("coco", "coco:1", oid, ["shape"], [], *box) for oid, box in COCO1_OBJECTS.items()]
    objects.append(("vg", "coco:1", 99, ["tree"], ["green"], 0, 0, 10, 10))  # another corpus: not an instance
    _write_table(tables / "objects.parquet", OBJECTS, objects)

    texts = [r[3] for r in VQA_ROWS] + [r[2] for r in NLVR2_ROWS] + [r[3] for r in SNLI_ROWS]
    texts += [s for r in REFCOCO_ROWS for s in r[3]]
    tokenizer_dir = save_tokenizer(train_wordpiece(texts, vocab_size=200), root / "tokenizer")

    rng = np.random.default_rng(0)
    with ImgDbWriter(root / "img_db") as writer:
        _put(writer, "coco:1", DETECTED_COCO1, rng)
        for key, n in [("coco:2", 2), ("coco:3", 4), ("flickr30k:1", 3), ("flickr30k:2", 2),
                       ("nlvr2:train-1-0-img0", 2), ("nlvr2:train-1-0-img1", 3), ("nlvr2:train-2-0-img0", 1),
                       ("nlvr2:train-2-0-img1", 4), ("nlvr2:train-2-1-img0", 2), ("nlvr2:dev-1-0-img0", 2)]:
            _put(writer, key, [[0.1 * i, 0.1 * i, 0.1 * i + 0.3, 0.1 * i + 0.5] for i in range(n)], rng)
    with ImgDbWriter(root / "gt_img_db") as writer:
        gt_boxes = [[x / 200, y / 100, (x + w) / 200, (y + h) / 100]
                    for x, y, w, h in (COCO1_OBJECTS[o] for o in GT_ORDER)]
        _put(writer, "coco:1", gt_boxes, rng)
    vocab_size = len(load_tokenizer(tokenizer_dir).get_vocab())
    return {"tables": tables, "tokenizer": tokenizer_dir, "img_db": ImgDb(root / "img_db"),
            "gt_img_db": ImgDb(root / "gt_img_db"), "root": root, "vocab_size": vocab_size}


def _encoder(world: dict) -> UniterModel:
    torch.manual_seed(0)
    config = UniterConfig(vocab_size=world["vocab_size"], hidden_size=16, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=32, img_dim=IMG_DIM,
                          max_position_embeddings=64, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
    return UniterModel(config).eval()


def _fix_output(layer: torch.nn.Linear, bias: list[float]) -> None:
    """Zero weights and a given bias: the head's logits are ``bias`` whatever the encoder says."""
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor(bias))


def test_nlvr2_attention_pool_official_relu_and_plain_linear():
    # Scores w . x with w = (1, 0) over positions x0 = (1, 1), x1 = (-2, 3), x2 = (5, 5) (padding): 1 and -2.
    sequence = torch.tensor([[[1.0, 1.0], [-2.0, 3.0], [5.0, 5.0]]])
    mask = torch.tensor([[True, True, False]])
    linear, official = AttentionPool(2), AttentionPool(2, relu=True, dropout=0.5)
    for pool in (linear, official):
        _fix_output(pool.score, [0.0])
        with torch.no_grad():
            pool.score.weight.copy_(torch.tensor([[1.0, 0.0]]))
    # linear: softmax(1, -2) = (e^3, 1) / (1 + e^3); official: ReLU gives (1, 0): softmax = (e, 1) / (1 + e)
    w = math.exp(3) / (1 + math.exp(3))
    assert linear(sequence, mask)[0].tolist() == pytest.approx([w - 2 * (1 - w), w + 3 * (1 - w)])
    official.eval()
    v = math.e / (1 + math.e)
    assert official(sequence, mask)[0].tolist() == pytest.approx([v - 2 * (1 - v), v + 3 * (1 - v)])
    # In training the pool's weights are dropped out (p = 0.5: kept ones doubled), the plain pool's never.
    official.train()
    torch.manual_seed(0)
    dropped = {tuple(official(sequence, mask)[0].tolist()) for _ in range(20)}
    assert len(dropped) > 1
    config = UniterConfig(vocab_size=10, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32, img_dim=IMG_DIM)
    head = NLVR2(config)  # the default: UniterForNlvr2PairedAttn's pool, dropout = attention dropout
    assert head.biattn.pool.relu and head.biattn.pool.dropout == config.attention_probs_dropout_prob
    assert not NLVR2(config, pool="linear").biattn.pool.relu


def test_registry_names_and_metrics():
    assert TASKS == {"vqa": VQA, "nlvr2": NLVR2, "snli_ve": SNLIVE, "refcoco": RefExp, "gqa": GQA}
    assert {name: (t.name, t.metric) for name, t in TASKS.items()} == {
        "vqa": ("vqa", "vqa_score"), "nlvr2": ("nlvr2", "nlvr2_acc"), "snli_ve": ("snli_ve", "snli_ve_acc"),
        "refcoco": ("refcoco", "refcoco_acc"), "gqa": ("gqa", "gqa_acc"),
    }
    assert DEFAULT_TASKS == ("retrieval", "vqa", "nlvr2", "snli_ve", "refcoco")  # GQA is opt-in


def test_metrics_from_sums():
    sums = {"nlvr2_correct": 3, "nlvr2_count": 4, "vqa_score_sum": 1.3, "vqa_count": 4, "nlvr2_loss": 0.5,
            "refcoco_gt_correct": 0, "refcoco_gt_count": 0}
    assert metrics_from_sums(sums) == pytest.approx({"nlvr2_acc": 0.75, "vqa_score": 0.325})


def test_vqa_loss_by_hand():
    # BCE(x, t) = log(1 + e^x) - x t: log 2 for (0, 1), log(1 + e^2) - 0.6 for (2, 0.3); summed, batch mean.
    loss = vqa_loss(torch.tensor([[0.0, 2.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.3], [0.0, 0.0]]))
    assert float(loss) == pytest.approx((LOG2 + math.log1p(math.e**2) - 0.6 + 2 * LOG2) / 2, abs=1e-6)


def test_vqa_vocab_soft_targets_and_tokens(world):
    data = VQA.build_data(world["tables"], world["img_db"], world["tokenizer"], "train2014", min_count=1)
    assert data.ans2label == {"red": 0, "2": 1, "blue": 2}  # by count, then alphabetically; "two" -> "2"
    assert VQA.build_data(world["tables"], world["img_db"], world["tokenizer"], "train2014",
                          min_count=2).ans2label == {"red": 0}
    batch = data.collate([data[i] for i in range(len(data))])
    expected = torch.tensor([VQA_TARGETS[q] for q in batch["question_ids"]])
    assert torch.allclose(batch["targets"], expected)
    assert batch["question_ids"] == [1, 2, 3, 4] and batch["txt_ids"] == ["1", "2", "3", "4"]
    assert batch["img_keys"] == ["coco:1", "coco:1", "coco:2", "coco:2"]
    assert (batch["input_ids"][:, 0] == 2).all()  # [CLS]
    short = VQA.build_data(world["tables"], world["img_db"], world["tokenizer"], "train2014", min_count=1,
                           max_txt_len=2)
    assert all(r["input_ids"][0] == 2 and r["input_ids"][-1] == 3 and len(r["input_ids"]) == 4
               for r in short.records)
    linear = VQA.build_data(world["tables"], world["img_db"], world["tokenizer"], "train2014", min_count=1,
                            soft_score="linear")
    batch = linear.collate([linear[i] for i in range(len(linear))])
    expected = torch.tensor([VQA_TARGETS_LINEAR[q] for q in batch["question_ids"]])
    assert torch.allclose(batch["targets"], expected)
    assert data.txt_lens.tolist() == [len(r["input_ids"]) for r in data.records]
    assert data.img_lens.tolist() == [3, 3, 2, 2]
    # The validation split gets the training split's vocabulary.
    val = VQA.build_data(world["tables"], world["img_db"], world["tokenizer"], "val2014", min_count=1,
                         skip_missing=True)
    assert val.ans2label == data.ans2label and [r["question_id"] for r in val.records] == [5, 6]


def test_vqa_forward_loss_and_score_by_hand(world):
    data = VQA.build_data(world["tables"], world["img_db"], world["tokenizer"], "train2014", min_count=1)
    head = VQA(_encoder(world).config, min_count=1, **data.head_options)
    _fix_output(head.classifier[-1], [0.0, 2.0, -1.0])  # argmax: label 1, the answer "2"
    out = head(_encoder(world), data.collate([data[i] for i in range(len(data))]))

    def bce(x: float, t: float) -> float:
        return math.log1p(math.exp(x)) - x * t

    expected_loss = sum(bce(x, t) for q in (1, 2, 3, 4) for x, t in zip([0.0, 2.0, -1.0], VQA_TARGETS[q],
                                                                            strict=True)) / 4
    assert out["vqa_loss"].item() == pytest.approx(expected_loss, abs=1e-5)
    # "2": q1 none of 10; q2 9 humans -> 1; q3 none; q4 one human says "2" ("two" is not normalized on the
    # human side) -> leave-one-out mean of min(1, 1/3) over 9 subsets and 0 over 1 = 0.3.
    assert out["vqa_score_sum"].item() == pytest.approx(1.3) and int(out["vqa_count"]) == 4
    assert [p["answer"] for p in out["predictions"]] == ["2"] * 4
    assert [p["score"] for p in out["predictions"]] == pytest.approx([0.0, 1.0, 0.0, 0.3])


def test_vqa_test_split_without_answers_gets_predictions_only(world):
    data = VQA.build_data(world["tables"], world["img_db"], world["tokenizer"], "test-dev2015", min_count=1)
    assert not data.answered and [r["question_id"] for r in data.records] == [8, 9]
    assert VQA.build_data(world["tables"], world["img_db"], world["tokenizer"], "val2014", min_count=1,
                          skip_missing=True).answered
    head = VQA(_encoder(world).config, min_count=1, **data.head_options)
    _fix_output(head.classifier[-1], [0.0, 2.0, -1.0])
    out = head(_encoder(world), data.collate([data[i] for i in range(len(data))]))
    assert out == {"predictions": [{"question_id": 8, "answer": "2"}, {"question_id": 9, "answer": "2"}]}


def test_vqa_vocab_mismatch_is_one_line(world):
    config = _encoder(world).config
    head = VQA(config, ans2label={"red": 0, "2": 1, "blue": 2})
    saved = VQA(config, ans2label={"red": 0, "2": 1, "green": 2, "yes": 3}).state_extra()
    with pytest.raises(ValueError) as err:
        head.check_state_extra(saved)
    assert str(err.value) == ("answer vocabulary mismatch: checkpoint has 4 answers, data has 3 (first "
                              "difference at label 2: checkpoint 'green', data 'blue')")
    head.check_state_extra(head.state_extra())
    with pytest.raises(ValueError, match="checkpoint is for task 'nlvr2', not 'vqa'"):
        head.check_state_extra(NLVR2(config).state_extra())


def test_missing_images_reported_or_skipped(world):
    with pytest.raises(TaskDataError) as err:
        VQA.build_data(world["tables"], world["img_db"], world["tokenizer"], "val2014", min_count=1)
    message = str(err.value)
    assert "\n" not in message and "task_vqa.parquet split val2014: 1 of 3 images missing from the feature " \
        f"store {world['root'] / 'img_db'}: coco:404 (set skip_missing" in message
    dev = NLVR2.build_data(world["tables"], world["img_db"], world["tokenizer"], "dev", skip_missing=True)
    assert [r["id"] for r in dev.records] == ["dev-2-0-0"] and dev.missing == ["nlvr2:dev-1-0-img1"]
    store = world["root"] / "img_db"
    assert dev.missing_report() == f"1 of 3 images missing from the feature store {store}: nlvr2:dev-1-0-img1"


def test_options_are_validated(world):
    with pytest.raises(ValueError, match="task vqa options: unknown option 'min_cout'"):
        VQA.build_data(world["tables"], world["img_db"], world["tokenizer"], "train2014", min_cout=1)
    with pytest.raises(ValueError, match="task nlvr2 options: variant"):
        NLVR2(_encoder(world).config, variant="quad")
    with pytest.raises(TaskDataError, match=r"task_nlvr2.parquet: no rows of split 'test1' \(splits present: "
                                            r"dev, train\)"):
        NLVR2.build_data(world["tables"], world["img_db"], world["tokenizer"], "test1")


def test_nlvr2_type_table_expansion(world):
    model = _encoder(world)
    before = model.embeddings.token_type_embeddings.weight.detach().clone()
    NLVR2(model.config, variant="triplet").adapt_encoder(model)
    after = model.embeddings.token_type_embeddings.weight
    assert after.shape == (3, 16) and model.config.type_vocab_size == 3
    assert torch.equal(after[:2], before) and torch.equal(after[2], before[1])
    with torch.no_grad():
        after[2] += 1.0  # a finetuned table is kept as it is
    expand_type_embeddings(model)
    assert torch.equal(model.embeddings.token_type_embeddings.weight[2], before[1] + 1.0)


@pytest.mark.parametrize("variant", ["triplet", "pair", "pair_biattn"])
def test_nlvr2_variants(world, variant):
    data = NLVR2.build_data(world["tables"], world["img_db"], world["tokenizer"], "train", variant=variant)
    batch = data.collate([data[i] for i in range(len(data))])
    # The lengths the sampler packs by are the batch's real padded size.
    rows, width = batch["input_ids"].shape[0], batch["input_ids"].shape[1] + batch["img_mask"].shape[1]
    assert rows * width == padded_units(data.txt_lens, data.img_lens)
    left, right = (world["img_db"].name2nbb[k] for k in data.records[0]["img_keys"])  # 2 and 3 regions
    if variant == "triplet":
        assert batch["img_type_ids"][0, : left + right].tolist() == [1] * left + [2] * right
    else:
        assert rows == 2 * len(data)
        assert batch["img_type_ids"][0, :left].tolist() == [1] * left
        assert batch["img_type_ids"][1, :right].tolist() == [2] * right
        assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])

    model = _encoder(world)
    head = NLVR2(model.config, variant=variant)
    with pytest.raises(ValueError, match="call adapt_encoder"):
        head(model, batch)
    head.adapt_encoder(model)
    out = head(model, batch)
    assert out["nlvr2_loss"].isfinite() and int(out["nlvr2_count"]) == 4
    out["nlvr2_loss"].backward()
    assert model.embeddings.token_type_embeddings.weight.grad[2].abs().sum() > 0  # the right image's type

    _fix_output(head.classifier, [0.0, 1.0])  # always "true"
    out = head(model, batch)
    # Labels T, F, T, T: CE log(1 + e^-1) for the three true ones, log(1 + e) for the false one.
    expected = (3 * math.log1p(math.exp(-1)) + math.log1p(math.e)) / 4
    assert out["nlvr2_loss"].item() == pytest.approx(expected, abs=1e-5)
    assert (int(out["nlvr2_correct"]), int(out["nlvr2_count"])) == (3, 4)
    assert out["predictions"][1] == {"identifier": "train-1-0-1", "prediction": True, "label": False}
    other = "pair" if variant == "triplet" else "triplet"
    with pytest.raises(ValueError, match=f"checkpoint is the NLVR2 '{other}' variant, the config asks for "
                                         f"'{variant}'"):
        head.check_state_extra(NLVR2(model.config, variant=other).state_extra())


def test_snli_ve_loss_and_accuracy_by_hand(world):
    data = SNLIVE.build_data(world["tables"], world["img_db"], world["tokenizer"], "train")
    batch = data.collate([data[i] for i in range(len(data))])
    assert batch["targets"].tolist() == [0, 1, 2, 1] and batch["pair_ids"][0] == "1.jpg#0r1e"
    model = _encoder(world)
    head = SNLIVE(model.config)
    _fix_output(head.classifier[-1], [0.0, LOG2, 0.0])  # p = (1/4, 1/2, 1/4): always "neutral"
    out = head(model, batch)
    assert out["snli_ve_loss"].item() == pytest.approx((2 * math.log(4) + 2 * LOG2) / 4, abs=1e-5)
    assert (int(out["snli_ve_correct"]), int(out["snli_ve_count"])) == (2, 4)
    assert out["predictions"][0] == {"pair_id": "1.jpg#0r1e", "prediction": "neutral", "label": "entailment"}


def test_snli_ve_bad_label_names_the_record(world, tmp_path):
    _write_table(tmp_path / "task_snli_ve.parquet", TASK_SNLI_VE,
                 [("9.jpg#0r1x", "flickr30k:1", "train", "A shape.", "-", "p")])
    message = r"task_snli_ve.parquet: pair '9.jpg#0r1x': field label is '-', not one of entailment, neutral"
    with pytest.raises(TaskDataError, match=message):
        SNLIVE.build_data(tmp_path, world["img_db"], world["tokenizer"], "train")


def test_iou_and_target_matching_by_hand():
    regions = torch.tensor(DETECTED_COCO1)
    right_half, thin_left = torch.tensor([0.5, 0.0, 1.0, 1.0]), torch.tensor([0.0, 0.0, 0.3, 1.0])
    assert box_iou(right_half, regions).tolist() == pytest.approx([0.0, 1.0, 1 / 3])
    assert box_iou(thin_left, regions).tolist() == pytest.approx([0.6, 0.0, 0.05 / 0.75])
    assert match_region(right_half, regions, 0.5) == (1, pytest.approx(1.0))
    assert match_region(thin_left, regions, 0.5) == (0, pytest.approx(0.6))
    assert match_region(thin_left, regions, 0.7) == (NO_TARGET, pytest.approx(0.6))
    assert match_region(torch.tensor([0.25, 0.0, 0.5, 1.0]), regions, 0.5)[0] == 0  # tie 0.5/0.5: first
    assert match_region(right_half, torch.zeros(0, 4), 0.5) == (NO_TARGET, 0.0)


def test_refexp_hits_detected_and_gt():
    scores = torch.tensor([[0.0, 3.0, 1.0], [2.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    boxes = torch.tensor(DETECTED_COCO1).expand(3, 3, 4)
    ref = torch.tensor([[0.5, 0.0, 1.0, 1.0], [0.5, 0.0, 1.0, 1.0], [0.3, 0.0, 0.75, 1.0]])
    targets = torch.tensor([1, 1, NO_TARGET])
    predicted, iou, correct = refexp_hits(scores, boxes, ref, targets, "detected", 0.5)
    assert predicted.tolist() == [1, 0, 2] and iou.tolist() == pytest.approx([1.0, 0.0, 0.9])
    assert correct.tolist() == [True, False, True]
    # Ground truth: only the referred annotation counts, and an example without one is a miss.
    _, _, correct = refexp_hits(scores, boxes, ref, torch.tensor([1, 2, NO_TARGET]), "gt", 0.5)
    assert correct.tolist() == [True, False, False]


def test_refexp_detected_regions(world):
    build = RefExp.build_data
    train = build(world["tables"], world["img_db"], world["tokenizer"], "train", image_sizes=IMAGE_SIZES)
    assert [(r["id"], r["target"]) for r in train.records] == [("1:0", 1), ("1:1", 1), ("2:0", 0)]
    assert train.unmatched == ["3:0"] and train.dropped_unmatched and train.regions == "detected"
    assert train.records[2]["ref_box"] == pytest.approx([0.0, 0.0, 0.3, 1.0])

    model = _encoder(world)
    head = RefExp(model.config)
    _fix_output(head.scorer, [0.0])  # equal scores: CE log 3 over the 3 regions, argmax the first region
    out = head(model, train.collate([train[i] for i in range(len(train))]))
    assert out["refcoco_loss"].item() == pytest.approx(LOG3, abs=1e-5)
    assert (int(out["refcoco_correct"]), int(out["refcoco_count"])) == (1, 3)  # region 0 is ref 2's (IoU 0.6)

    val = build(world["tables"], world["img_db"], world["tokenizer"], "val", image_sizes=IMAGE_SIZES)
    assert [(r["id"], r["target"]) for r in val.records] == [("4:0", NO_TARGET), ("5:0", 0)]
    assert val.unmatched == ["4:0"] and not val.dropped_unmatched
    out = head(model, val.collate([val[0], val[1]]))
    assert out["refcoco_loss"].item() == pytest.approx(LOG3, abs=1e-5)  # ref 4 has no target: not in the loss
    assert (int(out["refcoco_correct"]), int(out["refcoco_count"])) == (1, 2)
    assert out["predictions"][1] == {"id": "5:0", "ref_id": 5, "region": 0, "box": [0.0, 0.0, 0.5, 1.0],
                                     "iou": pytest.approx(1.0), "correct": True}
    only_unmatched = head(model, val.collate([val[0]]))
    assert only_unmatched["refcoco_loss"].item() == 0.0
    only_unmatched["refcoco_loss"].backward()

    with pytest.raises(TaskDataError, match=r"ref 1: image 'coco:1' has no width/height in image_sizes"):
        build(world["tables"], world["img_db"], world["tokenizer"], "train", image_sizes={})


def test_refexp_ground_truth_regions(world):
    build = RefExp.build_data
    train = build(world["tables"], world["img_db"], world["tokenizer"], "train", image_sizes=IMAGE_SIZES,
                  gt_img_db=world["gt_img_db"])
    # The store holds the instances as 13, 11, 12, 14: each expression's target is its own annotation.
    assert [(r["id"], r["target"]) for r in train.records] == [("1:0", 1), ("1:1", 1), ("2:0", 2), ("3:0", 0)]
    assert train.unmatched == [] and train.regions == "gt" and train.img_lens.tolist() == [4] * 4
    model = _encoder(world)
    head = RefExp(model.config)
    _fix_output(head.scorer, [0.0])  # always row 0, annotation 13: right for ref 3 only
    out = head(model, train.collate([train[i] for i in range(len(train))]))
    assert out["refcoco_loss"].item() == pytest.approx(math.log(4), abs=1e-5)
    assert (int(out["refcoco_gt_correct"]), int(out["refcoco_gt_count"])) == (1, 4)
    assert "refcoco_correct" not in out

    partial = world["root"] / "gt_partial"
    with ImgDbWriter(partial) as writer:
        _put(writer, "coco:1", [[0.5, 0.0, 1.0, 1.0], [0.0, 0.0, 0.3, 1.0]], np.random.default_rng(1))
    store = ImgDb(partial)
    with pytest.raises(TaskDataError, match=r"gt_partial: image 'coco:1' has 2 ground-truth regions but "
                                            r"\S+/tables/objects.parquet lists 4 COCO instances"):
        build(world["tables"], world["img_db"], world["tokenizer"], "train", image_sizes=IMAGE_SIZES,
              gt_img_db=store)
    store.close()


def test_read_image_sizes(tmp_path):
    shard = tmp_path / "images" / "coco" / "shard-00000.parquet"
    shard.parent.mkdir(parents=True)
    rows = [{"corpus": "coco", "key": "coco:1", "status": "ok", "width": 200, "height": 100},
            {"corpus": "coco", "key": "coco:2", "status": "http_404"},
            {"corpus": "coco", "key": "coco:3", "status": "ok", "width": 64, "height": 48}]
    pq.write_table(pa.Table.from_pylist(rows, schema=IMAGES), shard)
    assert read_image_sizes(tmp_path / "images") == {"coco:1": (200, 100), "coco:3": (64, 48)}
    assert read_image_sizes(tmp_path / "images", keys=["coco:3"]) == {"coco:3": (64, 48)}
