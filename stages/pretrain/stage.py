"""The ``pretrain`` stage: UNITER pretraining with Ray Train on the txtdb stage's text dbs and the features
stage's region store; output layout in ``stages/outputs/pretrain.py``.

Inputs: ``txtdb`` and ``features``. The curves (per-task loss, accuracy, examples/s, input units/s,
padding: ``train/...``; validation: ``val/...``, the untrained model's at step 0) go to the stage's MLflow
run from rank 0; the final metrics use the same names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from ray.train import CheckpointConfig, ControllerError, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from stages.base import MetricLogger, StageContext, StageError, StageResult
from stages.outputs.alignment import AlignmentOutput
from stages.outputs.features import FeaturesOutput
from stages.outputs.pretrain import PretrainOutput
from stages.outputs.txt_db import TxtDbOutput
from stages.pretrain import checkpointing
from stages.pretrain.config import PretrainConfig
from stages.pretrain.data import Corpus, PretrainInputs, build_corpus, stream_examples, streams
from stages.pretrain.figures import alignment_figure
from stages.pretrain.loop import LoopSpec, StepEvent, throughput_metrics, train_fn
from vlp.data.batching import UnitBatchSampler
from vlp.data.collate import collate
from vlp.data.tokenizer import load_tokenizer
from vlp.objectives.owa import alignment_maps
from vlp.train.metrics import MetricSums
from vlp.train.pretrain_model import build_model, encoder_config, objective_options
from vlp.train.runtime import RuntimeConfig

RUN_NAME = "run"
# Below these, pretraining did not learn to align text and regions: ITM accuracy (chance 0.5 with half of
# the pairs negative) and zero-shot image retrieval R@1 as a multiple of chance (1 / images).
ALIGNED_ITM_ACC = 0.6
ALIGNED_R1_OVER_CHANCE = 2.0
FATAL_MARKER = "fatal.txt"
NO_RUN = MetricLogger()  # logs nothing
# Placement of the workers (config ``ray.placement.pretrain``) -> Ray's placement group strategy.
PLACEMENT = {"pack": "PACK", "spread": "SPREAD", "strict_spread": "STRICT_SPREAD"}


def preflight(cfg: PretrainConfig, seed: int, inputs: PretrainInputs) -> Corpus:
    """Everything that can be checked before workers start: dbs, task inputs, batch budgets, BERT init."""
    try:
        corpus = build_corpus(cfg, seed, inputs)
    except ValueError as err:
        raise StageError(" ".join(str(err).split())) from None
    budgets = []
    for stream in streams(cfg.tasks, corpus.weights):  # every stream's batches, at their largest
        examples, bound, _ = stream_examples(stream, corpus, cfg, seed)
        budgets.append(("batch_units", (examples.txt_lens, bound), cfg.batch_units, cfg.num_workers, True))
    val_units = cfg.validation.batch_units or cfg.batch_units
    if corpus.val_lens is not None:
        budgets.append(("validation.batch_units", corpus.val_lens, val_units, 1, False))
    if corpus.alignment_val is not None:
        held = corpus.alignment_val
        budgets.append(("validation.batch_units", (held.txt_lens, held.img_lens), val_units, 1, False))
    for setting, (txt_lens, img_lens), units, world, even in budgets:
        try:
            UnitBatchSampler(txt_lens, img_lens, units, world_size=world, even_shards=even).epoch_batches(0)
        except ValueError as err:
            raise StageError(f"pretrain.{setting}: {err}") from None
    if cfg.model.init_from_bert is not None:
        try:
            build_model(encoder_config(cfg.model, corpus.vocab_size, corpus.img_dim), {},
                        cfg.model.init_from_bert)
        except ValueError as err:
            raise StageError(f"pretrain.model.init_from_bert: {' '.join(str(err).split())}") from None
    return corpus


def build_trainer(cfg: PretrainConfig, inputs: PretrainInputs, storage: Path, *, seed: int,
                  runtime: RuntimeConfig, metrics: MetricLogger = NO_RUN,
                  hooks: Sequence[Callable[[StepEvent], None]] = (), placement: str = "pack",
                  controller_failure_limit: int = 3) -> TorchTrainer:
    """The TorchTrainer of one pretraining run, checkpointing into ``storage``: its ``fit()`` runs (or, when
    ``storage`` holds checkpoints of the run, resumes) to the last step. Ray Train restarts failed workers
    (a worker process or its node lost) from the last checkpoint up to ``cfg.max_failures`` times, except
    after a deterministic failure (bad data, NaN loss), which the workers record in ``storage/fatal.txt`` so
    that a retry stops at once; ``fit`` (below) turns either into a one-line StageError. ``metrics``: the
    MLflow run rank 0 logs to. ``placement``: ``pack``, ``spread`` or ``strict_spread`` (the workers'
    placement group); ``controller_failure_limit``: attempts to start a worker group that cannot be placed
    (each waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S) before the run fails, -1 for no limit. ``storage``
    must be a path every node of the cluster sees."""
    storage.mkdir(parents=True, exist_ok=True)
    marker = storage / FATAL_MARKER
    marker.unlink(missing_ok=True)  # a new attempt gets a fresh chance
    spec = LoopSpec(cfg.model_dump(mode="json"), seed, runtime.model_dump(mode="json"),
                    str(inputs.txtdb.root), str(inputs.features.root), str(marker), metrics,
                    hooks=tuple(hooks),
                    alignment_dir=str(inputs.alignment.root) if inputs.alignment is not None else None)
    resources = {"CPU": runtime.threads} | ({"GPU": 1} if cfg.use_gpu else {})
    return TorchTrainer(
        train_fn,
        # Not dataclasses.asdict: it would turn hooks and the logger, dataclasses, into dicts.
        train_loop_config={f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources, placement_strategy=PLACEMENT[placement]),
        run_config=RunConfig(
            storage_path=str(storage.resolve()),
            name=RUN_NAME,
            failure_config=FailureConfig(max_failures=cfg.max_failures,
                                         controller_failure_limit=controller_failure_limit),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )


def fit(trainer: TorchTrainer, storage: Path) -> Result:
    """``trainer.fit()`` of a ``build_trainer`` trainer, its failures as one-line StageErrors."""
    marker = storage / FATAL_MARKER
    try:
        result = trainer.fit()
    except Exception as err:
        if marker.is_file():
            raise StageError(marker.read_text()) from None
        if isinstance(err, ControllerError):
            scaling = trainer.scaling_config
            limit = trainer.run_config.failure_config.controller_failure_limit
            cause = err.controller_failure
            raise StageError(
                f"pretrain: {scaling.num_workers} workers ({scaling.placement_strategy}, "
                f"{scaling.resources_per_worker} each) could not be started after {limit + 1} attempts "
                f"({type(cause).__name__}); add nodes or free resources, or lower pretrain.num_workers or "
                f"ray.placement.pretrain") from None
        lines = [line for line in str(err).splitlines() if line.strip()]
        raise StageError(f"pretrain: training failed ({type(err).__name__}: "
                         f"{lines[-1] if lines else 'no message'})") from None
    if result.checkpoint is None:
        raise StageError(f"pretrain: training ended without a checkpoint in {storage}")
    return result


def export(cfg: PretrainConfig, corpus: Corpus, checkpoint_dir: Path, tokenizer_dir: Path,
           out: PretrainOutput) -> dict:
    """Write model/, tokenizer/ and metrics.json from the final checkpoint; returns the metrics record."""
    state = checkpointing.load_state(checkpoint_dir)
    progress = checkpointing.load_progress(checkpoint_dir)
    options = objective_options(cfg, corpus.meta, corpus.label_dim)
    model = build_model(encoder_config(cfg.model, corpus.vocab_size, corpus.img_dim), options)
    model.load_state_dict(state["model"])
    out.write_model(model, options, tokenizer_dir)
    totals = {task: MetricSums(sums) for task, sums in progress.get("totals", {}).items()}
    record = {
        "steps": progress["step"],
        "untrained": progress.get("initial", {}),
        "final": progress.get("validation", {}),
        "throughput": throughput_metrics(totals),
        "train_captions": len(corpus.train),
        "notes": corpus.notes,
    }
    out.write_metrics(record)
    # Where the workers ran (Ray node ids by rank, per attempt): the run's record, not a result.
    return record | {"attempts": progress.get("attempts", [])}


def run(ctx: StageContext) -> StageResult:
    cfg: PretrainConfig = ctx.cfg.pretrain
    alignment = AlignmentOutput(ctx.inputs["alignment"]) if "alignment" in ctx.inputs else None
    inputs = PretrainInputs(TxtDbOutput(ctx.inputs["txtdb"]), FeaturesOutput(ctx.inputs["features"]),
                            alignment)
    out = PretrainOutput(ctx.out_dir)
    corpus = preflight(cfg, ctx.cfg.seed, inputs)
    for note in corpus.notes:
        ctx.log.info("pretrain: %s", note)
    # ctx.cfg.ray is in no cache key: where the workers run changes no result.
    trainer = build_trainer(cfg, inputs, out.train_dir, seed=ctx.cfg.seed, runtime=ctx.cfg.runtime,
                            metrics=ctx.metrics, placement=ctx.cfg.ray.placement.pretrain,
                            controller_failure_limit=ctx.cfg.ray.controller_failure_limit)
    result = fit(trainer, out.train_dir)
    with result.checkpoint.as_directory() as directory:
        record = export(cfg, corpus, Path(directory), inputs.txtdb.tokenizer_dir, out)
    ctx.log.info("pretrain: %d steps; untrained %s; final %s", record["steps"], record["untrained"],
                 record["final"])
    # The last points of the curves: the final validation and the whole run's training metrics.
    curves = {f"val/{k}": v for k, v in record["final"].items()}
    curves |= {f"train/{k}": v for k, v in record["throughput"].items()}
    metrics = {k: float(v) for k, v in curves.items() if np.isfinite(v)}
    params = {"tasks": dict(sorted(cfg.tasks.items())), "model_size": cfg.model.size,
              "num_workers": cfg.num_workers, "train_captions": len(corpus.train)}
    attempts = record["attempts"]
    if attempts:
        last = attempts[-1]["nodes"]
        ctx.log.info("pretrain: %d attempt(s); the last one's ranks ran on nodes %s", len(attempts), last)
        params |= {"placement": ctx.cfg.ray.placement.pretrain, "attempts": len(attempts),
                   "worker_nodes": ",".join(last)}
        metrics |= {"workers/nodes": float(len(set(last)))}
    artifacts = [out.metrics_path.name]
    if "owa" in cfg.tasks and corpus.alignment_val is not None:
        artifacts.append(str(alignment_figure_of(cfg, corpus, out).relative_to(out.root)))
    images = len(set(corpus.retrieval.img_keys)) if corpus.retrieval is not None else 0
    verdict = alignment_verdict(record["final"], images)
    if verdict["alignment"] == "at_chance":
        ctx.log.warning("pretrain: %s", verdict["detail"])
    return StageResult(metrics=metrics | {"steps": float(record["steps"])}, params=params,
                       artifacts=artifacts, metric_steps={k: record["steps"] for k in metrics}, tags=verdict)


ALIGNMENT_FIGURE_PAIRS = 4


def alignment_figure_of(cfg: PretrainConfig, corpus: Corpus, out: PretrainOutput) -> Path:
    """figures/alignment_val.png: word -> region maps of the first held-out annotated sentences."""
    model = out.model()
    held = corpus.alignment_val
    first = {}  # the first sentence of each of the first images: pairs of different images
    for i, key in enumerate(held.img_keys):
        first.setdefault(key, i)
    chosen = list(first.values())[:ALIGNMENT_FIGURE_PAIRS]
    chosen += [i for i in range(len(held)) if i not in chosen][: ALIGNMENT_FIGURE_PAIRS - len(chosen)]
    examples = [held[i] for i in chosen]
    batch = collate(examples, pad_id=int(corpus.meta.get("PAD", 0)))
    tokenizer = load_tokenizer(out.tokenizer_dir)
    items = []
    maps_of = alignment_maps(model.encoder, model.objectives["owa"], batch)
    for example, maps in zip(examples, maps_of, strict=True):
        ids = example["input_ids"][maps["rows"]].tolist()
        items.append({**maps, "tokens": tokenizer.convert_ids_to_tokens(ids), "image": example["img_key"]})
    return alignment_figure(items, out.root / "figures" / "alignment_val.png",
                            f"object-word alignment after {cfg.steps} steps (held-out sentences)")


def alignment_verdict(final: dict[str, float], retrieval_images: int) -> dict[str, str]:
    """``alignment``: ``learned``, ``at_chance`` (ITM accuracy or zero-shot retrieval still at chance) or
    ``unknown`` (neither measured), with a one-line ``detail``."""
    checks = []
    if "itm_acc" in final:
        checks.append(("validation ITM accuracy", final["itm_acc"], 0.5, final["itm_acc"] >= ALIGNED_ITM_ACC))
    if "zs_ir_r1" in final and retrieval_images:
        chance = 1.0 / retrieval_images
        checks.append(("zero-shot image retrieval R@1", final["zs_ir_r1"], chance,
                       final["zs_ir_r1"] >= ALIGNED_R1_OVER_CHANCE * chance))
    if not checks:
        return {"alignment": "unknown", "detail": "no ITM validation or zero-shot retrieval measured"}
    failed = [c for c in checks if not c[3]]
    detail = ", ".join(f"{name} {value:.3f} (chance {chance:.3f})" for name, value, chance, _ in checks)
    if failed:
        return {"alignment": "at_chance",
                "detail": f"pretraining did not learn to align text and regions: {detail}; downstream "
                          "numbers will not show what pretraining can do"}
    return {"alignment": "learned", "detail": detail}
