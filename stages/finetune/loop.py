"""The single-process finetuning loop every task shares.

A task head's ``forward(model, batch)`` runs the encoder it is given and returns named losses (``*_loss``,
summed, weighted by ``head.loss_weights(step, total)`` when the head has it), count sums and per-example
``predictions`` (``vlp.train.evaluate``). Finetuning sets are small (thousands of examples), so one process
with dynamic batches by input units, autocast where supported, AdamW and linear warmup / decay is all a
task needs; Ray only schedules the stage.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from stages.base import StageError
from stages.finetune.config import TrainConfig
from vlp.model import UniterModel
from vlp.train.device import to_device
from vlp.train.evaluate import batch_sampler, examples_in, split_loader
from vlp.train.metrics import MetricSums
from vlp.train.optim import build_optimizer, clip_gradients
from vlp.train.precision import Autocast
from vlp.train.seeds import seed_of


def plan_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    steps = max(1, math.ceil(cfg.epochs * batches_per_epoch))
    return min(steps, cfg.max_steps) if cfg.max_steps is not None else steps


@dataclass
class FitResult:
    steps: int
    seconds: float
    final_val: dict[str, float]
    curves: list[dict[str, Any]] = field(default_factory=list)  # {"step", "split": train|val, metrics...}


def fit(model: UniterModel, head: nn.Module, data: Dataset, cfg: TrainConfig, *, seed: int, log_every: int,
        device: torch.device, autocast: Autocast, validate: Callable[[], dict[str, float]],
        log: Callable[[dict[str, float], int], None], setting: str) -> FitResult:
    """Finetune ``model`` and ``head`` on ``data``; ``validate()`` runs at step 0, every ``cfg.val_every``
    steps (or epoch) and at the end, ``log(metrics, step)`` receives ``train/...`` and ``val/...`` curves.
    ``seed`` (derived from the root seed) seeds the batch order and, per step, dropout."""
    sampler = batch_sampler(data, cfg.batch_units, seed=seed_of(seed, "batches"), train=True,
                            setting=f"{setting}.batch_units", examples=cfg.examples_per_batch)
    per_epoch = len(sampler.epoch_batches(0))
    steps = plan_steps(cfg, per_epoch)
    val_every = cfg.val_every or per_epoch
    optimizer, schedule = build_optimizer(model, head, cfg, steps)
    batches: Iterator[dict[str, Any]] = iter(split_loader(data, sampler))
    weights_of = getattr(head, "loss_weights", None)
    curves: list[dict[str, Any]] = []

    def run_validation(step: int) -> dict[str, float]:
        metrics = validate()
        curves.append({"step": step, "split": "val", **metrics})
        log({f"val/{k}": v for k, v in metrics.items()}, step)
        return metrics

    final_val = run_validation(0)
    model.train()
    head.train()
    window, start, window_start = MetricSums(), time.perf_counter(), time.perf_counter()
    for step in range(steps):
        batch = to_device(next(batches), device)
        torch.manual_seed(seed_of(seed, "dropout", step))  # the same run gives the same model
        with autocast():
            out = head(model, batch)
        weights = weights_of(step, steps) if weights_of is not None else {}
        loss = sum(weights.get(k, 1.0) * v for k, v in out.items() if k.endswith("_loss"))
        if not torch.isfinite(loss):
            parts = ", ".join(f"{k}={float(v):.4g}" for k, v in out.items() if k.endswith("_loss"))
            raise StageError(f"{setting}: non-finite loss {float(loss)} at step {step + 1} ({parts})")
        loss.backward()
        clip_gradients([*model.parameters(), *head.parameters()], cfg.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        examples = examples_in(batch, out)
        window.add(out, examples)
        window.count(examples=examples)
        done = step + 1
        if done % log_every == 0 or done == steps:
            window.count(seconds=time.perf_counter() - window_start)
            metrics = window.metrics() | {"lr": schedule.get_last_lr()[0]}
            metrics |= {f"weight/{k}": v for k, v in weights.items()}
            curves.append({"step": done, "split": "train", **metrics})
            log({f"train/{k}": v for k, v in metrics.items()}, done)
            window, window_start = MetricSums(), time.perf_counter()
        if done % val_every == 0 or done == steps:
            final_val = run_validation(done)
            model.train()
            head.train()
    return FitResult(steps, time.perf_counter() - start, final_val, curves)
