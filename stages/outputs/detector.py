"""The detector stage's output: the weights it trained and how well they detect.

::

    detector.pt     weights with the architecture config and the class / attribute vocabularies inside
    classes.json    the vocabularies, readable without torch
    metrics.json    held-out recall@IoU0.5, class and attribute accuracy, training time
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from stages.outputs import StageOutput


@dataclass(frozen=True)
class DetectorOutput(StageOutput):
    REQUIRED: ClassVar[tuple[str, ...]] = ("detector.pt", "classes.json", "metrics.json")

    @property
    def weights(self) -> Path:
        return self.root / "detector.pt"

    @property
    def classes_path(self) -> Path:
        return self.root / "classes.json"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.json"
