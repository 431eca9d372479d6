"""VQA v2 finetuning: a multi-label answer classifier over the pooled [CLS], as in UNITER / BUTD.

The answer vocabulary is built from the training split alone (one answer per question, the
``multiple_choice_answer``), so every split of one table gets the same vocabulary; the targets are the soft
scores of the in-vocabulary answers among the 10 human answers (``options.soft_score``: ``mcan``, the
0 / 0.3 / 0.6 / 0.9 / 1.0 steps of UNITER's appendix, or ``linear`` min(#humans / 3, 1)), and the metric is
the official VQA accuracy of the argmax answer.

The test splits (test-dev2015, test2015) have no answers: their examples get predictions only (no loss, no
score), which the eval stage writes as the evaluation server's results file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from vlp.data.img_db import ImgDb
from vlp.eval.vqa import SoftScore, build_answer_vocab, soft_targets, vqa_accuracy
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


class VQAOptions(TaskOptions):
    min_count: int = Field(9, ge=1)  # UNITER's 3,129 answers on VQA v2; a small demo set needs a small value
    train_split: str = "train2014"  # the split the answer vocabulary comes from
    soft_score: SoftScore = "mcan"  # targets: UNITER/MCAN's 0/.3/.6/.9/1 steps, or linear min(1, n/3)


def vqa_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """UNITER's VQA loss: binary cross-entropy summed over the answers, averaged over the questions."""
    per_answer = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return per_answer.sum(dim=1).mean()


def vocab_mismatch(saved: dict[str, int], current: dict[str, int]) -> str | None:
    """One line saying how two answer vocabularies differ, or None when they are equal."""
    if saved == current:
        return None
    saved_list, current_list = sorted(saved, key=saved.get), sorted(current, key=current.get)
    common = min(len(saved_list), len(current_list))
    label = next((i for i in range(common) if saved_list[i] != current_list[i]), common)

    def at(answers: list[str]) -> str:
        return repr(answers[label]) if label < len(answers) else "nothing"

    return (f"answer vocabulary mismatch: checkpoint has {len(saved)} answers, data has {len(current)} "
            f"(first difference at label {label}: checkpoint {at(saved_list)}, data {at(current_list)})")


class VQADataset(TaskDataset):
    def __init__(self, *args: Any, ans2label: dict[str, int], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.ans2label = ans2label

    @property
    def answered(self) -> bool:
        """Whether the split has human answers (the test splits have none: predictions only)."""
        return all(r["answers"] is not None for r in self.records)

    @property
    def head_options(self) -> dict[str, Any]:
        return {"ans2label": self.ans2label}

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.records[i]
        example = self.example(i, record["img_keys"][0])
        return {**example, "labels": record["labels"], "scores": record["scores"]}

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().collate(examples)
        targets = torch.zeros(len(examples), len(self.ans2label))
        for b, ex in enumerate(examples):
            targets[b, ex["labels"]] = torch.tensor(ex["scores"], dtype=torch.float32)
        records = [self.records[ex["index"]] for ex in examples]
        batch["targets"] = targets
        batch["question_ids"] = [r["question_id"] for r in records]
        batch["answers"] = [r["answers"] for r in records]
        batch["answer_types"] = [r["answer_type"] for r in records]
        return batch


class VQA(TaskHead):
    name: ClassVar[str] = "vqa"
    metric: ClassVar[str] = "vqa_score"
    Options: ClassVar[type[TaskOptions]] = VQAOptions

    def __init__(self, encoder_config: UniterConfig, *, ans2label: dict[str, int], **options: Any):
        super().__init__(encoder_config, **options)
        check_answer_labels("VQA", ans2label)
        self.ans2label = dict(ans2label)
        self.label2ans = sorted(ans2label, key=ans2label.get)
        self.classifier = classifier_mlp(encoder_config, len(ans2label))

    @classmethod
    def build_data(cls, tables_dir: Path, img_db: ImgDb, tokenizer_dir: Path, split: str, *,
                   skip_missing: bool = False, **options: Any) -> VQADataset:
        opts = validate_options(cls.name, cls.Options, options)
        source, rows = read_task_rows(tables_dir, cls.name, split)
        if split == opts.train_split:
            train_rows = rows
        else:
            train_rows = read_task_rows(tables_dir, cls.name, opts.train_split)[1]
        ans2label = build_answer_vocab(
            (require(r["multiple_choice_answer"], f"{source}: question {r['question_id']}",
                     "multiple_choice_answer") for r in train_rows),
            opts.min_count,
        )
        if not ans2label:
            raise TaskDataError(f"{source}: no answer of split {opts.train_split!r} occurs min_count="
                                f"{opts.min_count} times; the answer vocabulary is empty")
        records = []
        answered = {row["answers"] is not None for row in rows}
        if len(answered) > 1:
            raise TaskDataError(f"{source} split {split}: some questions have answers and some have none "
                                "(field answers is null)")
        for row in rows:
            where = f"{source}: question {row['question_id']}"
            answers = row["answers"]
            if answers is not None and not answers:
                raise TaskDataError(f"{where}: field answers is empty")
            labels, scores = soft_targets(answers, ans2label, opts.soft_score) if answers else ([], [])
            records.append({
                "id": str(row["question_id"]), "question_id": row["question_id"],
                "img_keys": (require(row["image_key"], where, "image_key"),),
                "text": require(row["question"], where, "question"),
                "answers": None if answers is None else list(answers),
                "answer_type": row["answer_type"], "labels": labels, "scores": scores,
            })
        where = f"{source} split {split}"
        records, missing, num_images = finish_records(records, img_db, tokenizer_dir, opts, where,
                                                      skip_missing)
        return VQADataset(split, source, img_db, records, missing, num_images, ans2label=ans2label)

    def forward(self, model: UniterModel, batch: dict[str, Any]) -> dict[str, Any]:
        logits = self.classifier(model.pool(encode(model, batch))).float()
        answers = [self.label2ans[i] for i in logits.argmax(dim=1).tolist()]
        if all(human is None for human in batch["answers"]):  # a test split: nothing to score against
            return {"predictions": [{"question_id": q, "answer": a}
                                    for q, a in zip(batch["question_ids"], answers, strict=True)]}
        scores = [vqa_accuracy(a, human) for a, human in zip(answers, batch["answers"], strict=True)]
        return {
            "vqa_loss": vqa_loss(logits, batch["targets"]),
            "vqa_score_sum": torch.tensor(sum(scores), device=logits.device),
            "vqa_count": torch.tensor(len(scores), device=logits.device),
            "predictions": [
                {"question_id": q, "answer": a, "score": s}
                for q, a, s in zip(batch["question_ids"], answers, scores, strict=True)
            ],
        }

    def state_extra(self) -> dict[str, Any]:
        return {**super().state_extra(), "ans2label": self.ans2label}

    def check_state_extra(self, extra: dict[str, Any]) -> None:
        super().check_state_extra(extra)
        problem = vocab_mismatch(extra.get("ans2label") or {}, self.ans2label)
        if problem:
            raise ValueError(problem)
