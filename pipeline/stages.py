"""The stage registry: what each stage runs, what it reads from the config, and what it depends on.

``code`` lists the source paths whose contents go into the stage's cache key, ``config`` the dotted
config sections it reads. Changing either reruns the stage and, through the input keys, everything
downstream of it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.config import PipelineConfig
from stages.eval.config import eval_upstream
from stages.finetune.config import TASK_NAMES, finetune_upstream


@dataclass(frozen=True)
class StageSpec:
    name: str
    entry: str  # "module:function" implementing run(ctx) -> StageResult
    config: tuple[str, ...]
    code: tuple[str, ...]
    upstream: Callable[[PipelineConfig], tuple[str, ...]]
    # User files the stage reads (weights, vocabularies): their contents go into the cache key too.
    files: Callable[[PipelineConfig], tuple[str | None, ...]] = lambda cfg: ()
    # CPUs the stage's Ray task reserves, so that stages the graph may run side by side (one per
    # downstream task) share the cluster instead of oversubscribing it.
    cpus: Callable[[PipelineConfig], float] = lambda cfg: 0
    args: tuple[str, ...] = ()  # passed to the entry after the context (the task of a per-task stage)

    def load(self):
        module, func = self.entry.split(":")
        entry = getattr(importlib.import_module(module), func)
        return lambda ctx: entry(ctx, *self.args)


# Each stage hashes the library modules it imports, not all of vlp/, so that adding a later stage's
# code does not invalidate the outputs of earlier ones.
_BASE_CODE = ("stages/base.py",)
_TABLES = "vlp/data/tables.py"
_IMG_DB = ("vlp/data/img_db.py", "vlp/data/msgpack_codec.py")
# The pretraining objectives (not iais.py, a finetuning regularizer that lives beside them).
# Finetuning and evaluation use every library package and the pretraining loop's building blocks.
_DOWNSTREAM_CODE = (*_BASE_CODE, "vlp", "stages/pretrain", "stages/finetune")
_OBJECTIVES = tuple(f"vlp/objectives/{m}.py" for m in
                    ("__init__", "common", "ipot", "itm", "masking", "mlm", "mrc", "mrfr", "mrm"))

STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec(
            name="world",
            entry="stages.download.world.stage:run",
            config=("world", "download.datasets"),
            code=(*_BASE_CODE, "stages/download/world"),
            upstream=lambda cfg: (),
        ),
        StageSpec(
            name="download",
            entry="stages.download.stage:run",
            config=("download",),
            code=(*_BASE_CODE, _TABLES, "stages/download"),
            upstream=lambda cfg: ("world",) if cfg.download.source == "world" else (),
        ),
        StageSpec(
            name="dedup",
            entry="stages.dedup.stage:run",
            config=("dedup",),
            code=(*_BASE_CODE, _TABLES, "stages/dedup"),
            upstream=lambda cfg: ("download",),
        ),
        StageSpec(
            name="detector",
            entry="stages.feature_extraction.detector.stage:run",
            config=("features.detector", "seed"),
            code=(*_BASE_CODE, "stages/feature_extraction/detector"),
            upstream=lambda cfg: ("dedup",),
        ),
        StageSpec(
            name="features",
            entry="stages.feature_extraction.stage:run",
            config=("features",),
            code=(*_BASE_CODE, *_IMG_DB, "stages/feature_extraction"),
            # The world's scene truth feeds the feature-quality probe; the detector stage exists only to
            # train weights when none are configured.
            upstream=lambda cfg: (
                ("download", "dedup")
                + (("detector",) if cfg.features.detector.weights is None else ())
                + (("world",) if cfg.download.source == "world" else ())
            ),
            files=lambda cfg: (
                cfg.features.detector.weights,
                cfg.features.detector.detectron2.classes_file,
                cfg.features.detector.detectron2.attributes_file,
            ),
        ),
        StageSpec(
            name="gt_features",
            entry="stages.feature_extraction.gt_features:run",
            config=("features",),
            code=(*_BASE_CODE, *_IMG_DB, "stages/feature_extraction", "stages/outputs/features.py"),
            upstream=lambda cfg: ("download",)
            + (("detector",) if cfg.features.detector.weights is None else ()),
            files=lambda cfg: (cfg.features.detector.weights,),
        ),
        StageSpec(
            name="txtdb",
            entry="stages.txt_db.stage:run",
            config=("txt_db",),
            code=(*_BASE_CODE, _TABLES, *_IMG_DB, "vlp/data/tokenizer.py", "vlp/data/txt_db.py",
                  "stages/txt_db"),
            upstream=lambda cfg: ("dedup",),
            files=lambda cfg: (cfg.txt_db.tokenizer,),
        ),
        StageSpec(
            name="pretrain",
            entry="stages.pretrain.stage:run",
            config=("pretrain", "seed", "runtime.precision", "runtime.threads"),
            code=(*_BASE_CODE, "vlp/data", "vlp/model", *_OBJECTIVES, "vlp/eval/retrieval.py",
                  "vlp/distributed.py", "stages/pretrain"),
            upstream=lambda cfg: ("txtdb", "features"),
            files=lambda cfg: (cfg.pretrain.model.init_from_bert,),
        ),
        StageSpec(
            name="karpathy_txtdb",
            entry="stages.txt_db.karpathy:run",
            config=(),
            code=(*_BASE_CODE, _TABLES, "vlp/data/tokenizer.py", "vlp/data/txt_db.py", "stages/txt_db",
                  "stages/finetune/karpathy_txtdb.py"),
            upstream=lambda cfg: ("download", "txtdb"),
        ),
        *(
            StageSpec(
                name=f"finetune_{task}",
                entry="stages.finetune.stage:run_task",
                args=(task,),
                config=("finetune.common", f"finetune.{task}", "seed", "runtime.precision", "runtime.threads",
                        "runtime.skip_missing_images"),
                code=_DOWNSTREAM_CODE,
                upstream=lambda cfg, task=task: finetune_upstream(task),
                cpus=lambda cfg: cfg.runtime.threads,
            )
            for task in TASK_NAMES
        ),
        StageSpec(
            name="finetune",
            entry="stages.finetune.aggregate:run",
            config=("finetune.tasks",),
            code=(*_BASE_CODE, "stages/finetune/stage.py"),
            upstream=lambda cfg: tuple(f"finetune_{task}" for task in cfg.finetune.tasks),
        ),
        *(
            StageSpec(
                name=f"eval_{task}",
                entry="stages.eval.stage:run_task",
                args=(task,),
                config=("eval.common", f"eval.splits.{task}", "runtime.eval_precision", "runtime.threads",
                        "runtime.skip_missing_images") + (("eval.retrieval",) if task == "retrieval" else ()),
                code=(*_DOWNSTREAM_CODE, "stages/eval")
                + (("stages/feature_extraction",) if task == "refcoco" else ()),
                upstream=lambda cfg, task=task: eval_upstream(task),
                cpus=lambda cfg: cfg.runtime.threads,
            )
            for task in TASK_NAMES
        ),
        StageSpec(
            name="eval",
            entry="stages.eval.aggregate:run",
            config=("finetune.tasks",),
            code=(*_BASE_CODE, "stages/eval"),
            upstream=lambda cfg: tuple(f"eval_{task}" for task in cfg.finetune.tasks),
        ),
    )
}

# The stages `--stage all` runs to (every stage not upstream of another is a sink).
ALL = "all"
