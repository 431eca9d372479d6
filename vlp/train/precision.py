"""Mixed precision: which autocast dtype a precision setting means on a device, and whether the loss needs
scaling (fp16 does, bf16 does not)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16", "fp16"]


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None (fp32) or the autocast dtype; ``auto`` is bf16 where the device supports it, else fp16 on CUDA,
    else fp32."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    except (AttributeError, RuntimeError):
        return None


@dataclass(frozen=True)
class Autocast:
    """``autocast()`` opens the autocast context of one device and dtype (none for fp32)."""

    device_type: str
    dtype: torch.dtype | None

    def __call__(self) -> AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype) if self.dtype is not None else nullcontext()

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A loss scaler when the dtype is fp16 (its small range underflows gradients), else None."""
        return torch.amp.GradScaler(self.device_type) if self.dtype == torch.float16 else None


def mixed_precision(precision: str, device: torch.device, *, loss_scaling: bool = True) -> Autocast:
    """The autocast of ``precision`` on ``device``; without ``loss_scaling`` fp16 falls back to fp32 (a loop
    that does not scale its loss must not train in fp16)."""
    dtype = autocast_dtype(precision, device)
    if dtype == torch.float16 and not loss_scaling:
        dtype = None
    return Autocast(device.type, dtype)
