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
    per_seed: dict[int, dict] = {}
    for task in tasks:
        for seed, path in ctx.inputs_by_seed(f"finetune_{task}").items():
            variants = FinetuneOutput(path).variants()
            per_seed.setdefault(seed, {})[task] = {"dir": str(path), "variants": variants}
    out = FinetuneIndexOutput(ctx.out_dir)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    # One seed: {task: entry}; several: {seed: {task: entry}}.
    index = next(iter(per_seed.values())) if len(per_seed) == 1 else per_seed
    out.index_path.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    prefix = (lambda seed: "") if len(per_seed) == 1 else (lambda seed: f"seed{seed}/")
    metrics = {f"{prefix(seed)}{task}/{v['name']}/val/{v['metric']}": float(v["val"][v["metric"]])
               for seed, entries in per_seed.items() for task, entry in entries.items()
               for v in entry["variants"] if v["metric"] in v["val"]}
    return StageResult(metrics=metrics, params={"tasks": list(tasks), "seeds": sorted(per_seed)},
                       artifacts=list(out.REQUIRED))
