"""GQA's official metrics (vlp.eval.gqa) on hand-built questions whose scores are worked out by hand."""

from __future__ import annotations

import json

import pytest

from vlp.eval.gqa import (
    Choices,
    GqaQuestion,
    SceneIndex,
    attribute_types,
    chi_square,
    consistency,
    derive_choices,
    gqa_metrics,
    question_choices,
)


def q(qid, answer, structural="verify", entailed=(), group=None, semantic=(), detailed="verifyAttr",
      balanced=True, question="Is it?", semantic_type="attr"):
    return GqaQuestion(qid, question, answer, structural, semantic_type, detailed, balanced, group,
                       tuple(entailed), tuple(semantic))


def test_consistency_averages_entailed_accuracy_over_correct_questions():
    # a entails b, c; d entails a; e entails a, x (x not in the set: skipped and counted); f is wrong.
    questions = {
        "a": q("a", "red", "query", entailed=["b", "c", "a"]),
        "b": q("b", "yes", entailed=["a"]),
        "c": q("c", "red", "choose"),
        "d": q("d", "yes", entailed=["a"]),
        "e": q("e", "no", entailed=["a", "x"]),
        "f": q("f", "no", entailed=["a"]),
    }
    predictions = {"a": "red", "b": "no", "c": "red", "d": "yes", "e": "no", "f": "yes"}
    # a correct: entailed b wrong, c right (a itself left out) -> 0.5; b wrong: not counted;
    # c correct without entailed: not counted; d correct -> a right -> 1;
    # e correct -> a right (x skipped) -> 1
    value, n, missing = consistency(questions, predictions)
    assert (value, n, missing) == (pytest.approx((0.5 + 1 + 1) / 3), 3, 1)
    # an entailed question answered wrongly lowers the score of every question entailing it
    predictions["a"] = "blue"
    value, n, _ = consistency(questions, predictions)
    # a wrong: not counted; d -> 0; e -> 0
    assert (value, n) == (0.0, 2)
    assert consistency({"a": q("a", "x")}, {"a": "x"}) == (None, 0, 0)


def test_accuracy_binary_open_and_per_type():
    questions = {
        "1": q("1", "yes", "verify", question="Is the circle red?"),
        "2": q("2", "no", "logical"),
        "3": q("3", "red", "choose"),
        "4": q("4", "circle", "query", semantic_type="rel"),
        "5": q("5", "blue", "query"),
        "6": q("6", "no", "verify", balanced=False),  # unbalanced: ignored
        "7": q("7", None, "query"),  # no answer (a test split's question): ignored
    }
    predictions = {"1": "yes", "2": "yes", "3": "red", "4": "circle", "5": "green", "6": "yes"}
    m = gqa_metrics(questions, predictions)
    assert m["gqa_accuracy"] == pytest.approx(3 / 5)
    assert m["gqa_binary"] == pytest.approx(2 / 3)  # verify, logical, choose are binary
    assert m["gqa_open"] == pytest.approx(1 / 2)
    assert m["gqa_questions"] == 5
    assert m["gqa_accuracy/structural/query"] == pytest.approx(0.5)
    assert m["gqa_accuracy/semantic/rel"] == 1.0
    assert m["gqa_accuracy/words/4"] == 1.0  # "Is the circle red?"
    assert "gqa_validity" not in m and "gqa_distribution" not in m  # no choices, no global groups
    with pytest.raises(ValueError, match="no prediction for question '5'"):
        gqa_metrics(questions, {k: v for k, v in predictions.items() if k != "5"})


def test_validity_plausibility_and_the_common_rule():
    questions = {
        "1": q("1", "red", "query"),
        "2": q("2", "yes"),
        "3": q("3", "metal", "query", detailed="queryCommon"),
        "4": q("4", "red", "query"),  # no choices: counts for neither
    }
    choices = {"1": Choices({"red", "blue", "green"}, {"red", "blue"}),
               "2": Choices({"yes", "no"}, {"yes", "no"}), "3": Choices({"metal"}, {"metal"})}
    predictions = {"1": "green", "2": "red", "3": "color", "4": "x"}
    m = gqa_metrics(questions, predictions, choices)
    # 1: valid, not plausible; 2: neither; 3: "Common" -> {color, material, shape}: both
    assert m["gqa_validity"] == pytest.approx(2 / 3)
    assert m["gqa_plausibility"] == pytest.approx(1 / 3)
    assert m["gqa_choices_questions"] == 3


def test_distribution_is_the_size_weighted_chi_square_over_global_groups():
    gold = {"color": {"red": 2, "blue": 1}, "": {"circle": 1}}
    predicted = {"color": {"red": 1, "green": 2}, "": {"circle": 1}}
    # color: (1-2)^2/2 + (0-1)^2/1 = 1.5, weight 3; "": 0, weight 1 -> 4.5 / 4
    assert chi_square(gold, predicted) == pytest.approx(4.5 / 4)
    questions = {"1": q("1", "red", "query", group="color"), "2": q("2", "red", "query", group="color"),
                 "3": q("3", "blue", "query", group="color"), "4": q("4", "circle", "query", group=""),
                 "5": q("5", "yes", group=None)}
    predictions = {"1": "red", "2": "green", "3": "green", "4": "circle", "5": "no"}
    assert gqa_metrics(questions, predictions)["gqa_distribution"] == pytest.approx(4.5 / 4 / 100)


def test_steps_leave_out_exist_and_name_queries():
    semantic = [{"operation": "select", "dependencies": [], "argument": "star (1)"},
                {"operation": "relate", "dependencies": [0], "argument": "_,below,s (2)"},
                {"operation": "query", "dependencies": [1], "argument": "name"}]
    assert q("1", "x", semantic=semantic).steps == 2
    exist = [{"operation": "select", "dependencies": [], "argument": "circle (1)"},
             {"operation": "exist", "dependencies": [0], "argument": "?"}]
    assert q("1", "x", semantic=exist).steps == 1


SCENE_ROWS = [
    # image 1: a red small circle below a blue star; image 2: a green circle left of a square
    {"image_id": "1", "object_id": "10", "name": "circle", "attributes": ["red", "small"],
     "relations": [{"name": "below", "object": "11"}]},
    {"image_id": "1", "object_id": "11", "name": "star", "attributes": ["blue"],
     "relations": [{"name": "above", "object": "10"}]},
    {"image_id": "2", "object_id": "20", "name": "circle", "attributes": ["green"],
     "relations": [{"name": "to the left of", "object": "21"}]},
    {"image_id": "2", "object_id": "21", "name": "square", "attributes": ["yellow", "large"],
     "relations": [{"name": "to the right of", "object": "20"}]},
]


def program(*steps):
    return tuple({"operation": op, "dependencies": deps, "argument": arg} for op, deps, arg in steps)


def test_choices_come_from_the_programs_and_the_scene_graphs():
    scenes = SceneIndex.from_rows(SCENE_ROWS)
    reference = [
        q("r1", "red", "query", semantic=program(("select", [], "circle (10)"), ("query", [0], "color"))),
        q("r2", "no", semantic=program(("select", [], "star (11)"), ("verify color", [0], "purple"))),
        q("r3", "small", "choose", semantic=program(("select", [], "circle (10)"), ("choose size", [0],
                                                                                      "small|large"))),
    ]
    types = attribute_types(reference)
    assert types == {"color": {"red", "purple"}, "size": {"small", "large"}}
    color = q("1", "red", "query", semantic=program(("select", [], "circle (10)"), ("query", [0], "color")))
    c = question_choices(color, scenes, types)
    # valid: every color the questions use; plausible: colors circles have in the scene graphs
    assert (c.valid, c.plausible) == ({"red", "purple"}, {"red"})
    below = q("2", "circle", "query", semantic=program(("select", [], "star (11)"),
                                                       ("relate", [0], "_,below,s (10)"),
                                                       ("query", [1], "name")))
    c = question_choices(below, scenes, types)
    assert c.valid == {"circle", "star", "square"} and c.plausible == {"circle"}  # what is below a star
    verify = q("3", "no", semantic=program(("select", [], "star (11)"), ("verify color", [0], "red")))
    assert question_choices(verify, scenes, types).valid == {"yes", "no"}
    choose = q("4", "large", "choose", semantic=program(("select", [], "square (21)"),
                                                        ("choose size", [0], "small|large")))
    assert question_choices(choose, scenes, types).plausible == {"small", "large"}
    unknown = q("5", "x", "query", semantic=program(("select", [], "star (11)"), ("query", [0], "material")))
    assert question_choices(unknown, scenes, types) is None
    assert set(derive_choices({"1": color, "5": unknown}, scenes, reference)) == {"1"}


def test_question_from_a_table_row():
    row = {"question_id": "07333408", "question": "What is on the white wall?", "answer": "pipe",
           "structural": "query", "semantic_type": "rel", "detailed": "relS", "is_balanced": True,
           "global_group": "", "entailed": [], "semantic": json.dumps([{"operation": "select",
                                                                        "dependencies": [],
                                                                        "argument": "wall (722332)"}])}
    question = GqaQuestion.from_row(row)
    assert question.global_group == "" and not question.binary
    assert question.semantic[0]["operation"] == "select"
