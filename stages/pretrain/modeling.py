"""The model pretraining optimizes: the UNITER encoder plus one objective module (heads) per task."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from stages.pretrain.config import PretrainConfig
from vlp.model import UniterConfig, UniterModel, init_from_bert
from vlp.objectives import REGISTRY
from vlp.objectives.itm import ITM
from vlp.objectives.mlm import MLM
from vlp.objectives.mrm import MaskedRegionObjective


class PretrainModel(nn.Module):
    """``forward(task, batch)`` runs one objective; a single module so that DDP sees every parameter."""

    def __init__(self, encoder: UniterModel, objectives: Mapping[str, nn.Module]):
        super().__init__()
        self.encoder = encoder
        self.objectives = nn.ModuleDict(dict(objectives))

    def forward(self, task: str, batch: dict) -> dict[str, Tensor]:
        return self.objectives[task](self.encoder, batch)


def encoder_config(cfg: PretrainConfig, vocab_size: int, img_dim: int) -> UniterConfig:
    over: dict[str, Any] = {"vocab_size": vocab_size, "img_dim": img_dim}
    if cfg.model.dropout is not None:
        over |= {"hidden_dropout_prob": cfg.model.dropout, "attention_probs_dropout_prob": cfg.model.dropout}
    return UniterConfig.preset(cfg.model.size, **over)


def objective_options(cfg: PretrainConfig, meta: Mapping[str, Any], label_dim: int) -> dict[str, dict]:
    """Constructor options of each configured task's objective (JSON-able, saved with the heads)."""
    tokens = {
        "mask_id": int(meta["MASK"]),
        "special_ids": sorted({int(meta[k]) for k in ("CLS", "SEP", "MASK", "UNK", "PAD") if k in meta}),
        "vocab_range": [int(v) for v in meta["v_range"]],
    }
    masked = {"mask_prob": cfg.mask_prob, "masking": cfg.masking, **tokens}
    by_task = {
        "mlm": masked,
        "mrfr": masked,
        "mrc": {**masked, "label_dim": label_dim},
        "mrc_kl": {**masked, "label_dim": label_dim},
        "itm": {"neg_prob": cfg.itm_neg_prob, "wra": cfg.wra, "wra_beta": cfg.wra_beta,
                "wra_iters": cfg.wra_iters},
    }
    return {task: by_task[task] for task in sorted(cfg.tasks)}


def build_model(
    ucfg: UniterConfig, options: Mapping[str, dict], init_bert: str | None = None
) -> PretrainModel:
    encoder = UniterModel(ucfg)
    if init_bert is not None:
        init_from_bert(encoder, init_bert)
    objectives = {}
    for task, opts in options.items():
        kwargs = dict(opts)
        if "vocab_range" in kwargs:
            kwargs["vocab_range"] = tuple(kwargs["vocab_range"])
        objectives[task] = REGISTRY[task](encoder, **kwargs)
    return PretrainModel(encoder, objectives)


def loss_weights(cfg: PretrainConfig) -> dict[str, float]:
    """Weight of each ``*_loss`` an objective returns (1 unless listed)."""
    return {"wra_loss": cfg.wra_weight}


def target_count(objective: nn.Module, batch: dict) -> int:
    """How many targets the objective's losses are averaged over in this (prepared) batch.

    The loop rescales each micro-batch's mean loss by its share of the step's targets over all micro-batches
    and workers, so the gradient is that of the mean over the whole global batch, however it is split.
    """
    if isinstance(objective, MLM):
        return int((batch["txt_labels"] != -100).sum())
    if isinstance(objective, MaskedRegionObjective):
        return int(batch["img_masked"].sum())
    if isinstance(objective, ITM):
        return len(batch["img_keys"])
    raise TypeError(f"no target count for objective {type(objective).__name__}")


def no_decay_parameter_names(model: nn.Module) -> set[str]:
    """Biases and LayerNorm parameters: BERT's optimizer leaves them out of weight decay."""
    names = set()
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            if isinstance(module, nn.LayerNorm) or name == "bias":
                names.add(f"{module_name}.{name}" if module_name else name)
    return names


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    skip = no_decay_parameter_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # shared parameters are listed once
        if param.requires_grad:
            (no_decay if name in skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """LR multiplier of optimizer step ``step`` (0-based): linear warmup over ``warmup`` steps, then linear
    decay that would reach 0 one step after the last."""
    decay = (total - step) / max(total - warmup, 1)
    if warmup and step < warmup:
        return min((step + 1) / warmup, decay)
    return max(decay, 0.0)


def build_optimizer(model: nn.Module, cfg: PretrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    opt = cfg.optim
    optimizer = torch.optim.AdamW(
        parameter_groups(model, opt.weight_decay), lr=opt.lr, betas=opt.betas, eps=opt.eps
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, opt.warmup_steps, cfg.steps)
    )
    return optimizer, schedule
