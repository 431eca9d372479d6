"""Which pretrained model the finetune and eval stages start from (``finetune.encoder``), and reading it.

``pretrain``: the pretrain stage's output. ``sweep``: the loss study's best trial (``best.json`` of the sweep
stage), the encoder the sweep registers in the MLflow model registry as ``@champion``; ``sweep:<row>``: that
row's best completed seed; ``sweep:<row>-s<seed>``: that trial. Read from the sweep's own output rather than
the registry, so that it is cached like any other input.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from stages.outputs.pretrain import PretrainOutput
from stages.outputs.sweep import SweepOutput

ENCODER = re.compile(r"^(pretrain|sweep(:[A-Za-z0-9_+][A-Za-z0-9_.+-]*)?)$")


def encoder_stage(encoder: str) -> str:
    """The stage an encoder setting reads: ``pretrain`` or ``sweep``."""
    return encoder.partition(":")[0]


def encoder_trial(encoder: str) -> str | None:
    """The trial or row a ``sweep:<...>`` setting names; None for the study's best (or ``pretrain``)."""
    return encoder.partition(":")[2] or None


def pretrained_input(inputs: Mapping[str, Path], encoder: str) -> PretrainOutput:
    """The pretrained model ``encoder`` names among a stage's ``inputs``."""
    if encoder_stage(encoder) == "sweep":
        sweep = SweepOutput(inputs["sweep"])
        return sweep.trial(sweep.trial_of(encoder_trial(encoder)))
    return PretrainOutput(inputs["pretrain"])


def encoder_name(pretrained: PretrainOutput, encoder: str) -> str:
    """``pretrain``, or ``sweep:<row>-s<seed>`` naming the trial ``pretrained`` is (its dir,
    trials/<row>-s<seed>/): the stage's record of where it started."""
    return f"sweep:{pretrained.root.name}" if encoder_stage(encoder) == "sweep" else "pretrain"
