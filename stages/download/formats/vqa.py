"""VQA v2: ``questions_<split>`` + ``annotations_<split>`` file pairs, joined by ``question_id``.

Every annotated question carries exactly 10 human answers (the VQA accuracy is computed over them).
The test splits (``test2015``, ``test-dev2015``: ``v2_OpenEnded_mscoco_test-dev2015_questions.json``) are
published without annotations: a ``questions_test*`` file may come alone, and its rows have no answers,
multiple-choice answer or answer type (their predictions go to the evaluation server instead). Any other
split needs both files. The images are COCO's, referred to as ``coco:<image_id>``.
"""

from __future__ import annotations

import re
from pathlib import Path

from stages.download.config import DatasetSource
from stages.download.formats.base import (
    FormatError,
    Parsed,
    dataset_label,
    json_list,
    json_object,
    load_json,
    records,
)

_ROLE = re.compile(r"(questions|annotations)_([\w-]+)")
ANSWERS_PER_QUESTION = 10


def _pairs(files: dict[str, Path]) -> dict[str, tuple[Path, Path | None]]:
    """split -> (questions file, annotations file or None for an unannotated test split)."""
    by_kind: dict[str, dict[str, Path]] = {"questions": {}, "annotations": {}}
    for role, path in files.items():
        match = _ROLE.fullmatch(role)
        if match is None:
            raise FormatError(
                dataset_label("vqa"),
                f"unknown file role '{role}' (known: questions_<split>, annotations_<split>)",
            )
        by_kind[match[1]][match[2]] = path
    if not files:
        raise FormatError(
            dataset_label("vqa"), "missing required file roles 'questions_<split>' + 'annotations_<split>'"
        )
    for kind, other in (("questions", "annotations"), ("annotations", "questions")):
        for split in by_kind[kind]:
            if split not in by_kind[other] and not (kind == "questions" and unannotated(split)):
                raise FormatError(
                    dataset_label("vqa"),
                    f"missing required file role '{other}_{split}' (it pairs with '{kind}_{split}')",
                )
    return {split: (path, by_kind["annotations"].get(split)) for split, path in by_kind["questions"].items()}


def unannotated(split: str) -> bool:
    """Whether ``split`` is one VQA publishes without annotations (test2015, test-dev2015)."""
    return split.startswith("test")


def _entries(path: Path, split: str, key: str) -> list:
    data = json_object(path, load_json(path))
    subtype = data.get("data_subtype")
    if subtype is not None and subtype != split:
        raise FormatError(path, f"is {subtype!r} but the file role names '{split}'", field="data_subtype")
    return json_list(path, data, key)


def parse_vqa(files: dict[str, Path], source: DatasetSource) -> Parsed:
    rows = []
    for split, (questions_path, annotations_path) in _pairs(files).items():
        questions: dict[int, tuple[int, int, str]] = {}
        for rec in records(questions_path, _entries(questions_path, split, "questions")):
            question_id = rec.get_int("question_id")
            rec.label = f"question {question_id}"
            if question_id in questions:
                raise rec.error("question_id", f"listed twice (also record {questions[question_id][0]})")
            questions[question_id] = (rec.index, rec.get_int("image_id"), rec.get_str("question"))

        if annotations_path is None:
            rows += [{"question_id": question_id, "image_key": f"coco:{image_id}", "split": split,
                      "question": question, "answers": None, "multiple_choice_answer": None,
                      "answer_type": None}
                     for question_id, (_, image_id, question) in questions.items()]
            continue
        annotations: dict[int, dict] = {}
        for rec in records(annotations_path, _entries(annotations_path, split, "annotations")):
            question_id = rec.get_int("question_id")
            rec.label = f"question {question_id}"
            if question_id not in questions:
                raise rec.error("question_id", f"no such question in {questions_path.name}")
            if question_id in annotations:
                raise rec.error("question_id", "annotated twice")
            image_id = rec.get_int("image_id")
            if image_id != questions[question_id][1]:
                raise rec.error(
                    "image_id",
                    f"is image {image_id} but {questions_path.name} has image {questions[question_id][1]}",
                )
            answers = rec.get_list("answers")
            if len(answers) != ANSWERS_PER_QUESTION:
                raise rec.error("answers", f"expected {ANSWERS_PER_QUESTION} answers, got {len(answers)}")
            annotations[question_id] = {
                "answers": [
                    rec.child("answers", i, item).get_str("answer") for i, item in enumerate(answers)
                ],
                "multiple_choice_answer": rec.get_str("multiple_choice_answer"),
                "answer_type": rec.get_str("answer_type"),
            }

        for question_id, (index, image_id, question) in questions.items():
            if question_id not in annotations:
                raise FormatError(
                    questions_path,
                    f"no annotation for it in {annotations_path.name}",
                    record=index,
                    record_id=f"question {question_id}",
                    field="question_id",
                )
            rows.append(
                {
                    "question_id": question_id,
                    "image_key": f"coco:{image_id}",
                    "split": split,
                    "question": question,
                    **annotations[question_id],
                }
            )
    return Parsed(tasks={"vqa": rows})
