"""CODIS's representation codebook (Duan et al. 2022, §3.1): K learnable prototypes that image and text
features are both transported onto, so that the two modalities are contrasted at the level of clusters.

For each modality X ∈ {text, image} of a batch of N pairs (features from ``ITC.embed``, L2-normalised, the
``itc`` task's projections and temperature γ; prototypes C L2-normalised):

* transport plan T_X = IPOT(D_X) of the cost D_X = 1 − Z_X·Cᵀ [N, K] with uniform marginals (rows 1/N,
  columns 1/K; ``vlp.objectives.ipot``, plan without gradient), Z_X the momentum teacher's features
  (``plans="teacher"``, CODIS) or the student's (``"student"``, the paper's ablation);
* OT loss ⟨T_X, 1 − Z_X·Cᵀ⟩ (Eq. 1), with the features detached: its gradient moves the prototypes
  toward the features they are transported from. Algorithm 1 of the paper writes ⟨T, Z·Cᵀ⟩, whose
  minimisation would push the codebook away from the features;
* prototype prediction P_X = softmax(Z_X·Cᵀ / γ) of the student, trained by cross-entropy to the plan
  rows rescaled to sum to 1 (they sum to 1/N): of the **other** modality's plan by default (Eq. 2, "Text to
  Prototype loss chains the Image-Prototype Transport Plan"), of its own with ``targets="same"``
  (Algorithm 1's reading).

``codebook_ot_loss`` = OT(text) + OT(image), ``codebook_pred_loss`` = t2p + i2p; their sum is L_code (Eq. 3).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.model.uniter import UniterModel
from vlp.objectives.ipot import ipot
from vlp.objectives.itc import core


def transport_plan(features: Tensor, prototypes: Tensor, beta: float = 0.5, iterations: int = 50) -> Tensor:
    """IPOT plan [N, K] from N unit features to K unit prototypes, cost 1 − cosine, uniform marginals; fp32,
    no gradient."""
    with torch.no_grad():
        cost = 1.0 - features.detach().float() @ prototypes.detach().float().T
        n, k = cost.shape
        ones_n = torch.ones(1, n, dtype=torch.bool, device=cost.device)
        ones_k = torch.ones(1, k, dtype=torch.bool, device=cost.device)
        return ipot(cost[None], ones_n, ones_k, beta, iterations)[0]


def ot_loss(features: Tensor, prototypes: Tensor, plan: Tensor) -> Tensor:
    """⟨T, 1 − Z·Cᵀ⟩ with Z detached (the codebook moves toward the features, not the reverse)."""
    return (plan * (1.0 - features.detach().float() @ prototypes.float().T)).sum()


def prototype_loss(features: Tensor, prototypes: Tensor, plan: Tensor, temperature: Tensor) -> Tensor:
    """H(plan rows rescaled to 1, softmax(Z·Cᵀ / γ)), mean over the rows."""
    logp = F.log_softmax(features.float() @ prototypes.float().T / temperature, dim=1)
    targets = plan / plan.sum(1, keepdim=True).clamp_min(torch.finfo(plan.dtype).tiny)
    return -(targets * logp).sum(1).mean()


def codebook_losses(text: Tensor, image: Tensor, plan_text: Tensor, plan_image: Tensor, prototypes: Tensor,
                    temperature: Tensor, *, targets: str = "cross", beta: float = 0.5,
                    iterations: int = 50) -> dict[str, Tensor]:
    """The two codebook losses for student features ``text``/``image`` [N, d] and the features the plans
    come from (``plan_text``/``plan_image``: teacher or student), prototypes [K, d] (all L2-normalised)."""
    t_plan = transport_plan(plan_text, prototypes, beta, iterations)
    i_plan = transport_plan(plan_image, prototypes, beta, iterations)
    ot = ot_loss(plan_text, prototypes, t_plan) + ot_loss(plan_image, prototypes, i_plan)
    text_target, image_target = (i_plan, t_plan) if targets == "cross" else (t_plan, i_plan)
    pred = (prototype_loss(text, prototypes, text_target, temperature)
            + prototype_loss(image, prototypes, image_target, temperature))
    return {"codebook_ot_loss": ot, "codebook_pred_loss": pred}


class Codebook(nn.Module):
    requires: tuple[str, ...] = ()
    uses_context = True

    def __init__(self, model: UniterModel, *, size: int = 64, embed_dim: int = 256, plans: str = "teacher",
                 targets: str = "cross", beta: float = 0.5, iterations: int = 50) -> None:
        super().__init__()
        if size < 1 or embed_dim < 1:
            raise ValueError(f"codebook needs size >= 1 and embed_dim >= 1, got {size}, {embed_dim}")
        if plans not in ("teacher", "student") or targets not in ("cross", "same"):
            raise ValueError(f"codebook plans must be teacher or student and targets cross or same, got "
                             f"{plans!r}, {targets!r}")
        if beta <= 0 or iterations < 1:
            raise ValueError(f"codebook needs beta > 0 and iterations >= 1, got {beta}, {iterations}")
        self.plans, self.targets, self.beta, self.iterations = plans, targets, beta, iterations
        # Unit-norm in expectation; only their directions matter (normalised before use).
        self.prototypes = nn.Parameter(torch.randn(size, embed_dim) / embed_dim**0.5)

    @property
    def wants_teacher(self) -> bool:
        return self.plans == "teacher"

    def prepare(self, batch: dict, generator: torch.Generator) -> dict:
        return batch

    def forward(self, model: UniterModel, batch: dict, context: Any = None) -> dict[str, Tensor]:
        itc = core(context, "codebook")
        text, image = itc.embed(model, batch)
        source = itc.teacher_embed(model, batch, context) if self.plans == "teacher" else None
        plan_text, plan_image = source if source is not None else (text.detach(), image.detach())
        prototypes = F.normalize(self.prototypes.float(), dim=-1)
        return codebook_losses(text, image, plan_text, plan_image, prototypes, itc.temperature(),
                               targets=self.targets, beta=self.beta, iterations=self.iterations)
