"""The separate step of objectives that train an adversary (LAViTeR's discriminator,
``vlp.objectives.laviter``).

An objective with an ``adversary`` module (not None) returns its generator-side losses from ``forward``, with
the adversary seen frozen (no gradient reaches its parameters), and the adversary's own loss from
``discriminator_step``. Pretraining keeps the adversary's parameters out of the main optimizer and, after
every main step of such a task, takes one step of the adversary's optimizer (Adam at a constant lr, as
AttnGAN's discriminators) on the same batches (``PretrainModel.forward(task, batch, adversary=True)``). Tasks
without an adversary never reach this module: their steps are the same as before it existed.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def adversaries(objectives: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """The adversary of every objective that has one, by task."""
    return {task: objective.adversary for task, objective in objectives.items()
            if getattr(objective, "adversary", None) is not None}


def adversary_parameters(modules: Mapping[str, nn.Module]) -> list[nn.Parameter]:
    seen: set[int] = set()
    params = []
    for module in modules.values():
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def build_adversary_optimizer(modules: Mapping[str, nn.Module], lr: float,
                              betas: tuple[float, float]) -> torch.optim.Optimizer | None:
    """Adam over every adversary's parameters (None without adversaries)."""
    params = adversary_parameters(modules)
    return torch.optim.Adam(params, lr=lr, betas=betas) if params else None
