"""Which pretrained model the finetune and eval stages start from (``finetune.encoder``), and reading it.

``pretrain``: the pretrain stage's output. ``sweep``: the loss study's best trial (``best.json`` of the sweep
stage), the encoder the sweep registers in the MLflow model registry as ``@champion``; read from the sweep's
own output rather than the registry, so that it is cached like any other input.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from stages.outputs.pretrain import PretrainOutput
from stages.outputs.sweep import SweepOutput

Encoder = Literal["pretrain", "sweep"]


def pretrained_input(inputs: Mapping[str, Path]) -> PretrainOutput:
    """The pretrained model among a stage's ``inputs``: the sweep's best trial if the sweep is one, else
    the pretrain stage's output."""
    if "sweep" in inputs:
        return SweepOutput(inputs["sweep"]).best_trial()
    return PretrainOutput(inputs["pretrain"])


def encoder_name(inputs: Mapping[str, Path]) -> str:
    """``pretrain``, or ``sweep:<row>-s<seed>`` naming the study's best trial: the stage's record of it."""
    if "sweep" in inputs:
        return f"sweep:{SweepOutput(inputs['sweep']).best()['trial']}"
    return "pretrain"
