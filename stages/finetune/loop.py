"""The single-process finetuning loop every task shares, and the evaluation pass over a task split.

A task head is an ``nn.Module`` whose ``forward(model, batch)`` runs the encoder it is given and returns
named losses (``*_loss``, summed, weighted by ``head.loss_weights(step, total)`` when the head has it),
count-based metric sums (``*_correct`` / ``*_count`` / ``*_score_sum``) and per-example ``predictions``.
Finetuning sets are small (thousands of examples), so one process with dynamic batches by input units,
bf16 autocast where supported, AdamW and linear warmup / decay is all a task needs; Ray only schedules the
stage.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from stages.base import StageError
from stages.finetune.config import TrainConfig
from stages.pretrain.loop import autocast_dtype
from stages.pretrain.modeling import lr_factor, no_decay_parameter_names
from stages.pretrain.validate import to_device
from vlp.data.batching import UnitBatchSampler
from vlp.model import UniterModel
from vlp.tasks.common import metrics_from_sums

Autocast = Callable[[], AbstractContextManager]
COUNT_SUFFIXES = ("_correct", "_count", "_score_sum")


def make_autocast(precision: str, device: torch.device) -> Autocast:
    dtype = autocast_dtype(precision, device)
    if dtype == torch.float16:  # fp16 needs loss scaling, which finetuning this small does not warrant
        dtype = None

    def autocast() -> AbstractContextManager:
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()

    return autocast


def batch_sampler(data: Any, max_units: int, *, seed: int = 0, train: bool, setting: str) -> UnitBatchSampler:
    """Dynamic batches of at most ``max_units`` padded input units; a one-line StageError naming the setting
    when an example alone is over the budget."""
    try:
        return UnitBatchSampler(data.txt_lens, data.img_lens, max_units, seed=seed, shuffle=train,
                                even_shards=train, infinite=train)
    except ValueError as err:
        raise StageError(f"{setting}: {err}") from None


def loader(data: Any, sampler: UnitBatchSampler) -> DataLoader:
    return DataLoader(data, batch_sampler=sampler, collate_fn=data.collate, num_workers=0)


def optimizer_for(model: nn.Module, head: nn.Module, cfg: TrainConfig, steps: int) -> tuple[Any, Any]:
    """AdamW (BERT's: no decay on biases and LayerNorms; the head at ``head_lr_mult`` x lr) with linear
    warmup over ``warmup`` of the steps, then linear decay to 0."""
    groups = []
    for module, lr in ((model, cfg.lr), (head, cfg.lr * cfg.head_lr_mult)):
        skip = no_decay_parameter_names(module)
        params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        for decay in (True, False):
            chosen = [p for n, p in params if (n not in skip) == decay]
            if chosen:
                decay_rate = cfg.weight_decay if decay else 0.0
                groups.append({"params": chosen, "lr": lr, "weight_decay": decay_rate})
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-6)
    warmup = int(cfg.warmup * steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, steps))
    return optimizer, schedule


def plan_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    steps = max(1, math.ceil(cfg.epochs * batches_per_epoch))
    return min(steps, cfg.max_steps) if cfg.max_steps is not None else steps


class Sums:
    """Losses (weighted by examples) and metric counts summed over batches, turned into metrics."""

    def __init__(self) -> None:
        self.values: dict[str, float] = defaultdict(float)
        self.examples = 0

    def add(self, out: dict[str, Any], examples: int) -> None:
        self.examples += examples
        for key, value in out.items():
            if key.endswith("_loss"):
                self.values[key] += float(value.detach()) * examples
            elif key.endswith(COUNT_SUFFIXES):
                self.values[key] += float(value)

    def metrics(self) -> dict[str, float]:
        out = {k: v / max(self.examples, 1) for k, v in self.values.items() if k.endswith("_loss")}
        return out | metrics_from_sums(dict(self.values))


def examples_in(batch: dict[str, Any], out: dict[str, Any]) -> int:
    predictions = out.get("predictions")
    return len(predictions) if predictions is not None else batch["input_ids"].shape[0]


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
    steps (or epoch) and at the end, ``log(metrics, step)`` receives ``train/...`` and ``val/...`` curves."""
    sampler = batch_sampler(data, cfg.batch_units, seed=seed, train=True, setting=f"{setting}.batch_units")
    per_epoch = len(sampler.epoch_batches(0))
    steps = plan_steps(cfg, per_epoch)
    val_every = cfg.val_every or per_epoch
    optimizer, schedule = optimizer_for(model, head, cfg, steps)
    batches: Iterator[dict[str, Any]] = iter(loader(data, sampler))
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
    window, start, window_start = Sums(), time.perf_counter(), time.perf_counter()
    for step in range(steps):
        batch = to_device(next(batches), device)
        torch.manual_seed(seed * 1_000_003 + step)  # dropout: the same run gives the same model
        with autocast():
            out = head(model, batch)
        weights = weights_of(step, steps) if weights_of is not None else {}
        loss = sum(weights.get(k, 1.0) * v for k, v in out.items() if k.endswith("_loss"))
        if not torch.isfinite(loss):
            parts = ", ".join(f"{k}={float(v):.4g}" for k, v in out.items() if k.endswith("_loss"))
            raise StageError(f"{setting}: non-finite loss {float(loss)} at step {step + 1} ({parts})")
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([*model.parameters(), *head.parameters()], cfg.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        window.add(out, examples_in(batch, out))
        done = step + 1
        if done % log_every == 0 or done == steps:
            seconds = time.perf_counter() - window_start
            metrics = window.metrics() | {"lr": schedule.get_last_lr()[0],
                                          "examples_per_s": window.examples / max(seconds, 1e-9)}
            metrics |= {f"weight/{k}": v for k, v in weights.items()}
            curves.append({"step": done, "split": "train", **metrics})
            log({f"train/{k}": v for k, v in metrics.items()}, done)
            window, window_start = Sums(), time.perf_counter()
        if done % val_every == 0 or done == steps:
            final_val = run_validation(done)
            model.train()
            head.train()
    return FitResult(steps, time.perf_counter() - start, final_val, curves)


@torch.no_grad()
def evaluate_dataset(model: UniterModel, head: nn.Module, data: Any, max_units: int, *, device: torch.device,
                     autocast: Autocast, setting: str) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(metrics, predictions) of ``head`` over every example of ``data``, in eval mode."""
    was = model.training, head.training
    model.eval()
    head.eval()
    sums, predictions = Sums(), []
    sampler = batch_sampler(data, max_units, train=False, setting=setting)
    for batch in loader(data, sampler):
        batch = to_device(batch, device)
        with autocast():
            out = head(model, batch)
        sums.add(out, examples_in(batch, out))
        predictions += out.get("predictions", [])
    model.train(was[0])
    head.train(was[1])
    return sums.metrics(), predictions
