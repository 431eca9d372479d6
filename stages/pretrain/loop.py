"""The per-worker training function Ray Train runs: UNITER pretraining, one task per optimizer step.

Every worker builds the same model and datasets, reads its own shard of each task's batches, and steps
in lockstep with the others (DDP). Rank 0 logs to the stage's MLflow run and writes the checkpoints.

Gradient normalisation: each objective returns losses averaged over its targets (masked tokens, masked
regions, pairs). A micro-batch's loss is rescaled by its share of all targets of the step, summed over the
micro-batches of every worker (one all-reduce of a count), so the step's gradient is that of the mean
over the global batch, however the batch is split into workers and accumulation steps.

Each step runs one stream of batches, a task on a dataset (``stages.pretrain.data.streams``: the tasks
themselves on one corpus, ``<task>/<dataset>`` with train_dbs' named form), drawn by the streams' ratios.
Every seed derives from the root seed: model init ``seed_of(seed, "init")``, batch order
``seed_of(seed, "batches", stream)``, dropout ``seed_of(seed, "dropout", step, rank)``, masks
``seed_of(seed, "<train|val>/<stream>", epoch, batch)``, ITM's corpus negatives
``seed_of(seed, "itm_negatives", stream)``; the stream of a step is a keyed hash of (seed, step).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from stages.base import MetricLogger
from stages.outputs.alignment import AlignmentOutput
from stages.outputs.features import FeaturesOutput
from stages.outputs.txt_db import TxtDbOutput
from stages.pretrain import checkpointing
from stages.pretrain.config import PretrainConfig
from stages.pretrain.data import (
    OWN_DATA_TASKS,
    Corpus,
    PretrainInputs,
    Stream,
    build_corpus,
    stream_examples,
    streams,
)
from vlp import distributed
from vlp.data.batching import UnitBatchSampler
from vlp.data.task_sampler import TaskSampler
from vlp.data.tokenizer import load_tokenizer
from vlp.train.adversarial import adversaries, adversary_parameters, build_adversary_optimizer
from vlp.train.device import to_device
from vlp.train.metrics import MetricSums
from vlp.train.optim import build_optimizer, clip_gradients
from vlp.train.precision import Autocast, mixed_precision
from vlp.train.prepared import prepared_loader
from vlp.train.pretrain_model import (
    PretrainModel,
    build_model,
    encoder_config,
    loss_weights,
    objective_options,
    target_count,
)
from vlp.train.runtime import RuntimeConfig
from vlp.train.seeds import seed_of
from vlp.train.validate import (
    DamsmValidation,
    RetrievalScorer,
    retrieval_index,
    validate_tasks,
    zero_shot_retrieval,
)

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
    seed: int  # the root seed
    runtime: dict[str, Any]  # RuntimeConfig, dumped
    txtdb_dir: str
    features_dir: str
    fatal_marker: str
    metrics: MetricLogger = field(default_factory=MetricLogger)  # the stage's run; rank 0 logs into it
    # Called with a StepEvent on every worker and step (fault injection in tests, gradient probes).
    hooks: Sequence[Callable[[StepEvent], None]] = field(default_factory=tuple)
    alignment_dir: str | None = None  # the alignment stage's output (task owa)


def throughput_metrics(windows: dict[str, MetricSums]) -> dict[str, float]:
    """Per-task loss, accuracy and rates (``<task>/...``) and all tasks' rates, from per-task sums of losses
    (weighted by targets), counts, examples, units, padded units, seconds and steps."""
    total = MetricSums()
    out: dict[str, float] = {}
    for task, sums in sorted(windows.items()):
        out |= {f"{task}/{k}": v for k, v in sums.metrics().items()}
        total.merge(sums)
    return out | total.rates()


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
    samplers: dict[str, UnitBatchSampler]  # by stream name
    task_sampler: TaskSampler  # draws a stream per step
    streams: dict[str, Stream]
    examples: dict[str, Any]  # each stream's examples (stages.pretrain.data.stream_examples)
    device: torch.device
    autocast: Autocast
    scorer: RetrievalScorer | None
    metrics: MetricLogger  # a no-op on every rank but 0
    step: int = 0
    progress: dict[str, Any] = field(default_factory=dict)
    iters: dict[str, Any] = field(default_factory=dict)
    consumed: dict[str, int] = field(default_factory=dict)
    totals: dict[str, MetricSums] = field(default_factory=dict)  # per task, over the whole run
    # Objectives that train an adversary (LAViTeR's discriminator): its modules by task, their own optimizer
    # (and loss scaler under fp16); vlp.train.adversarial. Empty / None otherwise.
    adversaries: dict[str, torch.nn.Module] = field(default_factory=dict)
    d_optimizer: torch.optim.Optimizer | None = None
    d_scaler: torch.amp.GradScaler | None = None
    damsm: DamsmValidation | None = None  # LAViTeR's zero-shot evaluation (vta / laviter tasks)

    @property
    def seed(self) -> int:
        return self.spec.seed

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
    runtime = RuntimeConfig.model_validate(spec.runtime)
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(runtime.threads)
    rank, world = distributed.rank(), distributed.world_size()
    inputs = PretrainInputs(TxtDbOutput(Path(spec.txtdb_dir)), FeaturesOutput(Path(spec.features_dir)),
                            AlignmentOutput(Path(spec.alignment_dir)) if spec.alignment_dir else None)
    corpus = build_corpus(cfg, spec.seed, inputs)
    options = objective_options(cfg, corpus.meta, corpus.label_dim)
    checkpoint = ray.train.get_checkpoint()
    torch.manual_seed(seed_of(spec.seed, "init"))
    model = build_model(encoder_config(cfg.model, corpus.vocab_size, corpus.img_dim), options,
                        cfg.model.init_from_bert if checkpoint is None else None).to(device)
    adversarial = adversaries(model.objectives)
    optimizer, schedule = build_optimizer(model.encoder, model.objectives, cfg.optim, cfg.steps,
                                          exclude=adversary_parameters(adversarial))
    d_optimizer = build_adversary_optimizer(adversarial, cfg.laviter.d_lr, cfg.laviter.d_betas)
    autocast = mixed_precision(runtime.precision, device)
    scaler = autocast.grad_scaler()
    d_scaler = autocast.grad_scaler() if adversarial else None
    by_name = {stream.name: stream for stream in streams(cfg.tasks, corpus.weights)}
    examples, samplers = {}, {}
    for name, stream in by_name.items():
        examples[name], bound, epoch_img_lens = stream_examples(stream, corpus, cfg, spec.seed)
        samplers[name] = UnitBatchSampler(examples[name].txt_lens, bound, cfg.batch_units,
                                          seed=seed_of(spec.seed, "batches", name), rank=rank,
                                          world_size=world, epoch_img_lens=epoch_img_lens)
    task_sampler = TaskSampler({name: stream.ratio for name, stream in by_name.items()}, seed=spec.seed)
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
        if d_optimizer is not None:
            d_optimizer.load_state_dict(state["d_optimizer"])
            if d_scaler is not None and state.get("d_scaler"):
                d_scaler.load_state_dict(state["d_scaler"])
        for name, sampler in samplers.items():
            sampler.load_state_dict(state["samplers"][name])
        task_sampler.load_state_dict(state["task_sampler"])
        step = int(state["step"])
        log.info("pretrain: rank %d resumes at step %d", rank, step)
    ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    nodes = worker_nodes()
    # Every attempt (the first and each restart from a checkpoint) and the Ray node of each of its ranks.
    progress["attempts"] = [*progress.get("attempts", []), {"step": step, "nodes": nodes}]
    scorer = damsm = None
    if corpus.retrieval is not None and {"vta", "laviter"} & set(cfg.tasks):
        tokenizer = load_tokenizer(inputs.txtdb.tokenizer_dir)
        damsm = DamsmValidation(model, corpus.retrieval, int(corpus.meta.get("PAD", 0)), device, autocast,
                                lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    if corpus.retrieval is not None and "itm" in cfg.tasks:
        index, texts = retrieval_index(corpus.retrieval)
        scorer = RetrievalScorer(model, corpus.retrieval.img_db, index, texts, int(corpus.meta.get("PAD", 0)),
                                 device, autocast)
    if rank == 0:
        for r, node in enumerate(nodes):
            log.info("pretrain: rank %d runs on node %s", r, node)
        for note in corpus.notes:
            log.info("pretrain: %s", note)
        log.info("pretrain: %d training captions, %d workers, precision %s, streams %s", len(corpus.train),
                 world, autocast.dtype or torch.float32, {n: s.ratio for n, s in by_name.items()})
    totals = {task: MetricSums(sums) for task, sums in progress.get("totals", {}).items()}
    return Run(spec, cfg, corpus, model, ddp, optimizer, schedule, scaler, samplers, task_sampler, by_name,
               examples, device,
               autocast, scorer, spec.metrics if rank == 0 else MetricLogger(), step, progress, totals=totals,
               adversaries=adversarial, d_optimizer=d_optimizer, d_scaler=d_scaler, damsm=damsm)


def worker_nodes() -> list[str]:
    """The Ray node id of every rank, on every rank."""
    node = ray.get_runtime_context().get_node_id()
    if not distributed.is_distributed():
        return [node]
    nodes: list[str | None] = [None] * distributed.world_size()
    dist.all_gather_object(nodes, node)
    return [str(n) for n in nodes]


def validate(run: Run, retrieval: bool) -> dict[str, float]:
    cfg, corpus = run.cfg, run.corpus
    metrics: dict[str, float] = {}
    start = time.perf_counter()
    units = cfg.validation.batch_units or cfg.batch_units
    caption_tasks = [t for t in cfg.tasks if t not in OWN_DATA_TASKS]
    if corpus.val is not None and caption_tasks:
        metrics |= validate_tasks(run.model, caption_tasks, corpus.val, corpus.val_lens, units, run.seed,
                                  run.pad_id, run.device, run.autocast)
    if "owa" in cfg.tasks and corpus.alignment_val is not None:  # on the held-out images' annotations
        held = corpus.alignment_val
        metrics |= validate_tasks(run.model, ["owa"], held, (held.txt_lens, held.img_lens), units, run.seed,
                                  run.pad_id, run.device, run.autocast)
    if retrieval and run.scorer is not None:
        recalls = zero_shot_retrieval(run.scorer, cfg.validation.retrieval_chunk,
                                      cfg.validation.retrieval_modes, cfg.validation.retrieval_shortlist_k)
        metrics |= {f"zs_{k}": v for k, v in recalls.items()}
    if retrieval and run.damsm is not None:
        metrics |= run.damsm()
    if metrics and distributed.is_main():
        log.info("pretrain: validation at step %d (%.1fs): %s", run.step, time.perf_counter() - start,
                 ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    run.metrics.log({f"val/{k}": v for k, v in metrics.items()}, run.step)
    return metrics


def next_batches(run: Run, stream: Stream) -> list[dict]:
    name = stream.name
    if name not in run.iters:
        prepare = run.model.objectives[stream.task].prepare
        run.iters[name] = iter(prepared_loader(run.examples[name], run.samplers[name], prepare, run.seed,
                                               f"train/{name}", run.pad_id, run.cfg.loader_workers,
                                               run.device.type == "cuda"))
        run.consumed[name] = 0
    batches = [next(run.iters[name]) for _ in range(run.cfg.grad_accum)]
    run.consumed[name] += len(batches)
    return [to_device(b, run.device) for b in batches]


def fail(run: Run, task: str, what: str) -> None:
    saved = run.progress.get("step", 0)
    kept = f"the last good checkpoint (step {saved}) is kept" if saved else "no checkpoint had been written"
    raise checkpointing.FatalTrainingError(
        f"pretrain: {what} at step {run.step + 1} (task {task!r}); training stopped, {kept}"
    )


def train_step(run: Run, stream: Stream) -> tuple[MetricSums, float, float]:
    """One optimizer step of ``stream``; returns (this worker's sums of the step, gradient norm before
    clipping, learning rate applied)."""
    cfg, world, task = run.cfg, distributed.world_size(), stream.task
    objective = run.model.objectives[task]
    weights = loss_weights(cfg)
    batches = next_batches(run, stream)
    counts = [target_count(objective, b) for b in batches]
    total = float(distributed.all_reduce_sum(torch.tensor(float(sum(counts)), dtype=torch.float64)))
    torch.manual_seed(seed_of(run.seed, "dropout", run.step, distributed.rank()))
    sums = MetricSums()
    for i, (batch, n) in enumerate(zip(batches, counts, strict=True)):
        last = i == len(batches) - 1
        sync = nullcontext() if last or not hasattr(run.ddp, "no_sync") else run.ddp.no_sync()
        with sync:
            with run.autocast():
                out = run.ddp(task, batch)
            loss = sum(weights.get(k, 1.0) * v for k, v in out.items() if k.endswith("_loss"))
            loss = loss * (n * world / max(total, 1.0))
            (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
        sums.add(out, n)
        real = int(batch["txt_mask"].sum() + batch["img_mask"].sum())
        padded = batch["txt_mask"].numel() + batch["img_mask"].numel()
        sums.count(examples=len(batch["img_keys"]), units=real, padded=padded)
    # Summed over workers here so that every worker stops on the same step with the same message.
    global_losses = distributed.all_reduce_dict(sums.losses())
    bad = {k: v for k, v in global_losses.items() if not math.isfinite(v)}
    if bad:
        fail(run, task, "non-finite loss " + ", ".join(f"{k}={v}" for k, v in sorted(bad.items())))
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    event = StepEvent(run.step + 1, task, distributed.rank(), world, run.model)
    for hook in run.spec.hooks:
        hook(event)
    grad_norm = clip_gradients(run.model.parameters(), cfg.optim.grad_clip)
    lr = run.optimizer.param_groups[0]["lr"]
    if run.scaler is not None:
        run.scaler.step(run.optimizer)  # skips the step when fp16 overflowed, and lowers the scale
        run.scaler.update()
    else:
        if not math.isfinite(grad_norm):
            fail(run, task, f"non-finite gradient norm {grad_norm}")
        run.optimizer.step()
    run.model.momentum_update()  # the EMA teacher follows every step's student (no-op without a teacher)
    run.schedule.step()
    run.optimizer.zero_grad(set_to_none=True)
    if task in run.adversaries:
        adversary_step(run, task, batches, counts, total, sums)
    run.step += 1
    return sums, grad_norm, lr


def adversary_step(run: Run, task: str, batches: list[dict], counts: list[int], total: float,
                   sums: MetricSums) -> None:
    """One step of the task's adversary on the step's batches (after the main step); its losses and counts
    join the step's sums (``laviter_disc_*``), normalised as the main step's."""
    world, optimizer, scaler = distributed.world_size(), run.d_optimizer, run.d_scaler
    assert optimizer is not None
    optimizer.zero_grad(set_to_none=True)
    adversary = MetricSums()
    for i, (batch, n) in enumerate(zip(batches, counts, strict=True)):
        last = i == len(batches) - 1
        sync = nullcontext() if last or not hasattr(run.ddp, "no_sync") else run.ddp.no_sync()
        with sync:
            with run.autocast():
                out = run.ddp(task, batch, adversary=True)
            loss = sum(v for k, v in out.items() if k.endswith("_loss")) * (n * world / max(total, 1.0))
            (scaler.scale(loss) if scaler is not None else loss).backward()
        adversary.add(out, n, new_targets=False)
    bad = {k: v for k, v in distributed.all_reduce_dict(adversary.losses()).items() if not math.isfinite(v)}
    if bad:
        fail(run, task, "non-finite adversary loss " + ", ".join(f"{k}={v}" for k, v in sorted(bad.items())))
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = adversary_parameters({task: run.adversaries[task]})
    norm = clip_gradients(params, run.cfg.optim.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        if not math.isfinite(norm):
            fail(run, task, f"non-finite adversary gradient norm {norm}")
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sums.merge(adversary)


def save_checkpoint(run: Run, metrics: dict[str, float]) -> None:
    """Rank 0 writes the checkpoint; every rank reports (Ray Train needs all ranks at each report)."""
    run.task_sampler.step = run.step
    samplers = {name: (s.state_dict(consumed=run.consumed[name]) if name in run.iters else s.state_dict())
                for name, s in run.samplers.items()}
    totals = {task: dict(sums.sums) for task, sums in run.totals.items()}
    run.progress = {**run.progress, "step": run.step, "totals": totals}
    with tempfile.TemporaryDirectory(prefix="pretrain-ckpt-") as tmp:
        checkpoint = None
        if distributed.is_main():
            state = {
                "model": run.model.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "schedule": run.schedule.state_dict(),
                "scaler": run.scaler.state_dict() if run.scaler is not None else None,
                **({"d_optimizer": run.d_optimizer.state_dict(),
                    "d_scaler": run.d_scaler.state_dict() if run.d_scaler is not None else None}
                   if run.d_optimizer is not None else {}),
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
    windows: dict[str, MetricSums] = defaultdict(MetricSums)  # per task, since the last log
    last_metrics: dict[str, float] = {}
    world = distributed.world_size()
    while run.step < cfg.steps:
        stream = run.streams[run.task_sampler.task(run.step)]
        task = stream.task
        start = time.perf_counter()
        sums, grad_norm, lr = train_step(run, stream)
        # Summed over workers when logged: the mean worker's wall time and one step per step.
        sums.count(seconds=(time.perf_counter() - start) / world, steps=1.0 / world)
        windows[task].merge(sums)
        step, final = run.step, run.step == cfg.steps
        if step % cfg.log_every == 0 or final:
            reduced = {t: w.reduced() for t, w in sorted(windows.items())}
            for t, w in reduced.items():
                run.totals.setdefault(t, MetricSums()).merge(w)
            metrics = {f"train/{k}": v for k, v in throughput_metrics(reduced).items()}
            metrics |= {"train/lr": lr, "train/grad_norm": grad_norm}
            run.metrics.log(metrics, step)
            windows = defaultdict(MetricSums)
        if step % vcfg.every == 0 or final:
            retrieval = final or bool(vcfg.retrieval_every and step % vcfg.retrieval_every == 0)
            last_metrics = validate(run, retrieval)
            run.progress["validation"] = last_metrics
            run.progress["validation_step"] = step
        if step % cfg.checkpoint_every == 0 or final:
            save_checkpoint(run, last_metrics)
