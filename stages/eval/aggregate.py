"""The ``eval`` stage: all tasks' metrics, the summary table and the figures in one place.

It reads the ``eval_<task>`` of every task in ``finetune.tasks`` and writes ``metrics.json`` (all of
them), ``summary.json`` / ``summary.md`` (stages/eval/summary.py) and copies the figures, all logged to
MLflow as artifacts; its metrics are ``<task>/<variant>/<section>/<metric>``.
"""

from __future__ import annotations

import shutil

from stages.base import StageContext, StageResult
from stages.eval.summary import build_summary, to_markdown
from stages.outputs.eval import EvalOutput, SummaryOutput, flatten, write_json


def run(ctx: StageContext) -> StageResult:
    tasks = ctx.cfg.finetune.tasks
    out = SummaryOutput(ctx.out_dir)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    metrics, artifacts = {}, list(out.REQUIRED)
    for task in tasks:
        source = EvalOutput(ctx.inputs[f"eval_{task}"])
        metrics[task] = source.metrics()
        for png in source.figures():
            target = out.figures_dir / png.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, target)
            artifacts.append(str(target.relative_to(ctx.out_dir)))
    summary = build_summary(metrics)
    write_json(out.metrics_path, metrics)
    write_json(out.summary_path, summary)
    out.summary_markdown.write_text(to_markdown(summary))
    ctx.log.info("eval: summary\n%s", to_markdown(summary))
    return StageResult(metrics=flatten(metrics), params={"tasks": list(tasks)}, artifacts=artifacts)
