"""Typed stage outputs: the contract between a stage and the stages that read it.

Each producing stage declares its output layout once, in ``stages/outputs/<stage>.py``: a frozen dataclass
around the output dir with one property per path and the loaders a consumer needs. The producer writes
through it, consumers read through it (``FeaturesOutput(ctx.inputs["features"])``), tests build and check
outputs through it. A stage never imports another stage's package; ``stages/base.py`` and this package are the
only shared app code, so a stage's cache key (its import closure) covers the layouts it reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar


@dataclass(frozen=True)
class StageOutput:
    root: Path
    # Paths (relative to root) every complete output holds.
    REQUIRED: ClassVar[tuple[str, ...]] = ()

    def missing(self) -> list[str]:
        """The required paths this output lacks (empty for a complete output)."""
        return [rel for rel in self.REQUIRED if not (self.root / rel).exists()]
