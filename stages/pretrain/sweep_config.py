"""Config of the ``sweep`` stage (section ``sweep``): a study of pretraining loss sets run as Ray Tune trials.

A study is a YAML file (``configs/sweeps/``) named by ``sweep.study`` and read into the config when it loads,
so its contents are part of the stage's cache key and of the run's MLflow params. Each row is a loss set with
its weights (``tasks``, replacing ``pretrain.tasks``) and any other pretraining settings it switches
(``pretrain``: merged into the pipeline's ``pretrain`` section); every row runs once per seed of ``seeds``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from stages.pretrain.config import PretrainConfig
from vlp.objectives import REGISTRY as OBJECTIVES
from vlp.tasks.registry import TASK_NAMES

# Rows name trial directories and MLflow runs.
ROW_NAME = re.compile(r"^[A-Za-z0-9_+][A-Za-z0-9_.+-]*$")
# Where a relative study path is looked for after the working directory: the repository (configs/sweeps/).
REPO_ROOT = Path(__file__).resolve().parents[2]


def trial_name(row: str, seed: int) -> str:
    """A trial's name: its dir (trials/<name>/), its MLflow run, ``finetune.encoder: sweep:<name>``."""
    return f"{row}-s{seed}"


class StudyRow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    # the loss set: objective -> sampling ratio (a pretraining study's rows; none in a finetuning study's)
    tasks: dict[str, float] = {}
    pretrain: dict[str, Any] = {}  # other pretrain settings of this row (``masking``, ``wra_weight``, ...)
    # finetune settings of this row's downstream stages (merged into the pipeline's ``finetune`` section):
    # what a finetuning study's rows differ in (IAIS variants), or a pretraining study's rows' own
    finetune: dict[str, Any] = {}
    # The paper's delta to the baseline row on each metric (the table prints it beside ours); a note
    # says which table and row it comes from.
    paper: dict[str, float] = {}
    paper_note: str = ""

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not ROW_NAME.match(name):
            raise ValueError(f"row name {name!r}: letters, digits and _ . + - only, not starting with . or -")
        return name


class AshaConfig(BaseModel):
    """ASHA early stopping on the study metric: on for exploration, off for a final comparison (every seed of
    every row must finish). Its time attribute is the reported optimizer step, which survives a trial retry
    (Tune's ``training_iteration`` restarts at 1)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    grace_steps: int = Field(250, ge=1)  # no trial stops before this step
    reduction_factor: int = Field(2, ge=2)


# UNITER's Meta-Sum on the demo world's splits: VQA, Flickr30k IR and TR R@1 (finetuned), NLVR2 test-P,
# RefCOCO testA (UNITER's is RefCOCO+, which the world lacks).
UNITER_META_SUM = ("vqa/pretrained/val2014/vqa_score", "retrieval/flickr30k/pretrained/test/full/ir_r1",
                   "retrieval/flickr30k/pretrained/test/full/tr_r1", "nlvr2/pretrained/test1/nlvr2_acc",
                   "refcoco/pretrained/testA/refcoco_acc")
# Its retrieval part without finetuning: the zero-shot model's Flickr30k IR and TR R@1.
ZERO_SHOT_META_SUM = ("retrieval/flickr30k/zero_shot/test/full/ir_r1",
                      "retrieval/flickr30k/zero_shot/test/full/tr_r1")


class Downstream(BaseModel):
    """Rows evaluated downstream: each trial's encoder (or each row's best seed) through the finetune and eval
    stages of ``tasks`` (``finetune.encoder: sweep:<trial>``, cached per trial), compared by the
    ``sweep_downstream`` stage on ``meta_sum``: 100 x the sum of these eval metrics, named as the stages log
    them (``<task>/<variant>/<split>/<metric>``); by default, those of UNITER's Meta-Sum among the tasks."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = ["retrieval", "vqa", "nlvr2", "refcoco"]
    trials: Literal["every_seed", "best_seed"] = "every_seed"
    # false: no finetuning; eval_retrieval scores each trial's zero-shot model alone (eval.retrieval.finetuned
    # false): the only task with a zero-shot model, its metrics ``retrieval/<dataset>/zero_shot/...``
    # (LAViTeR's AIMCoS, which needs the world's objects on COCO's test split)
    finetune: bool = True
    # None: those of UNITER_META_SUM among the tasks (zero-shot: Flickr30k's zero-shot IR and TR R@1)
    meta_sum: list[str] | None = Field(None, min_length=1)
    # more eval metrics in the table, not summed (IAIS's ISDa); a trial may lack one (a row without the head)
    report: list[str] = []

    @model_validator(mode="after")
    def _consistent(self) -> Downstream:
        unknown = [t for t in self.tasks if t not in TASK_NAMES]
        if unknown or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks: {self.tasks}: each once, from {', '.join(TASK_NAMES)}")
        if not self.finetune and self.tasks != ["retrieval"]:
            raise ValueError(f"finetune: false evaluates zero-shot models, which only retrieval has; tasks "
                             f"{self.tasks} must be [retrieval]")
        if self.meta_sum is None and not self.finetune:
            self.meta_sum = list(ZERO_SHOT_META_SUM)
        if self.meta_sum is None:
            self.meta_sum = [m for m in UNITER_META_SUM if m.partition("/")[0] in self.tasks]
            if not self.meta_sum:
                raise ValueError(f"meta_sum: none of UNITER's Meta-Sum metrics is one of the tasks "
                                 f"{self.tasks}: name the metrics to sum")
        for field, names in (("meta_sum", self.meta_sum), ("report", self.report)):
            for name in names:
                if name.partition("/")[0] not in self.tasks:
                    raise ValueError(f"{field}: {name!r} is not a metric of the tasks {self.tasks} "
                                     "(<task>/<variant>/<split>/<metric>)")
        return self


class Study(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    # A pretraining study (the sweep stage: its rows are loss sets, each trial a Ray Tune pretraining run),
    # or a finetuning study (false): its rows are finetune settings, each trial the downstream stages of one
    # row and finetuning seed, starting from the pipeline's encoder (``finetune.encoder``); needs
    # ``downstream``.
    pretraining: bool = True
    # The pipeline config (its ``name``) the study is written for, when its rows build on that config's
    # pretrain section or data (CODIS's teacher and queues, UNITER's in-domain mix); another is refused.
    config: str | None = None
    rows: list[StudyRow] = Field(min_length=1)
    seeds: list[int] = Field([0], min_length=1)
    steps: int | None = Field(None, ge=1)  # optimizer steps per trial; None: pretrain.steps
    # Steps between validations; each is one report to Tune (and a checkpoint a retried trial resumes from).
    report_every: int | None = Field(None, ge=1)  # None: pretrain.validation.every
    baseline: str | None = None  # the row deltas are taken against (default: the first row)
    metric: str = "itm_acc"  # a validation metric every row reports: ASHA's and the best row's
    mode: Literal["max", "min"] = "max"
    table_metrics: list[str] = ["itm_acc", "zs_ir_r1", "zs_tr_r1"]
    asha: AshaConfig = Field(default_factory=AshaConfig)
    max_failures: int = Field(1, ge=0)  # Tune's retries of a trial whose run failed
    # Trials running at once; None: the cluster's CPUs over one trial's (workers x runtime.threads).
    max_concurrent_trials: int | None = Field(None, ge=1)
    downstream: Downstream | None = None  # rows evaluated downstream (the sweep_downstream stage)

    @model_validator(mode="after")
    def _consistent(self) -> Study:
        names = [r.name for r in self.rows]
        if len(set(names)) != len(names):
            raise ValueError(f"rows: a name appears twice: {names}")
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} is not a row (rows: {', '.join(names)})")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: a seed appears twice: {self.seeds}")
        if self.pretraining:
            untrained = [r.name for r in self.rows if not r.tasks]
            if untrained:
                raise ValueError(f"rows {untrained}: a pretraining study's row needs its loss set (tasks)")
            if self.downstream is not None and self.asha.enabled:
                raise ValueError("downstream: rows are compared downstream in a final comparison, where "
                                 "every trial finishes: set asha: {enabled: false}")
        else:
            trained = [r.name for r in self.rows if r.tasks or r.pretrain]
            if trained or self.downstream is None or self.downstream.trials != "every_seed":
                raise ValueError("pretraining: false (a finetuning study) needs downstream (every_seed) and "
                                 f"rows of finetune settings only; rows {trained} set tasks or pretrain")
            if not self.downstream.finetune:
                raise ValueError("pretraining: false (a finetuning study) finetunes: downstream.finetune "
                                 "must be true")
        return self

    def downstream_trials(self) -> list[str]:
        """What the downstream comparison finetunes: every trial (``<row>-s<seed>``) or every row (its best
        seed, resolved once the study ran)."""
        return list(self.downstream_overrides())

    def downstream_overrides(self) -> dict[str, tuple[str, ...]]:
        """Each downstream trial's config overrides: its encoder (a pretraining study's trial or row) or its
        finetuning seed (a finetuning study's), one root seed (the study's regions are the first seed's),
        and its row's finetune settings."""
        out: dict[str, tuple[str, ...]] = {}
        if self.downstream is None:
            return out
        zero_shot = () if self.downstream.finetune else ("eval.retrieval.finetuned=false",)
        for row in self.rows:
            settings = ("seeds=[]", *zero_shot, *dotted("finetune", row.finetune))
            if self.downstream.trials == "best_seed":
                out[row.name] = (f"finetune.encoder=sweep:{row.name}", *settings)
                continue
            for seed in self.seeds:
                trial = trial_name(row.name, seed)
                own = (f"finetune.encoder=sweep:{trial}" if self.pretraining
                       else f"finetune.common.seed={seed}")
                out[trial] = (own, *settings)
        return out

    @property
    def baseline_row(self) -> str:
        return self.baseline or self.rows[0].name


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The study: a path to its YAML file (relative paths: the working directory, then the repository), read
    # into the config when it loads; None: no study configured (``--stage sweep`` refuses to run).
    study: Study | None = None
    # The best trial's encoder is registered in MLflow's model registry under this name, alias ``champion``.
    registered_model: str = "vlp-encoder"

    @field_validator("study", mode="before")
    @classmethod
    def _read_file(cls, value: Any) -> Any:
        if not isinstance(value, str | Path):
            return value
        path = Path(value)
        if not path.is_absolute() and not path.exists():
            path = REPO_ROOT / path
        if not path.is_file():
            raise ValueError(f"study file {value} not found")
        try:
            return yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"study file {path}: not YAML ({' '.join(str(err).split())})") from None


def dotted(prefix: str, settings: dict[str, Any]) -> list[str]:
    """``settings`` as ``prefix.a.b=<JSON value>`` overrides (JSON is YAML: the override parser reads it)."""
    out = []
    for key, value in settings.items():
        path = f"{prefix}.{key}"
        out += dotted(path, value) if isinstance(value, dict) and value else [f"{path}={json.dumps(value)}"]
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def row_config(base: PretrainConfig, study: Study, row: StudyRow) -> PretrainConfig:
    """The pretraining config of one row: the pipeline's ``pretrain`` with the row's settings, its tasks, the
    study's step budget, and a report (validation + checkpoint) every ``report_every`` steps."""
    data = _merge(base.model_dump(mode="json"), row.pretrain)
    data["tasks"] = dict(row.tasks)
    if study.steps is not None:
        data["steps"] = study.steps
    every = study.report_every or data["validation"]["every"]
    data["validation"]["every"] = data["checkpoint_every"] = every
    return PretrainConfig.model_validate(data)


def check_rows(base: PretrainConfig, study: Study) -> None:
    """ASHA's grace period is within the budget, and every row's pretraining config is valid and reports the
    study metric; ValueError naming the field or the row."""
    if not study.pretraining:
        return
    steps = study.steps or base.steps
    if study.asha.enabled and study.asha.grace_steps >= steps:
        raise ValueError(f"asha.grace_steps ({study.asha.grace_steps}) must be below the step budget "
                         f"({steps})")
    for i, row in enumerate(study.rows):
        try:
            cfg = row_config(base, study, row)
        except ValueError as err:
            raise ValueError(f"rows[{i}] ({row.name}): {' '.join(str(err).split())}") from None
        needs, from_retrieval = metric_source(study.metric)
        if needs is not None and needs not in cfg.tasks:
            raise ValueError(f"rows[{i}] ({row.name}): the study metric {study.metric} needs the {needs} "
                             f"task, which the row does not train")
        if from_retrieval and not _reports_retrieval(cfg):
            raise ValueError(f"rows[{i}] ({row.name}): the study metric {study.metric} comes from the "
                             f"zero-shot retrieval validation (every validation.retrieval_every = "
                             f"{cfg.validation.retrieval_every} steps), which not every report ("
                             f"report_every = {cfg.validation.every}) runs: make report_every a "
                             "multiple of it")


# Metrics only the zero-shot retrieval validation writes (``vlp.train.validate``: ITM / ITC recall, LAViTeR's
# DAMSM recall, R-precision, Fréchet distances and captioning scores).
RETRIEVAL_METRICS = re.compile(r"zs_|r_precision|frechet_|bleu\d|cider$")
# The zero-shot recall a task's head scores (``zs_itc_rerank_*`` shortlists by ITC, then ranks by ITM), most
# specific prefix first; ``zs_damsm_*`` comes from the vta or the laviter task, so its name does not say.
_RECALL_TASKS = (("zs_damsm_", None), ("zs_itc_", "itc"), ("zs_", "itm"))


def metric_source(metric: str) -> tuple[str | None, bool]:
    """Where a validation metric comes from: the task it needs (``<task>_acc``, the recall prefixes above;
    None when the name does not say: checked against the first report instead), and whether only the
    zero-shot retrieval validation writes it."""
    from_retrieval = RETRIEVAL_METRICS.match(metric) is not None
    task = next((t for prefix, t in _RECALL_TASKS if metric.startswith(prefix)), None)
    if task is None and metric.removesuffix("_acc") in OBJECTIVES:  # not owa_topk_acc (owa's)
        task = metric.removesuffix("_acc")
    return task, from_retrieval


def _reports_retrieval(cfg: PretrainConfig) -> bool:
    """Every report (each ``validation.every`` steps and the last step) runs the retrieval validation."""
    every, retrieval = cfg.validation.every, cfg.validation.retrieval_every
    return every >= cfg.steps or (retrieval > 0 and every % retrieval == 0)
