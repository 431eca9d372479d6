"""The ``finetune_<task>`` stages: one cached stage per downstream task (output layout in
``stages/outputs/finetune.py``).

``finetune_<task>`` finetunes the task from each configured initialisation (``finetune.common.init``: the
pretrained encoder, the same architecture from scratch, or both) and writes one variant dir per run:
``pretrained/``, ``scratch/``; retrieval ``<dataset>/pretrained/``, ``<dataset>/scratch/`` and, with IAIS on
and ``iais.compare``, ``<dataset>/pretrained_no_iais/``. Every variant starts from the same seeds (derived
from the root seed and the task), so variants differ only in what they are meant to.

Curves go to the stage's MLflow run as ``<variant>/train/...`` and ``<variant>/val/...``; the final metrics
are the last validation, ``<variant>/val/<metric>``. Inputs: ``pretrain`` or (``finetune.encoder``)
``sweep`` (encoder, ITM head, tokenizer), ``features`` (regions), and the task's data: ``txtdb`` and
``karpathy_txtdb`` (retrieval), ``dedup`` (VQA, NLVR2, SNLI-VE tables) or ``download`` (RefCOCO: tables
and image sizes) and ``gt_features`` (RefCOCO's training regions at the COCO instance boxes,
``finetune.refcoco.train_regions``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from stages.base import StageContext, StageError, StageResult
from stages.finetune.config import FinetuneConfig, HeadTaskConfig, TrainConfig
from stages.finetune.loop import fit
from stages.outputs.encoder import encoder_name, pretrained_input
from stages.outputs.features import FeaturesOutput
from stages.outputs.finetune import FinetuneOutput
from stages.outputs.pretrain import PretrainOutput
from stages.outputs.txt_db import TxtDbOutput, find_dbs
from vlp.data.img_db import ImgDb
from vlp.eval.retrieval import recall_at_k, score_all_pairs
from vlp.model import UniterModel
from vlp.tasks.common import TaskDataError
from vlp.tasks.registry import TASKS
from vlp.tasks.retrieval import PairScorer, Retrieval, RetrievalDataset
from vlp.tasks.splits import retrieval_split, task_image_sizes, task_split
from vlp.train.device import default_device
from vlp.train.evaluate import BatchBudgetError, evaluate_dataset
from vlp.train.precision import Autocast, mixed_precision
from vlp.train.runtime import RuntimeConfig
from vlp.train.seeds import seed_of

SKIP_SETTING = "runtime.skip_missing_images"


@dataclass(frozen=True)
class Variant:
    name: str  # its dir under the stage output, and its prefix in MLflow
    init: str  # pretrained | scratch
    iais: bool = False
    dataset: str | None = None  # retrieval dataset


def variants_of(task: str, cfg: FinetuneConfig) -> list[Variant]:
    inits = cfg.common.inits
    if task != "retrieval":
        return [Variant(init, init) for init in inits]
    iais = cfg.retrieval.iais
    out = []
    for dataset in cfg.retrieval.datasets:
        out += [Variant(f"{dataset}/{init}", init, iais.enabled, dataset) for init in inits]
        if iais.enabled and iais.compare and "pretrained" in inits:
            out.append(Variant(f"{dataset}/pretrained_no_iais", "pretrained", False, dataset))
    return out


@dataclass
class Setup:
    """What every variant of a task shares."""

    ctx: StageContext
    task: str
    cfg: FinetuneConfig
    runtime: RuntimeConfig
    seed: int  # the task's, derived from the root seed
    pre: PretrainOutput
    out: FinetuneOutput
    img_db: ImgDb
    device: torch.device
    autocast: Autocast

    def encoder(self, variant: Variant) -> tuple[UniterModel, dict[str, Tensor] | None]:
        """The encoder a variant starts from, and (pretrained) the pretrained objective heads."""
        dropout = self.cfg.common.dropout
        if variant.init == "pretrained":
            model = self.pre.model(dropout)
            return model.encoder, model.objectives.state_dict()
        torch.manual_seed(seed_of(self.seed, "init"))
        return UniterModel(self.pre.encoder_config(dropout)), None


def retrieval_scorer(model, head: Retrieval, data: RetrievalDataset, img_db: ImgDb, device: torch.device,
                     autocast: Autocast) -> PairScorer:
    texts = [data.text(j) for j in range(len(data))]
    return PairScorer(model, head, img_db, data.index.img_keys, texts, pad_id=data.pad_id, device=device,
                      autocast=autocast)


def finetune_retrieval(s: Setup, variant: Variant, val: RetrievalDataset) -> dict[str, Any]:
    rcfg = s.cfg.retrieval
    dbs = rcfg.datasets[variant.dataset]
    split = f"{variant.dataset} {rcfg.train_split}"
    # Built per variant: its negative sampler starts from the same seed in every variant.
    train = retrieval_split(find_dbs(retrieval_dbs(s.ctx), dbs.train, f"task retrieval split {split}"), split,
                            s.img_db, skip=s.runtime.skip_missing_images, setting=SKIP_SETTING, log=s.ctx.log,
                            neg_samples=rcfg.neg_samples, seed=seed_of(s.seed, "negatives"), sides=rcfg.sides)
    model, heads = s.encoder(variant)
    torch.manual_seed(seed_of(s.seed, "head"))
    head = Retrieval(model.config, margin=rcfg.margin, hard_negatives=rcfg.hard_negatives,
                     iais=rcfg.iais.loss_config() if variant.iais else None, iais_weight=rcfg.iais.weight,
                     sides=rcfg.sides)
    if heads is not None:
        try:
            head.init_from_itm(heads, str(s.pre.model_dir / "heads.pt"))
        except ValueError as err:
            raise StageError(str(err)) from None
    model.to(s.device)
    head.to(s.device)
    scorer = retrieval_scorer(model, head, val, s.img_db, s.device, s.autocast)
    n_img, n_txt = len(val.index.img_keys), len(val)

    def validate() -> dict[str, float]:
        return recall_at_k(score_all_pairs(scorer, n_img, n_txt, *rcfg.val_chunk), val.index.txt2img)

    # The eval stage reads the same dbs' test split.
    return _fit(s, variant, rcfg, model, head, train, validate, {"data": dbs.model_dump()})


def finetune_task(s: Setup, variant: Variant, train: Any, val: Any) -> dict[str, Any]:
    tcfg: HeadTaskConfig = s.cfg.task(s.task)
    model, _ = s.encoder(variant)
    torch.manual_seed(seed_of(s.seed, "head"))
    try:
        head = TASKS[s.task](model.config, **tcfg.task_options(), **train.head_options)
    except ValueError as err:
        raise StageError(f"finetune.{s.task}.options: {err}") from None
    head.adapt_encoder(model)
    model.to(s.device)
    head.to(s.device)

    def validate() -> dict[str, float]:
        return evaluate_dataset(model, head, val, tcfg.batch_units, device=s.device, autocast=s.autocast,
                                setting=f"finetune.{s.task}.batch_units")[0]

    return _fit(s, variant, tcfg, model, head, train, validate, {"options": tcfg.task_options()})


def _fit(s: Setup, variant: Variant, tcfg: TrainConfig, model, head, train, validate,
         extra: dict[str, Any]) -> dict[str, Any]:
    task, ctx = s.task, s.ctx
    ctx.log.info("finetune_%s: %s: %d training examples", task, variant.name, len(train))

    def log(metrics: dict[str, float], step: int) -> None:
        ctx.log_metrics({f"{variant.name}/{k}": v for k, v in metrics.items()}, step)

    result = fit(model, head, train, tcfg, seed=s.seed, log_every=s.cfg.common.log_every, device=s.device,
                 autocast=s.autocast, validate=validate, log=log, setting=f"finetune.{task}")
    main = head.metric
    ctx.log.info("finetune_%s: %s: %d steps in %.1fs, val %s=%.4f", task, variant.name, result.steps,
                 result.seconds, main, result.final_val.get(main, float("nan")))
    record = {"task": task, **asdict(variant), "steps": result.steps, "seconds": round(result.seconds, 3),
              "train_examples": len(train), "val": result.final_val, "metric": main,
              "state_extra": head.state_extra(), **extra}
    s.out.save_variant(model.cpu(), head.cpu(), record, result.curves)
    return record


def retrieval_dbs(ctx: StageContext) -> list[TxtDbOutput]:
    """Where retrieval text dbs are looked up by name: the txtdb stage's, then karpathy_txtdb's."""
    return [TxtDbOutput(ctx.inputs["txtdb"]), TxtDbOutput(ctx.inputs["karpathy_txtdb"])]


def _variants(s: Setup) -> list[dict[str, Any]]:
    task, cfg, runtime, ctx = s.task, s.cfg, s.runtime, s.ctx
    tcfg = cfg.task(task)
    if task == "retrieval":
        vals = {}
        for name, dbs in cfg.retrieval.datasets.items():
            split = f"{name} {tcfg.val_split}"
            paths = find_dbs(retrieval_dbs(ctx), [dbs.val], f"task retrieval split {split}")
            vals[name] = retrieval_split(paths, split, s.img_db, skip=runtime.skip_missing_images,
                                         setting=SKIP_SETTING, log=ctx.log)
        return [finetune_retrieval(s, variant, vals[variant.dataset]) for variant in variants_of(task, cfg)]
    # RefCOCO's table is the download stage's: dedup drops the COCO instances of its evaluation images.
    tables = ctx.inputs["download" if task == "refcoco" else "dedup"] / "tables"
    extra = {"image_sizes": task_image_sizes(task, tables, ctx.inputs["download"] / "images")} \
        if task == "refcoco" else {}
    gt_store = None
    if task == "refcoco" and cfg.refcoco.train_regions == "gt":
        gt_store = FeaturesOutput(ctx.inputs["gt_features"]).img_db()  # UNITER trains on the annotated boxes
    try:
        train_extra = extra | ({"gt_img_db": gt_store} if gt_store is not None else {})
        train, val = (task_split(task, tables, s.img_db, s.pre.tokenizer_dir, split, tcfg.task_options(),
                                 skip=runtime.skip_missing_images, setting=SKIP_SETTING, log=ctx.log, **more)
                      for split, more in ((tcfg.train_split, train_extra), (tcfg.val_split, extra)))
        return [finetune_task(s, variant, train, val) for variant in variants_of(task, cfg)]
    finally:
        if gt_store is not None:
            gt_store.close()


def run_task(ctx: StageContext, task: str) -> StageResult:
    runtime: RuntimeConfig = ctx.cfg.runtime
    torch.set_num_threads(runtime.threads)
    device = default_device()
    img_db = FeaturesOutput(ctx.inputs["features"]).img_db()
    out = FinetuneOutput(ctx.out_dir)
    seed = ctx.cfg.seed if ctx.cfg.finetune.common.seed is None else ctx.cfg.finetune.common.seed
    s = Setup(ctx, task, ctx.cfg.finetune, runtime, seed_of(seed, "finetune", task),
              pretrained_input(ctx.inputs, ctx.cfg.finetune.encoder), out, img_db, device,
              mixed_precision(runtime.precision, device, loss_scaling=False))
    try:
        records = _variants(s)
    except (TaskDataError, BatchBudgetError) as err:
        raise StageError(str(err)) from None
    finally:
        img_db.close()
    out.write_variants(records)
    final = {f"{r['name']}/val/{k}": float(v) for r in records for k, v in r["val"].items()}
    steps = {f"{r['name']}/val/{k}": r["steps"] for r in records for k in r["val"]}
    final |= {f"{r['name']}/steps": float(r["steps"]) for r in records}
    return StageResult(metrics=final, params={"task": task, "variants": [r["name"] for r in records],
                                              "encoder": encoder_name(s.pre, ctx.cfg.finetune.encoder)},
                       artifacts=[out.variants_path.name], metric_steps=steps)
