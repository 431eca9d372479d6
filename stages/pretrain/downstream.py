"""The ``sweep_downstream`` stage: a study's rows compared after finetuning (``sweep.study.downstream``).

The planner runs, for every trial of the study (or every row's best seed), the ``eval_<task>`` stages of the
downstream tasks with everything they need under ``finetune.encoder=sweep:<trial>``: each trial's encoder is
finetuned and evaluated like the pipeline's own, cached per trial (``downstream.finetune: false``: its
zero-shot model is evaluated by eval_retrieval alone). A finetuning study (``pretraining:
false``: IAIS's variants) has no pretraining trials: its trials are its rows' finetune settings under each
finetuning seed, from the pipeline's encoder. This stage reads their metrics, sums the study's Meta-Sum
metrics (x 100, UNITER's units), and writes the comparison as the sweep does for validation metrics: per row
mean, sample sd, min-max and n, the delta to the baseline row, the paper's delta (a row's
``paper: {meta_sum: ...}``), and a chart.
"""

from __future__ import annotations

import json
from typing import Any

from stages.base import StageContext, StageError, StageResult
from stages.outputs.eval import EvalOutput, flatten
from stages.outputs.sweep import COMPLETED, DownstreamOutput, SweepOutput
from stages.pretrain.sweep import comparison, comparison_figure, table_csv, table_markdown
from stages.pretrain.sweep_config import Study, trial_name

META_SUM = "meta_sum"


def trial_metrics(ctx: StageContext, study: Study, selector: str) -> dict[str, float]:
    """The Meta-Sum and report metrics of one trial's evaluations, and meta_sum; StageError naming a missing
    Meta-Sum metric. A report metric may be missing (LAViTeR's captioning, only of rows with a captioner)."""
    down = study.downstream
    found: dict[str, float] = {}
    for task in down.tasks:
        source = EvalOutput(ctx.inputs[f"eval_{task}@{selector}"])
        metrics = {f"{task}/{name}": value for name, value in flatten(source.metrics()).items()}
        for name in down.report:
            if name in metrics:
                found[name] = metrics[name]
        for name in down.meta_sum:
            if name.partition("/")[0] != task:
                continue
            if name not in metrics:
                raise StageError(f"{source.metrics_path}: no metric {name.partition('/')[2]!r} for "
                                 f"sweep.study.downstream.meta_sum entry {name!r}")
            found[name] = metrics[name]
    return {**found, META_SUM: 100.0 * sum(found[name] for name in down.meta_sum)}


def compared_trials(ctx: StageContext, study: Study) -> dict[str, dict[str, Any]]:
    """Per downstream selector, the trial it stands for (trial, row, seed): a pretraining study's from its
    study.json (a row: its best seed), a finetuning study's from its rows and finetuning seeds."""
    if not study.pretraining:
        return {trial_name(r.name, s): {"trial": trial_name(r.name, s), "row": r.name, "seed": s}
                for r in study.rows for s in study.seeds}
    sweep = SweepOutput(ctx.inputs["sweep"])
    ran = {t["trial"]: t for t in sweep.record()["trials"]}
    return {selector: {k: ran[sweep.trial_of(selector)][k] for k in ("trial", "row", "seed")}
            for selector in study.downstream_trials()}


def run(ctx: StageContext) -> StageResult:
    study: Study = ctx.cfg.sweep.study
    out = DownstreamOutput(ctx.out_dir)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    trials = [{**trial, "status": COMPLETED, "metrics": trial_metrics(ctx, study, selector)}
              for selector, trial in compared_trials(ctx, study).items()]
    unreported = [name for name in study.downstream.report if not any(name in t["metrics"] for t in trials)]
    if unreported:
        raise StageError(f"sweep.study.downstream.report: no trial's evaluation wrote {unreported}")
    compared = study.model_copy(update={"metric": META_SUM, "table_metrics": [*study.downstream.meta_sum,
                                                                              *study.downstream.report]})
    table = comparison(compared, trials)
    out.trials_path.write_text(json.dumps({"tasks": study.downstream.tasks, "trials": trials}, indent=1)
                               + "\n")
    (out.root / "comparison.csv").write_text(table_csv(compared, table))
    how = "after finetuning each trial's encoder" if study.downstream.finetune else \
        "each trial's zero-shot model, not finetuned"
    what = f"Downstream, {how} ({META_SUM}: 100 x the sum of its metrics)"
    (out.root / "comparison.md").write_text(table_markdown(compared, table, None, what))
    comparison_figure(compared, trials, out.figure_path)
    ctx.log.info("sweep_downstream: comparison\n%s", (out.root / "comparison.md").read_text())
    metrics = {f"{r['row']}/{k}": float(v) for r in table for k, v in r.items()
               if "/" in k and isinstance(v, float)}
    return StageResult(metrics=metrics, params={"study": study.name, "trials": [t["trial"] for t in trials],
                                                "tasks": list(study.downstream.tasks)},
                       artifacts=list(out.REQUIRED))
