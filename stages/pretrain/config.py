"""Config of the ``pretrain`` stage: UNITER pretraining on Ray Train (section ``pretrain``).

Defaults are sized for the demo world on two 1-CPU workers (tiny model, ~3k captions, 10 regions per image):
there, 1,500 steps take MLM accuracy from 0 to ~0.6, ITM from chance to ~0.77 and zero-shot R@1 from chance
to ~0.3. Real corpora want base/large, a larger batch budget and many more steps.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vlp.objectives import REGISTRY


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    size: Literal["tiny", "base", "large"] = "tiny"
    # Local Hugging Face BERT dir whose text embeddings, layers and pooler initialise the encoder (its
    # vocab must be the txt_db tokenizer's). None: random initialisation.
    init_from_bert: str | None = None
    # Hidden and attention dropout; None keeps the preset's (0.1).
    dropout: float | None = Field(None, ge=0.0, lt=1.0)


class OptimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr: float = Field(5e-4, gt=0)  # peak (UNITER-base, initialised from BERT, used 5e-5)
    # Linear warmup over this many optimizer steps, then linear decay to 0 at the last step.
    warmup_steps: int = Field(150, ge=0)
    weight_decay: float = Field(0.01, ge=0)  # not applied to biases and LayerNorm weights
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    grad_clip: float = Field(2.0, ge=0)  # max global gradient norm; 0 disables clipping


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


class PretrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = Field(default_factory=ModelConfig)
    # Task -> mix ratio; one task per optimizer step, drawn by these ratios (UNITER's best mix).
    tasks: dict[str, float] = {"mlm": 2.0, "mrfr": 1.0, "mrc_kl": 1.0, "itm": 2.0}
    masking: Literal["conditional", "joint"] = "conditional"
    mask_prob: float = Field(0.15, gt=0, le=1)
    itm_neg_prob: float = Field(0.5, ge=0, le=1)
    wra: bool = True  # word-region alignment (optimal transport) alongside ITM
    wra_weight: float = Field(0.1, ge=0)
    wra_beta: float = Field(0.5, gt=0)
    wra_iters: int = Field(50, ge=1)
    # Text dbs to pretrain on (names in the txtdb output, without ".db").
    train_dbs: list[str] = ["coco_train2014", "coco_val2014", "vg_train", "cc_train", "sbu_train"]
    # Which box-count sidecar of the feature store to read (conf_th, max_bb, min_bb): one of features.nbb.
    nbb: tuple[float, int, int] = (0.2, 100, 10)
    max_txt_len: int = Field(60, ge=1)  # word pieces per caption (without [CLS]/[SEP]); longer are truncated
    # Padded input units (batch size x (longest text + most regions)) per micro-batch and worker.
    batch_units: int = Field(1024, ge=1)
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step and worker
    steps: int = Field(1500, ge=1)  # optimizer steps
    optim: OptimConfig = Field(default_factory=OptimConfig)
    # auto: bf16 autocast where the device supports it, else fp16 (CUDA, with loss scaling), else fp32.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    checkpoint_every: int = Field(250, ge=1)  # optimizer steps between checkpoints (and one at the end)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(25, ge=1)  # optimizer steps between training-metric logs
    # Ray Train: workers (one DDP process each), their devices and CPUs, retries after a worker failure.
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, ge=1)
    loader_workers: int = Field(0, ge=0)  # DataLoader processes per worker (0: load in the training process)
    max_failures: int = Field(2, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _known_tasks(self) -> PretrainConfig:
        unknown = sorted(set(self.tasks) - set(REGISTRY))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; choose from {sorted(REGISTRY)}")
        if not self.tasks or any(r <= 0 for r in self.tasks.values()):
            raise ValueError(f"tasks must map at least one task to a ratio > 0, got {self.tasks}")
        if not self.train_dbs:
            raise ValueError("train_dbs is empty")
        if self.optim.warmup_steps >= self.steps:
            raise ValueError(f"optim.warmup_steps ({self.optim.warmup_steps}) must be below steps "
                             f"({self.steps})")
        return self
