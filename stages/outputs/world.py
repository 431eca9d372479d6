"""The world stage's output: the miniature internet as the mirror serves it, and what was planted in it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from stages.outputs import StageOutput


@dataclass(frozen=True)
class WorldOutput(StageOutput):
    REQUIRED: ClassVar[tuple[str, ...]] = ("www", "faults.json", "truth.json", "scenes.jsonl")

    @property
    def www(self) -> Path:
        """The mirror's root: every published file at ``<host>/<path>`` of its URL."""
        return self.root / "www"

    @property
    def faults_file(self) -> Path:
        """The mirror's fault plan."""
        return self.root / "faults.json"

    @property
    def truth_file(self) -> Path:
        return self.root / "truth.json"

    @property
    def scenes_file(self) -> Path:
        """JSON Lines, one scene per published image URL."""
        return self.root / "scenes.jsonl"

    def truth(self) -> dict[str, Any]:
        """Image counts, expected download failures and retries, the overlaps dedup must remove."""
        return json.loads(self.truth_file.read_text())

    def faults(self) -> dict[str, Any]:
        return json.loads(self.faults_file.read_text())

    def scenes(self) -> Iterator[dict[str, Any]]:
        """Per published image: dataset, key, url, split, size and objects (shape, colour, ..., box)."""
        with self.scenes_file.open() as f:
            for line in f:
                yield json.loads(line)
