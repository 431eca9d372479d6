"""Config of the ``pretrain`` stage: UNITER pretraining on Ray Train (section ``pretrain``).

Defaults are sized for the demo world on two 1-CPU workers (tiny model, ~3k captions, 10 regions per image):
there, 1,500 steps take MLM accuracy from 0 to ~0.6, ITM from chance to ~0.77 and zero-shot R@1 from chance
to ~0.3. Real corpora want base/large, a larger batch budget and many more steps. The stage also reads the
root ``seed`` and ``runtime.precision`` / ``runtime.threads``; the box-count rule and the text length come
from its inputs (the features stage's declared rule, the text dbs as txtdb wrote them).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vlp.train.optim import OptimConfig
from vlp.train.pretrain_model import ModelConfig, ObjectivesConfig


class ValidationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    every: int = Field(250, ge=1)  # optimizer steps between validations (also run at step 0 and at the end)
    # Held-out text dbs (names in the txtdb output, without ".db").
    dbs: list[str] = ["cc_val"]
    # Images (with all their captions) moved from the training dbs into validation; 0 keeps all for training.
    holdout_images: int = Field(100, ge=0)
    batch_units: int | None = Field(None, ge=1)  # None: training's batch_units
    # Zero-shot image/text retrieval with the ITM head over every image x text pair of this db (needs the
    # itm task); None skips it.
    retrieval_db: str | None = "flickr30k_test"
    retrieval_every: int = Field(750, ge=0)  # steps between retrieval runs; 0: only at step 0 and at the end
    retrieval_max_images: int | None = Field(None, ge=1)  # the first N images (and their texts) only
    retrieval_chunk: tuple[int, int] = (4, 32)  # images x texts scored per forward pass
    # Zero-shot retrieval's scoring: full = the ITM head on every pair (val/zs_*); itc_rerank (ALBEF's
    # retrieval; needs the itc task) = the itc task's contrastive similarity shortlists each text's top-k
    # images and each image's top-k texts and the ITM head reranks them (val/zs_itc_rerank_*), the
    # similarity alone ranking everything too (val/zs_itc_*).
    retrieval_modes: tuple[Literal["full", "itc_rerank"], ...] = ("full",)
    retrieval_shortlist_k: int = Field(16, ge=1)


class DatasetMix(BaseModel):
    """One pretraining dataset of ``train_dbs``' named form: its text dbs and its weight in the mix."""

    model_config = ConfigDict(extra="forbid")

    dbs: list[str] = Field(min_length=1)
    weight: float = Field(1.0, gt=0)


class PretrainConfig(ObjectivesConfig):
    """The objectives (``tasks``, ``masking``, ``mask_prob``, ``itm_*``, ``wra*``, ...) plus the run."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    # Text dbs to pretrain on (names in the txtdb output, without ".db"). A list is one corpus whose captions
    # are sampled by size (the paper: "each pair (w, v) is sampled from the whole training set D"); a mapping
    # {dataset: {dbs, weight}} gives one batch stream per (task, dataset), drawn with ratio tasks[task] x
    # weight (the official code's per-dataset mix_ratio: UNITER's in-domain config is coco and vg with
    # weight 1 each and tasks itm 2, mlm 2, mrfr 1, mrc_kl 1; its all-data config coco 2, vg 3, cc 3, sbu 2
    # with itm 3, mlm 4, mrfr 2, mrc_kl 2).
    train_dbs: list[str] | dict[str, DatasetMix] = ["coco_train2014", "coco_val2014", "vg_train", "cc_train",
                                                    "sbu_train"]
    # Padded input units (batch size x (longest text + most regions)) per micro-batch and worker.
    batch_units: int = Field(1024, ge=1)
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step and worker
    steps: int = Field(1500, ge=1)  # optimizer steps
    optim: OptimConfig = Field(default_factory=OptimConfig)  # head_lr_mult applies to the objective heads
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    checkpoint_every: int = Field(250, ge=1)  # optimizer steps between checkpoints (and one at the end)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(25, ge=1)  # optimizer steps between training-metric logs
    # Ray Train: workers (one DDP process each, runtime.threads CPUs each), their devices, retries after a
    # worker failure.
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    loader_workers: int = Field(0, ge=0)  # DataLoader processes per worker (0: load in the training process)
    max_failures: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _some_train_db(self) -> PretrainConfig:
        if not self.train_dbs:
            raise ValueError("train_dbs is empty")
        names = self.db_names()
        if len(set(names)) != len(names):
            raise ValueError(f"train_dbs lists a text db twice: {names}")
        modes = self.validation.retrieval_modes
        if not modes or len(set(modes)) != len(modes):
            raise ValueError(f"validation.retrieval_modes must list full and/or itc_rerank once each, got "
                             f"{modes}")
        if "itc_rerank" in modes and "itc" not in self.tasks:
            raise ValueError("validation.retrieval_modes: itc_rerank shortlists by the itc task's "
                             "similarity: add itc to tasks")
        return self

    def db_names(self) -> list[str]:
        """Every training text db, in order (the datasets' dbs one after the other)."""
        if isinstance(self.train_dbs, list):
            return list(self.train_dbs)
        return [db for mix in self.train_dbs.values() for db in mix.dbs]
