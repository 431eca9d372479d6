"""Config of the ``pretrain`` stage: UNITER pretraining on Ray Train (section ``pretrain``).

Defaults are sized for the demo world on two 1-CPU workers (tiny model, ~3k captions, 10 regions per image):
there, 1,500 steps take MLM accuracy from 0 to ~0.6, ITM from chance to ~0.77 and zero-shot R@1 from chance
to ~0.3. Real corpora want base/large, a larger batch budget and many more steps. The stage also reads the
root ``seed`` and ``runtime.precision`` / ``runtime.threads``; the box-count rule and the text length come
from its inputs (the features stage's declared rule, the text dbs as txtdb wrote them).
"""

from __future__ import annotations

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


class PretrainConfig(ObjectivesConfig):
    """The objectives (``tasks``, ``masking``, ``mask_prob``, ``itm_neg_prob``, ``wra*``) plus the run."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    # Text dbs to pretrain on (names in the txtdb output, without ".db").
    train_dbs: list[str] = ["coco_train2014", "coco_val2014", "vg_train", "cc_train", "sbu_train"]
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
        return self
