"""Batched IPOT (inexact proximal point optimal transport, Xie et al. 2018) for word-region alignment.

Each example transports a uniform distribution over its real rows (words) onto a uniform distribution over
its real columns (regions); padded rows and columns carry no mass. The plan is computed without gradient,
so the OT distance <plan, cost> is differentiable only through the cost, as in UNITER's WRA.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def cosine_cost(x: Tensor, y: Tensor, eps: float = 1e-5) -> Tensor:
    """Cosine distance 1 - cos(x_i, y_j) for every pair: [B, n, D] x [B, m, D] -> [B, n, m]."""
    x_unit = F.normalize(x, p=2, dim=-1, eps=eps)
    y_unit = F.normalize(y, p=2, dim=-1, eps=eps)
    return 1.0 - x_unit @ y_unit.transpose(1, 2)


def _uniform_marginal(mask: Tensor, dtype: torch.dtype) -> Tensor:
    weights = mask.to(dtype)
    # An example with no real positions gets an all-zero marginal (and so a zero plan), not a division by 0.
    return weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)


@torch.no_grad()
def ipot(
    cost: Tensor,
    x_mask: Tensor,
    y_mask: Tensor,
    beta: float = 0.5,
    iterations: int = 50,
    inner_iterations: int = 1,
) -> Tensor:
    """Transport plan [B, n, m] for cost [B, n, m]; x_mask [B, n] / y_mask [B, m] are True at real positions.

    Computed in at least fp32 and returned in that precision; zero wherever a row or column is padding.
    """
    if beta <= 0 or iterations < 1 or inner_iterations < 1:
        raise ValueError(
            f"ipot needs beta > 0 and at least one iteration, got {beta=}, {iterations=}, {inner_iterations=}"
        )
    if cost.dim() != 3 or x_mask.shape != cost.shape[:2] or y_mask.shape != (cost.shape[0], cost.shape[2]):
        raise ValueError(
            f"ipot expects cost [B, n, m] with masks [B, n] and [B, m], got {tuple(cost.shape)}, "
            f"{tuple(x_mask.shape)}, {tuple(y_mask.shape)}"
        )
    work = cost.float() if cost.dtype in (torch.float16, torch.bfloat16) else cost
    joint = x_mask.unsqueeze(2) & y_mask.unsqueeze(1)
    # The plan is invariant to rescaling the kernel by a per-example constant; shifting by the smallest real
    # cost keeps exp() from underflowing on costs much larger than beta.
    shift = work.masked_fill(~joint, float("inf")).amin(dim=(1, 2), keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    kernel = torch.exp((-(work - shift) / beta).masked_fill(~joint, float("-inf")))
    mu = _uniform_marginal(x_mask, work.dtype)
    nu = _uniform_marginal(y_mask, work.dtype)
    tiny = torch.finfo(work.dtype).tiny
    plan = joint.to(work.dtype)
    col_scale = nu
    for _ in range(iterations):
        # Proximal step: the previous plan is the prior of an entropic OT problem solved by Sinkhorn scaling.
        q = kernel * plan
        for _ in range(inner_iterations):
            row_scale = mu / (q @ col_scale.unsqueeze(2)).squeeze(2).clamp_min(tiny)
            col_scale = nu / (q.transpose(1, 2) @ row_scale.unsqueeze(2)).squeeze(2).clamp_min(tiny)
        plan = row_scale.unsqueeze(2) * q * col_scale.unsqueeze(1)
    return plan


def ot_distance(
    cost: Tensor,
    x_mask: Tensor,
    y_mask: Tensor,
    beta: float = 0.5,
    iterations: int = 50,
    inner_iterations: int = 1,
) -> Tensor:
    """<plan, cost> per example [B]; differentiable through `cost` only (the IPOT plan is detached)."""
    joint = x_mask.unsqueeze(2) & y_mask.unsqueeze(1)
    cost = cost.masked_fill(~joint, 0.0)
    plan = ipot(cost.detach(), x_mask, y_mask, beta, iterations, inner_iterations)
    return (cost * plan.to(cost.dtype)).sum(dim=(1, 2))
