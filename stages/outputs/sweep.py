"""Output of the ``sweep`` stage: a study of pretraining loss sets, one Ray Tune trial per row and seed.

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

from stages.outputs import StageOutput
from stages.outputs.pretrain import PretrainOutput


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
