"""The ``runtime`` config section: how training and evaluation stages use the machine and treat missing
images, one setting each for pretraining, every finetune_<task> and every eval_<task> stage."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from vlp.train.precision import Precision


class RuntimeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Training autocast (pretraining, finetuning). auto: bf16 where the CPU / GPU supports it (2x faster on
    # the demo machine), else fp16 on CUDA: with loss scaling in pretraining; finetuning, which does not
    # scale its loss, runs fp32 instead of fp16.
    precision: Precision = "auto"
    # Evaluation autocast (the eval_<task> stages). fp32: bf16 scores of close pairs tie (a tie never
    # counts as a hit), and on CPU oneDNN caches one bf16 primitive per new block shape, so memory climbs
    # with the number of scored blocks.
    eval_precision: Literal["auto", "fp32", "bf16"] = "fp32"
    # CPUs (torch intra-op threads) of each pretraining worker and of each finetune_<task> / eval_<task>
    # stage, which Ray runs side by side: one thread each keeps small-matrix OpenMP from thrashing (5x
    # slower when oversubscribed).
    threads: int = Field(1, ge=1)
    # Finetuning and evaluation drop the examples whose images the feature store lacks (listed in the
    # log) instead of stopping.
    skip_missing_images: bool = False
