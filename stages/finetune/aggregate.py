"""The ``finetune`` stage: the index of every configured task's finetune output.

It depends on the ``finetune_<task>`` of every task in ``finetune.tasks`` and writes ``finetune.json``:
each task's output dir and variants. Its metrics are each variant's last validation of the task's main
metric, ``<task>/<variant>/val/<metric>``.
"""

from __future__ import annotations

import json

from stages.base import StageContext, StageResult
from stages.outputs.finetune import FinetuneIndexOutput, FinetuneOutput


def run(ctx: StageContext) -> StageResult:
    tasks = ctx.cfg.finetune.tasks
    outputs = {task: FinetuneOutput(ctx.inputs[f"finetune_{task}"]) for task in tasks}
    index = {task: {"dir": str(out.root), "variants": out.variants()} for task, out in outputs.items()}
    out = FinetuneIndexOutput(ctx.out_dir)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    out.index_path.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    metrics = {f"{task}/{v['name']}/val/{v['metric']}": float(v["val"][v["metric"]])
               for task, entry in index.items() for v in entry["variants"] if v["metric"] in v["val"]}
    return StageResult(metrics=metrics, params={"tasks": list(tasks)}, artifacts=list(out.REQUIRED))
