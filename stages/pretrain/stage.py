"""The ``pretrain`` stage: UNITER pretraining with Ray Train on the txtdb stage's text dbs and the features
stage's region store.

Output (in ``ctx.out_dir``)::

    model/              the pretrained encoder (``UniterModel.from_pretrained``: config.json, model.pt),
                        plus heads.pt (the objectives' heads) and heads.json (their constructor options)
    tokenizer/          copy of the txtdb tokenizer the encoder's vocabulary belongs to
    metrics.json        validation of the untrained (step 0) and of the final model, whole-run throughput
    ray_train/run/      Ray Train's checkpoints; a rerun of a killed stage (same key) resumes from them

Inputs: ``txtdb`` and ``features``. The curves (per-task loss, accuracy, examples/s, input units/s,
padding; validation) go to the stage's MLflow run from rank 0.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from stages.base import StageContext, StageError, StageResult
from stages.pretrain import checkpointing
from stages.pretrain.config import PretrainConfig
from stages.pretrain.data import Corpus, build_corpus
from stages.pretrain.loop import LoopSpec, StepEvent, task_metrics, train_fn
from stages.pretrain.modeling import build_model, encoder_config, objective_options
from vlp.data.batching import UnitBatchSampler

STORE = "img_db"
TOKENIZER_DIR = "tokenizer"
MODEL_DIR = "model"
METRICS = "metrics.json"
TRAIN_DIR = "ray_train"
RUN_NAME = "run"


def preflight(cfg: PretrainConfig, txt_db_dir: Path, img_db_dir: Path) -> Corpus:
    """Everything that can be checked before workers start: dbs, task inputs, batch budgets, BERT init."""
    try:
        corpus = build_corpus(cfg, txt_db_dir, img_db_dir)
    except ValueError as err:
        raise StageError(" ".join(str(err).split())) from None
    train_lens = (corpus.train.txt_lens, corpus.train.img_lens)
    budgets = [("batch_units", train_lens, cfg.batch_units, cfg.num_workers, True)]
    if corpus.val_lens is not None:
        val_units = cfg.validation.batch_units or cfg.batch_units
        budgets.append(("validation.batch_units", corpus.val_lens, val_units, 1, False))
    for setting, (txt_lens, img_lens), units, world, even in budgets:
        try:
            UnitBatchSampler(txt_lens, img_lens, units, world_size=world, even_shards=even).epoch_batches(0)
        except ValueError as err:
            raise StageError(f"pretrain.{setting}: {err}") from None
    if cfg.model.init_from_bert is not None:
        vocab_size = int(corpus.meta.get("vocab_size") or corpus.meta["v_range"][1])
        try:
            build_model(encoder_config(cfg, vocab_size, corpus.img_dim), {}, cfg.model.init_from_bert)
        except ValueError as err:
            raise StageError(f"pretrain.model.init_from_bert: {' '.join(str(err).split())}") from None
    return corpus


def fit(
    cfg: PretrainConfig,
    txt_db_dir: Path,
    img_db_dir: Path,
    storage: Path,
    mlflow: tuple[str | None, str | None] = (None, None),
    hooks: Sequence[Callable[[StepEvent], None]] = (),
) -> Result:
    """Run (or resume, when ``storage`` holds checkpoints of this run) the TorchTrainer to the last step."""
    storage.mkdir(parents=True, exist_ok=True)
    marker = storage / "fatal.txt"
    marker.unlink(missing_ok=True)  # a new attempt of the stage gets a fresh chance
    spec = LoopSpec(cfg.model_dump(mode="json"), str(txt_db_dir), str(img_db_dir), str(marker), *mlflow,
                    hooks=tuple(hooks))
    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.use_gpu else {})
    trainer = TorchTrainer(
        train_fn,
        # Not dataclasses.asdict: it would turn hooks that are dataclasses into dicts.
        train_loop_config={f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            storage_path=str(storage.resolve()),
            name=RUN_NAME,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as err:
        if marker.is_file():
            raise StageError(marker.read_text()) from None
        lines = [line for line in str(err).splitlines() if line.strip()]
        raise StageError(f"pretrain: training failed ({type(err).__name__}: "
                         f"{lines[-1] if lines else 'no message'})") from None
    if result.checkpoint is None:
        raise StageError(f"pretrain: training ended without a checkpoint in {storage}")
    return result


def export(cfg: PretrainConfig, corpus: Corpus, checkpoint_dir: Path, txt_db_dir: Path, out: Path) -> dict:
    """Write model/, tokenizer/ and metrics.json from the final checkpoint; returns the metrics record."""
    state = checkpointing.load_state(checkpoint_dir)
    progress = checkpointing.load_progress(checkpoint_dir)
    vocab_size = int(corpus.meta.get("vocab_size") or corpus.meta["v_range"][1])
    options = objective_options(cfg, corpus.meta, corpus.label_dim)
    model = build_model(encoder_config(cfg, vocab_size, corpus.img_dim), options)
    model.load_state_dict(state["model"])
    model_dir = out / MODEL_DIR
    model.encoder.save_pretrained(model_dir)
    torch.save(model.objectives.state_dict(), model_dir / "heads.pt")
    (model_dir / "heads.json").write_text(json.dumps(options, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(out / TOKENIZER_DIR, ignore_errors=True)
    shutil.copytree(txt_db_dir / TOKENIZER_DIR, out / TOKENIZER_DIR)
    record = {
        "steps": progress["step"],
        "untrained": progress.get("initial", {}),
        "final": progress.get("validation", {}),
        "throughput": task_metrics(progress.get("totals", {})),
        "train_captions": len(corpus.train),
        "notes": corpus.notes,
    }
    (out / METRICS).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


def run(ctx: StageContext) -> StageResult:
    cfg: PretrainConfig = ctx.cfg.pretrain
    txt_db_dir, img_db_dir = ctx.inputs["txtdb"], ctx.inputs["features"] / STORE
    corpus = preflight(cfg, txt_db_dir, img_db_dir)
    for note in corpus.notes:
        ctx.log.info("pretrain: %s", note)
    result = fit(cfg, txt_db_dir, img_db_dir, ctx.out_dir / TRAIN_DIR,
                 (ctx.mlflow_tracking_uri, ctx.mlflow_run_id))
    with result.checkpoint.as_directory() as directory:
        record = export(cfg, corpus, Path(directory), txt_db_dir, ctx.out_dir)
    metrics = {f"untrained.{k}": v for k, v in record["untrained"].items()}
    metrics |= {f"final.{k}": v for k, v in record["final"].items()}
    metrics |= {f"train.{k.replace('/', '.')}": v for k, v in record["throughput"].items()}
    metrics["steps"] = float(record["steps"])
    ctx.log.info("pretrain: %d steps; untrained %s; final %s", record["steps"], record["untrained"],
                 record["final"])
    params = {"tasks": dict(sorted(cfg.tasks.items())), "model_size": cfg.model.size,
              "num_workers": cfg.num_workers, "train_captions": len(corpus.train)}
    return StageResult(metrics={k: float(v) for k, v in metrics.items() if np.isfinite(v)}, params=params,
                       artifacts=[METRICS])
