"""The ``finetune_<task>`` stages (one cached stage per downstream task) and the ``finetune`` aggregate.

``finetune_<task>`` finetunes the task from each configured initialisation (``finetune.common.init``:
the pretrained encoder, the same architecture from scratch, or both) and writes one variant dir per run
(layout in ``stages/finetune/checkpoint.py``)::

    <variant>/            pretrained/, scratch/; retrieval: <dataset>/pretrained/, <dataset>/scratch/ and,
                          with IAIS on and iais.compare, <dataset>/pretrained_no_iais/
    variants.json         every variant: dir, init, IAIS, steps, seconds, last validation metrics

Curves go to the stage's MLflow run as ``<variant>/train/...`` and ``<variant>/val/...``. Inputs: ``pretrain``
(encoder, ITM head, tokenizer), ``features`` (regions), and the task's data: ``txtdb`` (retrieval), ``dedup``
(VQA, NLVR2, SNLI-VE tables) or ``download`` (RefCOCO: tables and image sizes).

``finetune`` depends on the ``finetune_<task>`` of every task in ``finetune.tasks`` and writes
``finetune.json``: each task's output dir and variants.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from stages.base import StageContext, StageError, StageResult
from stages.finetune.checkpoint import Pretrained, save_finetuned
from stages.finetune.config import CommonConfig, FinetuneConfig, RetrievalConfig, TrainConfig
from stages.finetune.data import image_sizes, open_store, retrieval_data, retrieval_db_dirs, task_data
from stages.finetune.loop import evaluate_dataset, fit, make_autocast
from vlp.data.img_db import ImgDb
from vlp.eval.retrieval import recall_at_k, score_all_pairs
from vlp.tasks import TASKS
from vlp.tasks.retrieval import PairScorer, Retrieval, RetrievalDataset

VARIANTS_FILE = "variants.json"
INDEX_FILE = "finetune.json"
STORE = "img_db"


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


def device_of() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _logger(ctx: StageContext, prefix: str):
    def log(metrics: dict[str, float], step: int) -> None:
        ctx.log_metrics({f"{prefix}/{k}": v for k, v in metrics.items()}, step)

    return log


def retrieval_scorer(model, head: Retrieval, data: RetrievalDataset, img_db: ImgDb, device: torch.device,
                     autocast) -> PairScorer:
    texts = [data.text(j) for j in range(len(data))]
    return PairScorer(model, head, img_db, data.index.img_keys, texts, pad_id=data.pad_id, device=device,
                      autocast=autocast)


def finetune_retrieval(ctx: StageContext, variant: Variant, cfg: FinetuneConfig, pre: Pretrained,
                       img_db: ImgDb, val: RetrievalDataset) -> dict[str, Any]:
    common, rcfg = cfg.common, cfg.retrieval
    device, autocast = device_of(), make_autocast(common.precision, device_of())
    # Built per variant: its negative sampler starts from the same seed in every variant.
    train = retrieval_data(retrieval_db_dirs(ctx.inputs), rcfg.datasets[variant.dataset].train,
                           f"{variant.dataset} {rcfg.train_split}", img_db, max_txt_len=rcfg.max_txt_len,
                           skip=common.skip_missing_images, log=ctx.log, neg_samples=rcfg.neg_samples,
                           seed=common.seed)
    model = pre.encoder(variant.init, common.dropout, common.seed)
    head = Retrieval(model.config, margin=rcfg.margin, hard_negatives=rcfg.hard_negatives,
                     iais=rcfg.iais.loss_config() if variant.iais else None, iais_weight=rcfg.iais.weight)
    if variant.init == "pretrained":
        try:
            head.init_from_itm(pre.heads(), str(pre.model_dir / "heads.pt"))
        except ValueError as err:
            raise StageError(str(err)) from None
    model.to(device)
    head.to(device)
    scorer = retrieval_scorer(model, head, val, img_db, device, autocast)
    n_img, n_txt = len(val.index.img_keys), len(val)

    def validate() -> dict[str, float]:
        return recall_at_k(score_all_pairs(scorer, n_img, n_txt, *rcfg.val_chunk), val.index.txt2img)

    return _fit_and_save(ctx, "retrieval", variant, rcfg, common, model, head, train, validate, device,
                         autocast)


def finetune_task(ctx: StageContext, task: str, variant: Variant, cfg: FinetuneConfig, pre: Pretrained,
                  train: Any, val: Any) -> dict[str, Any]:
    common, tcfg = cfg.common, cfg.task(task)
    device, autocast = device_of(), make_autocast(common.precision, device_of())
    model = pre.encoder(variant.init, common.dropout, common.seed)
    torch.manual_seed(common.seed + 1)
    try:
        head = TASKS[task](model.config, **tcfg.options, **train.head_options)
    except ValueError as err:
        raise StageError(f"finetune.{task}.options: {err}") from None
    head.adapt_encoder(model)
    model.to(device)
    head.to(device)

    def validate() -> dict[str, float]:
        return evaluate_dataset(model, head, val, tcfg.batch_units, device=device, autocast=autocast,
                                setting=f"finetune.{task}.batch_units")[0]

    return _fit_and_save(ctx, task, variant, tcfg, common, model, head, train, validate, device, autocast)


def _fit_and_save(ctx: StageContext, task: str, variant: Variant, tcfg: TrainConfig, common: CommonConfig,
                  model, head, train, validate, device: torch.device, autocast) -> dict[str, Any]:
    ctx.log.info("finetune_%s: %s: %d training examples", task, variant.name, len(train))
    result = fit(model, head, train, tcfg, seed=common.seed, log_every=common.log_every, device=device,
                 autocast=autocast, validate=validate, log=_logger(ctx, variant.name),
                 setting=f"finetune.{task}")
    main = head.metric
    ctx.log.info("finetune_%s: %s: %d steps in %.1fs, val %s=%.4f", task, variant.name, result.steps,
                 result.seconds, main, result.final_val.get(main, float("nan")))
    record = {"task": task, **asdict(variant), "steps": result.steps, "seconds": round(result.seconds, 3),
              "train_examples": len(train), "val": result.final_val, "metric": main,
              "state_extra": head.state_extra(), "options": dict(tcfg.options)}
    if isinstance(tcfg, RetrievalConfig):  # the eval stage reads the same dbs' test split
        record["data"] = {**tcfg.datasets[variant.dataset].model_dump(), "max_txt_len": tcfg.max_txt_len}
    save_finetuned(ctx.out_dir / variant.name, model.cpu(), head.cpu(), record, result.curves)
    return record


def run_task(ctx: StageContext, task: str) -> StageResult:
    cfg: FinetuneConfig = ctx.cfg.finetune
    torch.set_num_threads(cfg.common.threads)
    pre = Pretrained(ctx.inputs["pretrain"])
    img_db = open_store(ctx.inputs["features"] / STORE, cfg.common.nbb)
    common, tcfg = cfg.common, cfg.task(task)
    records = []
    try:
        if task == "retrieval":
            vals = {name: retrieval_data(retrieval_db_dirs(ctx.inputs), [dbs.val], f"{name} {tcfg.val_split}",
                                         img_db, max_txt_len=cfg.retrieval.max_txt_len,
                                         skip=common.skip_missing_images, log=ctx.log)
                    for name, dbs in cfg.retrieval.datasets.items()}
            for variant in variants_of(task, cfg):
                records.append(finetune_retrieval(ctx, variant, cfg, pre, img_db, vals[variant.dataset]))
        else:
            extra = {"image_sizes": image_sizes(task, ctx.inputs)} if task == "refcoco" else {}
            train, val = (task_data(task, split, ctx.inputs, img_db, pre.tokenizer_dir, tcfg.options,
                                    common.skip_missing_images, ctx.log, **extra)
                          for split in (tcfg.train_split, tcfg.val_split))
            for variant in variants_of(task, cfg):
                records.append(finetune_task(ctx, task, variant, cfg, pre, train, val))
    finally:
        img_db.close()
    (ctx.out_dir / VARIANTS_FILE).write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
    metrics = {f"{r['name']}.val.{k}": float(v) for r in records for k, v in r["val"].items()}
    metrics |= {f"{r['name']}.steps": float(r["steps"]) for r in records}
    return StageResult(metrics=metrics, params={"task": task, "variants": [r["name"] for r in records]},
                       artifacts=[VARIANTS_FILE])


def read_variants(task_dir: Path) -> list[dict[str, Any]]:
    path = task_dir / VARIANTS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise StageError(f"{path}: cannot read the finetuned variants ({err})") from None


def run(ctx: StageContext) -> StageResult:
    """The aggregate: an index of every configured task's finetune output."""
    cfg: FinetuneConfig = ctx.cfg.finetune
    index = {task: {"dir": str(ctx.inputs[f"finetune_{task}"]),
                    "variants": read_variants(ctx.inputs[f"finetune_{task}"])} for task in cfg.tasks}
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    (ctx.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    metrics = {f"{task}.{v['name']}.val.{v['metric']}": float(v["val"][v["metric"]])
               for task, entry in index.items() for v in entry["variants"] if v["metric"] in v["val"]}
    return StageResult(metrics=metrics, params={"tasks": list(cfg.tasks)}, artifacts=[INDEX_FILE])
