"""One optimizer config for pretraining and every finetuning task: AdamW over BERT's parameter groups (no
weight decay on biases and LayerNorms; heads at ``head_lr_mult`` x lr), linear warmup then linear decay."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class OptimConfig(BaseModel):
    """Defaults are pretraining's; finetuning configs override lr and head_lr_mult."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(5e-4, gt=0)  # peak learning rate (UNITER-base, initialised from BERT, used 5e-5)
    # The heads learn at this multiple of lr: a finetuning task's new head, pretraining's objective heads.
    head_lr_mult: float = Field(1.0, gt=0)
    # Linear warmup over this fraction of the optimizer steps, then linear decay to 0 at the last step.
    warmup: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)  # not applied to biases and LayerNorm weights
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    grad_clip: float = Field(2.0, ge=0)  # max global gradient norm; 0 disables clipping

    def warmup_steps(self, total: int) -> int:
        return int(self.warmup * total)


def no_decay_parameter_names(model: nn.Module) -> set[str]:
    """Biases and LayerNorm parameters: BERT's optimizer leaves them out of weight decay."""
    names = set()
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            if isinstance(module, nn.LayerNorm) or name == "bias":
                names.add(f"{module_name}.{name}" if module_name else name)
    return names


def parameter_groups(parts: Sequence[tuple[nn.Module, float]], weight_decay: float,
                     exclude: Collection[nn.Parameter] = ()) -> list[dict[str, Any]]:
    """A decayed and a non-decayed group per ``(module, lr)`` part; a parameter shared between parts (a head
    tied to encoder weights) belongs to the first part that has it. Empty groups are left out, and so are the
    ``exclude`` parameters (an adversary's, which its own optimizer steps)."""
    seen: set[int] = {id(p) for p in exclude}
    groups = []
    for module, lr in parts:
        skip = no_decay_parameter_names(module)
        params = [(n, p) for n, p in module.named_parameters() if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for _, p in params)
        for decay in (True, False):
            chosen = [p for n, p in params if (n not in skip) == decay]
            if chosen:
                groups.append({"params": chosen, "lr": lr, "weight_decay": weight_decay if decay else 0.0})
    return groups


def lr_factor(step: int, warmup: int, total: int) -> float:
    """LR multiplier of optimizer step ``step`` (0-based): linear warmup over ``warmup`` steps, then linear
    decay that would reach 0 one step after the last."""
    decay = (total - step) / max(total - warmup, 1)
    if warmup and step < warmup:
        return min((step + 1) / warmup, decay)
    return max(decay, 0.0)


def build_optimizer(body: nn.Module, head: nn.Module, cfg: OptimConfig, total_steps: int,
                    exclude: Collection[nn.Parameter] = ()
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``body`` at lr and ``head`` at head_lr_mult x lr (less ``exclude``), with its warmup/decay
    schedule."""
    groups = parameter_groups([(body, cfg.lr), (head, cfg.lr * cfg.head_lr_mult)], cfg.weight_decay, exclude)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    warmup = cfg.warmup_steps(total_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total_steps))
    return optimizer, schedule


def clip_gradients(parameters: Any, max_norm: float) -> float:
    """The global gradient norm before clipping; gradients are clipped to ``max_norm`` unless it is 0."""
    return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else float("inf")))
