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


@dataclass(frozen=True)
class StageSpec:
    name: str
    entry: str  # "module:function" implementing run(ctx) -> StageResult
    config: tuple[str, ...]
    code: tuple[str, ...]
    upstream: Callable[[PipelineConfig], tuple[str, ...]]
    # User files the stage reads (weights, vocabularies): their contents go into the cache key too.
    files: Callable[[PipelineConfig], tuple[str | None, ...]] = lambda cfg: ()

    def load(self):
        module, func = self.entry.split(":")
        return getattr(importlib.import_module(module), func)


# Each stage hashes the library modules it imports, not all of vlp/, so that adding a later stage's
# code does not invalidate the outputs of earlier ones.
_BASE_CODE = ("stages/base.py",)
_TABLES = "vlp/data/tables.py"
_IMG_DB = ("vlp/data/img_db.py", "vlp/data/msgpack_codec.py")

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
            config=("features.detector",),
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
            config=("pretrain",),
            code=(*_BASE_CODE, "vlp/data", "vlp/model", "vlp/objectives", "vlp/eval", "vlp/distributed.py",
                  "stages/pretrain"),
            upstream=lambda cfg: ("txtdb", "features"),
            files=lambda cfg: (cfg.pretrain.model.init_from_bert,),
        ),
    )
}

# The stages `--stage all` runs to (every stage not upstream of another is a sink).
ALL = "all"
