"""GQA finetuning: an answer classifier over the pooled [CLS], like VQA's (UNITER's MLP), over the answers of
the training split.

GQA has one answer per question (no 10 human answers), so the target is that answer's label and the loss a
softmax cross-entropy over the answer vocabulary (questions whose answer is out of the vocabulary count in
the metric, never right, and add no loss). The vocabulary: every answer of the training split seen at least
``options.min_count`` times, labels by descending count then alphabetically; answers are compared exactly as
GQA's evaluation compares them (no normalisation). The batch metric ``gqa_acc`` is the accuracy over every
question of the split; the official metrics (balanced accuracy, binary / open, consistency, validity,
plausibility, distribution: ``vlp.eval.gqa``) need the whole split's predictions and are computed by the eval
stage. Splits without answers (test, challenge) get predictions only.

The paper's zero-shot setting (GQA answered without finetuning) needs a pretrained answer head; this project's
pretraining has no question-answering objective, so GQA is always finetuned here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from vlp.data.img_db import ImgDb
from vlp.eval.gqa import Choices, GqaQuestion, SceneIndex, derive_choices, gqa_metrics
from vlp.model.config import UniterConfig
from vlp.model.uniter import UniterModel
from vlp.objectives.common import encode
from vlp.tasks.common import (
    TaskDataError,
    TaskDataset,
    TaskHead,
    TaskOptions,
    check_answer_labels,
    classifier_mlp,
    finish_records,
    read_task_rows,
    require,
    validate_options,
)
from vlp.tasks.vqa import vocab_mismatch

IGNORE = -100


class GQAOptions(TaskOptions):
    min_count: int = Field(1, ge=1)  # training answers seen fewer times are left out of the classifier
    train_split: str = "train"  # the split the answer vocabulary comes from


def answer_vocab(answers: Iterable[str], min_count: int = 1) -> dict[str, int]:
    """Answer -> label for every answer seen at least ``min_count`` times, by descending count then name."""
    counts = Counter(answers)
    kept = sorted((a for a, c in counts.items() if c >= min_count and a), key=lambda a: (-counts[a], a))
    return {a: i for i, a in enumerate(kept)}


class GQADataset(TaskDataset):
    def __init__(self, *args: Any, ans2label: dict[str, int], rows: list[dict[str, Any]], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.ans2label = ans2label
        self.rows = rows  # every question of the split as the table has it (the official metrics read them)

    @property
    def answered(self) -> bool:
        return all(r["answer"] is not None for r in self.records)

    @property
    def head_options(self) -> dict[str, Any]:
        return {"ans2label": self.ans2label}

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.records[i]
        return {**self.example(i, record["img_keys"][0]), "label": record["label"]}

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().collate(examples)
        records = [self.records[ex["index"]] for ex in examples]
        batch["labels"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.long)
        batch["question_ids"] = [r["question_id"] for r in records]
        batch["gold"] = [r["answer"] for r in records]
        return batch


class GQA(TaskHead):
    name: ClassVar[str] = "gqa"
    metric: ClassVar[str] = "gqa_acc"
    Options: ClassVar[type[TaskOptions]] = GQAOptions

    def __init__(self, encoder_config: UniterConfig, *, ans2label: dict[str, int], **options: Any):
        super().__init__(encoder_config, **options)
        check_answer_labels("GQA", ans2label)
        self.ans2label = dict(ans2label)
        self.label2ans = sorted(ans2label, key=ans2label.get)
        self.classifier = classifier_mlp(encoder_config, len(ans2label))

    @classmethod
    def build_data(cls, tables_dir: Path, img_db: ImgDb, tokenizer_dir: Path, split: str, *,
                   skip_missing: bool = False, **options: Any) -> GQADataset:
        opts = validate_options(cls.name, cls.Options, options)
        source, rows = read_task_rows(tables_dir, cls.name, split)
        train_rows = rows if split == opts.train_split else read_task_rows(tables_dir, cls.name,
                                                                           opts.train_split)[1]
        ans2label = answer_vocab((require(r["answer"], f"{source}: question {r['question_id']}", "answer")
                                  for r in train_rows), opts.min_count)
        if not ans2label:
            raise TaskDataError(f"{source}: no answer of split {opts.train_split!r} occurs min_count="
                                f"{opts.min_count} times; the answer vocabulary is empty")
        if len({r["answer"] is None for r in rows}) > 1:
            raise TaskDataError(f"{source} split {split}: some questions have answers and some have none "
                                "(field answer is null)")
        records = []
        for row in rows:
            where = f"{source}: question {row['question_id']}"
            answer = row["answer"]
            records.append({
                "id": row["question_id"], "question_id": row["question_id"],
                "img_keys": (require(row["image_key"], where, "image_key"),),
                "text": require(row["question"], where, "question"), "answer": answer,
                "label": ans2label.get(answer, IGNORE) if answer is not None else IGNORE,
            })
        records, missing, num_images = finish_records(records, img_db, tokenizer_dir, opts,
                                                      f"{source} split {split}", skip_missing)
        return GQADataset(split, source, img_db, records, missing, num_images, ans2label=ans2label, rows=rows)

    def forward(self, model: UniterModel, batch: dict[str, Any]) -> dict[str, Any]:
        logits = self.classifier(model.pool(encode(model, batch))).float()
        answers = [self.label2ans[i] for i in logits.argmax(dim=1).tolist()]
        if all(g is None for g in batch["gold"]):  # a split without answers: predictions only
            return {"predictions": [{"question_id": q, "answer": a}
                                    for q, a in zip(batch["question_ids"], answers, strict=True)]}
        labels = batch["labels"]
        known = labels != IGNORE
        loss = (F.cross_entropy(logits[known], labels[known]) if known.any()
                else logits.sum() * 0.0)  # no target in the vocabulary: no loss, the graph stays connected
        correct = [a == g for a, g in zip(answers, batch["gold"], strict=True)]
        return {
            "gqa_loss": loss,
            "gqa_correct": torch.tensor(sum(correct), device=logits.device),
            "gqa_count": torch.tensor(len(correct), device=logits.device),
            "predictions": [{"question_id": q, "answer": a, "correct": c}
                            for q, a, c in zip(batch["question_ids"], answers, correct, strict=True)],
        }

    def state_extra(self) -> dict[str, Any]:
        return {**super().state_extra(), "ans2label": self.ans2label}

    def check_state_extra(self, extra: dict[str, Any]) -> None:
        super().check_state_extra(extra)
        problem = vocab_mismatch(extra.get("ans2label") or {}, self.ans2label)
        if problem:
            raise ValueError(problem)


def choices_for(data: GQADataset, scene_rows: list[dict[str, Any]] | None,
                reference_rows: Iterable[dict[str, Any]]) -> dict[str, Choices]:
    """Validity / plausibility choices of the split's questions, from the scene graphs (``task_gqa_objects``
    rows; none without them) and the attribute values the reference questions use."""
    if not scene_rows:
        return {}
    questions = {r["question_id"]: GqaQuestion.from_row(r) for r in data.rows}
    return derive_choices(questions, SceneIndex.from_rows(scene_rows),
                          (GqaQuestion.from_row(r) for r in reference_rows))


def split_metrics(data: GQADataset, predictions: list[dict[str, Any]], choices: dict[str, Choices]
                  ) -> dict[str, float]:
    """GQA's official metrics of one evaluated split (``vlp.eval.gqa``) over the questions that were
    predicted (all of them unless missing images were skipped); nothing for a split without answers."""
    answered = {p["question_id"]: p["answer"] for p in predictions}
    questions = {r["question_id"]: GqaQuestion.from_row(r) for r in data.rows if r["question_id"] in answered}
    if not data.answered:
        return {}
    return gqa_metrics(questions, answered, choices)


def submission(predictions: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The evaluation server's predictions file: ``[{"questionId": str, "prediction": str}]``."""
    return [{"questionId": p["question_id"], "prediction": p["answer"]} for p in predictions]


@torch.no_grad()
def attention_maps(model: UniterModel, data: GQADataset, count: int, tokenizer: Any, device: torch.device
                   ) -> list[dict[str, Any]]:
    """Last-layer text-to-region attention (heads averaged) of the first ``count`` questions of the split
    that point at objects (the paper's Fig. 4 view): ``{"image", "tokens", "attention" [Lt, N]}``."""
    pointed = {r["question_id"] for r in data.rows
               if any(p["field"] == "question" for p in r["pointers"] or ())}
    chosen = [i for i, r in enumerate(data.records) if r["question_id"] in pointed][:count]
    was = model.training
    model.eval()
    maps = []
    for i in chosen:
        batch = data.collate([data[i]])
        inputs = {k: batch[k].to(device) for k in ("input_ids", "position_ids", "txt_mask", "img_feat",
                                                   "img_pos_feat", "img_mask")}
        out = model(**inputs, attn_layer=-1)
        lt, n = inputs["input_ids"].shape[1], inputs["img_feat"].shape[1]
        ids = data.records[i]["input_ids"]
        maps.append({"image": f"{data.records[i]['img_keys'][0]} q{data.records[i]['question_id']}",
                     "tokens": tokenizer.convert_ids_to_tokens(ids),
                     "attention": out.attention[0].mean(0)[:lt, lt:lt + n].float().cpu()})
    model.train(was)
    return maps
