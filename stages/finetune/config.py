"""Config of the finetuning stages (section ``finetune``): which tasks, from which initialisation, how long.

Each task is its own cached stage ``finetune_<task>`` reading ``finetune.common``, ``finetune.<task>``, the
root ``seed`` and ``runtime`` (precision, threads, skip_missing_images), so changing one task's settings
reruns only that task; ``finetune.tasks`` picks which of them the ``finetune`` stage (and ``eval``) runs.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from stages.outputs.encoder import ENCODER, encoder_stage
from vlp.objectives.iais import Anchor
from vlp.tasks.common import TaskOptions
from vlp.tasks.gqa import GQAOptions
from vlp.tasks.nlvr2 import NLVR2Options
from vlp.tasks.refexp import RefExpOptions
from vlp.tasks.registry import DEFAULT_TASKS
from vlp.tasks.vqa import VQAOptions
from vlp.train.optim import OptimConfig

TaskName = Literal["retrieval", "vqa", "nlvr2", "snli_ve", "refcoco", "gqa"]
Init = Literal["pretrained", "scratch"]


class CommonConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # pretrained: start from the pretrain stage's encoder (and, for retrieval, its ITM head); scratch: the
    # same architecture randomly initialised (the baseline that shows what pretraining buys); both: run each.
    init: Literal["pretrained", "scratch", "both"] = "both"
    dropout: float | None = Field(None, ge=0.0, lt=1.0)  # hidden/attention dropout; None keeps the encoder's
    log_every: int = Field(10, ge=1)  # optimizer steps between training-metric logs
    # The finetuning seed (the tasks' initialisation and batch order derive from it); None: the root seed. A
    # finetuning study varies it without retraining what the root seed feeds (detector, pretraining).
    seed: int | None = None

    @property
    def inits(self) -> tuple[Init, ...]:
        return ("pretrained", "scratch") if self.init == "both" else (self.init,)


class TrainConfig(OptimConfig):
    """Optimisation of one task (the optimizer settings, then epochs or steps and dynamic batches)."""

    lr: float = Field(1e-4, gt=0)
    head_lr_mult: float = Field(5.0, gt=0)  # the new head learns faster than the encoder (UNITER: 10 for VQA)
    epochs: float = Field(3.0, gt=0)
    max_steps: int | None = Field(None, ge=1)  # cap on optimizer steps (None: epochs decide)
    batch_units: int = Field(2048, ge=1)  # padded input units (examples x (longest text + most regions))
    val_every: int = Field(0, ge=0)  # optimizer steps between validations; 0: at each epoch's end
    train_split: str
    val_split: str  # validation curves during finetuning (the eval stage's splits are eval.splits)

    @property
    def examples_per_batch(self) -> int | None:
        """A fixed number of examples per optimizer step instead of the ``batch_units`` budget (None)."""
        return None


class HeadTaskConfig(TrainConfig):
    """A task with a ``vlp.tasks`` head: the options its head and data builder take (``Task.Options``),
    validated when the config loads; missing images are runtime.skip_missing_images."""

    options: TaskOptions

    def task_options(self) -> dict[str, Any]:
        return self.options.model_dump()


class RetrievalData(BaseModel):
    """Text dbs (txtdb stage names, without .db) of one retrieval dataset's Karpathy splits."""

    model_config = ConfigDict(extra="forbid")

    train: list[str]
    val: str
    test: str


class IAISSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    variant: Literal["singular", "distributed"] = "singular"
    # singular mirror: scores (the paper: softmax over gathered scores) or probabilities (the official code:
    # softmax over gathered head-averaged probabilities); vlp.objectives.iais
    singular_mirror: Literal["scores", "probabilities"] = "scores"
    # over the positive pairs: mean (the paper's weighting against the margin loss) or sum (the official
    # code, whose rank loss is a mean: weight x positives per step)
    positives: Literal["mean", "sum"] = "mean"
    anchors: tuple[Anchor, ...] = ("text", "image")
    schedule: Literal["exp", "linear", "log", "constant"] = "exp"
    gamma: float = Field(5.0, gt=0)  # exp / log schedule steepness (the paper: 5 and 10)
    weight: float = Field(1.0, ge=0)  # multiplies the annealed lambda_t
    # Also finetune the pretrained model without IAIS, so eval can show what IAIS does to ISDa.
    compare: bool = True

    def loss_config(self) -> dict[str, Any] | None:
        if not self.enabled:
            return None
        return {"variant": self.variant, "singular_mirror": self.singular_mirror, "positives": self.positives,
                "anchors": list(self.anchors), "schedule": self.schedule, "gamma": self.gamma}


class RetrievalConfig(TrainConfig):
    # A positive costs about 2 x neg_samples candidate passes (no gradient) and 1 + 2 x hard_negatives
    # training passes: one epoch of the demo's 1,200 captions is ~2 minutes on one CPU thread.
    epochs: float = 1.0
    batch_units: int = 512  # positives only
    train_split: str = "train"
    val_split: str = "val"
    # Text dbs of the txtdb stage (flickr30k_*) or the karpathy_txtdb stage (coco_karpathy_*), read as they
    # were written (cut to txt_db.max_txt_len); UNITER trains COCO retrieval on Karpathy train + restval.
    datasets: dict[str, RetrievalData] = Field(default_factory=lambda: {
        "flickr30k": RetrievalData(train=["flickr30k_train"], val="flickr30k_val", test="flickr30k_test"),
        "coco": RetrievalData(train=["coco_karpathy_train", "coco_karpathy_restval"], val="coco_karpathy_val",
                              test="coco_karpathy_test")})
    margin: float = Field(0.2, ge=0)
    # The hard-negative recipe (vlp.tasks.retrieval). The official one (train-itm-*-hn.json; the IAIS paper's
    # "31 hard negatives per side, 8 positives per batch"): neg_samples 399, hard_negatives 31,
    # positives_per_step 8, sides separate. The defaults are the demo's scale: 2 x 399 candidate passes per
    # positive is ~100x the demo's whole finetuning cost, and its Flickr30k train split has fewer images.
    neg_samples: int = Field(4, ge=1)  # random candidates per positive, per side
    hard_negatives: int = Field(1, ge=1)  # hardest candidates kept per positive, per side
    # shared: one positive anchors both sides (the IAIS paper's wording); separate: the image side has its own
    # positive drawn independently (the official code's two loaders)
    sides: Literal["shared", "separate"] = "shared"
    positives_per_step: int | None = Field(None, ge=1)  # None: as many as batch_units holds
    val_chunk: tuple[int, int] = (8, 64)  # images x texts scored per forward pass in validation
    iais: IAISSettings = Field(default_factory=IAISSettings)

    @property
    def examples_per_batch(self) -> int | None:
        return self.positives_per_step

    @model_validator(mode="after")
    def _sizes(self) -> RetrievalConfig:
        if self.hard_negatives > self.neg_samples:
            raise ValueError(f"hard_negatives ({self.hard_negatives}) must not exceed neg_samples "
                             f"({self.neg_samples})")
        if not self.datasets:
            raise ValueError("datasets is empty")
        return self


# The demo's VQA has no test-dev: val2014 serves as validation here and as the eval split.
class VqaConfig(HeadTaskConfig):
    options: VQAOptions = Field(default_factory=VQAOptions)
    train_split: str = "train2014"
    val_split: str = "val2014"


# Small training sets (demo: 140 NLVR2 statements, 271 RefCOCO expressions) get more epochs.
class Nlvr2Config(HeadTaskConfig):
    options: NLVR2Options = Field(default_factory=NLVR2Options)
    epochs: float = 6.0
    train_split: str = "train"
    val_split: str = "dev"


class SnliVeConfig(HeadTaskConfig):
    options: TaskOptions = Field(default_factory=TaskOptions)
    epochs: float = 2.0
    train_split: str = "train"
    val_split: str = "dev"


class RefcocoConfig(HeadTaskConfig):
    options: RefExpOptions = Field(default_factory=RefExpOptions)
    # Regions of the training split: gt = the COCO instance boxes (gt_features; UNITER: "only one object is
    # paired with the query", and its refcoco configs train on re_coco_gt), detected = the detector's regions
    # with the referred box's best match at IoU >= 0.5 as the target. Validation uses the detected regions.
    train_regions: Literal["gt", "detected"] = "gt"
    # An expression and its image's ~10 regions make a short example: smaller batches give the ~271 demo
    # expressions enough steps (2,048 units: 12 steps, no learning; 512 and 20 epochs: 160 steps).
    epochs: float = 20.0
    batch_units: int = 512
    train_split: str = "train"
    val_split: str = "val"


# GQA (configs/gqa.yaml): the balanced train questions, validated on val; eval scores val and testdev.
class GqaConfig(HeadTaskConfig):
    options: GQAOptions = Field(default_factory=GQAOptions)
    train_split: str = "train"
    val_split: str = "val"


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[TaskName] = list(DEFAULT_TASKS)
    # The pretrained model every task starts from (and zero-shot retrieval evaluates): ``pretrain``, the
    # pretrain stage's; ``sweep``, the loss study's best trial (``sweep.study``), the encoder the sweep
    # registers as @champion; ``sweep:<row>``, the row's best seed; ``sweep:<row>-s<seed>``, that trial.
    encoder: str = "pretrain"
    common: CommonConfig = Field(default_factory=CommonConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    vqa: VqaConfig = Field(default_factory=VqaConfig)
    nlvr2: Nlvr2Config = Field(default_factory=Nlvr2Config)
    snli_ve: SnliVeConfig = Field(default_factory=SnliVeConfig)
    refcoco: RefcocoConfig = Field(default_factory=RefcocoConfig)
    gqa: GqaConfig = Field(default_factory=GqaConfig)

    @field_validator("encoder")
    @classmethod
    def _encoder(cls, value: str) -> str:
        if not ENCODER.match(value):
            raise ValueError(f"{value!r}: pretrain, sweep, sweep:<row> or sweep:<row>-s<seed>")
        return value

    @model_validator(mode="after")
    def _distinct(self) -> FinetuneConfig:
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks lists a task twice: {self.tasks}")
        return self

    def task(self, name: str) -> TrainConfig:
        return getattr(self, name)


def finetune_upstream(task: str, encoder: str = "pretrain") -> tuple[str, ...]:
    """Stages ``finetune_<task>`` reads: the encoder and its tokenizer (``encoder``: the pretrain or the sweep
    stage), the regions (features) and
    the task's data: retrieval texts (txtdb, karpathy_txtdb), VQA / NLVR2 / SNLI-VE tables (dedup),
    RefCOCO's table and image sizes (download: dedup drops the RefCOCO eval images' rows from the image
    shards) and its ground-truth regions (gt_features, the training split's with train_regions: gt)."""
    data = {"retrieval": ("txtdb", "karpathy_txtdb"),
            "refcoco": ("download", "gt_features")}.get(task, ("dedup",))
    return (encoder_stage(encoder), "features", *data)
