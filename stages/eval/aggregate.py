"""The ``eval`` stage: all tasks' metrics, the summary table and the figures in one place.

It reads the ``eval_<task>`` of every task in ``finetune.tasks`` and writes ``metrics.json`` (all of
them), ``summary.json`` / ``summary.md`` (stages/eval/summary.py) and copies the figures, all logged to
MLflow as artifacts; its metrics are ``<task>/<variant>/<section>/<metric>``.
"""

from __future__ import annotations

import shutil

from stages.base import StageContext, StageResult
from stages.eval.summary import build_seed_summary, build_summary, seeds_to_markdown, to_markdown
from stages.outputs.eval import EvalOutput, SummaryOutput, flatten, write_json


def run(ctx: StageContext) -> StageResult:
    tasks = ctx.cfg.finetune.tasks
    out = SummaryOutput(ctx.out_dir)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    per_seed: dict[int, dict] = {}
    artifacts = list(out.REQUIRED)
    for task in tasks:
        for seed, path in ctx.inputs_by_seed(f"eval_{task}").items():
            source = EvalOutput(path)
            per_seed.setdefault(seed, {})[task] = source.metrics()
            for png in source.figures():
                name = png.name if len(ctx.inputs_by_seed(f"eval_{task}")) == 1 else f"seed{seed}_{png.name}"
                target = out.figures_dir / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(png, target)
                artifacts.append(str(target.relative_to(ctx.out_dir)))
    if len(per_seed) == 1:
        (metrics,) = per_seed.values()
        summary = build_summary(metrics)
        markdown, flat = to_markdown(summary), flatten(metrics)
    else:
        metrics = {str(seed): m for seed, m in per_seed.items()}
        summary = build_seed_summary(per_seed)
        markdown, flat = seeds_to_markdown(summary), flatten(metrics, "seed")
    write_json(out.metrics_path, metrics)
    write_json(out.summary_path, summary)
    out.summary_markdown.write_text(markdown)
    ctx.log.info("eval: summary\n%s", markdown)
    return StageResult(metrics=flat, params={"tasks": list(tasks), "seeds": sorted(per_seed)},
                       artifacts=artifacts)
