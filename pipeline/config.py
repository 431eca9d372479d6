"""Typed pipeline config: YAML values validated into pydantic models, with ``key.sub=value`` overrides.

Every section lives next to the code that reads it; this module only composes them. Errors are one
line naming the file and the offending key, so a typo never starts a half-configured run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stages.alignment.config import AlignmentConfig
from stages.base import StageError
from stages.dedup.config import DedupConfig
from stages.download.config import DownloadConfig
from stages.eval.config import EvalConfig
from stages.feature_extraction.config import FeatureConfig
from stages.finetune.config import FinetuneConfig
from stages.outputs.encoder import encoder_stage, encoder_trial
from stages.pretrain.config import PretrainConfig
from stages.pretrain.sweep_config import SweepConfig, check_rows, trial_name
from stages.txt_db.config import TxtDbConfig
from vlp.train.runtime import RuntimeConfig
from worldgen.config import WorldConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


class ConfigError(StageError):
    pass


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # None: sqlite:///<workdir>/mlflow.db on one node; on a cluster of several nodes, an `mlflow server` the
    # pipeline starts on the driver's node over that same store, for the run (pipeline/cluster.py). The
    # MLFLOW_TRACKING_URI environment variable wins over both (the local cluster's job line sets it).
    uri: str | None = None
    experiment: str = "vlp-pipeline"
    # Where that server listens: 127.0.0.1 is right for several nodes on one machine; a cloud cluster needs an
    # address the other nodes reach (the head's private IP), or a server of its own (MLFLOW_TRACKING_URI).
    server_host: str = "127.0.0.1"


class PlacementConfig(BaseModel):
    """Where Ray places work. Placement changes no result, so no stage's cache key includes it."""

    model_config = ConfigDict(extra="forbid")

    # Pretraining's Ray Train workers: `pack` (as few nodes as possible), `spread` (across nodes, best effort:
    # a run whose node is lost resumes on the nodes left) or `strict_spread` (one worker per node, or the run
    # fails after ray.controller_failure_limit attempts to start them). Feature-extraction actors and the
    # finetune/eval stage tasks are placed by the resources they ask for (CPUs, GPUs).
    pretrain: Literal["pack", "spread", "strict_spread"] = "pack"


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # CPUs of the local Ray started when RAY_ADDRESS is unset (None: all of this machine's).
    num_cpus: int | None = Field(None, gt=0)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    # Ray Train controller errors tolerated (a worker group that could not be placed within
    # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s by default) before a training run fails with one line;
    # Ray's default, -1, retries forever: a run starved of resources would wait forever.
    controller_failure_limit: int = Field(3, ge=-1)


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "demo"
    # The root seed every stage derives its seeds from (vlp.train.seeds.seed_of): detector training,
    # pretraining, finetuning. The world has its own (world.seed): it is data, not a training run.
    seed: int = 0
    # Run the seed-dependent stages once per seed (cached per seed); the finetune and eval aggregates
    # gather every seed (eval: per-seed rows plus mean, spread and min-max). Empty: just ``seed``.
    seeds: list[int] = Field(default_factory=list)
    world: WorldConfig = Field(default_factory=WorldConfig)
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    features: FeatureConfig = Field(default_factory=FeatureConfig)
    txt_db: TxtDbConfig = Field(default_factory=TxtDbConfig)
    alignment: AlignmentConfig = Field(default_factory=AlignmentConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds lists a seed twice: {self.seeds}")
        study = self.sweep.study
        if study is not None:
            if study.config not in (None, self.name):
                raise ValueError(f"sweep.study: study {study.name!r} is written for config {study.config!r} "
                                 f"(--config configs/{study.config}.yaml), not {self.name!r}")
            try:
                check_rows(self.pretrain, study)
            except ValueError as err:
                raise ValueError(f"sweep.study.{err}") from None
            finetune = self.finetune.model_dump(mode="json")
            for i, row in enumerate(study.rows):  # finetune settings valid on this config's finetune section
                try:
                    FinetuneConfig.model_validate(_deep_merge(finetune, row.finetune))
                except ValidationError as err:
                    raise ValueError(_format_validation_error(f"sweep.study.rows[{i}] ({row.name}).finetune",
                                                              err)) from None
        if encoder_stage(self.finetune.encoder) == "sweep":
            if study is None or not study.pretraining:
                raise ValueError("finetune.encoder: 'sweep' starts finetuning from the loss study's best "
                                 "trial, but sweep.study names no pretraining study")
            trial = encoder_trial(self.finetune.encoder)
            names = {r.name for r in study.rows} | {trial_name(r.name, s) for r in study.rows
                                                    for s in study.seeds}
            if trial is not None and trial not in names:
                raise ValueError(f"finetune.encoder: {trial!r} is neither a row nor a trial (<row>-s<seed>) "
                                 f"of study {study.name!r}")
            if len(self.seeds) > 1 and self.features.detector.weights is None:
                raise ValueError("finetune.encoder: 'sweep' with several seeds: the study pretrains on the "
                                 "first seed's regions (its trained detector), which the other seeds' do not "
                                 "share; run one seed, or give features.detector.weights")
        return self

    def subset(self, paths: tuple[str, ...]) -> dict[str, Any]:
        """The config values under the dotted ``paths``: what a stage reads, hence its cache key. A path
        ``-<path>`` drops that part of an earlier path's section (``-sweep.study.downstream``)."""
        dumped = self.model_dump(mode="json")
        out: dict[str, Any] = {}
        for path in paths:
            if path.startswith("-"):
                _drop(out, path[1:])
                continue
            node: Any = dumped
            for part in path.split("."):
                node = node[part]
            out[path] = node
        return out


def _drop(subset: dict[str, Any], path: str) -> None:
    """Remove ``path`` from the subset section it lies in (nothing when that section is unset)."""
    section = next((p for p in subset if path.startswith(p + ".")), None)
    if section is None:
        raise ValueError(f"config path -{path}: no earlier path holds it")
    node = subset[section]
    *parents, last = path[len(section) + 1:].split(".")
    for part in parents:
        if node is None:
            return
        node = node[part]
    if node is not None:
        node.pop(last)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config ({err.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_config_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file merged over the file its ``base:`` key names (relative to it), recursively."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: base chain loops back to itself")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: field 'base': expected a file name, got {base!r}")
    return _deep_merge(_read_config_tree(path.parent / base, (*seen, path)), data)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` in ``data``; the value is parsed as YAML (numbers, booleans, lists)."""
    key, sep, raw = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def with_overrides(cfg: PipelineConfig, overrides: tuple[str, ...]) -> PipelineConfig:
    """``cfg`` with ``key.sub=value`` overrides applied (and validated again)."""
    if not overrides:
        return cfg
    data = cfg.model_dump(mode="json")
    for override in overrides:
        apply_override(data, override)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(f"overrides {list(overrides)}", err)) from None


def _format_validation_error(source: str, err: ValidationError) -> str:
    problems = []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown key {key!r}")
        elif not item["loc"]:  # a check across sections: its input is the whole config, its message the keys
            problems.append(item["msg"].removeprefix("Value error, "))
        else:
            problems.append(f"{key}: {item['msg']} (got {item.get('input')!r})")
    return f"{source}: " + "; ".join(problems)


def load_config(
    path: Path | str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> PipelineConfig:
    path = Path(path) if path else DEFAULT_CONFIG
    data = _read_config_tree(path)
    for override in overrides:
        apply_override(data, override)
    source = f"{path}" + (" (with overrides)" if overrides else "")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(source, err)) from None
