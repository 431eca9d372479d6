"""Which pretraining task each optimizer step runs, drawn by mix ratios, agreed by every worker for free.

UNITER draws with ``random.choice`` on rank 0 and broadcasts the choice every step. Here the draw for
step ``s`` is a keyed hash of (seed, s) mapped onto the cumulative ratios: a pure function, so every
worker computes the same task without communication, and the only state to checkpoint is the step.
blake2b rather than a NumPy generator because its output can never change between library versions.
"""

from __future__ import annotations

import hashlib
import math
import struct
from bisect import bisect_right
from collections.abc import Mapping
from typing import Any


class TaskSampler:
    """``task(step)`` for any step; ``next()`` walks the steps from ``self.step`` (resumable).

    With gradient accumulation, call it once per optimizer step and run every micro-batch of that step
    on the returned task. Tasks are ordered by name, so the mapping's order in a config does not matter.
    """

    def __init__(self, ratios: Mapping[str, float], seed: int = 0):
        bad = {k: v for k, v in ratios.items()
               if not isinstance(k, str) or not k or not isinstance(v, int | float) or isinstance(v, bool)
               or not math.isfinite(v) or v < 0}
        if bad:
            raise ValueError(f"task mix ratios must be finite numbers >= 0 keyed by task name; bad: {bad}")
        weights = {k: float(v) for k, v in sorted(ratios.items()) if v > 0}
        if not weights:
            raise ValueError(f"task mix ratios {dict(ratios)} select no task (all zero or empty)")
        self.tasks: tuple[str, ...] = tuple(weights)
        total = sum(weights.values())
        self.probabilities: dict[str, float] = {k: w / total for k, w in weights.items()}
        cumulative, acc = [], 0.0
        for w in weights.values():
            acc += w
            cumulative.append(acc / total)
        self._upper = cumulative[:-1]  # the last task takes everything above the second-to-last bound
        self.seed = int(seed)
        self.step = 0

    def _uniform(self, step: int) -> float:
        digest = hashlib.blake2b(struct.pack("<qq", self.seed, step), digest_size=8).digest()
        return (int.from_bytes(digest, "little") >> 11) * 2.0**-53  # 53 random bits -> [0, 1)

    def task(self, step: int) -> str:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self.tasks[bisect_right(self._upper, self._uniform(step))]

    def next(self) -> str:
        name = self.task(self.step)
        self.step += 1
        return name

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(f"task sampler state has seed {state.get('seed')!r}, this run {self.seed}: "
                             "the task sequence would not continue")
        self.step = int(state["step"])
