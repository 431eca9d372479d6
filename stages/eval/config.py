"""Config of the evaluation stages (section ``eval``): splits per task, retrieval scoring modes, figures.

The ``eval_<task>`` stages also read ``runtime`` (eval_precision, threads, skip_missing_images) and the
box-count rule the features stage declared.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from stages.outputs.encoder import encoder_stage
from vlp.tasks.registry import TASK_NAMES


class CommonEvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_units: int = Field(4096, ge=1)  # padded input units per evaluation batch


class LaviterEvalConfig(BaseModel):
    """The zero-shot model's LAViTeR evaluation (``vlp.tasks.laviter``), run when the pretrained model has a
    ``vta`` or ``laviter`` head."""

    model_config = ConfigDict(extra="forbid")

    # The retrieval datasets (finetune.retrieval.datasets) whose eval splits it runs on: COCO's Karpathy test.
    datasets: tuple[str, ...] = ("coco",)
    r_precision_negatives: int = Field(99, ge=1)  # AttnGAN: the true caption among itself and 99 random
    r_precision_repeats: int = Field(10, ge=1)  # AttnGAN: 10 draws, mean and std
    beam_size: int = Field(3, ge=1)  # captioning (1: greedy)
    max_len: int = Field(20, ge=1)  # generated caption tokens at most
    length_penalty: float = Field(0.0, ge=0)  # beam score / length ** this


class RetrievalEvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # full: the cross-encoder scores every image x text pair; shortlist: only each text's top-k images and
    # each image's top-k texts by unimodal similarity, the rest ranked last; itc_shortlist: the same with the
    # pretrained itc task's contrastive similarity (ALBEF), for the zero-shot model of a pretraining with
    # the itc task (other models skip it).
    modes: tuple[Literal["full", "shortlist", "itc_shortlist"], ...] = ("full", "shortlist")
    shortlist_k: int = Field(16, ge=1)
    chunk: tuple[int, int] = (8, 64)  # images x texts per cross-encoder call of full scoring
    rerank_chunk: int = Field(128, ge=1)  # images per call when reranking one text's shortlist
    unimodal_chunk: int = Field(256, ge=1)  # texts / images per unimodal encoder call
    # Scored blocks between hand-backs of free heap memory (vlp.tasks.retrieval.PairScorer; 0: never).
    release_every: int = Field(8, ge=0)
    zero_shot: bool = True  # also the pretrained model's ITM head, before any finetuning
    # false: the zero-shot model alone, on the test splits of finetune.retrieval.datasets, without
    # finetune_retrieval (a study's zero-shot downstream comparison: sweep.study.downstream.finetune: false)
    finetuned: bool = True
    recall_curve_k: int = Field(10, ge=1)  # recall@K for K = 1..this in the recall-curve figure
    # ISDa on Flickr30k Entities phrase-box annotations of the images of these Entities splits (the
    # entity_features stage pools their boxes).
    isda_splits: tuple[str, ...] = ("test",)
    # The image side of ISDa: annotated = the regions pooled at the Entities boxes, one per box (the paper:
    # features at the ground-truth boxes); detected = the detected regions with IoU >= 0.5 to an object's box.
    isda_regions: Literal["annotated", "detected"] = "annotated"
    isda_max_sentences: int | None = Field(None, ge=1)  # the first N usable sentences (None: all)
    attention_pairs: int = Field(4, ge=0)  # test pairs drawn as text-to-image attention maps
    laviter: LaviterEvalConfig = Field(default_factory=LaviterEvalConfig)

    @model_validator(mode="after")
    def _some_mode(self) -> RetrievalEvalConfig:
        if not self.modes or len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes must list full, shortlist and/or itc_shortlist once each, got "
                             f"{self.modes}")
        if not (self.finetuned or self.zero_shot):
            raise ValueError("finetuned: false and zero_shot: false leave no model to evaluate")
        return self


def _default_splits() -> dict[str, list[str]]:
    return {"retrieval": ["test"], "vqa": ["val2014"], "nlvr2": ["dev", "test1"], "snli_ve": ["dev", "test"],
            "refcoco": ["val", "testA", "testB"], "gqa": ["val", "testdev"]}


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    common: CommonEvalConfig = Field(default_factory=CommonEvalConfig)
    # Splits each task is evaluated on (retrieval: "test", each finetune.retrieval.datasets entry's test db).
    splits: dict[str, list[str]] = Field(default_factory=_default_splits)
    retrieval: RetrievalEvalConfig = Field(default_factory=RetrievalEvalConfig)

    @model_validator(mode="after")
    def _known_tasks(self) -> EvalConfig:
        unknown = sorted(set(self.splits) - set(TASK_NAMES))
        if unknown:
            raise ValueError(f"splits: unknown task(s) {unknown}; choose from {list(TASK_NAMES)}")
        empty = sorted(t for t, s in self.splits.items() if not s)
        if empty:
            raise ValueError(f"splits: no split for task(s) {empty}")
        # Every task keeps an entry, so each eval_<task> stage can key its cache on eval.splits.<task>.
        self.splits = {**_default_splits(), **self.splits}
        return self

    def splits_of(self, task: str) -> list[str]:
        return self.splits[task]


def finetuned_input(task: str, finetuned: bool = True) -> str | None:
    """The finetune stage whose variants ``eval_<task>`` evaluates; None for retrieval's zero-shot model alone
    (``finetuned`` false: ``eval.retrieval.finetuned``)."""
    return f"finetune_{task}" if finetuned or task != "retrieval" else None


def eval_upstream(task: str, encoder: str = "pretrain", finetuned: bool = True) -> tuple[str, ...]:
    """Stages ``eval_<task>`` reads: its finetuned variants (none for retrieval with ``finetuned`` false:
    ``eval.retrieval.finetuned``), the pretrained model they started from (zero-shot
    retrieval, tokenizer; ``encoder``: the pretrain or the sweep stage), the regions, and the task's data as
    in ``finetune_upstream``; retrieval also reads dedup (Entities annotations and image sizes for ISDa) and
    the regions at the Entities boxes (entity_features); RefCOCO also the regions at the COCO ground-truth
    boxes (gt_features); retrieval and RefCOCO read the download stage's tables (the COCO instances of
    evaluation images, which dedup drops: LAViTeR's AIMCoS, RefCOCO's boxes)."""
    data = {"retrieval": ("txtdb", "karpathy_txtdb", "dedup", "entity_features", "download"),
            "refcoco": ("download", "gt_features")}.get(task, ("dedup",))
    tuned = finetuned_input(task, finetuned)
    return (*((tuned,) if tuned else ()), encoder_stage(encoder), "features", *data)
