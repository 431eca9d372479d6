"""The ``eval_<task>`` stages: one cached stage per task (output layout in ``stages/outputs/eval.py``).

``eval_<task>`` evaluates every finetuned variant of ``finetune_<task>`` on the task's ``eval.splits`` and
writes ``metrics.json`` = ``{variant: {section: {metric: value}}}`` plus each variant's predictions. Sections
are splits; RefCOCO puts the detected-region accuracy (``refcoco_acc``) and the ground-truth-region accuracy
(``refcoco_gt_acc``, on the gt_features stage's regions at the COCO instance boxes) side by side. A VQA test
split (test-dev2015 / test2015: no answers) gets no metrics but the evaluation server's results file
(``EvalOutput.vqa_results_path``). GQA adds its official metrics over the whole split (``vlp.eval.gqa``:
validity / plausibility where the split has scene graphs), the server's submission file of its server tiers
(testdev) and ``figures/attention_gqa_<split>.png``. Retrieval adds the zero-shot model (the pretrained
encoder with its ITM head), scores each test split in every ``eval.retrieval.modes`` (sections
``test/full``, ``test/shortlist``, ``test/itc_shortlist`` for a zero-shot model with the itc head:
recall@1/5/10, Meta-Sum, seconds, pairs scored), measures ISDa on Flickr30k Entities (section ``isda``) and
draws
``figures/recall_<dataset>_<split>.png`` and ``figures/attention_<dataset>_<split>.png`` (one row of pairs
per model); with ``eval.retrieval.finetuned`` false it evaluates the zero-shot model alone, without
``finetune_retrieval``. The MLflow metrics are ``<variant>/<section>/<metric>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from stages.base import StageContext, StageError, StageResult
from stages.eval import figures
from stages.eval.config import EvalConfig, finetuned_input
from stages.eval.laviter import laviter_sections, object_classes
from stages.eval.retrieval import (
    attention_maps,
    isda_inputs,
    isda_of,
    log_summary,
    score_modes,
)
from stages.outputs.encoder import encoder_name, pretrained_input
from stages.outputs.eval import EvalOutput, Metrics, flatten, write_json
from stages.outputs.features import EntityFeaturesOutput, FeaturesOutput
from stages.outputs.finetune import FinetuneOutput
from stages.outputs.pretrain import PretrainOutput
from stages.outputs.txt_db import TxtDbOutput, find_dbs, max_txt_len
from vlp.data.img_db import ImgDb
from vlp.data.tokenizer import load_tokenizer
from vlp.tasks import gqa
from vlp.tasks.common import TaskDataError, read_task_table
from vlp.tasks.laviter import damsm_heads
from vlp.tasks.registry import TASKS
from vlp.tasks.retrieval import ITM_HEAD, PairScorer, Retrieval
from vlp.tasks.splits import retrieval_split, task_image_sizes, task_split
from vlp.train.device import default_device
from vlp.train.evaluate import BatchBudgetError, evaluate_dataset
from vlp.train.precision import Autocast, mixed_precision
from vlp.train.runtime import RuntimeConfig

SKIP_SETTING = "runtime.skip_missing_images"
ISDA_SECTION = "isda"


@dataclass
class Setup:
    ctx: StageContext
    cfg: EvalConfig
    runtime: RuntimeConfig
    pre: PretrainOutput
    finetuned: FinetuneOutput | None  # None: retrieval's zero-shot model alone (eval.retrieval.finetuned)
    variants: list[dict[str, Any]]
    img_db: ImgDb
    out: EvalOutput
    device: torch.device
    autocast: Autocast


def _head_for(task: str, model, record: dict[str, Any], data: Any, where: str):
    try:
        head = TASKS[task](model.config, **record["options"], **data.head_options)
        head.check_state_extra(record["state_extra"])
    except ValueError as err:
        raise StageError(f"{where}: {' '.join(str(err).split())}") from None
    return head


def eval_task(s: Setup, task: str) -> tuple[Metrics, list[str]]:
    ctx = s.ctx
    options = s.variants[0]["options"]
    # RefCOCO's table is the download stage's: dedup drops the COCO instances of its evaluation images.
    tables = ctx.inputs["download" if task == "refcoco" else "dedup"] / "tables"
    extra: dict[str, Any] = {}
    stores = {"": s.img_db}
    if task == "refcoco":
        extra["image_sizes"] = task_image_sizes(task, tables, ctx.inputs["download"] / "images")
        stores["_gt"] = FeaturesOutput(ctx.inputs["gt_features"]).img_db()
    data = {}
    for split in s.cfg.splits_of(task):
        for suffix, store in stores.items():
            gt = {"gt_img_db": store} if suffix else {}
            data[split, suffix] = task_split(task, tables, s.img_db, s.pre.tokenizer_dir, split, options,
                                             skip=s.runtime.skip_missing_images, setting=SKIP_SETTING,
                                             log=ctx.log, **extra, **gt)
    choices = _gqa_choices(tables, data) if task == "gqa" else {}
    metrics: Metrics = {}
    figure_split = next((split for split, _ in data if split in choices), None) if task == "gqa" else None
    maps: dict[str, list[dict[str, Any]]] = {}
    for variant in s.variants:
        name = variant["name"]
        model = s.finetuned.load_variant(name)
        encoder = model.encoder.to(s.device)
        sections: dict[str, dict[str, float]] = {}
        for (split, suffix), split_data in data.items():
            head = _head_for(task, encoder, model.record, split_data, str(s.finetuned.variant_dir(name)))
            s.finetuned.load_head(head, model, name)
            head.to(s.device)
            values, predictions = evaluate_dataset(encoder, head, split_data, s.cfg.common.batch_units,
                                                   device=s.device, autocast=s.autocast,
                                                   setting="eval.common.batch_units")
            # The ground-truth run's loss would overwrite the detected run's: only its accuracy is kept.
            sections.setdefault(split, {}).update(
                {k: v for k, v in values.items() if not (suffix and k.endswith("_loss"))})
            write_json(s.out.predictions_path(name, f"{split}{suffix}"), predictions)
            if task == "vqa" and not split_data.answered:  # a test split: submit to the evaluation server
                results = [{"question_id": p["question_id"], "answer": p["answer"]} for p in predictions]
                write_json(s.out.vqa_results_path(name, split), results)
            if task == "gqa":  # the official metrics need the whole split; testdev also goes to the server
                values = values | gqa.split_metrics(split_data, predictions, choices.get(split, {}))
                sections[split].update(values)
                if split in GQA_SUBMISSION_SPLITS:
                    write_json(s.out.gqa_submission_path(name, split), gqa.submission(predictions))
            ctx.log.info("eval_%s: %s %s%s: %s", task, name, split, suffix,
                         ", ".join(f"{k}={v:.4f}" for k, v in sorted(values.items())))
        metrics[name] = sections
        if figure_split is not None:  # the question words' attention over the regions, per model
            maps[name] = gqa.attention_maps(encoder, data[figure_split, ""], GQA_FIGURE_QUESTIONS,
                                            load_tokenizer(s.pre.tokenizer_dir), s.device)
    if "_gt" in stores:
        stores["_gt"].close()
    artifacts = []
    if any(maps.values()):
        path = figures.attention_maps({k: v for k, v in maps.items() if v},
                                      s.out.figures_dir / f"attention_gqa_{figure_split}.png",
                                      f"gqa {figure_split}: last-layer question-to-region attention")
        artifacts.append(str(path.relative_to(s.out.root)))
    return metrics, artifacts


# GQA's evaluation-server tiers: their predictions are also written in the server's submission format.
GQA_SUBMISSION_SPLITS = ("testdev", "test", "challenge", "submission")
# Questions with pointers drawn as attention maps (of the first evaluated split with scene graphs).
GQA_FIGURE_QUESTIONS = 4


def _gqa_choices(tables, data: dict[tuple[str, str], Any]) -> dict[str, dict]:
    """Per evaluated GQA split with published scene graphs, its questions' validity / plausibility choices
    (``vlp.eval.gqa``: from the scene graphs of the whole dataset and every question's attribute values);
    none for a split without scene graphs (testdev), as GQA's own evaluation."""
    scene_path = tables / "task_gqa_objects.parquet"
    if not scene_path.exists():
        return {}
    scene_rows = read_task_table(tables, "gqa_objects")[1]
    reference = read_task_table(tables, "gqa")[1]
    with_graphs = {r["split"] for r in scene_rows}
    return {split: gqa.choices_for(split_data, scene_rows, reference)
            for (split, _), split_data in data.items() if split in with_graphs}


def _retrieval_models(s: Setup, dataset: str):
    """(name, encoder, rank head, pretraining objectives) of the zero-shot model and of each finetuned variant
    of ``dataset`` (objectives: the zero-shot model's, else None; only a zero-shot model pretrained with the
    itc task has the itc head). A pretrained model without an ITM head but with DAMSM heads (vta / laviter
    tasks) is still the zero-shot model: its rank head is then None (no ITM scoring, only the LAViTeR
    evaluation)."""
    if s.cfg.retrieval.zero_shot:
        pretrained = s.pre.model()
        head = Retrieval(pretrained.encoder.config)
        try:
            head.init_from_itm(pretrained.objectives.state_dict(), str(s.pre.model_dir / "heads.pt"))
        except ValueError as err:
            if damsm_heads(pretrained.objectives)[0] is None or f"{ITM_HEAD}.weight" in \
                    pretrained.objectives.state_dict():
                raise StageError(str(err)) from None
            head = None
        yield f"{dataset}/zero_shot", pretrained.encoder, head, pretrained.objectives
    for variant in s.variants:
        if variant["dataset"] != dataset:
            continue
        name = variant["name"]
        model = s.finetuned.load_variant(name)
        try:
            head = Retrieval(model.encoder.config, **model.record["state_extra"])
        except (TypeError, ValueError) as err:
            raise StageError(f"{s.finetuned.variant_dir(name)}: not a retrieval checkpoint ({err})") from None
        s.finetuned.load_head(head, model, name)
        yield name, model.encoder, head, None


def _retrieval_datasets(s: Setup) -> dict[str, dict[str, Any]]:
    """Each retrieval dataset evaluated, with its text dbs per split: the finetuned variants' (as they were
    finetuned), or without finetuning those of finetune.retrieval.datasets."""
    if s.finetuned is None:
        return {name: data.model_dump() for name, data in s.ctx.cfg.finetune.retrieval.datasets.items()}
    datasets: dict[str, dict[str, Any]] = {}
    for variant in s.variants:
        datasets.setdefault(variant["dataset"], variant["data"])
    return datasets


def eval_retrieval(s: Setup) -> tuple[Metrics, list[str]]:
    ctx, rcfg = s.ctx, s.cfg.retrieval
    tokenizer = load_tokenizer(s.pre.tokenizer_dir)
    isda_data = isda_inputs(rcfg, ctx.inputs["dedup"], EntityFeaturesOutput(ctx.inputs["entity_features"]),
                            s.img_db)
    sentences = isda_data.sentences
    if not sentences:
        ctx.log.warning("eval_retrieval: no Flickr30k Entities sentence of splits %s has two boxed chains "
                        "and an image in the %s regions' store: no ISDa", list(rcfg.isda_splits),
                        rcfg.isda_regions)
    txt_dbs = [TxtDbOutput(ctx.inputs["txtdb"]), TxtDbOutput(ctx.inputs["karpathy_txtdb"])]
    objects = object_classes(ctx.inputs["download"] / "tables")
    metrics: Metrics = {}
    artifacts: list[str] = []
    for dataset, data_cfg in _retrieval_datasets(s).items():
        for split in s.cfg.splits_of("retrieval"):
            if split not in data_cfg:
                raise StageError(f"eval.splits.retrieval: split {split!r} is not one of the retrieval "
                                 f"dataset {dataset!r}'s dbs ({', '.join(data_cfg)})")
            names = data_cfg[split] if isinstance(data_cfg[split], list) else [data_cfg[split]]
            label = f"{dataset} {split}"
            paths = find_dbs(txt_dbs, names, f"task retrieval split {label}")
            test = retrieval_split(paths, label, s.img_db, skip=s.runtime.skip_missing_images,
                                   setting=SKIP_SETTING, log=ctx.log)
            texts = [test.text(j) for j in range(len(test))]
            curves, maps = {}, {}
            for name, model, head, objectives in _retrieval_models(s, dataset):
                model.to(s.device)
                sections = metrics.setdefault(name, {})
                if objectives is not None and dataset in rcfg.laviter.datasets:
                    head_or_stub = head if head is not None else Retrieval(model.config)
                    scorer = PairScorer(model, head_or_stub, s.img_db, test.index.img_keys, texts,
                                        pad_id=test.pad_id, device=s.device, autocast=s.autocast,
                                        release_every=rcfg.release_every)
                    found, captions = laviter_sections(scorer, objectives, test.index.txt2img, tokenizer,
                                                       rcfg.laviter, objects, s.device)
                    sections |= {f"{split}/{section}": values for section, values in found.items()}
                    if captions:
                        write_json(s.out.predictions_path(name, f"{split}_captions"), captions)
                    for section, values in found.items():
                        ctx.log.info("eval_retrieval: %s %s/%s: %s", name, split, section,
                                     ", ".join(f"{k}={v:.4f}" for k, v in sorted(values.items())))
                if head is None:
                    ctx.log.warning("eval_retrieval: %s has no ITM head: no zero-shot ITM scoring", name)
                    continue
                head.to(s.device)
                itc = objectives["itc"] if objectives is not None and "itc" in objectives else None
                if itc is not None:
                    itc.to(s.device)
                scorer = PairScorer(model, head, s.img_db, test.index.img_keys, texts, pad_id=test.pad_id,
                                    device=s.device, autocast=s.autocast, release_every=rcfg.release_every)
                results = score_modes(scorer, test.index.txt2img, rcfg, itc)
                log_summary(ctx.log, name, results)
                sections |= {f"{split}/{mode}": r.metrics for mode, r in results.items()}
                kind = name.rpartition("/")[2]
                curves[kind] = next(iter(results.values())).curve
                if sentences and ISDA_SECTION not in sections:
                    # Entities sentences are cut as the text db stage cut the texts the model was tuned on.
                    sections[ISDA_SECTION] = isda_of(scorer, isda_data, tokenizer, test.pairs.meta,
                                                     max_txt_len(test.pairs.meta, paths[0]))
                    ctx.log.info("eval_retrieval: %s ISDa %s", name, sections[ISDA_SECTION])
                if rcfg.attention_pairs:
                    maps[kind] = attention_maps(scorer, test.index.txt2img, tokenizer, rcfg.attention_pairs)
            if maps:
                path = s.out.figures_dir / f"attention_{dataset}_{split}.png"
                figures.attention_maps(maps, path, f"{dataset} {split}: last-layer text-to-image attention")
                artifacts.append(str(path.relative_to(s.out.root)))
            path = figures.recall_curves(curves, s.out.figures_dir / f"recall_{dataset}_{split}.png",
                                         f"{dataset} {split}: recall@K ({rcfg.modes[0]} scoring)")
            artifacts.append(str(path.relative_to(s.out.root)))
    if isda_data.img_db is not s.img_db:
        isda_data.img_db.close()
    return metrics, artifacts


def run_task(ctx: StageContext, task: str) -> StageResult:
    cfg: EvalConfig = ctx.cfg.eval
    runtime: RuntimeConfig = ctx.cfg.runtime
    torch.set_num_threads(runtime.threads)
    finetuned, variants = None, []
    source = finetuned_input(task, cfg.retrieval.finetuned)
    if source is not None:
        finetuned = FinetuneOutput(ctx.inputs[source])
        variants = finetuned.variants()
        if not variants:
            raise StageError(f"{finetuned.root}: {source} produced no variant to evaluate")
    out = EvalOutput(ctx.out_dir)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    device = default_device()
    img_db = FeaturesOutput(ctx.inputs["features"]).img_db()
    encoder = ctx.cfg.finetune.encoder
    s = Setup(ctx, cfg, runtime, pretrained_input(ctx.inputs, encoder), finetuned, variants, img_db, out,
              device, mixed_precision(runtime.eval_precision, device, loss_scaling=False))
    try:
        metrics, artifacts = eval_retrieval(s) if task == "retrieval" else eval_task(s, task)
    except (TaskDataError, BatchBudgetError) as err:
        raise StageError(str(err)) from None
    finally:
        img_db.close()
    out.write_metrics(metrics)
    return StageResult(metrics=flatten(metrics), params={"task": task, "splits": cfg.splits_of(task),
                                                         "encoder": encoder_name(s.pre, encoder)},
                       artifacts=[out.metrics_path.name, *artifacts])
