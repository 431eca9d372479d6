"""The per-worker training function Ray Train runs: UNITER pretraining, one task per optimizer step.

Every worker builds the same model and datasets, reads its own shard of each task's batches, and steps
in lockstep with the others (DDP). Rank 0 logs to the stage's MLflow run and writes the checkpoints.

Gradient normalisation: each objective returns losses averaged over its targets (masked tokens, masked
regions, pairs). A micro-batch's loss is rescaled by its share of all targets of the step, summed over the
micro-batches of every worker (one all-reduce of a count), so the step's gradient is that of the mean
over the global batch, however the batch is split into workers and accumulation steps.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from stages.pretrain import checkpointing
from stages.pretrain.config import PretrainConfig
from stages.pretrain.data import Corpus, build_corpus, loader, retrieval_index, seed_of
from stages.pretrain.modeling import (
    PretrainModel,
    build_model,
    build_optimizer,
    encoder_config,
    loss_weights,
    objective_options,
    target_count,
)
from stages.pretrain.validate import RetrievalScorer, to_device, validate_tasks, zero_shot_retrieval
from vlp import distributed
from vlp.data.batching import UnitBatchSampler
from vlp.data.task_sampler import TaskSampler

log = logging.getLogger("vlp.pretrain")


@dataclass
class StepEvent:
    """Passed to the loop's hooks once a step's gradients are summed over workers, before clipping."""

    step: int  # 1-based number of the optimizer step being taken
    task: str
    rank: int
    world_size: int
    model: PretrainModel


@dataclass
class LoopSpec:
    """``train_loop_config`` of the TorchTrainer (plain values, so Ray can ship it to the workers)."""

    cfg: dict[str, Any]  # PretrainConfig, dumped
    txt_db_dir: str
    img_db_dir: str
    fatal_marker: str
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None
    # Called with a StepEvent on every worker and step (fault injection in tests, gradient probes).
    hooks: Sequence[Callable[[StepEvent], None]] = field(default_factory=tuple)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
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


class MetricSink:
    """Rank 0's MLflow logging into the stage's run (no ``mlflow.start_run``: the stage owns the run)."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.run_id = run_id if distributed.is_main() else None
        self.client = None
        if self.run_id is not None:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(uri)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)


class Window:
    """Training statistics since the last log, per task; summed over workers when flushed."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)

    def add(self, task: str, key: str, value: float) -> None:
        self.sums[f"{task}/{key}"] += value

    def flush(self) -> dict[str, float]:
        """The sums over all workers (``seconds``: the mean worker's wall time); then starts afresh."""
        total = distributed.all_reduce_dict(self.sums)
        self.sums = defaultdict(float)
        world = distributed.world_size()
        return {k: v / world if k.endswith("/seconds") else v for k, v in total.items()}


def task_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Per-task loss, accuracy, examples/s, input units/s and padding fraction, plus all tasks' rates, from
    ``<task>/<key>`` sums (losses weighted by targets, correct/count, examples, units, padded, seconds)."""
    by_task: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for key, value in sums.items():
        task, name = key.split("/", 1)
        by_task[task][name] = value
    out: dict[str, float] = {}
    examples = units = seconds = steps = 0.0
    for task, s in sorted(by_task.items()):
        wall = max(s["seconds"], 1e-9)
        for name, value in s.items():
            if name.endswith("_loss"):
                out[f"{task}/{name}"] = value / max(s["targets"], 1.0)
            elif name.endswith("_correct"):
                acc = name[: -len("_correct")]
                out[f"{task}/{acc}_acc"] = value / max(s[f"{acc}_count"], 1.0)
        out[f"{task}/examples_per_s"] = s["examples"] / wall
        out[f"{task}/units_per_s"] = s["units"] / wall
        out[f"{task}/padding"] = 1.0 - s["units"] / max(s["padded"], 1.0)
        examples, units, seconds = examples + s["examples"], units + s["units"], seconds + wall
        steps += s["steps"]
    if seconds:
        out["examples_per_s"] = examples / seconds
        out["units_per_s"] = units / seconds
        out["steps_per_s"] = steps / seconds
    return out


@dataclass
class Run:
    """Everything a worker holds while training."""

    spec: LoopSpec
    cfg: PretrainConfig
    corpus: Corpus
    model: PretrainModel
    ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Any
    scaler: torch.amp.GradScaler | None
    samplers: dict[str, UnitBatchSampler]
    task_sampler: TaskSampler
    device: torch.device
    autocast: Callable[[], AbstractContextManager]
    scorer: RetrievalScorer | None
    sink: MetricSink
    step: int = 0
    progress: dict[str, Any] = field(default_factory=dict)
    iters: dict[str, Any] = field(default_factory=dict)
    consumed: dict[str, int] = field(default_factory=dict)
    totals: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @property
    def pad_id(self) -> int:
        return int(self.corpus.meta.get("PAD", 0))


def train_fn(config: dict[str, Any]) -> None:
    spec = LoopSpec(**config)
    marker = Path(spec.fatal_marker)
    checkpointing.raise_if_fatal(marker)
    try:
        run = setup(spec)
        train(run)
    except (checkpointing.FatalTrainingError, ValueError) as err:
        # Bad data, bad config or a diverged run: a retry from the checkpoint would fail the same way.
        message = " ".join(str(err).split())
        if distributed.is_main() or not isinstance(err, checkpointing.FatalTrainingError):
            checkpointing.write_fatal(marker, message)
        raise checkpointing.FatalTrainingError(message) from None


def setup(spec: LoopSpec) -> Run:
    cfg = PretrainConfig.model_validate(spec.cfg)
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cfg.cpus_per_worker)
    rank, world = distributed.rank(), distributed.world_size()
    corpus = build_corpus(cfg, Path(spec.txt_db_dir), Path(spec.img_db_dir))
    meta = corpus.meta
    vocab_size = int(meta.get("vocab_size") or meta["v_range"][1])
    options = objective_options(cfg, meta, corpus.label_dim)
    checkpoint = ray.train.get_checkpoint()
    torch.manual_seed(seed_of(cfg.seed, "init"))
    model = build_model(encoder_config(cfg, vocab_size, corpus.img_dim), options,
                        cfg.model.init_from_bert if checkpoint is None else None).to(device)
    optimizer, schedule = build_optimizer(model, cfg)
    dtype = autocast_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    samplers = {
        task: UnitBatchSampler(corpus.train.txt_lens, corpus.train.img_lens, cfg.batch_units,
                               seed=seed_of(cfg.seed, "batches", task), rank=rank, world_size=world)
        for task in sorted(cfg.tasks)
    }
    task_sampler = TaskSampler(cfg.tasks, seed=cfg.seed)
    step, progress = 0, {}
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = checkpointing.load_state(Path(directory), map_location=device)
            progress = checkpointing.load_progress(Path(directory))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        for task, sampler in samplers.items():
            sampler.load_state_dict(state["samplers"][task])
        task_sampler.load_state_dict(state["task_sampler"])
        step = int(state["step"])
        log.info("pretrain: rank %d resumes at step %d", rank, step)
    ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})

    def autocast() -> AbstractContextManager:
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()

    scorer = None
    if corpus.retrieval is not None:
        index, texts = retrieval_index(corpus.retrieval)
        scorer = RetrievalScorer(model, corpus.retrieval.img_db, index, texts, int(meta.get("PAD", 0)),
                                 device, autocast)
    if rank == 0:
        for note in corpus.notes:
            log.info("pretrain: %s", note)
        log.info("pretrain: %d training captions, %d workers, precision %s, tasks %s", len(corpus.train),
                 world, dtype or torch.float32, dict(sorted(cfg.tasks.items())))
    return Run(spec, cfg, corpus, model, ddp, optimizer, schedule, scaler, samplers, task_sampler, device,
               autocast, scorer, MetricSink(spec.mlflow_uri, spec.mlflow_run_id), step, progress,
               totals=defaultdict(float, progress.get("totals", {})))


def validate(run: Run, retrieval: bool) -> dict[str, float]:
    cfg, corpus = run.cfg, run.corpus
    metrics: dict[str, float] = {}
    start = time.perf_counter()
    if corpus.val is not None:
        units = cfg.validation.batch_units or cfg.batch_units
        metrics |= validate_tasks(run.model, list(cfg.tasks), corpus.val, corpus.val_lens, units, cfg.seed,
                                  run.pad_id, run.device, run.autocast)
    if retrieval and run.scorer is not None:
        recalls = zero_shot_retrieval(run.scorer, cfg.validation.retrieval_chunk)
        metrics |= {f"zs_{k}": v for k, v in recalls.items()}
    if metrics and distributed.is_main():
        log.info("pretrain: validation at step %d (%.1fs): %s", run.step, time.perf_counter() - start,
                 ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    run.sink.log({f"val/{k}": v for k, v in metrics.items()}, run.step)
    return metrics


def next_batches(run: Run, task: str) -> list[dict]:
    if task not in run.iters:
        prepare = run.model.objectives[task].prepare
        run.iters[task] = iter(loader(run.corpus.train, run.samplers[task], prepare, run.cfg.seed,
                                      f"train/{task}", run.pad_id, run.cfg.loader_workers,
                                      run.device.type == "cuda"))
        run.consumed[task] = 0
    batches = [next(run.iters[task]) for _ in range(run.cfg.grad_accum)]
    run.consumed[task] += len(batches)
    return [to_device(b, run.device) for b in batches]


def fail(run: Run, task: str, what: str) -> None:
    saved = run.progress.get("step", 0)
    kept = f"the last good checkpoint (step {saved}) is kept" if saved else "no checkpoint had been written"
    raise checkpointing.FatalTrainingError(
        f"pretrain: {what} at step {run.step + 1} (task {task!r}); training stopped, {kept}"
    )


def train_step(run: Run, task: str, window: Window) -> tuple[float, float]:
    """One optimizer step of ``task``; returns (gradient norm before clipping, learning rate applied)."""
    cfg, world = run.cfg, distributed.world_size()
    objective = run.model.objectives[task]
    weights = loss_weights(cfg)
    batches = next_batches(run, task)
    counts = [target_count(objective, b) for b in batches]
    total = float(distributed.all_reduce_sum(torch.tensor(float(sum(counts)), dtype=torch.float64)))
    torch.manual_seed(seed_of(cfg.seed, "dropout", run.step, distributed.rank()))
    loss_sums: dict[str, float] = defaultdict(float)
    for i, (batch, n) in enumerate(zip(batches, counts, strict=True)):
        last = i == len(batches) - 1
        sync = nullcontext() if last or not hasattr(run.ddp, "no_sync") else run.ddp.no_sync()
        with sync:
            with run.autocast():
                out = run.ddp(task, batch)
            loss = sum(weights.get(k, 1.0) * v for k, v in out.items() if k.endswith("_loss"))
            loss = loss * (n * world / max(total, 1.0))
            (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
        for key, value in out.items():
            if key.endswith("_loss"):
                loss_sums[key] += float(value.detach()) * n
            elif key.endswith(("_correct", "_count")):
                window.add(task, key, float(value))
        real = int(batch["txt_mask"].sum() + batch["img_mask"].sum())
        padded = batch["txt_mask"].numel() + batch["img_mask"].numel()
        window.add(task, "examples", len(batch["img_keys"]))
        window.add(task, "units", real)
        window.add(task, "padded", padded)
    # Summed over workers here so that every worker stops on the same step with the same message.
    global_sums = distributed.all_reduce_dict(loss_sums)
    bad = {k: v for k, v in global_sums.items() if not math.isfinite(v)}
    if bad:
        fail(run, task, "non-finite loss " + ", ".join(f"{k}={v}" for k, v in sorted(bad.items())))
    for key, value in loss_sums.items():
        window.add(task, key, value)
    window.add(task, "targets", sum(counts))
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    event = StepEvent(run.step + 1, task, distributed.rank(), world, run.model)
    for hook in run.spec.hooks:
        hook(event)
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.model.parameters(), max_norm))
    lr = run.optimizer.param_groups[0]["lr"]
    if run.scaler is not None:
        run.scaler.step(run.optimizer)  # skips the step when fp16 overflowed, and lowers the scale
        run.scaler.update()
    else:
        if not math.isfinite(grad_norm):
            fail(run, task, f"non-finite gradient norm {grad_norm}")
        run.optimizer.step()
    run.schedule.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return grad_norm, lr


def save_checkpoint(run: Run, metrics: dict[str, float]) -> None:
    """Rank 0 writes the checkpoint; every rank reports (Ray Train needs all ranks at each report)."""
    run.task_sampler.step = run.step
    samplers = {task: (s.state_dict(consumed=run.consumed[task]) if task in run.iters else s.state_dict())
                for task, s in run.samplers.items()}
    run.progress = {**run.progress, "step": run.step, "totals": dict(run.totals)}
    with tempfile.TemporaryDirectory(prefix="pretrain-ckpt-") as tmp:
        checkpoint = None
        if distributed.is_main():
            state = {
                "model": run.model.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "schedule": run.schedule.state_dict(),
                "scaler": run.scaler.state_dict() if run.scaler is not None else None,
                "step": run.step,
                "samplers": samplers,
                "task_sampler": run.task_sampler.state_dict(),
            }
            checkpointing.save(Path(tmp), state, run.progress)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"step": run.step, **metrics}, checkpoint=checkpoint)


def train(run: Run) -> None:
    cfg = run.cfg
    vcfg = cfg.validation
    if "initial" not in run.progress:
        run.progress["initial"] = validate(run, retrieval=True)
    run.ddp.train()
    window = Window()
    last_metrics: dict[str, float] = {}
    while run.step < cfg.steps:
        task = run.task_sampler.task(run.step)
        start = time.perf_counter()
        grad_norm, lr = train_step(run, task, window)
        seconds = time.perf_counter() - start
        window.add(task, "seconds", seconds)
        window.add(task, "steps", 1.0 / distributed.world_size())  # summed over workers when flushed
        step, final = run.step, run.step == cfg.steps
        if step % cfg.log_every == 0 or final:
            sums = window.flush()
            for key, value in sums.items():
                run.totals[key] += value
            metrics = {f"train/{k}": v for k, v in task_metrics(sums).items()}
            metrics |= {"train/lr": lr, "train/grad_norm": grad_norm}
            run.sink.log(metrics, step)
        if step % vcfg.every == 0 or final:
            retrieval = final or bool(vcfg.retrieval_every and step % vcfg.retrieval_every == 0)
            last_metrics = validate(run, retrieval)
            run.progress["validation"] = last_metrics
            run.progress["validation_step"] = step
        if step % cfg.checkpoint_every == 0 or final:
            save_checkpoint(run, last_metrics)
