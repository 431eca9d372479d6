"""The ``eval_<task>`` stages (one cached stage per task) and the ``eval`` aggregate.

``eval_<task>`` evaluates every finetuned variant of ``finetune_<task>`` on the task's ``eval.splits`` and
writes ``metrics.json`` = ``{variant: {section: {metric: value}}}`` plus each variant's predictions
(``<variant>/<split>_predictions.json``). Sections are splits; RefCOCO puts the detected-region accuracy
(``refcoco_acc``) and the ground-truth-region accuracy (``refcoco_gt_acc``, features pooled at the COCO
instance boxes into ``gt_img_db/``) side by side. Retrieval adds the zero-shot model (the pretrained
encoder with its ITM head), scores each test split in every ``eval.retrieval.modes`` (sections
``test/full``, ``test/shortlist``: recall@1/5/10, Meta-Sum, seconds, pairs scored), measures ISDa on
Flickr30k Entities (section ``isda``) and draws ``figures/recall_<dataset>.png`` and
``figures/attention_<dataset>_<split>.png`` (one row of pairs per model).

``eval`` reads the ``eval_<task>`` of every task in ``finetune.tasks`` and writes ``metrics.json`` (all of
them), ``summary.json`` / ``summary.md`` (stages/eval/summary.py) and copies the figures, all logged to
MLflow as artifacts.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from stages.base import StageContext, StageError, StageResult
from stages.eval import figures
from stages.eval.config import EvalConfig
from stages.eval.gt_regions import build_gt_store
from stages.eval.retrieval import (
    attention_maps,
    entity_sentences,
    flickr_sizes,
    isda_of,
    log_summary,
    score_modes,
)
from stages.eval.summary import build_summary, to_markdown
from stages.feature_extraction.stage import detector_weights
from stages.finetune.checkpoint import Pretrained, load_finetuned, load_head
from stages.finetune.data import (
    image_sizes,
    open_store,
    retrieval_data,
    retrieval_db_dirs,
    task_data,
    task_tables,
)
from stages.finetune.loop import evaluate_dataset, make_autocast
from stages.finetune.stage import STORE, device_of, read_variants
from vlp.data.img_db import ImgDb
from vlp.data.tokenizer import load_tokenizer
from vlp.tasks import TASKS
from vlp.tasks.retrieval import PairScorer, Retrieval

METRICS = "metrics.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
FIGURES = "figures"
GT_STORE = "gt_img_db"
SKIP_SETTING = "eval.common.skip_missing_images"
ISDA_SECTION = "isda"
Metrics = dict[str, dict[str, dict[str, float]]]


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")


def _head_for(task: str, model, record: dict[str, Any], data: Any, directory: Path):
    try:
        head = TASKS[task](model.config, **record["options"], **data.head_options)
        head.check_state_extra(record["state_extra"])
    except ValueError as err:
        raise StageError(f"{directory}: {' '.join(str(err).split())}") from None
    return head


def gt_store(ctx: StageContext, splits: list[str], nbb: tuple[float, int, int]) -> ImgDb:
    """RefCOCO's ground-truth region store for the images of ``splits``, built into the stage output."""
    table = pq.read_table(task_tables("refcoco", ctx.inputs) / "task_refcoco.parquet",
                          columns=["image_key", "split"]).to_pylist()
    keys = {r["image_key"] for r in table if r["split"] in splits}
    weights = detector_weights(ctx, ctx.cfg.features)
    out = ctx.out_dir / GT_STORE
    count = build_gt_store(keys, ctx.inputs["download"], ctx.cfg.features, weights, out, nbb)
    ctx.log.info("eval_refcoco: ground-truth regions of %d images pooled into %s", count, GT_STORE)
    return open_store(ctx.out_dir / GT_STORE, nbb, "ground-truth region store")


def eval_task(ctx: StageContext, task: str, cfg: EvalConfig, pre: Pretrained, img_db: ImgDb, ft_dir: Path,
              variants: list[dict[str, Any]]) -> tuple[Metrics, list[str]]:
    common = cfg.common
    device, autocast = device_of(), make_autocast(common.precision, device_of())
    options = variants[0]["options"]
    extra: dict[str, Any] = {}
    stores = {"": img_db}
    if task == "refcoco":
        extra["image_sizes"] = image_sizes(task, ctx.inputs)
        stores["_gt"] = gt_store(ctx, cfg.splits_of(task), common.nbb)
    data = {}
    for split in cfg.splits_of(task):
        for suffix, store in stores.items():
            gt = {"gt_img_db": store} if suffix else {}
            data[split, suffix] = task_data(task, split, ctx.inputs, img_db, pre.tokenizer_dir, options,
                                            common.skip_missing_images, ctx.log, SKIP_SETTING, **extra, **gt)
    metrics: Metrics = {}
    for variant in variants:
        directory = ft_dir / variant["name"]
        model, state, record = load_finetuned(directory)
        model.to(device)
        sections: dict[str, dict[str, float]] = {}
        for (split, suffix), split_data in data.items():
            head = _head_for(task, model, record, split_data, directory)
            load_head(head, state, directory)
            head.to(device)
            values, predictions = evaluate_dataset(model, head, split_data, common.batch_units, device=device,
                                                   autocast=autocast, setting="eval.common.batch_units")
            # The ground-truth run's loss would overwrite the detected run's: only its accuracy is kept.
            sections.setdefault(split, {}).update(
                {k: v for k, v in values.items() if not (suffix and k.endswith("_loss"))})
            _write_json(ctx.out_dir / variant["name"] / f"{split}{suffix}_predictions.json", predictions)
            ctx.log.info("eval_%s: %s %s%s: %s", task, variant["name"], split, suffix,
                         ", ".join(f"{k}={v:.4f}" for k, v in sorted(values.items())))
        metrics[variant["name"]] = sections
    if "_gt" in stores:
        stores["_gt"].close()
    return metrics, []


def _retrieval_models(dataset: str, variants: list[dict[str, Any]], ft_dir: Path, pre: Pretrained,
                      zero_shot: bool):
    """(name, encoder, rank head) of the zero-shot model and of each finetuned variant of ``dataset``."""
    if zero_shot:
        model = pre.encoder("pretrained", None, 0)
        head = Retrieval(model.config)
        try:
            head.init_from_itm(pre.heads(), str(pre.model_dir / "heads.pt"))
        except ValueError as err:
            raise StageError(str(err)) from None
        yield f"{dataset}/zero_shot", model, head
    for variant in variants:
        if variant["dataset"] != dataset:
            continue
        directory = ft_dir / variant["name"]
        model, state, record = load_finetuned(directory)
        try:
            head = Retrieval(model.config, **record["state_extra"])
        except (TypeError, ValueError) as err:
            raise StageError(f"{directory}: not a retrieval checkpoint ({err})") from None
        load_head(head, state, directory)
        yield variant["name"], model, head


def eval_retrieval(ctx: StageContext, cfg: EvalConfig, pre: Pretrained, img_db: ImgDb, ft_dir: Path,
                   variants: list[dict[str, Any]]) -> tuple[Metrics, list[str]]:
    rcfg, common = cfg.retrieval, cfg.common
    device, autocast = device_of(), make_autocast(common.precision, device_of())
    tokenizer = load_tokenizer(pre.tokenizer_dir)
    sentences = entity_sentences(ctx.inputs["dedup"], rcfg.isda_splits, img_db, rcfg.isda_max_sentences)
    sizes = flickr_sizes(ctx.inputs["dedup"], sentences) if sentences else {}
    if not sentences:
        ctx.log.warning("eval_retrieval: no Flickr30k Entities sentence of splits %s has two boxed phrases "
                        "and an image in the store: no ISDa", list(rcfg.isda_splits))
    metrics: Metrics = {}
    artifacts: list[str] = []
    for dataset in dict.fromkeys(v["dataset"] for v in variants):
        data_cfg = next(v["data"] for v in variants if v["dataset"] == dataset)
        for split in cfg.splits_of("retrieval"):
            if split not in data_cfg:
                known = ", ".join(k for k in data_cfg if k != "max_txt_len")
                raise StageError(f"eval.splits.retrieval: split {split!r} is not one of the retrieval "
                                 f"dataset {dataset!r}'s dbs ({known})")
            names = data_cfg[split] if isinstance(data_cfg[split], list) else [data_cfg[split]]
            test = retrieval_data(retrieval_db_dirs(ctx.inputs), names, f"{dataset} {split}", img_db,
                                  max_txt_len=data_cfg["max_txt_len"], skip=common.skip_missing_images,
                                  log=ctx.log, setting=SKIP_SETTING)
            texts = [test.text(j) for j in range(len(test))]
            curves, maps = {}, {}
            for name, model, head in _retrieval_models(dataset, variants, ft_dir, pre, rcfg.zero_shot):
                model.to(device)
                head.to(device)
                scorer = PairScorer(model, head, img_db, test.index.img_keys, texts, pad_id=test.pad_id,
                                    device=device, autocast=autocast, release_every=rcfg.release_every)
                results = score_modes(scorer, test.index.txt2img, rcfg)
                log_summary(ctx.log, name, results)
                sections = metrics.setdefault(name, {})
                sections |= {f"{split}/{mode}": r.metrics for mode, r in results.items()}
                kind = name.rpartition("/")[2]
                curves[kind] = next(iter(results.values())).curve
                if sentences and ISDA_SECTION not in sections:
                    sections[ISDA_SECTION] = isda_of(scorer, sentences, sizes, tokenizer, test.pairs.meta,
                                                     data_cfg["max_txt_len"])
                    ctx.log.info("eval_retrieval: %s ISDa %s", name, sections[ISDA_SECTION])
                if rcfg.attention_pairs:
                    maps[kind] = attention_maps(scorer, test.index.txt2img, tokenizer, rcfg.attention_pairs)
            if maps:
                path = ctx.out_dir / FIGURES / f"attention_{dataset}_{split}.png"
                figures.attention_maps(maps, path, f"{dataset} {split}: last-layer text-to-image attention")
                artifacts.append(str(path.relative_to(ctx.out_dir)))
            path = figures.recall_curves(curves, ctx.out_dir / FIGURES / f"recall_{dataset}_{split}.png",
                                         f"{dataset} {split}: recall@K ({cfg.retrieval.modes[0]} scoring)")
            artifacts.append(str(path.relative_to(ctx.out_dir)))
    return metrics, artifacts


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``a/b/c -> value`` for every finite number of a nested dict (MLflow metric names)."""
    out = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten(value, f"{name}/")
        elif isinstance(value, int | float) and value == value and abs(value) != float("inf"):
            out[name] = float(value)
    return out


def run_task(ctx: StageContext, task: str) -> StageResult:
    cfg: EvalConfig = ctx.cfg.eval
    torch.set_num_threads(cfg.common.threads)
    pre = Pretrained(ctx.inputs["pretrain"])
    ft_dir = ctx.inputs[f"finetune_{task}"]
    variants = read_variants(ft_dir)
    if not variants:
        raise StageError(f"{ft_dir}: finetune_{task} produced no variant to evaluate")
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    img_db = open_store(ctx.inputs["features"] / STORE, cfg.common.nbb)
    try:
        if task == "retrieval":
            metrics, artifacts = eval_retrieval(ctx, cfg, pre, img_db, ft_dir, variants)
        else:
            metrics, artifacts = eval_task(ctx, task, cfg, pre, img_db, ft_dir, variants)
    finally:
        img_db.close()
    _write_json(ctx.out_dir / METRICS, metrics)
    return StageResult(metrics=flatten(metrics), params={"task": task, "splits": cfg.splits_of(task)},
                       artifacts=[METRICS, *artifacts])


def run(ctx: StageContext) -> StageResult:
    """The aggregate: all tasks' metrics, the summary table and the figures in one place."""
    tasks = ctx.cfg.finetune.tasks
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    metrics, artifacts = {}, [METRICS, SUMMARY_JSON, SUMMARY_MD]
    for task in tasks:
        source = ctx.inputs[f"eval_{task}"]
        try:
            metrics[task] = json.loads((source / METRICS).read_text())
        except (OSError, ValueError) as err:
            raise StageError(f"{source / METRICS}: cannot read eval_{task}'s metrics ({err})") from None
        for png in sorted((source / FIGURES).glob("*.png")):
            target = ctx.out_dir / FIGURES / png.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, target)
            artifacts.append(str(target.relative_to(ctx.out_dir)))
    summary = build_summary(metrics)
    _write_json(ctx.out_dir / METRICS, metrics)
    _write_json(ctx.out_dir / SUMMARY_JSON, summary)
    (ctx.out_dir / SUMMARY_MD).write_text(to_markdown(summary))
    ctx.log.info("eval: summary\n%s", to_markdown(summary))
    return StageResult(metrics=flatten(metrics), params={"tasks": list(tasks)}, artifacts=artifacts)
