"""Output of an ``eval_<task>`` stage, which the ``eval`` aggregate reads.

::

    metrics.json                          {variant: {section: {metric: value}}}; a section is a split
                                          (retrieval: ``<split>/<mode>`` and ``isda``)
    <variant>/<split>_predictions.json    the predictions of each example
    <variant>/vqa_OpenEnded_mscoco_<split>_<variant>_results.json
                                          VQA test splits (no answers): the evaluation server's results
                                          file, ``[{"question_id": int, "answer": str}]``
    <variant>/gqa_<split>_submission.json GQA server tiers (testdev, test, challenge, submission): the
                                          server's file, ``[{"questionId": str, "prediction": str}]``
    figures/*.png                         retrieval: recall@K curves and text-to-image attention maps
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from stages.base import StageError
from stages.outputs import StageOutput

Metrics = dict[str, dict[str, dict[str, float]]]


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")


@dataclass(frozen=True)
class EvalOutput(StageOutput):
    REQUIRED: ClassVar[tuple[str, ...]] = ("metrics.json",)

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.json"

    @property
    def figures_dir(self) -> Path:
        return self.root / "figures"

    def predictions_path(self, variant: str, split: str) -> Path:
        return self.root / variant / f"{split}_predictions.json"

    def vqa_results_path(self, variant: str, split: str) -> Path:
        """The VQA server's file name, ``vqa_[task type]_[dataset]_[subset]_[method]_results.json``."""
        return self.root / variant / f"vqa_OpenEnded_mscoco_{split}_{variant.replace('/', '-')}_results.json"

    def gqa_submission_path(self, variant: str, split: str) -> Path:
        """GQA's submission file of a split (the server's format; the name is ours, the server takes any)."""
        return self.root / variant / f"gqa_{split}_submission.json"

    def write_metrics(self, metrics: Metrics) -> None:
        write_json(self.metrics_path, metrics)

    def metrics(self) -> Metrics:
        try:
            return json.loads(self.metrics_path.read_text())
        except (OSError, ValueError) as err:
            raise StageError(f"{self.metrics_path}: cannot read the evaluation metrics ({err})") from None

    def figures(self) -> list[Path]:
        return sorted(self.figures_dir.glob("*.png"))


@dataclass(frozen=True)
class SummaryOutput(EvalOutput):
    """The ``eval`` aggregate: every task's metrics (``{task: <an eval_<task> metrics.json>}``), the summary
    table (stages/eval/summary.py) as JSON and Markdown, and every task's figures."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("metrics.json", "summary.json", "summary.md")

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.json"

    @property
    def summary_markdown(self) -> Path:
        return self.root / "summary.md"

    def summary(self) -> dict[str, Any]:
        return json.loads(self.summary_path.read_text())


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``a/b/c -> value`` for every finite number of a nested dict: the MLflow names of evaluation metrics."""
    out = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten(value, f"{name}/")
        elif isinstance(value, int | float) and value == value and abs(value) != float("inf"):
            out[name] = float(value)
    return out
