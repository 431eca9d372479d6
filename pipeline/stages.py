"""The stage registry: what each stage runs, what it reads from the config, and what it depends on.

``config`` lists the dotted config sections a stage reads (``-<path>``: a part of one it does not); the
code it runs is the import closure of its entry module (``pipeline/imports.py``), computed, never listed.
Changing either reruns the stage and, through the input keys, everything downstream of it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.config import PipelineConfig
from stages.eval.config import eval_upstream
from stages.finetune.config import finetune_upstream
from stages.outputs import StageOutput
from stages.outputs.alignment import AlignmentOutput
from stages.outputs.detector import DetectorOutput
from stages.outputs.download import DedupOutput, DownloadOutput
from stages.outputs.eval import EvalOutput, SummaryOutput
from stages.outputs.features import EntityFeaturesOutput, FeaturesOutput
from stages.outputs.finetune import FinetuneIndexOutput, FinetuneOutput
from stages.outputs.pretrain import PretrainOutput
from stages.outputs.sweep import DownstreamOutput, SweepOutput
from stages.outputs.txt_db import TxtDbOutput
from stages.outputs.world import WorldOutput
from vlp.tasks.registry import TASK_NAMES


@dataclass(frozen=True)
class StageSpec:
    name: str
    entry: str  # "module:function" implementing run(ctx) -> StageResult
    config: tuple[str, ...]
    upstream: Callable[[PipelineConfig], tuple[str, ...]]
    # User files the stage reads (weights, vocabularies): their contents go into the cache key too.
    files: Callable[[PipelineConfig], tuple[str | None, ...]] = lambda cfg: ()
    # CPUs the stage's Ray task reserves, so that stages the graph may run side by side (one per
    # downstream task) share the cluster instead of oversubscribing it.
    cpus: Callable[[PipelineConfig], float] = lambda cfg: 0
    args: tuple[str, ...] = ()  # passed to the entry after the context (the task of a per-task stage)
    # Whether the graph serves the world stage's output (an input of the stage) on a loopback mirror
    # while the stage runs, handing it the mirror's base URL as ``ctx.mirror_url``.
    serves_world: Callable[[PipelineConfig], bool] = lambda cfg: False
    # The output layout the stage declares: checked before it is committed and before a consumer reads it.
    output: type[StageOutput] = StageOutput
    # Run once over every seed of ``seeds`` (its inputs named "<stage>@<seed>"), not once per seed.
    across_seeds: bool = False
    # It has seeds of its own (a study): planned once, on the first seed's inputs, whatever ``seeds``.
    first_seed_only: bool = False
    # Its Ray Train workers take the cluster's CPUs for the whole run, and give up when they cannot be placed
    # in time: so it runs alone, after every stage upstream of any of its seeds, one seed after another,
    # and every other stage waits for it (raced by other stages' tasks, its workers timed out unplaced).
    exclusive: bool = False
    # It runs a Ray Data pipeline whose actors and read tasks take CPUs as they go: two such stages at once
    # can each hold part of the cluster and wait for the rest forever (three seeds' features stages on 2 CPUs
    # did), so the graph runs them one at a time.
    ray_data: bool = False
    # Planned once over the trials of the study (``sweep.study.downstream``): its inputs are each trial's
    # ``eval_<task>`` (``eval_<task>@<trial>``), planned with the trial's overrides (``finetune.encoder=
    # sweep:<trial>``, or a finetuning study's seed and settings).
    over_trials: bool = False

    @property
    def module(self) -> str:
        return self.entry.split(":")[0]

    def load(self):
        module, func = self.entry.split(":")
        entry = getattr(importlib.import_module(module), func)
        return lambda ctx: entry(ctx, *self.args)


def _trained_detector(cfg: PipelineConfig) -> tuple[str, ...]:
    """The detector stage, when the stages that pool features need its weights (none configured)."""
    return ("detector",) if cfg.features.detector.weights is None else ()


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec(
            name="world",
            entry="stages.world.stage:run",
            output=WorldOutput,
            config=("world", "download.datasets"),
            upstream=lambda cfg: (),
        ),
        StageSpec(
            name="download",
            entry="stages.download.stage:run",
            output=DownloadOutput,
            config=("download",),
            upstream=lambda cfg: ("world",) if cfg.download.source == "world" else (),
            serves_world=lambda cfg: cfg.download.source == "world",
        ),
        StageSpec(
            name="dedup",
            entry="stages.dedup.stage:run",
            output=DedupOutput,
            config=("dedup",),
            upstream=lambda cfg: ("download",),
        ),
        StageSpec(
            name="detector",
            output=DetectorOutput,
            entry="stages.feature_extraction.detector.stage:run",
            config=("features.detector", "seed"),
            upstream=lambda cfg: ("dedup",),
            # Its training threads: with seeds=[0,1,2] three detectors would otherwise train at once on
            # the same cores (measured on the demo: ~280 s per epoch each, 30-75 s for one alone).
            cpus=lambda cfg: cfg.features.detector.train.threads,
        ),
        StageSpec(
            name="features",
            output=FeaturesOutput,
            entry="stages.feature_extraction.stage:run",
            config=("features",),
            # The world's scene truth feeds the feature-quality probe; the detector stage exists only to
            # train weights when none are configured.
            upstream=lambda cfg: (
                ("download", "dedup")
                + _trained_detector(cfg)
                + (("world",) if cfg.download.source == "world" else ())
            ),
            files=lambda cfg: (
                cfg.features.detector.weights,
                cfg.features.detector.detectron2.classes_file,
                cfg.features.detector.detectron2.attributes_file,
            ),
            ray_data=True,
        ),
        StageSpec(
            name="gt_features",
            output=FeaturesOutput,
            entry="stages.feature_extraction.gt_features:run",
            config=("features",),
            upstream=lambda cfg: ("download", *_trained_detector(cfg)),
            files=lambda cfg: (cfg.features.detector.weights,),
        ),
        StageSpec(
            name="entity_features",
            output=EntityFeaturesOutput,
            entry="stages.feature_extraction.gt_features:run_entities",
            config=("features", "eval.retrieval.isda_splits"),
            upstream=lambda cfg: ("download", *_trained_detector(cfg)),
            files=lambda cfg: (cfg.features.detector.weights,),
        ),
        StageSpec(
            name="txtdb",
            output=TxtDbOutput,
            entry="stages.txt_db.stage:run",
            config=("txt_db",),
            upstream=lambda cfg: ("dedup",),
            files=lambda cfg: (cfg.txt_db.tokenizer,),
        ),
        StageSpec(
            name="alignment",
            output=AlignmentOutput,
            entry="stages.alignment.stage:run",
            # the detector's config names its weight / vocabulary files (the names of its predictions)
            config=("alignment", "features.detector"),
            upstream=lambda cfg: ("dedup", "features", "txtdb", *_trained_detector(cfg)),
            files=lambda cfg: (
                cfg.alignment.word_vectors,
                cfg.features.detector.weights,
                cfg.features.detector.detectron2.classes_file,
                cfg.features.detector.detectron2.attributes_file,
            ),
        ),
        StageSpec(
            name="pretrain",
            output=PretrainOutput,
            entry="stages.pretrain.stage:run",
            config=("pretrain", "seed", "runtime.precision", "runtime.threads"),
            # the alignment annotations only when the object-word alignment objective is a task
            upstream=lambda cfg: ("txtdb", "features")
            + (("alignment",) if "owa" in cfg.pretrain.tasks else ()),
            files=lambda cfg: (cfg.pretrain.model.init_from_bert,),
            exclusive=True,
        ),
        StageSpec(
            name="sweep",
            output=SweepOutput,
            entry="stages.pretrain.sweep:run",
            # the study, and the pretrain section its rows start from; not the study's downstream section
            # (what sweep_downstream does with the trials) nor registered_model (where the best encoder is
            # registered changes no result)
            config=("pretrain", "sweep.study", "-sweep.study.downstream", "runtime.precision",
                    "runtime.threads"),
            upstream=lambda cfg: ("txtdb", "features") + (
                ("alignment",) if cfg.sweep.study is not None
                and any("owa" in r.tasks for r in cfg.sweep.study.rows) else ()),
            files=lambda cfg: (cfg.pretrain.model.init_from_bert,),
            first_seed_only=True,
            # its trials' Ray Train workers take the cluster's CPUs, as pretraining's do
            exclusive=True,
        ),
        StageSpec(
            name="sweep_downstream",
            output=DownstreamOutput,
            entry="stages.pretrain.downstream:run",
            config=("sweep.study",),
            # a pretraining study's trials (a finetuning study's trials are finetune settings alone)
            upstream=lambda cfg: ("sweep",) if cfg.sweep.study is not None and cfg.sweep.study.pretraining
            else (),
            over_trials=True,
        ),
        StageSpec(
            name="karpathy_txtdb",
            output=TxtDbOutput,
            entry="stages.txt_db.karpathy:run",
            config=(),
            upstream=lambda cfg: ("download", "txtdb"),
        ),
        *(
            StageSpec(
                name=f"finetune_{task}",
                output=FinetuneOutput,
                entry="stages.finetune.stage:run_task",
                args=(task,),
                config=("finetune.common", f"finetune.{task}", "finetune.encoder", "seed",
                        "runtime.precision", "runtime.threads", "runtime.skip_missing_images"),
                upstream=lambda cfg, task=task: finetune_upstream(task, cfg.finetune.encoder),
                cpus=lambda cfg: cfg.runtime.threads,
            )
            for task in TASK_NAMES
        ),
        StageSpec(
            name="finetune",
            output=FinetuneIndexOutput,
            across_seeds=True,
            entry="stages.finetune.aggregate:run",
            config=("finetune.tasks",),
            upstream=lambda cfg: tuple(f"finetune_{task}" for task in cfg.finetune.tasks),
        ),
        *(
            StageSpec(
                name=f"eval_{task}",
                output=EvalOutput,
                entry="stages.eval.stage:run_task",
                args=(task,),
                config=("eval.common", f"eval.splits.{task}", "finetune.encoder", "runtime.eval_precision",
                        "runtime.threads", "runtime.skip_missing_images")
                # retrieval: the datasets whose test splits a zero-shot-only evaluation scores
                + (("eval.retrieval", "finetune.retrieval.datasets") if task == "retrieval" else ()),
                upstream=lambda cfg, task=task: eval_upstream(task, cfg.finetune.encoder,
                                                              cfg.eval.retrieval.finetuned),
                cpus=lambda cfg: cfg.runtime.threads,
            )
            for task in TASK_NAMES
        ),
        StageSpec(
            name="eval",
            output=SummaryOutput,
            across_seeds=True,
            entry="stages.eval.aggregate:run",
            config=("finetune.tasks",),
            upstream=lambda cfg: tuple(f"eval_{task}" for task in cfg.finetune.tasks),
        ),
    )
}

# The stages `--stage all` runs to (every stage not upstream of another is a sink).
ALL = "all"
