"""Outputs of the ``sweep`` stage (a study of pretraining loss sets, one Ray Tune trial per row and seed) and
of the ``sweep_downstream`` stage (its rows compared after finetuning). The sweep's:

::

    study.json        the study as run, and every trial: row, seed, status (completed, stopped by ASHA,
                      failed), the step it reached, its last reported metrics, its MLflow run
    comparison.csv    per row: trials completed, and per table metric mean, sample sd, min, max, the delta of
    comparison.md     the mean to the baseline row's and the paper's delta beside it
    best.json         the best row (by the mean of the study metric) and its best trial; the registered model
    figures/comparison.png   the study metric per row: mean with sd, every completed trial as a dot
    trials/<row>-s<seed>/    each trial's pretraining output (the pretrain stage's layout: model/, tokenizer/,
                      metrics.json, ray_train/)
    tune/             Ray Tune's experiment directory
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from stages.base import StageError
from stages.outputs import StageOutput
from stages.outputs.pretrain import PretrainOutput

COMPLETED = "completed"  # a trial's status in study.json once it checkpointed its last step


@dataclass(frozen=True)
class SweepOutput(StageOutput):
    REQUIRED: ClassVar[tuple[str, ...]] = ("study.json", "comparison.csv", "comparison.md", "best.json",
                                           "figures/comparison.png")

    @property
    def study_path(self) -> Path:
        return self.root / "study.json"

    @property
    def best_path(self) -> Path:
        return self.root / "best.json"

    @property
    def figure_path(self) -> Path:
        return self.root / "figures" / "comparison.png"

    @property
    def tune_dir(self) -> Path:
        return self.root / "tune"

    def trial(self, name: str) -> PretrainOutput:
        return PretrainOutput(self.root / "trials" / name)

    def best(self) -> dict[str, Any]:
        return json.loads(self.best_path.read_text())

    def best_trial(self) -> PretrainOutput:
        """The pretraining output of the study's best trial."""
        return self.trial(self.best()["trial"])

    def record(self) -> dict[str, Any]:
        """study.json: the study as run and every trial (row, seed, status, step, metrics)."""
        return json.loads(self.study_path.read_text())

    def trial_of(self, selector: str | None) -> str:
        """The completed trial a selector names: None, the study's best (best.json); ``<row>-s<seed>``, that
        trial; ``<row>``, the row's completed seed with the best study metric. StageError otherwise."""
        if selector is None:
            return self.best()["trial"]
        record = self.record()
        study, trials = record["study"], record["trials"]
        named = [t for t in trials if t["trial"] == selector]
        if named and named[0]["status"] == COMPLETED:
            return selector
        done = [t for t in trials if t["row"] == selector and t["status"] == COMPLETED
                and study["metric"] in t["metrics"]]
        if done:
            pick = max if study["mode"] == "max" else min
            return pick(done, key=lambda t: t["metrics"][study["metric"]])["trial"]
        what = f"trial {selector!r} is {named[0]['status']}" if named else \
            f"no trial or row {selector!r} has a completed trial"
        raise StageError(f"{self.study_path}: {what} (trials: {', '.join(t['trial'] for t in trials)})")


@dataclass(frozen=True)
class DownstreamOutput(StageOutput):
    """Output of the ``sweep_downstream`` stage: the study's rows compared after finetuning.

    ::

        downstream.json   every trial compared: trial, row, seed, the eval metrics of the study's Meta-Sum
                          and meta_sum (100 x their sum)
        comparison.csv    per row: trials, mean / sd / min / max of meta_sum and of each of its metrics, the
        comparison.md     delta of the mean to the baseline row's, and the paper's delta beside it
        figures/comparison.png   meta_sum per row: mean with sd, every trial as a dot
    """

    REQUIRED: ClassVar[tuple[str, ...]] = ("downstream.json", "comparison.csv", "comparison.md",
                                           "figures/comparison.png")

    @property
    def trials_path(self) -> Path:
        return self.root / "downstream.json"

    @property
    def figure_path(self) -> Path:
        return self.root / "figures" / "comparison.png"
