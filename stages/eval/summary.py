"""The one summary table of the eval stage: every task's main metrics per model, JSON and Markdown.

Input: ``{task: {variant: {section: {metric: value}}}}`` as the ``eval_<task>`` stages write it, where a
variant is ``pretrained`` / ``scratch`` (retrieval: ``<dataset>/zero_shot``, ``<dataset>/pretrained``,
``<dataset>/scratch``, ``<dataset>/pretrained_no_iais``) and a section is a split (retrieval:
``<split>/<mode>`` and ``isda``).
"""

from __future__ import annotations

import math
from typing import Any

MAIN_METRICS = {
    # LAViTeR's (the zero-shot model with DAMSM heads, sections <split>/laviter and <split>/captioning).
    "retrieval": ("meta_sum", "ir_r1", "tr_r1", "r_precision", "aimcos", "bleu4", "cider"),
    "vqa": ("vqa_score",),
    "nlvr2": ("nlvr2_acc",),
    "snli_ve": ("snli_ve_acc",),
    "refcoco": ("refcoco_acc", "refcoco_gt_acc"),
    # GQA's official metrics (distribution, lower is better and not a fraction, stays in metrics.json)
    "gqa": ("gqa_accuracy", "gqa_consistency", "gqa_binary", "gqa_open", "gqa_validity", "gqa_plausibility"),
}
COLUMNS = ("zero_shot", "pretrained", "scratch", "pretrained_no_iais")
HEADERS = {"zero_shot": "zero-shot", "pretrained": "pretrained", "scratch": "scratch",
           "pretrained_no_iais": "pretrained, no IAIS"}
ISDA = "isda"


def _split_variant(name: str) -> tuple[str | None, str]:
    dataset, _, kind = name.rpartition("/")
    return dataset or None, kind


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def build_summary(metrics: dict[str, dict[str, dict[str, dict[str, float]]]]) -> dict[str, Any]:
    rows, isda_rows, cost_rows = [], [], []
    for task, variants in metrics.items():
        by_dataset: dict[str | None, dict[str, dict[str, dict[str, float]]]] = {}
        for name, sections in variants.items():
            dataset, kind = _split_variant(name)
            by_dataset.setdefault(dataset, {})[kind] = sections
        for dataset, kinds in by_dataset.items():
            label = f"{task} ({dataset})" if dataset else task
            sections = sorted({s for k in kinds.values() for s in k if s != ISDA})
            for section in sections:
                for metric in MAIN_METRICS.get(task, ()):
                    values = {kind: _finite(kinds[kind].get(section, {}).get(metric)) for kind in kinds}
                    if all(v is None for v in values.values()):
                        continue
                    pre, scratch = values.get("pretrained"), values.get("scratch")
                    rows.append({"task": label, "split": section, "metric": metric, "values": values,
                                 "pretrained_beats_scratch": None if pre is None or scratch is None
                                 else pre > scratch})
                    if task == "retrieval" and metric == "meta_sum":
                        for kind, sec in kinds.items():
                            if "seconds" in sec.get(section, {}):  # a scoring mode (not DAMSM's recall)
                                cost_rows.append({"dataset": dataset, "model": kind, "split": section,
                                                  "seconds": sec[section].get("seconds"),
                                                  "pairs_scored": sec[section].get("pairs_scored"),
                                                  "ir_r1": sec[section].get("ir_r1"),
                                                  "tr_r1": sec[section].get("tr_r1")})
            isda = {kind: _finite(sec[ISDA].get("isda")) for kind, sec in kinds.items() if ISDA in sec}
            if isda:
                on, off = isda.get("pretrained"), isda.get("pretrained_no_iais")
                pairs = next(sec[ISDA].get("isda_pairs") for sec in kinds.values() if ISDA in sec)
                isda_rows.append({"task": label, "values": isda, "pairs": pairs,
                                  "iais_lowers_isda": None if on is None or off is None else on < off})
    return {"tasks": rows, "isda": isda_rows, "retrieval_cost": cost_rows}


def _cell(value: float | None, scale: float = 100.0, spec: str = ".1f") -> str:
    return "–" if value is None else format(value * scale, spec)


def _mark(flag: bool | None) -> str:
    # A row where pretraining does not beat scratch is marked: it says the run did not learn what it should.
    return "–" if flag is None else ("yes" if flag else "**no**")


def _task_table(rows: list[dict[str, Any]], cell, mark) -> list[str]:
    used = [c for c in COLUMNS if any(c in r["values"] for r in rows)]
    lines = [f"| task | split | metric | {' | '.join(HEADERS[c] for c in used)} | pretrained > scratch |",
             "|" + "---|" * (4 + len(used))]
    for row in rows:
        cells = [cell(row["values"].get(c)) for c in used]
        lines.append(f"| {row['task']} | {row['split']} | {row['metric']} | " + " | ".join(cells)
                     + f" | {mark(row['pretrained_beats_scratch'])} |")
    return lines


def _isda_table(rows: list[dict[str, Any]], title: str, cell, mark, pairs: bool) -> list[str]:
    if not rows:
        return []
    used = [c for c in COLUMNS if any(c in r["values"] for r in rows)]
    lines = ["", title, "", "| task | " + ("pairs | " if pairs else "")
             + " | ".join(HEADERS[c] for c in used) + " | IAIS lowers ISDa |",
             "|" + "---|" * (2 + pairs + len(used))]
    for row in rows:
        cells = ([f"{row['pairs']:.0f}"] if pairs else []) + [cell(row["values"].get(c)) for c in used]
        lines.append(f"| {row['task']} | " + " | ".join(cells) + f" | {mark(row['iais_lowers_isda'])} |")
    return lines


def to_markdown(summary: dict[str, Any]) -> str:
    lines = ["# Evaluation summary", "",
             "Main metrics in % (Meta-Sum: the sum of IR and TR R@1/5/10 in %). Retrieval splits are "
             "`<split>/<scoring mode>`; a zero-shot model with DAMSM heads (LAViTeR) adds `<split>/damsm` "
             "(recall by DAMSM cosines), `<split>/laviter` (R-precision, AIMCoS x 100) and "
             "`<split>/captioning` (BLEU-4, CIDEr x 100).", ""]
    lines += _task_table(summary["tasks"], _cell, _mark)
    lines += _isda_table(summary["isda"], "## ISDa (last-layer intra-modal attention vs Flickr30k Entities; "
                         "lower is better)", lambda v: _cell(v, 1.0, ".4g"), _mark, pairs=True)
    if summary["retrieval_cost"]:
        lines += ["", "## Retrieval scoring cost", "",
                  "| dataset | model | split/mode | seconds | pairs scored | IR R@1 | TR R@1 |",
                  "|---|---|---|---|---|---|---|"]
        for row in summary["retrieval_cost"]:
            lines.append(f"| {row['dataset']} | {HEADERS.get(row['model'], row['model'])} | {row['split']} | "
                         f"{row['seconds']:.2f} | {row['pairs_scored']:.0f} | {_cell(row['ir_r1'])} | "
                         f"{_cell(row['tr_r1'])} |")
    return "\n".join(lines) + "\n"


def _spread(values: dict[int, float]) -> dict[str, Any]:
    """mean, sample standard deviation, min, max and the per-seed values of one metric."""
    xs = list(values.values())
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(xs), "max": max(xs), "per_seed": values}


def _gather(per_seed: dict[int, dict[str, Any]], section: str, key_fields: tuple[str, ...], flag: str):
    by_key: dict[tuple, dict[int, dict[str, Any]]] = {}
    for seed, summary in per_seed.items():
        for row in summary[section]:
            by_key.setdefault(tuple(row[f] for f in key_fields), {})[seed] = row
    rows = []
    for key, rows_by_seed in by_key.items():
        models = dict.fromkeys(m for row in rows_by_seed.values() for m in row["values"])
        values = {}
        for model in models:
            found = {seed: row["values"][model] for seed, row in rows_by_seed.items()
                     if row["values"].get(model) is not None}
            if found:
                values[model] = _spread(found)
        flags = {seed: row[flag] for seed, row in rows_by_seed.items() if row[flag] is not None}
        rows.append({**dict(zip(key_fields, key, strict=True)), "values": values,
                     "seeds": sorted(rows_by_seed),
                     flag: {"holds": sum(flags.values()), "of": len(flags),
                            "failing_seeds": sorted(s for s, ok in flags.items() if not ok)}})
    return rows


def build_seed_summary(per_seed: dict[int, dict[str, dict]]) -> dict[str, Any]:
    """The summary of several seeds' runs (``{seed: {task: metrics}}``): each row of every seed's summary
    with, per model, the mean, spread (sample std) and min-max over the seeds and each seed's value; how
    many seeds meet the row's flag (pretrained > scratch; IAIS lowers ISDa) and which do not."""
    summaries = {seed: build_summary(metrics) for seed, metrics in sorted(per_seed.items())}
    return {"seeds": sorted(summaries),
            "tasks": _gather(summaries, "tasks", ("task", "split", "metric"), "pretrained_beats_scratch"),
            "isda": _gather(summaries, "isda", ("task",), "iais_lowers_isda"),
            "per_seed": summaries}


def _spread_cell(value: dict[str, Any] | None, scale: float = 100.0, spec: str = ".1f") -> str:
    if value is None:
        return "–"
    fmt = lambda x: format(x * scale, spec)  # noqa: E731
    return f"{fmt(value['mean'])} ± {fmt(value['std'])} ({fmt(value['min'])}–{fmt(value['max'])})"


def _seed_mark(flag: dict[str, Any]) -> str:
    if not flag["of"]:
        return "–"
    text = f"{flag['holds']}/{flag['of']}"
    if flag["failing_seeds"]:
        return f"**{text}** (not seed {', '.join(map(str, flag['failing_seeds']))})"
    return text


def seeds_to_markdown(summary: dict[str, Any]) -> str:
    seeds = ", ".join(map(str, summary["seeds"]))
    lines = ["# Evaluation summary over seeds " + seeds, "",
             "Main metrics in %: mean ± sample standard deviation (min–max) over the seeds. The last "
             "column counts the seeds in which pretrained beats scratch.", ""]
    lines += _task_table(summary["tasks"], _spread_cell, _seed_mark)
    lines += _isda_table(summary["isda"], "## ISDa over seeds (lower is better)",
                         lambda v: _spread_cell(v, 1.0, ".4f"), _seed_mark, pairs=False)
    for seed, one in summary["per_seed"].items():
        body = to_markdown(one).split("\n", 1)[1]
        lines += ["", f"## Seed {seed}", body.rstrip()]
    return "\n".join(lines) + "\n"
