"""The ``sweep_downstream`` stage: a study's rows compared after finetuning (``sweep.study.downstream``).

The planner runs, for every trial of the study (or every row's best seed), the ``eval_<task>`` stages of the
downstream tasks with everything they need under ``finetune.encoder=sweep:<trial>``: each trial's encoder is
finetuned and evaluated like the pipeline's own, cached per trial. This stage reads their metrics, sums the
study's Meta-Sum metrics (x 100, UNITER's units), and writes the comparison as the sweep does for validation
metrics: per row mean, sample sd, min-max and n, the delta to the baseline row, the paper's delta (a row's
``paper: {meta_sum: ...}``), and a chart.
"""

from __future__ import annotations

import json

from stages.base import StageContext, StageError, StageResult
from stages.outputs.eval import EvalOutput, flatten
from stages.outputs.sweep import COMPLETED, DownstreamOutput, SweepOutput
from stages.pretrain.sweep import comparison, comparison_figure, table_csv, table_markdown
from stages.pretrain.sweep_config import Study

META_SUM = "meta_sum"


def trial_metrics(ctx: StageContext, study: Study, selector: str) -> dict[str, float]:
    """The Meta-Sum metrics of one trial's evaluations, and meta_sum; StageError naming a missing one."""
    found: dict[str, float] = {}
    for task in study.downstream.tasks:
        source = EvalOutput(ctx.inputs[f"eval_{task}@{selector}"])
        metrics = {f"{task}/{name}": value for name, value in flatten(source.metrics()).items()}
        for name in study.downstream.meta_sum:
            if name.partition("/")[0] != task:
                continue
            if name not in metrics:
                raise StageError(f"{source.metrics_path}: no metric {name.partition('/')[2]!r} for "
                                 f"sweep.study.downstream.meta_sum entry {name!r}")
            found[name] = metrics[name]
    return {**found, META_SUM: 100.0 * sum(found.values())}


def run(ctx: StageContext) -> StageResult:
    study: Study = ctx.cfg.sweep.study
    sweep = SweepOutput(ctx.inputs["sweep"])
    out = DownstreamOutput(ctx.out_dir)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    ran = {t["trial"]: t for t in sweep.record()["trials"]}
    trials = []
    for selector in study.downstream_trials():
        trial = ran[sweep.trial_of(selector)]
        trials.append({"trial": trial["trial"], "row": trial["row"], "seed": trial["seed"],
                       "status": COMPLETED, "metrics": trial_metrics(ctx, study, selector)})
    compared = study.model_copy(update={"metric": META_SUM, "table_metrics": list(study.downstream.meta_sum)})
    table = comparison(compared, trials)
    out.trials_path.write_text(json.dumps({"tasks": study.downstream.tasks, "trials": trials}, indent=1)
                               + "\n")
    (out.root / "comparison.csv").write_text(table_csv(compared, table))
    what = f"Downstream, after finetuning each trial's encoder ({META_SUM}: 100 x the sum of the others)"
    (out.root / "comparison.md").write_text(table_markdown(compared, table, None, what))
    comparison_figure(compared, trials, out.figure_path)
    ctx.log.info("sweep_downstream: comparison\n%s", (out.root / "comparison.md").read_text())
    metrics = {f"{r['row']}/{k}": float(v) for r in table for k, v in r.items()
               if "/" in k and isinstance(v, float)}
    return StageResult(metrics=metrics, params={"study": study.name, "trials": [t["trial"] for t in trials],
                                                "tasks": list(study.downstream.tasks)},
                       artifacts=list(out.REQUIRED))
