"""The eval summary over several seeds: per-seed rows, mean, sample spread and min-max, and the seeds in
which pretrained does not beat scratch, on hand-made metrics."""

import math

import pytest

from stages.eval.summary import build_seed_summary, build_summary, seeds_to_markdown, to_markdown


def metrics(vqa_pre: float, vqa_scratch: float, isda_on: float, isda_off: float) -> dict:
    return {
        "vqa": {"pretrained": {"val2014": {"vqa_score": vqa_pre}},
                "scratch": {"val2014": {"vqa_score": vqa_scratch}}},
        "retrieval": {"flickr30k/pretrained": {"isda": {"isda": isda_on, "isda_pairs": 7}},
                      "flickr30k/pretrained_no_iais": {"isda": {"isda": isda_off, "isda_pairs": 7}}},
    }


def test_one_seed_marks_a_row_where_pretraining_loses():
    summary = build_summary(metrics(0.30, 0.35, 0.2, 0.1))
    (row,) = summary["tasks"]
    assert row["pretrained_beats_scratch"] is False
    assert "| vqa | val2014 | vqa_score | 30.0 | 35.0 | **no** |" in to_markdown(summary)


def test_seeds_give_mean_spread_min_max_and_the_failing_seeds():
    summary = build_seed_summary({0: metrics(0.40, 0.30, 0.1, 0.2), 1: metrics(0.44, 0.30, 0.1, 0.2),
                                  2: metrics(0.30, 0.32, 0.3, 0.2)})
    assert summary["seeds"] == [0, 1, 2] and set(summary["per_seed"]) == {0, 1, 2}
    (row,) = summary["tasks"]
    pre = row["values"]["pretrained"]
    assert pre["mean"] == pytest.approx(0.38) and (pre["min"], pre["max"]) == (0.30, 0.44)
    assert pre["std"] == pytest.approx(math.sqrt(((0.02) ** 2 + 0.06 ** 2 + 0.08 ** 2) / 2))
    assert pre["per_seed"] == {0: 0.40, 1: 0.44, 2: 0.30}
    assert row["pretrained_beats_scratch"] == {"holds": 2, "of": 3, "failing_seeds": [2]}
    (isda,) = summary["isda"]
    assert isda["iais_lowers_isda"] == {"holds": 2, "of": 3, "failing_seeds": [2]}
    text = seeds_to_markdown(summary)
    row = ("| vqa | val2014 | vqa_score | 38.0 ± 7.2 (30.0–44.0) | 30.7 ± 1.2 (30.0–32.0) "
           "| **2/3** (not seed 2) |")
    assert row in text
    assert "## Seed 2" in text and "| vqa | val2014 | vqa_score | 30.0 | 32.0 | **no** |" in text


def test_laviter_sections_of_the_zero_shot_model_are_rows_and_not_scoring_costs():
    metrics = {"retrieval": {
        "coco/zero_shot": {"test/full": {"meta_sum": 3.0, "ir_r1": 0.5, "tr_r1": 0.4, "seconds": 1.0,
                                         "pairs_scored": 10.0},
                           "test/damsm": {"meta_sum": 2.0, "ir_r1": 0.3, "tr_r1": 0.2},
                           "test/laviter": {"r_precision": 0.6, "r_precision_top3": 0.9, "aimcos": 0.5,
                                            "frechet_regions": 12.0},
                           "test/captioning": {"bleu4": 0.27, "cider": 0.87}},
        "coco/pretrained": {"test/full": {"meta_sum": 4.0, "ir_r1": 0.6, "tr_r1": 0.5, "seconds": 1.0,
                                          "pairs_scored": 10.0}}}}
    summary = build_summary(metrics)
    rows = {(r["split"], r["metric"]): {k: v for k, v in r["values"].items() if v is not None}
            for r in summary["tasks"]}
    assert rows[("test/laviter", "r_precision")] == {"zero_shot": 0.6}
    assert rows[("test/laviter", "aimcos")] == {"zero_shot": 0.5}
    assert rows[("test/captioning", "bleu4")] == {"zero_shot": 0.27}
    assert rows[("test/captioning", "cider")] == {"zero_shot": 0.87}
    assert rows[("test/damsm", "ir_r1")] == {"zero_shot": 0.3}
    assert ("test/laviter", "frechet_regions") not in rows  # not a percentage: metrics.json and MLflow only
    assert {(r["model"], r["split"]) for r in summary["retrieval_cost"]} == {("zero_shot", "test/full"),
                                                                             ("pretrained", "test/full")}
    assert "| retrieval (coco) | test/captioning | cider | 87.0 |" in to_markdown(summary)
